package state_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/depcache/depcache/state"
)

func reserveStore(t *testing.T, dir string, size int64) *state.Store {
	t.Helper()
	s, err := state.Open(dir, state.Options{Reserve: size, Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// reserveBytes returns the size and the allocated bytes of dir's reserve.
func reserveBytes(t *testing.T, dir string) (size, held int64) {
	t.Helper()
	fi, err := os.Lstat(filepath.Join(dir, state.ReserveFile))
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size(), fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// The reserve is made whole, given up a quarter at a time down to nothing
// (every byte it held, counted once), grown back, and left alone when it is
// larger than a store's own size or when a store keeps none.
func TestReserveParts(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 1 << 20
	s := reserveStore(t, dir, size)
	if err := s.KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if n, held := reserveBytes(t, dir); n != size || held < size {
		t.Fatalf("reserve of %d bytes, %d allocated; want %d", n, held, size)
	}
	var total int64
	parts := 0
	for {
		freed, err := s.ReleaseReserve(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if freed == 0 {
			break
		}
		total += freed
		parts++
		if parts == 1 {
			if n, _ := reserveBytes(t, dir); n != size*3/4 {
				t.Errorf("after the first part, %d bytes left, want %d", n, size*3/4)
			}
			// Grown back in place.
			if err := s.KeepReserve(ctx); err != nil {
				t.Fatal(err)
			}
			if n, held := reserveBytes(t, dir); n != size || held < size {
				t.Fatalf("grown back to %d bytes, %d allocated; want %d", n, held, size)
			}
			total = 0
		}
		if parts > 100 {
			t.Fatal("the reserve never runs out")
		}
	}
	if total < size || total > size+64<<10 {
		t.Errorf("the parts freed %d bytes in all, want the %d the reserve held", total, size)
	}
	if _, err := os.Lstat(filepath.Join(dir, state.ReserveFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the reserve is still there once given up: %v", err)
	}
	if parts < 4 {
		t.Errorf("given up in %d parts, want it in quarters or less", parts)
	}

	if err := s.KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if err := reserveStore(t, dir, size/2).KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := reserveBytes(t, dir); n != size {
		t.Errorf("a store with a smaller size changed the reserve to %d bytes", n)
	}
	none := t.TempDir()
	if err := reserveStore(t, none, -1).KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := reserveBytes(t, none); n != 0 {
		t.Errorf("a store that keeps none made a reserve of %d bytes", n)
	}
}

// A directory where the reserve belongs is never removed: giving up the
// reserve fails naming it, keeping it does nothing, and doctor's check
// fails.
func TestReserveSquatted(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := reserveStore(t, dir, 1<<20)
	squat := filepath.Join(dir, state.ReserveFile)
	if err := os.MkdirAll(filepath.Join(squat, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReleaseReserve(ctx); !errors.Is(err, state.ErrLayout) {
		t.Errorf("giving up a directory as the reserve: %v, want ErrLayout", err)
	}
	if err := s.KeepReserve(ctx); err != nil {
		t.Errorf("keeping a reserve where a directory is: %v", err)
	}
	if _, err := os.Stat(filepath.Join(squat, "x")); err != nil {
		t.Fatalf("the directory was changed: %v", err)
	}
	found := false
	for _, c := range s.Checks(ctx) {
		if c.Name == "disk reserve" {
			found = true
			if c.Status != "fail" {
				t.Errorf("doctor's check of a directory as the reserve: %s %s, want fail", c.Status, c.Detail)
			}
		}
	}
	if !found {
		t.Error("no disk reserve check")
	}
}
