package unpack

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
)

const budget = 8 << 20

// extractFile sniffs and extracts an archive file into parent/target and
// checks that nothing appeared in parent besides target and the canary.
func extractFile(t *testing.T, archive string) error {
	t.Helper()
	parent := t.TempDir()
	target := filepath.Join(parent, "target")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	canary := filepath.Join(parent, "canary")
	os.WriteFile(canary, []byte("untouched"), 0o644)
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	format, err := Sniff(f)
	if err != nil {
		t.Fatal(err)
	}
	var xerr error
	if format == Plain {
		xerr = errors.New("not recognised as an archive")
	} else if format == Zip {
		fi, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		_, _, xerr = ExtractZip(context.Background(), f, fi.Size(), target, Limits{MaxBytes: budget, MaxFiles: 1000})
	} else {
		r, err := Open(f, format)
		if err != nil {
			xerr = err
		} else {
			_, xerr = Extract(context.Background(), r, target, Limits{MaxBytes: budget, MaxFiles: 1000})
		}
	}
	ents, _ := os.ReadDir(parent)
	for _, e := range ents {
		if e.Name() != "target" && e.Name() != "canary" {
			t.Errorf("%s written outside the target directory", e.Name())
		}
	}
	if b, _ := os.ReadFile(canary); string(b) != "untouched" {
		t.Error("canary changed")
	}
	if _, err := os.Lstat("/tmp/depcache-evil"); err == nil {
		t.Error("/tmp/depcache-evil was written")
	}
	return xerr
}

// hostileWants is the one error each archive in testdata/hostile must be
// refused with; an archive there that is not listed fails the test, so a
// new fixture must say what it expects.
var hostileWants = map[string]error{
	"absolute.tar":              ErrHostile,
	"blockdev.tar":              ErrHostile,
	"chardev.tar":               ErrHostile,
	"dotdot.tar":                ErrHostile,
	"duplicate.tar":             ErrHostile,
	"fifo.tar":                  ErrHostile,
	"gzip-bomb.tar.gz":          ErrTooLarge, // 64 MiB of zeros
	"hardlink-absolute.tar":     ErrHostile,
	"hardlink-escape.tar":       ErrHostile,
	"hardlink-to-missing.tar":   ErrHostile,
	"huge-member.tar":           ErrTooLarge, // a 16 GiB header, refused before its data
	"nested-dotdot.tar":         ErrHostile,
	"overwrite-symlink.tar":     ErrHostile,
	"symlink-absolute.tar":      ErrHostile,
	"symlink-escape.tar":        ErrHostile,
	"truncated.tar":             ErrCorrupt,
	"truncated.tar.gz":          ErrCorrupt,
	"write-through-symlink.tar": ErrHostile,
	// zip (gen_zip.py): the same rules through ExtractZip.
	"zip-absolute.zip":              ErrHostile,
	"zip-blockdev.zip":              ErrHostile,
	"zip-bomb.zip":                  ErrTooLarge, // 64 MiB of zeros in one member
	"zip-bomb-many.zip":             ErrTooLarge, // 16 members of 1 MiB
	"zip-chardev.zip":               ErrHostile,
	"zip-dotdot.zip":                ErrHostile,
	"zip-duplicate.zip":             ErrHostile,
	"zip-fifo.zip":                  ErrHostile,
	"zip-lying-size.zip":            ErrCorrupt, // its headers claim 10 bytes of 100,000
	"zip-nested-dotdot.zip":         ErrHostile,
	"zip-socket.zip":                ErrHostile,
	"zip-symlink-absolute.zip":      ErrHostile,
	"zip-symlink-chain.zip":         ErrHostile, // each link inside as text, the chain leads out
	"zip-symlink-escape.zip":        ErrHostile,
	"zip-truncated.zip":             ErrCorrupt,
	"zip-write-through-symlink.zip": ErrHostile,
}

func TestHostileCorpus(t *testing.T) {
	files, err := filepath.Glob("../../testdata/hostile/*.tar*")
	if err != nil {
		t.Fatal(err)
	}
	zips, _ := filepath.Glob("../../testdata/hostile/*.zip")
	if len(zips) < 12 {
		t.Fatalf("hostile corpus has %d zip archives, want at least 12", len(zips))
	}
	files = append(files, zips...)
	if len(files) < 12 {
		t.Fatalf("hostile corpus has %d archives, want at least 12", len(files))
	}
	found := map[string]bool{}
	for _, fx := range files {
		name := filepath.Base(fx)
		found[name] = true
		t.Run(name, func(t *testing.T) {
			want, ok := hostileWants[name]
			if !ok {
				t.Fatal("no expected error listed in hostileWants")
			}
			err := extractFile(t, fx)
			if !errors.Is(err, want) {
				t.Fatalf("err = %v, want %v", err, want)
			}
			for _, other := range []error{ErrHostile, ErrTooLarge, ErrCorrupt} {
				if other != want && errors.Is(err, other) {
					t.Errorf("err = %v, wraps %v as well as %v", err, other, want)
				}
			}
			t.Logf("refused: %v", err)
		})
	}
	for name := range hostileWants {
		if !found[name] {
			t.Errorf("%s is listed but not in testdata/hostile", name)
		}
	}
}

func TestGoodArchive(t *testing.T) {
	if err := extractFile(t, "../../testdata/bundles/hello.tar.gz"); err != nil {
		t.Fatal(err)
	}
}

func TestExtractContent(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, data string) {
		h.Size = int64(len(data))
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(data))
	}
	add(&tar.Header{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(&tar.Header{Name: "a/b.txt", Typeflag: tar.TypeReg, Mode: 0o4755}, "hello")
	add(&tar.Header{Name: "a/link", Typeflag: tar.TypeSymlink, Linkname: "b.txt"}, "")
	add(&tar.Header{Name: "hard", Typeflag: tar.TypeLink, Linkname: "a/b.txt"}, "")
	tw.Close()
	dir := t.TempDir()
	n, err := Extract(context.Background(), &buf, dir, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if n != 5 {
		t.Errorf("bytes = %d, want 5", n)
	}
	for _, p := range []string{"a/b.txt", "a/link", "hard"} {
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil || string(b) != "hello" {
			t.Errorf("%s: %q %v", p, b, err)
		}
	}
	fi, _ := os.Stat(filepath.Join(dir, "a/b.txt"))
	if fi.Mode()&os.ModeSetuid != 0 {
		t.Error("set-uid bit kept")
	}
}

// A plain tar cut at a member boundary (a connection that just closed)
// is refused; the same archive whole is accepted, and so is an empty one.
func TestTruncatedAtAMemberBoundary(t *testing.T) {
	var whole bytes.Buffer
	tw := tar.NewWriter(&whole)
	var cut int
	for _, name := range []string{"a.txt", "b.txt"} {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: 600})
		tw.Write(bytes.Repeat([]byte("x"), 600))
		tw.Flush()
		if cut == 0 {
			cut = whole.Len() // after a.txt and its padding
		}
	}
	tw.Close()
	// A member whose data ends in a whole block of zeros, cut after it.
	var zeros bytes.Buffer
	zw := tar.NewWriter(&zeros)
	zw.WriteHeader(&tar.Header{Name: "zeros", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1024})
	zw.Write(make([]byte, 1024))
	zw.Flush()
	zerosCut := zeros.Len()
	zw.Close()
	var empty bytes.Buffer
	tar.NewWriter(&empty).Close()
	for _, tc := range []struct {
		name string
		data []byte
		werr bool
	}{
		{"whole", whole.Bytes(), false},
		{"cut after the first member", whole.Bytes()[:cut], true},
		{"cut after the last member, before the end marker", whole.Bytes()[:whole.Len()-1024], true},
		{"cut after a member ending in a block of zeros", zeros.Bytes()[:zerosCut], true},
		{"that member whole", zeros.Bytes(), false},
		{"empty archive", empty.Bytes(), false},
		{"nothing at all", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Extract(context.Background(), iotest.HalfReader(bytes.NewReader(tc.data)), t.TempDir(), Limits{})
			if (err != nil) != tc.werr || (tc.werr && !errors.Is(err, ErrCorrupt)) {
				t.Fatalf("err = %v, want error %v (ErrCorrupt)", err, tc.werr)
			}
		})
	}
}

func TestSniff(t *testing.T) {
	for _, tc := range []struct {
		file string
		want Format
	}{
		{"../../testdata/bundles/hello.tar.gz", TarGzip},
		{"../../testdata/hostile/dotdot.tar", Tar},
		{"../../testdata/hostile/README.md", Plain},
	} {
		f, err := os.Open(tc.file)
		if err != nil {
			t.Fatal(err)
		}
		got, err := Sniff(f)
		f.Close()
		if err != nil || got != tc.want {
			t.Errorf("%s: %v %v, want %v", tc.file, got, err, tc.want)
		}
	}
}

// fuzzLimits are small, so that the oracle's budget check means something.
var fuzzLimits = Limits{MaxBytes: 1 << 20, MaxFiles: 100}

// fuzzChains are symlink-chain archives for the fuzzer to start from: the
// benign ones are extracted, so the oracle walks their links; the others
// are one mutation away from the chains the extractor must refuse.
func fuzzChains(t testing.TB) [][]byte {
	seeds := [][]mem{
		{file("lib64/libc.so", "c"), sym("lib", "lib64"), sym("current", "lib/libc.so")},
		{file("c/f", "cf"), sym("a/b", "../c"), sym("a/d", "b/f")},
		{sym("d/up", ".."), sym("L", "d/up/f"), file("f", "top")},
		{sym("L", "d/up/.."), sym("d/up", "..")},
		{sym("d/up", ".."), sym("L", "d/up/..")},
		{sym("m/n", ".."), sym("o/p", ".."), sym("z", "m/n/o/p/../..")},
		{sym("p/q/r", "../.."), sym("p/q/s", "r"), sym("p/q/t", "s"), sym("x", "p/q/t/..")},
		{sym("M", "L"), sym("L", "d/up/.."), sym("d/up", "..")},
		{sym("a", "b"), sym("b", "a")},
		{file("big", strings.Repeat("x", 600<<10)), hard("h1", "big"), hard("h2", "big")},
	}
	var out [][]byte
	for _, ms := range seeds {
		out = append(out, archive(t, ms...))
	}
	return out
}

// FuzzExtract: whatever the bytes, nothing is written outside the target;
// and when extraction succeeds, every symlink on disk resolves inside it
// (judged by the filesystem, not by the extractor's model) and the files
// written fit the limits.
func FuzzExtract(f *testing.F) {
	files, _ := filepath.Glob("../../testdata/hostile/*.tar")
	for _, fx := range files {
		b, _ := os.ReadFile(fx)
		f.Add(b)
	}
	for _, b := range fuzzChains(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkExtraction(t, func(target string) (int64, error) {
			return Extract(context.Background(), bytes.NewReader(data), target, fuzzLimits)
		})
	})
}

// checkExtraction is the fuzzers' oracle: extract into a fresh target and,
// whatever the input, nothing is written beside it; after a success, every
// symlink on disk resolves inside, and the distinct files written are what
// was reported and fit the limits.
func checkExtraction(t *testing.T, extract func(target string) (int64, error)) {
	t.Helper()
	parent := t.TempDir()
	target := filepath.Join(parent, "t")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	n, err := extract(target)
	ents, rerr := os.ReadDir(parent)
	if rerr != nil {
		t.Fatal(rerr)
	}
	if len(ents) != 1 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("written outside the target: %s", strings.Join(names, ", "))
	}
	if err != nil {
		return
	}
	assertLinksInside(t, target)
	size, count := written(t, target)
	if size > fuzzLimits.MaxBytes || size != n {
		t.Errorf("%d bytes in distinct files, %d reported, bound %d", size, n, fuzzLimits.MaxBytes)
	}
	if count > fuzzLimits.MaxFiles {
		t.Errorf("%d distinct files, bound %d", count, fuzzLimits.MaxFiles)
	}
	if cost, dirs := treeCost(t, target); cost > fuzzLimits.MaxBytes {
		t.Errorf("the tree takes %d bytes of disk (%d directories), bound %d", cost, dirs, fuzzLimits.MaxBytes)
	}
}

// An archive of nothing, as tar(1) writes it, begins with the end marker;
// fewer than two zero blocks, or a block that is not zero, is not one.
func TestEmptyTar(t *testing.T) {
	gz := func(b []byte) []byte {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write(b)
		zw.Close()
		return buf.Bytes()
	}
	marked := make([]byte, 10240)
	marked[1023] = 1
	for _, tc := range []struct {
		name string
		head []byte
		want Format
		ok   bool
	}{
		{"tar cf of nothing", make([]byte, 10240), Tar, true},
		{"the end marker alone", make([]byte, 1024), Tar, true},
		{"gzip of it", gz(make([]byte, 10240)), TarGzip, true},
		{"one zero block", make([]byte, 512), Plain, false},
		{"a byte set in the second block", marked, Plain, false},
		{"gzip of one zero block", gz(make([]byte, 1000)), Plain, false},
		{"text", []byte("hello"), Plain, false},
	} {
		if got, ok := EmptyTar(tc.head); got != tc.want || ok != tc.ok {
			t.Errorf("%s: %v %v, want %v %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
	// What the extractor makes of it: nothing, and no error.
	for _, head := range [][]byte{make([]byte, 10240), gz(make([]byte, 10240))} {
		f, _ := EmptyTar(head)
		r, err := Open(bytes.NewReader(head), f)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		if n, err := Extract(context.Background(), r, dir, Limits{}); err != nil || n != 0 {
			t.Errorf("%v of nothing: %d bytes, %v", f, n, err)
		}
		if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
			t.Errorf("%v of nothing made %v, %v", f, ents, err)
		}
	}
}
