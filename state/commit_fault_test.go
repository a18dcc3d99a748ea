package state_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/depcache/depcache/state"
)

// committed is a store whose state file went through two commits, so that
// the previous version exists too, with the bytes of both.
type committed struct {
	s          *state.Store
	dir        string
	cur, prev  []byte
	wantBefore int // entries in the state
}

func newCommitted(t *testing.T) *committed {
	t.Helper()
	dir := t.TempDir()
	s := openStore(t, dir)
	ctx := context.Background()
	for i := range 2 {
		if err := s.Update(ctx, put(i, 1)); err != nil {
			t.Fatal(err)
		}
	}
	c := &committed{s: s, dir: dir, wantBefore: 2}
	c.cur = readBytes(t, s.Path())
	c.prev = readBytes(t, s.Path()+state.PrevSuffix)
	return c
}

func readBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// bulk adds n entries after the first two, enough to make the state file
// far larger than it was.
func bulk(n int) func(*state.State) (bool, error) {
	return func(st *state.State) (bool, error) {
		for i := 2; i < 2+n; i++ {
			if _, err := put(i, 1)(st); err != nil {
				return false, err
			}
		}
		return true, nil
	}
}

// checkFailed checks what a failed commit must leave: an error that names
// the state file and what failed and wraps the cause, the state and (when
// c.prev is set) its previous version byte for byte as they were, the state
// readable, no temporary file, and, once clear has removed the fault, an
// update that keeps every entry.
func (c *committed) checkFailed(t *testing.T, err error, what string, cause error, clear func()) {
	t.Helper()
	if err == nil {
		t.Fatal("the commit succeeded despite the fault")
	}
	if !errors.Is(err, cause) {
		t.Errorf("err = %v, want it to wrap %v", err, cause)
	}
	if !strings.Contains(err.Error(), c.s.Path()) || !strings.Contains(err.Error(), what) {
		t.Errorf("error %q does not name the state file and %q", err, what)
	}
	if got := readBytes(t, c.s.Path()); !bytes.Equal(got, c.cur) {
		t.Errorf("the state file changed in a failed commit:\n%s\nwant\n%s", got, c.cur)
	}
	if c.prev != nil {
		if got := readBytes(t, c.s.Path()+state.PrevSuffix); !bytes.Equal(got, c.prev) {
			t.Errorf("the previous version changed in a failed commit:\n%s\nwant\n%s", got, c.prev)
		}
	}
	temps, gerr := filepath.Glob(filepath.Join(c.dir, "."+state.StateFile+"*"))
	if gerr != nil {
		t.Fatal(gerr)
	}
	if len(temps) != 0 {
		t.Errorf("temporary files left by the failed commit: %v", temps)
	}
	ctx := context.Background()
	st, verr := c.s.View(ctx)
	if verr != nil {
		t.Fatalf("state after a failed commit: %v", verr)
	}
	if n := len(st.Sorted()); n != c.wantBefore {
		t.Errorf("%d entries after a failed commit, want the %d before it", n, c.wantBefore)
	}
	clear()
	if err := c.s.Update(ctx, bulk(10)); err != nil {
		t.Fatalf("update once the fault is gone: %v", err)
	}
	st, verr = c.s.View(ctx)
	if verr != nil {
		t.Fatal(verr)
	}
	for i := range 12 {
		if st.Get(bundleKey(i)) == nil {
			t.Errorf("entry %d lost", i)
		}
	}
}

// A write of the temporary file that fails (here past the file size limit,
// EFBIG, as a full disk fails with ENOSPC) fails the commit before the
// commit point.
func TestCommitWriteError(t *testing.T) {
	c := newCommitted(t)
	limit := uint64(len(c.cur)) + 512
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
		t.Fatal(err)
	}
	// The limit is the whole process's: no other test runs meanwhile (none
	// in this package is parallel), and Go ignores the SIGXFSZ that comes
	// with the EFBIG.
	restore := func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: limit, Max: old.Max}); err != nil {
		t.Fatal(err)
	}
	restored := false
	defer func() {
		if !restored {
			restore()
		}
	}()
	err := c.s.Update(context.Background(), bulk(200))
	c.checkFailed(t, err, "writing", syscall.EFBIG, func() { restore(); restored = true })
}

// Keeping the previous version fails at its link (a directory squats its
// temporary name) or at its rename (a directory squats its name): the
// commit fails before the commit point.
func TestCommitKeepPrevError(t *testing.T) {
	for _, tc := range []struct {
		name  string
		squat string // suffix of the name a directory takes
		cause error
	}{
		{"link", state.PrevSuffix + ".tmp", fs.ErrExist},
		{"rename", state.PrevSuffix, fs.ErrExist}, // os.Rename refuses a directory as the new name
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCommitted(t)
			squat := c.s.Path() + tc.squat
			if tc.squat == state.PrevSuffix {
				// The squatter takes the previous version's place: only
				// the state itself can be compared.
				if err := os.Remove(squat); err != nil {
					t.Fatal(err)
				}
				c.prev = nil
			}
			// Not empty, so that neither a remove nor a rename over it
			// clears it.
			if err := os.MkdirAll(filepath.Join(squat, "x"), 0o755); err != nil {
				t.Fatal(err)
			}
			err := c.s.Update(context.Background(), bulk(1))
			c.checkFailed(t, err, "keeping the previous version", tc.cause, func() {
				if err := os.RemoveAll(squat); err != nil {
					t.Fatal(err)
				}
			})
		})
	}
}
