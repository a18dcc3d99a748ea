package manager_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// TestLostDependentIsTold: a dependent this manager registered that
// another process removes from its entry (a sweep that reaped it while this
// process was stopped past its lease), with or without evicting the entry,
// is reported once through OnLost, and Wait fails with ErrDependentLost
// while nothing of this process holds the entry, until Get registers a
// dependent again. Released dependents are never reported.
func TestLostDependentIsTold(t *testing.T) {
	for _, tc := range []struct {
		name  string
		evict bool
		reap  []string // without evict
	}{
		{"one of two reaped", false, []string{"stopped"}},
		{"both reaped", false, []string{"stopped", "kept"}},
		{"entry evicted", true, nil},
	} {
		evict := tc.evict
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			var mu sync.Mutex
			var lost []manager.LostDependent
			rec := &logRecorder{}
			reg := prometheus.NewRegistry()
			m := newManager(t, root, func(c *manager.Config) {
				c.Log = rec.logger()
				c.Metrics = reg
				c.OnLost = func(l manager.LostDependent) {
					mu.Lock()
					lost = append(lost, l)
					mu.Unlock()
				}
			})
			abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
			k := mustKey(t, "file://"+abs, "")
			for _, dep := range []string{"kept", "stopped"} {
				if _, err := getWait(t, m, dep, k); err != nil {
					t.Fatal(err)
				}
			}
			// Released ones are not lost, however the passes interleave.
			for range 20 {
				if _, err := getWait(t, m, "churn", k); err != nil {
					t.Fatal(err)
				}
				if err := m.Release(context.Background(), "churn", k); err != nil {
					t.Fatal(err)
				}
			}
			// Another process reaps "stopped" (and, evicting, the entry).
			s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
			if err != nil {
				t.Fatal(err)
			}
			err = s.Update(context.Background(), func(st *state.State) (bool, error) {
				if evict {
					delete(st.Entries, k.ID())
					return true, nil
				}
				n := st.Get(k).Clone()
				for _, d := range tc.reap {
					delete(n.Dependents, d)
				}
				st.Put(n)
				return true, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			got := func() []manager.LostDependent {
				mu.Lock()
				defer mu.Unlock()
				return append([]manager.LostDependent(nil), lost...)
			}
			want := len(tc.reap)
			if evict {
				want = 2 // both lost their entry
			}
			waitFor(t, 30*time.Second, func() bool { return len(got()) >= want }, func() string { return "no loss reported" })
			for _, l := range got() {
				if l.Key.ID() != k.ID() || l.Evicted != evict || l.Dependent == "churn" || (!evict && !slices.Contains(tc.reap, l.Dependent)) {
					t.Errorf("reported %+v", l)
				}
			}
			// Said at error level, once per loss, and counted.
			var logged []logrus.Entry
			for _, e := range rec.find("is gone from its entry without its release") {
				if e.Level == logrus.ErrorLevel {
					logged = append(logged, e)
				}
			}
			if len(logged) != want {
				t.Errorf("%d error records of the loss, want %d: %q", len(logged), want, rec.messages())
			}
			if n := counter(t, reg, "depcache_lost_dependents_total", "", ""); n != float64(want) {
				t.Errorf("depcache_lost_dependents_total = %v, want %d", n, want)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			// Wait fails while nothing of this process holds the entry.
			_, err = m.Wait(ctx, k)
			if stillHeld := want == 1; stillHeld != (err == nil) || (!stillHeld && !errors.Is(err, manager.ErrDependentLost)) {
				t.Fatalf("Wait after the loss (still held: %v): %v", stillHeld, err)
			}
			// Registering again heals it; the loss is not reported twice.
			for _, l := range got() {
				if _, err := m.Get(ctx, l.Dependent, k); err != nil {
					t.Fatal(err)
				}
			}
			if e, err := m.Wait(ctx, k); err != nil || e.Stage != state.Ready {
				t.Fatalf("Wait after Get again: %+v %v", e, err)
			}
			if n := len(got()); n != want {
				t.Errorf("%d losses reported, want %d", n, want)
			}
		})
	}
}

// TestTTLEndIsNotALoss: a dependent bound to this process with a TTL,
// reaped once a pass saw its TTL end, ended as asked: it is not reported
// lost, nor logged as an error, nor counted. One without a TTL reaped in
// the same commit is still reported, and so is one with a TTL that was
// reaped before its TTL ended and found gone only after (the process was
// stopped past both).
func TestTTLEndIsNotALoss(t *testing.T) {
	root := t.TempDir()
	var mu sync.Mutex
	var lost []manager.LostDependent
	rec := &logRecorder{}
	clock := &fakeClock{now: time.Now()}
	m := newManager(t, root, func(c *manager.Config) {
		c.Log = rec.logger()
		c.Clock = clock
		c.CleanupInterval = 24 * time.Hour // the clock jumps: no sweep of m's own reaps first
		c.OnLost = func(l manager.LostDependent) {
			mu.Lock()
			lost = append(lost, l)
			mu.Unlock()
		}
	})
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := m.Get(ctx, "ttl", k, manager.WithTTL(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Get(ctx, "stoppedttl", k, manager.WithTTL(10*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := getWait(t, m, "stopped", k); err != nil {
		t.Fatal(err)
	}
	// Passes see "ttl" just before its TTL ends, and after (the loop's own
	// pass reaps it then).
	clock.advance(59 * time.Second)
	if _, err := m.Wait(ctx, k); err != nil {
		t.Fatal(err)
	}
	clock.advance(61 * time.Second)
	if _, err := m.Wait(ctx, k); err != nil {
		t.Fatal(err)
	}
	// Another process reaps all three: "ttl" past its TTL, "stopped" and
	// "stoppedttl" as if this process was stopped past its lease, which
	// it then is, past the TTL of "stoppedttl" too.
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		n := st.Get(k).Clone()
		delete(n.Dependents, "ttl")
		delete(n.Dependents, "stopped")
		delete(n.Dependents, "stoppedttl")
		st.Put(n)
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	clock.advance(15 * time.Minute)
	got := func() []manager.LostDependent {
		mu.Lock()
		defer mu.Unlock()
		return append([]manager.LostDependent(nil), lost...)
	}
	waitFor(t, 30*time.Second, func() bool { return len(got()) >= 2 }, func() string { return "no loss reported" })
	var names []string
	for _, l := range got() {
		names = append(names, l.Dependent)
	}
	if slices.Sort(names); !slices.Equal(names, []string{"stopped", "stoppedttl"}) {
		t.Fatalf("reported lost: %v, want stopped and stoppedttl", names)
	}
	for _, e := range rec.find("is gone from its entry without its release") {
		if e.Data["dependent"] == "ttl" {
			t.Errorf("the TTL's end was logged as a loss: %v", e.Message)
		}
	}
	// "stopped" keeps Wait failing; once it is registered again, nothing
	// of the TTL's end stands in the way.
	if _, err := m.Get(ctx, "stopped", k); err != nil {
		t.Fatal(err)
	}
	if e, err := m.Wait(ctx, k); err != nil || e.Stage != state.Ready {
		t.Fatalf("Wait after Get again: %+v %v", e, err)
	}
	if n := len(got()); n != 2 {
		t.Errorf("%d losses reported, want 2", n)
	}
}
