package state

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

func reserveOn(t *testing.T, dir string, fall func(*os.File, int64, int64) error) (*Store, string) {
	t.Helper()
	if fall != nil {
		fallocateFunc = fall
		t.Cleanup(func() { fallocateFunc = fallocate })
	}
	s, err := Open(dir, Options{Reserve: 1 << 20, NoCombine: true})
	if err != nil {
		t.Fatal(err)
	}
	return s, filepath.Join(dir, ReserveFile)
}

func heldBy(t *testing.T, p string) (size, held int64) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size(), allocated(fi)
}

// Where the filesystem has no fallocate(2) (sshfs), the reserve is written
// as zeros, and grown back the same way once a part was given up.
func TestReserveWithoutFallocate(t *testing.T) {
	ctx := context.Background()
	s, p := reserveOn(t, t.TempDir(), func(*os.File, int64, int64) error { return syscall.EOPNOTSUPP })
	if err := s.KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if size, held := heldBy(t, p); size != 1<<20 || held < 1<<20 {
		t.Fatalf("written reserve: %d bytes, %d allocated", size, held)
	}
	if freed, err := s.ReleaseReserve(ctx); err != nil || freed < 256<<10 {
		t.Fatalf("a quarter given up: %d, %v", freed, err)
	}
	if err := s.KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if size, held := heldBy(t, p); size != 1<<20 || held < 1<<20 {
		t.Fatalf("grown back: %d bytes, %d allocated", size, held)
	}
}

// A reserve with a hole below its size (a part given up while another
// process grew it) is filled, not taken for whole by its size.
func TestReserveHoleFilled(t *testing.T) {
	ctx := context.Background()
	s, p := reserveOn(t, t.TempDir(), nil)
	if err := s.KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 256<<10); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil { // the size back, the blocks not
		t.Fatal(err)
	}
	if _, held := heldBy(t, p); held >= 1<<20 {
		t.Skipf("this filesystem allocates a hole (%d bytes held)", held)
	}
	if err := s.KeepReserve(ctx); err != nil {
		t.Fatal(err)
	}
	if size, held := heldBy(t, p); size != 1<<20 || held < 1<<20 {
		t.Errorf("after keeping it: %d bytes, %d allocated; want the hole filled", size, held)
	}
}

// Processes that start together make one reserve between them, in place:
// no temporary file is left, and no more than the reserve is allocated.
func TestReserveMadeOnce(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		s, _ := reserveOn(t, dir, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- s.KeepReserve(ctx)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if n := e.Name(); n != ReserveFile && n != ShardDir {
			t.Errorf("%s left in the root", n)
		}
	}
	if size, held := heldBy(t, filepath.Join(dir, ReserveFile)); size != 1<<20 || held > 1<<20+64<<10 {
		t.Errorf("reserve of %d bytes, %d allocated; want 1 MiB", size, held)
	}
}
