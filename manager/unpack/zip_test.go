package unpack

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// zmem is one member of a zip made by zipArchive.
type zmem struct {
	name string
	mode fs.FileMode // with its type bits: fs.ModeSymlink, fs.ModeDir, ...
	data string      // a symlink's target
}

func zfile(name, data string) zmem { return zmem{name: name, mode: 0o644, data: data} }
func zsym(name, target string) zmem {
	return zmem{name: name, mode: fs.ModeSymlink | 0o777, data: target}
}
func zdir(name string) zmem { return zmem{name: name, mode: fs.ModeDir | 0o755} }

// zipArchive writes ms as a zip archive, modes in the unix attributes.
func zipArchive(t testing.TB, ms ...zmem) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, m := range ms {
		h := &zip.FileHeader{Name: m.name, Method: zip.Deflate}
		h.SetMode(m.mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(m.data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func extractZipBytes(t testing.TB, b []byte, dir string, lim Limits) (int64, map[string]string, error) {
	t.Helper()
	return ExtractZip(context.Background(), bytes.NewReader(b), int64(len(b)), dir, lim)
}

func TestSniffZip(t *testing.T) {
	if f := SniffBytes(zipArchive(t, zfile("a", "b"))); f != Zip {
		t.Errorf("a zip sniffs as %v", f)
	}
	if f := SniffBytes(zipArchive(t)); f != Zip {
		t.Errorf("an empty zip sniffs as %v", f)
	}
	if f := SniffBytes([]byte("PK but not a zip")); f != Plain {
		t.Errorf("PK text sniffs as %v", f)
	}
}

func TestExtractZipContent(t *testing.T) {
	b := zipArchive(t,
		zdir("a/"),
		zmem{name: "a/b.txt", mode: 0o4755 | fs.ModeSetuid, data: "hello"},
		zsym("a/link", "b.txt"),
		zfile("c/d/e.txt", "deep"), // parents not listed
	)
	dir := t.TempDir()
	n, hashes, err := extractZipBytes(t, b, dir, Limits{MaxBytes: budget})
	if err != nil {
		t.Fatal(err)
	}
	if n != 9 {
		t.Errorf("bytes = %d, want 9", n)
	}
	for p, want := range map[string]string{"a/b.txt": "hello", "a/link": "hello", "c/d/e.txt": "deep"} {
		got, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil || string(got) != want {
			t.Errorf("%s: %q %v, want %q", p, got, err, want)
		}
	}
	if target, err := os.Readlink(filepath.Join(dir, "a/link")); err != nil || target != "b.txt" {
		t.Errorf("a/link: %q %v, want a symlink to b.txt", target, err)
	}
	fi, err := os.Stat(filepath.Join(dir, "a/b.txt"))
	if err != nil || fi.Mode()&os.ModeSetuid != 0 || fi.Mode().Perm() != 0o755 {
		t.Errorf("a/b.txt: %v %v, want 0755 without set-uid", fi.Mode(), err)
	}
	if len(hashes) != 2 || hashes["a/b.txt"] != "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" {
		t.Errorf("hashes = %v", hashes)
	}
}

// The budget holds what is written, whatever the headers say: every member
// of the bomb fixtures is counted as it is decompressed, and nothing past
// the bound (and the member that passes it) reaches the disk.
func TestZipBombsStopAtTheBound(t *testing.T) {
	for _, name := range []string{"zip-bomb.zip", "zip-bomb-many.zip"} {
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("../../testdata/hostile", name))
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			n, _, err := extractZipBytes(t, b, dir, Limits{MaxBytes: budget})
			if !errors.Is(err, ErrTooLarge) {
				t.Fatalf("err = %v, want ErrTooLarge", err)
			}
			disk, _ := written(t, dir)
			if n > budget+1 || disk != n {
				t.Errorf("%d bytes on disk, %d reported; bound %d", disk, n, budget)
			}
		})
	}
	// A member whose header claims more than the bound is refused before
	// any of it is written.
	b := zipArchive(t, zfile("a", strings.Repeat("a", 1000)))
	dir := t.TempDir()
	if _, _, err := extractZipBytes(t, b, dir, Limits{MaxBytes: 100}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("a 1000-byte member under a 100-byte bound: err = %v, want ErrTooLarge", err)
	}
	if disk, _ := written(t, dir); disk != 0 {
		t.Errorf("%d bytes written of a member whose header is past the bound", disk)
	}
}

func TestZipMaxFiles(t *testing.T) {
	b := zipArchive(t, zdir("d/"), zfile("d/a", "a"), zsym("l", "d/a"))
	for _, tc := range []struct {
		max int
		ok  bool
	}{{3, true}, {2, false}} {
		_, _, err := extractZipBytes(t, b, t.TempDir(), Limits{MaxFiles: tc.max})
		if tc.ok != (err == nil) || (!tc.ok && !errors.Is(err, ErrTooLarge)) {
			t.Errorf("MaxFiles %d: err = %v, want ok %v or ErrTooLarge", tc.max, err, tc.ok)
		}
	}
}

// FuzzExtractZip is FuzzExtract's oracle for zips: whatever the bytes,
// nothing is written outside the target; when extraction succeeds, every
// symlink on disk resolves inside it (by the filesystem) and the bytes
// written fit the bound.
func FuzzExtractZip(f *testing.F) {
	files, _ := filepath.Glob("../../testdata/hostile/*.zip")
	for _, fx := range files {
		if b, err := os.ReadFile(fx); err == nil && len(b) < 64<<10 {
			f.Add(b)
		}
	}
	for _, ms := range [][]zmem{
		{zfile("lib64/libc.so", "c"), zsym("lib", "lib64"), zsym("current", "lib/libc.so")},
		{zfile("c/f", "cf"), zsym("a/b", "../c"), zsym("a/d", "b/f")},
		{zsym("d/up", ".."), zsym("L", "d/up/f"), zfile("f", "top")},
		{zsym("M", "L"), zsym("L", "d/up/.."), zsym("d/up", "..")},
		{zsym("a", "b"), zsym("b", "a")},
		{zfile("big", strings.Repeat("x", 600<<10)), zfile("big2", strings.Repeat("y", 600<<10))},
	} {
		f.Add(zipArchive(f, ms...))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkExtraction(t, func(target string) (int64, error) {
			n, _, err := extractZipBytes(t, data, target, fuzzLimits)
			return n, err
		})
	})
}
