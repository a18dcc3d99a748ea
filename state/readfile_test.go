package state

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestReadFile(t *testing.T) {
	dir := t.TempDir()
	if _, err := readFile(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: %v; want fs.ErrNotExist", err)
	}
	// Sizes around the first buffer's 512 bytes, and far past it.
	for _, n := range []int{0, 1, 511, 512, 513, 4096, 100_000} {
		want := bytes.Repeat([]byte("x"), n)
		name := filepath.Join(dir, "f")
		if err := os.WriteFile(name, want, 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := readFile(name)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%d bytes: read %d bytes, %v", n, len(got), err)
		}
	}
	if _, err := readFileFlags(filepath.Join(dir, "f"), 0, 1000); err == nil || !strings.Contains(err.Error(), "over 1000 bytes") {
		t.Fatalf("100,000 bytes with a limit of 1,000: %v", err)
	}
	// A planted FIFO does not block a reader that asks not to.
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := readFileFlags(fifo, unix.O_NONBLOCK, 0); err != nil || len(b) != 0 {
		t.Fatalf("a FIFO with no writer: %q, %v", b, err)
	}
	// Nor does a symbolic link lead it elsewhere.
	if err := os.Symlink(filepath.Join(dir, "f"), filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if _, err := readFileFlags(filepath.Join(dir, "link"), unix.O_NOFOLLOW, 0); !errors.Is(err, unix.ELOOP) {
		t.Fatalf("a symbolic link read with O_NOFOLLOW: %v; want ELOOP", err)
	}
}

func TestWriteNew(t *testing.T) {
	name := filepath.Join(t.TempDir(), "p.tmp")
	want := bytes.Repeat([]byte("y"), 70_000)
	if err := writeNew(name, want); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(name)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back %d bytes, %v", len(got), err)
	}
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		t.Fatalf("mode %v: want private to this user", fi.Mode())
	}
	if err := writeNew(name, []byte("again")); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("a second write of the same name: %v; want fs.ErrExist", err)
	}
}
