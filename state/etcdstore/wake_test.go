package etcdstore

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
)

// TestManagerWakesForUnannouncedChanges: a manager whose poll interval
// and cleanup interval are an hour still acts at once on the two changes
// that put no entry key, since its loop watches them: a budget lowered by
// another process (it sweeps the entry it no longer needs), and its
// session's lease ended under it (it reports its dependent lost). Without
// the watches, neither happens within the hour.
func TestManagerWakesForUnannouncedChanges(t *testing.T) {
	m := etcdtest.Start(t)
	root := t.TempDir()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("the content of " + r.URL.Path + "\n"))
	}))
	defer srv.Close()
	s := open(t, []string{m.Endpoint}, "/wake", func(o *Options) { o.Root = root })
	lost := make(chan manager.LostDependent, 4)
	mg, err := manager.New(manager.Config{Root: root, State: s, Log: quiet(),
		PollInterval: time.Hour, CleanupInterval: time.Hour,
		OnLost: func(l manager.LostDependent) { lost <- l }})
	if err != nil {
		t.Fatal(err)
	}
	stop, err := mg.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	get := func(name, path string) state.Key {
		t.Helper()
		key, err := manager.ParseKey(srv.URL+path, "")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := mg.Get(ctx, name, key); err != nil {
			t.Fatal(err)
		}
		if _, err := mg.Wait(ctx, key); err != nil {
			t.Fatal(err)
		}
		return key
	}
	done := get("done", "/a")
	if err := mg.Release(ctx, "done", done); err != nil {
		t.Fatal(err)
	}

	// The budget, lowered by another process.
	other := open(t, []string{m.Endpoint}, "/wake", func(o *Options) { o.Root = root })
	present := func() bool {
		st, err := other.View(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return st.Get(done) != nil
	}
	if !present() {
		t.Fatal("the released entry is gone before the budget changed")
	}
	changed := time.Now()
	setBudget(t, other, 1)
	for present() {
		time.Sleep(20 * time.Millisecond)
		if ctx.Err() != nil {
			t.Fatal("the unused entry is still there a minute after the budget went to 1 byte")
		}
	}

	t.Logf("the unused entry was evicted %s after the budget changed (poll and cleanup intervals: 1 h)", time.Since(changed).Round(time.Millisecond))

	// The session's lease, ended under a held dependent.
	setBudget(t, other, 1<<30)
	held := get("job", "/b")
	revoked := time.Now()
	if _, err := s.Client().Revoke(ctx, s.SessionLease()); err != nil {
		t.Fatal(err)
	}
	select {
	case l := <-lost:
		t.Logf("the lost dependent was reported %s after its lease ended", time.Since(revoked).Round(time.Millisecond))
		if l.Key != held || l.Dependent != "job" {
			t.Fatalf("lost %+v, want dependent job of %s", l, held)
		}
	case <-ctx.Done():
		t.Fatal("no dependent reported lost a minute after its lease ended")
	}
}
