package unpack

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// mem is one member of a test archive.
type mem struct {
	typ  byte
	name string
	link string // symlink or hard-link target
	data string
}

func sym(name, target string) mem  { return mem{typ: tar.TypeSymlink, name: name, link: target} }
func hard(name, target string) mem { return mem{typ: tar.TypeLink, name: name, link: target} }
func file(name, data string) mem   { return mem{typ: tar.TypeReg, name: name, data: data} }
func dir(name string) mem          { return mem{typ: tar.TypeDir, name: name} }

// archive writes ms as a tar archive.
func archive(t testing.TB, ms ...mem) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, m := range ms {
		h := &tar.Header{Typeflag: m.typ, Name: m.name, Linkname: m.link, Mode: 0o644, Size: int64(len(m.data))}
		if m.typ == tar.TypeDir {
			h.Mode = 0o755
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(m.data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// The outcomes of resolveOnDisk.
const (
	inside = iota
	outside
	tooDeep // more links than the kernel would follow: it resolves nothing
)

// resolveOnDisk resolves rel (a slash path under root) on the real
// filesystem, as the kernel would but without trusting it to stop at root:
// one component at a time, with Lstat, restarting on each symlink's target
// from the symlink's directory. A name that does not exist (or sits under
// a regular file) is taken lexically, since the kernel would resolve
// nothing through it. It knows nothing of the extractor's model, so it can
// check it.
func resolveOnDisk(root, rel string) (string, int, error) {
	var at []string
	todo := strings.Split(rel, "/")
	hops := 0
	for len(todo) > 0 {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(at) == 0 {
				return "", outside, nil
			}
			at = at[:len(at)-1]
			continue
		}
		next := append(slices.Clip(at), c)
		full := filepath.Join(root, filepath.FromSlash(path.Join(next...)))
		fi, err := os.Lstat(full)
		if errors.Is(err, fs.ErrNotExist) || (err != nil && strings.Contains(err.Error(), "not a directory")) {
			at = next
			continue
		}
		if err != nil {
			return "", inside, err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			at = next
			continue
		}
		if hops++; hops > 255 {
			return "", tooDeep, nil
		}
		target, err := os.Readlink(full)
		if err != nil {
			return "", inside, err
		}
		if path.IsAbs(target) || filepath.IsAbs(target) {
			return "", outside, nil
		}
		todo = append(strings.Split(target, "/"), todo...)
	}
	if len(at) == 0 {
		return ".", inside, nil
	}
	return path.Join(at...), inside, nil
}

// reversed returns ms with its symlinks in the opposite order, the other
// members staying where they are, so that the same links are made in the
// other order.
func reversed(ms []mem) []mem {
	out := slices.Clone(ms)
	var at []int
	for i, m := range out {
		if m.typ == tar.TypeSymlink {
			at = append(at, i)
		}
	}
	for i, j := 0, len(at)-1; i < j; i, j = i+1, j-1 {
		out[at[i]], out[at[j]] = out[at[j]], out[at[i]]
	}
	return out
}

func chain(n int, last string) []mem {
	var ms []mem
	for i := range n - 1 {
		ms = append(ms, sym(fmt.Sprintf("l%d", i), fmt.Sprintf("l%d", i+1)))
	}
	return append(ms, sym(fmt.Sprintf("l%d", n-1), last))
}

// Every link below is local as text (path.Join of its directory and its
// target stays inside); only through the archive's other links does the
// last one lead out. Each is tried in both orders: links checked when they
// are made, and links made before the names they pass through become links
// (caught only by the check after the last member).
func TestSymlinkChainsEscaping(t *testing.T) {
	for _, tc := range []struct {
		name string
		ms   []mem
	}{
		{"dotdot through a link to the root", []mem{sym("d/up", ".."), sym("L", "d/up/..")}},
		{"several links to the root in one target", []mem{sym("m/n", ".."), sym("o/p", ".."), sym("z", "m/n/o/p/../..")}},
		{"a deep link to the root, then two dotdots", []mem{sym("a/b/c/r", "../../.."), sym("e", "a/b/c/r/../..")}},
		{"a link to a link to the root", []mem{sym("a/r", ".."), sym("b/s", "../a/r"), sym("c/e", "../b/s/..")}},
		{"a link to a link to a link", []mem{sym("p/q/r", "../.."), sym("p/q/s", "r"), sym("p/q/t", "s"), sym("x", "p/q/t/..")}},
		{"a link to a link that escapes", []mem{sym("d/up", ".."), sym("L", "d/up/.."), sym("M", "L")}},
		{"dot and empty components", []mem{sym("d/up", "./../"), sym("L", ".//d/./up//..//")}},
		{"the same link twice in one target", []mem{sym("v/root", ".."), sym("w/x", "../v/root/v/root/..")}},
		{"a link to dot, then dotdots", []mem{sym("d/self", "."), sym("d/up2", "self/.."), sym("e", "d/up2/..")}},
		{"a link named in a subdirectory and used from above", []mem{dir("s/t/"), sym("s/t/u", "../.."), sym("k", "s/t/u/../x")}},
		{"escape from a deep link, through a sibling link", []mem{sym("a/b/top", "../.."), sym("a/b/x", "top"), sym("a/b/y", "x/..")}},
		{"a loop", []mem{sym("a", "b"), sym("b", "a")}},
		{"a link to itself", []mem{sym("s", "s")}},
		{"a loop through a directory name", []mem{sym("d/l", "../d/l/x")}},
		{"a chain 41 links deep", chain(41, ".")},
		{"a chain ending in an absolute link", []mem{sym("a", "b"), sym("b", "/etc")}},
		{"a chain ending above the directory", []mem{sym("a", "b"), sym("b", "../x")}},
		{"through a regular file's name", []mem{file("f", "x"), sym("l", "f/../..")}},
	} {
		for _, order := range []string{"forward", "reversed"} {
			t.Run(tc.name+"/"+order, func(t *testing.T) {
				ms := tc.ms
				if order == "reversed" {
					ms = reversed(ms)
				}
				_, err := Extract(context.Background(), bytes.NewReader(archive(t, ms...)), t.TempDir(), Limits{})
				if !errors.Is(err, ErrHostile) {
					t.Fatalf("err = %v, want ErrHostile", err)
				}
				if !strings.Contains(err.Error(), "member \"") {
					t.Errorf("error %q does not name the member", err)
				}
				t.Log(err)
			})
		}
	}
}

// The shape the brief was about, in the order the check at creation cannot
// see: the link that escapes is checked when nothing it passes through is a
// link yet.
func TestSymlinkChainCaughtAtTheEnd(t *testing.T) {
	data := archive(t, sym("L", "d/up/.."), sym("d/up", ".."))
	_, err := Extract(context.Background(), bytes.NewReader(data), t.TempDir(), Limits{})
	if !errors.Is(err, ErrHostile) || !strings.Contains(err.Error(), `member "L"`) || !strings.Contains(err.Error(), "through d/up") {
		t.Fatalf("err = %v, want ErrHostile naming L and the link d/up it passes through", err)
	}
}

// Hard links and writes under links are refused by name, so links cannot
// be used to reach a file they point at.
func TestThroughSymlinksByName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ms   []mem
	}{
		{"hard link through a symlink", []mem{file("sub/f", "x"), sym("l", "sub"), hard("h", "l/f")}},
		{"hard link through a symlink, before it", []mem{file("sub/f", "x"), hard("h", "l/f"), sym("l", "sub")}},
		{"hard link to a symlink", []mem{file("f", "x"), sym("l", "f"), hard("h", "l")}},
		{"a file under a symlink", []mem{dir("sub/"), sym("d", "sub"), file("d/evil", "x")}},
		{"a directory under a symlink", []mem{dir("sub/"), sym("d", "sub"), dir("d/x/")}},
		{"a symlink under a symlink", []mem{dir("sub/"), sym("d", "sub"), sym("d/x", "y")}},
		{"a symlink over a directory", []mem{dir("d/"), sym("d", "sub")}},
		{"a directory over a symlink", []mem{sym("d", "sub"), dir("d/")}},
		{"a symlink twice", []mem{sym("d", "a"), sym("d", "b")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Extract(context.Background(), bytes.NewReader(archive(t, tc.ms...)), t.TempDir(), Limits{})
			if !errors.Is(err, ErrHostile) {
				t.Fatalf("err = %v, want ErrHostile", err)
			}
		})
	}
}

func TestSymlinkChainsBenign(t *testing.T) {
	type want struct {
		link, dest, content string // content "" means dest is not a file to read
	}
	for _, tc := range []struct {
		name  string
		ms    []mem
		wants []want
		// oneWay: refused when the links come the other way round, as the
		// check at creation takes a name that is not a link yet as a
		// directory (a refusal that errs on the safe side).
		oneWay bool
	}{
		{"lib -> lib64", []mem{file("lib64/libc.so", "c"), sym("lib", "lib64")}, []want{{"lib", "lib64", ""}, {"lib/libc.so", "lib64/libc.so", "c"}}, false},
		{"current -> v1", []mem{file("v1/bin/tool", "t"), sym("current", "v1")}, []want{{"current/bin/tool", "v1/bin/tool", "t"}}, false},
		{"a/b -> ../c", []mem{file("c/f", "cf"), sym("a/b", "../c")}, []want{{"a/b/f", "c/f", "cf"}}, false},
		{"a chain of three", []mem{file("real/file", "r"), sym("l1", "l2"), sym("l2", "l3"), sym("l3", "real/file")}, []want{{"l1", "real/file", "r"}}, false},
		{"usr/lib64 -> lib, with a relative library link", []mem{file("usr/lib/libz.so.1", "z"), sym("usr/lib64", "lib"), sym("usr/lib/libz.so", "../lib64/libz.so.1")}, []want{{"usr/lib/libz.so", "usr/lib/libz.so.1", "z"}}, false},
		{"dotdot back down through a deeper link", []mem{file("x/f", "xf"), dir("x/y/"), sym("s", "x/y"), sym("t", "s/../../x/f")}, []want{{"t", "x/f", "xf"}}, true},
		{"up to the root through links, no further", []mem{file("f", "top"), sym("d/up", ".."), sym("L", "d/up/f")}, []want{{"L", "f", "top"}, {"d/up", ".", ""}}, false},
		{"link to dot", []mem{file("f", "x"), sym("self", ".")}, []want{{"self/f", "f", "x"}}, false},
		{"trailing slash and dots", []mem{file("sub/f", "s"), sym("d", "./sub/./")}, []want{{"d/f", "sub/f", "s"}}, false},
		{"dangling", []mem{sym("dangling", "not/there")}, []want{{"dangling", "not/there", ""}}, false},
		{"through a regular file, dangling", []mem{file("f", "x"), sym("l", "f/..")}, nil, false},
		{"a chain 40 links deep", append(chain(40, "f"), file("f", "end")), []want{{"l0", "f", "end"}}, false},
	} {
		for _, order := range []string{"forward", "reversed"} {
			t.Run(tc.name+"/"+order, func(t *testing.T) {
				ms := tc.ms
				if order == "reversed" {
					ms = reversed(ms)
				}
				dir := t.TempDir()
				_, err := Extract(context.Background(), bytes.NewReader(archive(t, ms...)), dir, Limits{})
				if order == "reversed" && tc.oneWay {
					if !errors.Is(err, ErrHostile) {
						t.Fatalf("err = %v, want the conservative refusal", err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				for _, w := range tc.wants {
					dest, where, err := resolveOnDisk(dir, w.link)
					if err != nil || where != inside || dest != w.dest {
						t.Errorf("%s resolves to %q (%d, %v), want %q", w.link, dest, where, err, w.dest)
					}
					if w.content != "" {
						if b, err := os.ReadFile(filepath.Join(dir, w.link)); err != nil || string(b) != w.content {
							t.Errorf("reading %s: %q %v, want %q", w.link, b, err, w.content)
						}
					}
				}
				assertLinksInside(t, dir)
			})
		}
	}
}

// assertLinksInside fails if any symlink under dir leads outside it.
func assertLinksInside(t testing.TB, dir string) {
	t.Helper()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink == 0 {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		_, where, err := resolveOnDisk(dir, filepath.ToSlash(rel))
		if err != nil {
			return err
		}
		if where == outside {
			target, _ := os.Readlink(p)
			t.Errorf("published symlink %s -> %q leads outside the directory", rel, target)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// The oracle itself: links that lead out on disk are found, whatever
// made them.
func TestResolveOnDisk(t *testing.T) {
	dir := t.TempDir()
	for _, l := range [][2]string{{"d/up", ".."}, {"L", "d/up/.."}, {"abs", "/etc"}, {"ok", "d/up/d"}, {"loop", "loop"}} {
		os.MkdirAll(filepath.Join(dir, filepath.Dir(l[0])), 0o755)
		if err := os.Symlink(l[1], filepath.Join(dir, l[0])); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		rel   string
		where int
	}{{"d/up", inside}, {"L", outside}, {"abs", outside}, {"ok", inside}, {"loop", tooDeep}, {"d/nothere/../../..", outside}} {
		if _, where, err := resolveOnDisk(dir, tc.rel); err != nil || where != tc.where {
			t.Errorf("%s: %d %v, want %d", tc.rel, where, err, tc.where)
		}
	}
}

// The check at creation gives up on a link that would take long to walk,
// so that many links leading through each other cost linear time; the
// check at the end, which has no such bound, still refuses. Here l0's
// early check would see the escape, but walks too far to get there.
func TestEarlyCheckBudget(t *testing.T) {
	long := strings.Repeat("./", 1500)
	var ms []mem
	for i := 19; i >= 1; i-- {
		next := fmt.Sprintf("l%d", i+1)
		if i == 19 {
			next = "d/up/.."
		}
		ms = append(ms, sym(fmt.Sprintf("l%d", i), long+next))
	}
	ms = append(ms, sym("d/up", ".."), sym("l0", long+"l1"))
	_, err := Extract(context.Background(), bytes.NewReader(archive(t, ms...)), t.TempDir(), Limits{})
	if !errors.Is(err, ErrHostile) || !strings.Contains(err.Error(), `member "l19"`) || !strings.Contains(err.Error(), "with the archive's other links") {
		t.Fatalf("err = %v, want ErrHostile from the check at the end, naming l19", err)
	}
	if len(err.Error()) > 8000 {
		t.Errorf("error of %d bytes", len(err.Error()))
	}
}
