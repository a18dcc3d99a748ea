// Package storetest is the conformance suite of state.Backend: every store
// (the file store, the etcd store) runs it, so that the manager can rely on
// the contracts written in the interface's doc and nothing more.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// Factory opens a store. Calls with the same name open the same state (as
// two processes would, each with its own instance); different names are
// independent stores.
type Factory func(t *testing.T, name string) state.Backend

var errRefused = errors.New("refused by the test's callback")

func key(i int) state.Key {
	return state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://example.com/conformance/%d", i)}
}

func entry(i int, size int64) *state.Entry {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	return &state.Entry{Key: key(i), Stage: state.Ready, SizeBytes: size, Generation: uint64(i + 1),
		Path: fmt.Sprintf("entries/%s-g%d/content", key(i).ID(), i+1), Created: t0, LastUsed: t0}
}

func view(t *testing.T, s state.Backend) *state.State {
	t.Helper()
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatalf("%s: View: %v", s, err)
	}
	return st
}

// Run runs the suite against the stores newStore opens.
func Run(t *testing.T, newStore Factory) {
	ctx := context.Background()
	t.Run("empty", func(t *testing.T) {
		s := newStore(t, "empty")
		if s.String() == "" {
			t.Error("String is empty: messages could not name the store")
		}
		if ok, err := s.Exists(ctx); err != nil || ok {
			t.Errorf("Exists on a new store: %v, %v", ok, err)
		}
		if st := view(t, s); len(st.Entries) != 0 || st.Policy != nil {
			t.Errorf("a new store holds %+v", st)
		}
	})

	t.Run("commit is seen by another instance", func(t *testing.T) {
		a, b := newStore(t, "shared"), newStore(t, "shared")
		err := a.Update(ctx, func(st *state.State) (bool, error) {
			st.Put(entry(1, 10))
			pol := state.DefaultPolicy()
			pol.MaxSizeBytes = 1 << 30
			st.Policy = &pol
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := b.Exists(ctx); err != nil || !ok {
			t.Errorf("Exists after a commit: %v, %v", ok, err)
		}
		st := view(t, b)
		if e := st.Get(key(1)); e == nil || e.SizeBytes != 10 || st.Policy == nil || st.Policy.MaxSizeBytes != 1<<30 {
			t.Errorf("the other instance sees %+v / policy %+v", e, st.Policy)
		}
		if st.MaxGeneration < 2 {
			t.Errorf("MaxGeneration %d after committing generation 2", st.MaxGeneration)
		}
	})

	t.Run("an error or no change writes nothing", func(t *testing.T) {
		s := newStore(t, "errors")
		if err := s.Update(ctx, func(st *state.State) (bool, error) { st.Put(entry(1, 1)); return true, nil }); err != nil {
			t.Fatal(err)
		}
		calls := []struct {
			name string
			do   func() error
		}{
			{"Update error", func() error {
				return s.Update(ctx, func(st *state.State) (bool, error) {
					n := st.Get(key(1)).Clone()
					n.SizeBytes = 99
					st.Put(n)
					st.Put(entry(2, 2))
					return true, errRefused
				})
			}},
			{"Update unchanged", func() error {
				return s.Update(ctx, func(st *state.State) (bool, error) { return false, nil })
			}},
			{"UpdateEntries error after writes", func() error {
				return s.UpdateEntries(ctx, []string{key(1).ID(), key(2).ID()}, func(tx *state.Txn) (bool, error) {
					n := tx.Get(key(1)).Clone()
					n.SizeBytes = 99
					tx.Put(n)
					tx.Put(entry(2, 2))
					return true, errRefused
				})
			}},
			{"UpdateEntries unchanged after writes", func() error {
				return s.UpdateEntries(ctx, []string{key(1).ID()}, func(tx *state.Txn) (bool, error) {
					tx.Delete(key(1))
					return false, nil
				})
			}},
			{"UpdateBatched error", func() error {
				return s.UpdateBatched(ctx, func(st *state.State) (bool, error) { return true, errRefused })
			}},
		}
		for _, c := range calls {
			err := c.do()
			if c.name != "Update unchanged" && c.name != "UpdateEntries unchanged after writes" && !errors.Is(err, errRefused) {
				t.Errorf("%s: %v, want the callback's error", c.name, err)
			}
			st := view(t, s)
			if e := st.Get(key(1)); e == nil || e.SizeBytes != 1 || st.Get(key(2)) != nil || len(st.Entries) != 1 {
				t.Errorf("%s changed the state: %+v", c.name, st.Entries)
			}
		}
	})

	t.Run("UpdateEntries sees the named entries and the header", func(t *testing.T) {
		s := newStore(t, "entries")
		err := s.Update(ctx, func(st *state.State) (bool, error) {
			for i := range 5 {
				st.Put(entry(i, int64(i)))
			}
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var maxGen uint64
		err = s.UpdateEntries(ctx, []string{key(1).ID(), key(7).ID()}, func(tx *state.Txn) (bool, error) {
			maxGen = tx.MaxGeneration()
			if e := tx.Get(key(1)); e == nil || e.SizeBytes != 1 {
				return false, fmt.Errorf("named entry 1: %+v", e)
			}
			if tx.Get(key(7)) != nil {
				return false, errors.New("entry 7 does not exist, but Get returned one")
			}
			n := tx.Get(key(1)).Clone()
			n.SizeBytes = 100
			tx.Put(n)
			tx.Put(entry(7, 7))
			if tx.Get(key(7)) == nil {
				return false, errors.New("a Put is not seen by the same callback's Get")
			}
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if maxGen < 5 {
			t.Errorf("MaxGeneration in the Txn: %d, want at least 5", maxGen)
		}
		st := view(t, s)
		if st.Get(key(1)).SizeBytes != 100 || st.Get(key(7)) == nil || len(st.Entries) != 6 {
			t.Errorf("after UpdateEntries: %d entries, 1 = %+v", len(st.Entries), st.Get(key(1)))
		}
		if st.MaxGeneration < 8 {
			t.Errorf("MaxGeneration %d after committing generation 8", st.MaxGeneration)
		}
		// An entry that was not named is out of reach.
		defer func() {
			if recover() == nil {
				t.Error("Get of an entry not named did not panic")
			}
		}()
		_ = s.UpdateEntries(ctx, []string{key(1).ID()}, func(tx *state.Txn) (bool, error) {
			tx.Get(key(2))
			return false, nil
		})
	})

	t.Run("no update is lost between instances and goroutines", func(t *testing.T) {
		const instances, workers, each = 2, 4, 15
		stores := make([]state.Backend, instances)
		for i := range stores {
			stores[i] = newStore(t, "counter")
		}
		if err := stores[0].Update(ctx, func(st *state.State) (bool, error) { st.Put(entry(0, 0)); return true, nil }); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, instances*workers)
		for i := range instances {
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for n := range each {
						var err error
						bump := func(e *state.Entry) *state.Entry { c := e.Clone(); c.SizeBytes++; return c }
						switch (w + n) % 3 {
						case 0:
							err = stores[i].UpdateEntries(ctx, []string{key(0).ID()}, func(tx *state.Txn) (bool, error) {
								tx.Put(bump(tx.Get(key(0))))
								return true, nil
							})
						case 1:
							err = stores[i].UpdateBatched(ctx, func(st *state.State) (bool, error) {
								st.Put(bump(st.Get(key(0))))
								return true, nil
							})
						default:
							err = stores[i].Update(ctx, func(st *state.State) (bool, error) {
								st.Put(bump(st.Get(key(0))))
								return true, nil
							})
						}
						if err != nil {
							errs <- err
							return
						}
					}
				}()
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if got := view(t, stores[1]).Get(key(0)).SizeBytes; got != instances*workers*each {
			t.Errorf("counter = %d after %d increments: updates were lost", got, instances*workers*each)
		}
	})

	t.Run("handed-out entries are the store's, not the caller's", func(t *testing.T) {
		s := newStore(t, "sharing")
		if err := s.Update(ctx, func(st *state.State) (bool, error) { st.Put(entry(1, 1)); return true, nil }); err != nil {
			t.Fatal(err)
		}
		c := view(t, s).Get(key(1)).Clone()
		c.SizeBytes = 42
		c.Dependents = map[string]state.Dependent{"x": {}}
		if e := view(t, s).Get(key(1)); e.SizeBytes != 1 || len(e.Dependents) != 0 {
			t.Errorf("changing a Clone changed the store: %+v", e)
		}
	})

	t.Run("an invalid state is refused, not written", func(t *testing.T) {
		s := newStore(t, "invalid")
		err := s.Update(ctx, func(st *state.State) (bool, error) {
			st.Entries["not-the-id"] = entry(1, 1)
			return true, nil
		})
		if err == nil {
			t.Fatal("an entry filed under the wrong ID was committed")
		}
		if st := view(t, s); len(st.Entries) != 0 {
			t.Errorf("after a refused commit: %+v", st.Entries)
		}
	})

	t.Run("Reset replaces and hands over the last state", func(t *testing.T) {
		s := newStore(t, "reset")
		if err := s.Update(ctx, func(st *state.State) (bool, error) { st.Put(entry(1, 1)); return true, nil }); err != nil {
			t.Fatal(err)
		}
		var last *state.State
		if _, err := s.Reset(ctx, func(st, l *state.State) error {
			last = l
			st.Put(entry(2, 2))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if last == nil || last.Get(key(1)) == nil {
			t.Errorf("Reset's last state: %+v", last)
		}
		st := view(t, newStore(t, "reset"))
		if st.Get(key(1)) != nil || st.Get(key(2)) == nil {
			t.Errorf("after Reset: %+v", st.Entries)
		}
		if _, err := s.Reset(ctx, func(st, l *state.State) error { st.Put(entry(3, 3)); return errRefused }); !errors.Is(err, errRefused) {
			t.Errorf("Reset with a failing callback: %v", err)
		}
		if st := view(t, s); st.Get(key(2)) == nil || st.Get(key(3)) != nil {
			t.Errorf("a failed Reset changed the state: %+v", st.Entries)
		}
	})

	t.Run("a done context is refused", func(t *testing.T) {
		s := newStore(t, "cancelled")
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		called := false
		err := s.UpdateEntries(cctx, []string{key(1).ID()}, func(tx *state.Txn) (bool, error) { called = true; return true, nil })
		if err == nil && called {
			// A store may have taken the operation before it saw the
			// context end; it must then have committed it.
			if view(t, s).Get(key(1)) != nil {
				t.Error("a Put was committed although the callback put nothing")
			}
		} else if !errors.Is(err, context.Canceled) {
			t.Errorf("UpdateEntries on a cancelled context: %v", err)
		}
		if _, err := s.View(cctx); !errors.Is(err, context.Canceled) {
			t.Errorf("View on a cancelled context: %v", err)
		}
	})
}
