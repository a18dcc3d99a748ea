package manager_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// twice is a store that runs every callback twice, as a compare-and-swap
// store does on a conflict: first on a copy it throws away, then for real.
// A manager callback that does I/O, or keeps what its first run gathered,
// shows here.
type twice struct {
	*state.Store
	extra atomic.Int64
}

func (s *twice) Update(ctx context.Context, fn func(*state.State) (bool, error)) error {
	return s.Store.Update(ctx, s.wrap(fn))
}

func (s *twice) UpdateBatched(ctx context.Context, fn func(*state.State) (bool, error)) error {
	return s.Store.UpdateBatched(ctx, s.wrap(fn))
}

func (s *twice) UpdateEntries(ctx context.Context, ids []string, fn func(*state.Txn) (bool, error)) error {
	return s.Store.UpdateBatched(ctx, s.wrap(state.EntriesFunc(ids, fn)))
}

func (s *twice) wrap(fn func(*state.State) (bool, error)) func(*state.State) (bool, error) {
	return func(st *state.State) (bool, error) {
		s.extra.Add(1)
		fn(st.Clone()) // thrown away
		return fn(st)
	}
}

// TestCallbacksMayRunTwice: with a store that runs every callback twice (first on a copy it discards), the manager still gets,
// publishes, releases, sweeps and verifies correctly: its callbacks do no
// I/O and keep nothing from a discarded run.
func TestCallbacksMayRunTwice(t *testing.T) {
	root := t.TempDir()
	fs, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	store := &twice{Store: fs}
	m := newManager(t, root, func(c *manager.Config) { c.State = store })
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	e, err := getWait(t, m, "job", k)
	if err != nil || e.Stage != state.Ready {
		t.Fatalf("get: %+v %v", e, err)
	}
	p, err := m.Abs(e)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(p, "hello", "README.txt")); err != nil {
		t.Fatalf("published content: %v", err)
	}
	res, err := m.Verify(context.Background(), nil)
	if err != nil || len(res) != 1 {
		t.Fatalf("verify: %+v %v", res, err)
	}
	if err := m.Release(context.Background(), "job", k); err != nil {
		t.Fatal(err)
	}
	rep, err := m.SweepWith(context.Background(), false, manager.PolicyChange{MaxSizeBytes: ptr[int64](1), MinAge: ptr(time.Duration(0))})
	if err != nil || len(rep.Victims) != 1 {
		t.Fatalf("sweep: %+v %v", rep, err)
	}
	if st := viewEntry(t, root, k); st != nil {
		t.Errorf("entry after its eviction: %+v", st)
	}
	if ents, err := os.ReadDir(filepath.Join(root, "entries")); err != nil || len(ents) != 0 {
		t.Errorf("entries/ after the eviction: %v %v", ents, err)
	}
	if c := trashContent(root); len(c) != 0 {
		t.Errorf("trash after the sweep: %v", c)
	}
	if store.extra.Load() == 0 {
		t.Fatal("no callback ran twice: the test proved nothing")
	}
}
