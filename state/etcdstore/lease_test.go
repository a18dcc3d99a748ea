package etcdstore

import (
	"context"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// depKV reads the key of dependent name of entry i.
func depKV(t *testing.T, s *Store, i int, name string) (lease int64, ok bool) {
	t.Helper()
	resp, err := s.Client().Get(context.Background(), s.l.dep(testKey(i).ID(), name))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return 0, false
	}
	return resp.Kvs[0].Lease, true
}

// awaitGone waits until dependent name of entry i is gone.
func awaitGone(t *testing.T, s *Store, i int, name string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, ok := depKV(t, s, i, name); !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("dependent %q of entry %d still there after 60 s", name, i)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDependentLeases: after LeaseDependents, a dependent bound to a
// process is put on the session's lease, a named one with a TTL on a lease
// of its own of that TTL, a named one without on none; before it, none is
// on a lease. Close revokes the session (its dependents go at once); a TTL
// dependent goes at its TTL, timed by the server.
func TestDependentLeases(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/lease")
	proc := state.Process{Host: "h", BootID: "b", PID: 7, StartTime: 1}
	since := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	exp := since.Add(3 * time.Second)
	e := testEntry(1)
	e.Dependents = map[string]state.Dependent{
		"bound": {Since: since, Process: &proc},
		"ttl":   {Since: since, Expires: &exp},
		"named": {Since: since},
	}
	put(t, s, e)
	for _, name := range []string{"bound", "ttl", "named"} {
		if l, ok := depKV(t, s, 1, name); !ok || l != 0 {
			t.Fatalf("before LeaseDependents: dependent %q on lease %x (present %v), want none", name, l, ok)
		}
	}
	s.LeaseDependents(5 * time.Second)
	e = e.Clone()
	for name, d := range e.Dependents {
		d.Since = d.Since.Add(time.Nanosecond) // changed: written again
		if d.Expires != nil {
			x := d.Expires.Add(time.Nanosecond)
			d.Expires = &x
		}
		e.Dependents[name] = d
	}
	put(t, s, e)
	bound, ok := depKV(t, s, 1, "bound")
	if !ok || bound == 0 || bound != int64(s.SessionLease()) {
		t.Fatalf("bound dependent: lease %x (present %v), want the session's %x", bound, ok, s.SessionLease())
	}
	ttl, ok := depKV(t, s, 1, "ttl")
	if !ok || ttl == 0 || ttl == bound {
		t.Fatalf("ttl dependent: lease %x (present %v), want one of its own", ttl, ok)
	}
	r, err := s.Client().TimeToLive(context.Background(), clientv3.LeaseID(ttl))
	if err != nil || r.GrantedTTL != 3 {
		t.Fatalf("ttl dependent's lease: %+v %v, want a TTL of 3 s", r, err)
	}
	if r, err := s.Client().TimeToLive(context.Background(), clientv3.LeaseID(bound)); err != nil || r.GrantedTTL != 5 {
		t.Fatalf("session's lease: %+v %v, want a TTL of 5 s", r, err)
	}
	if l, ok := depKV(t, s, 1, "named"); !ok || l != 0 {
		t.Fatalf("named dependent: lease %x (present %v), want none", l, ok)
	}

	other := open(t, []string{m.Endpoint}, "/lease")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := depKV(t, other, 1, "bound"); ok {
		t.Fatal("the bound dependent survived its store's Close")
	}
	awaitGone(t, other, 1, "ttl")
	st, err := other.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	got := st.Get(testKey(1))
	if got == nil || len(got.Dependents) != 1 {
		t.Fatalf("after the leases ended: %+v, want the entry with its named dependent", got)
	}
}

// TestSessionEnded: when the session's lease ends under the store (here
// revoked from outside, as when the process was cut off past its TTL), its
// dependents are gone, and the next commit that registers one starts a
// new session instead of failing or putting it on the dead lease.
func TestSessionEnded(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/lease")
	s.LeaseDependents(0)
	proc := state.Process{Host: "h", BootID: "b", PID: 7, StartTime: 1}
	e := testEntry(1)
	e.Dependents = map[string]state.Dependent{"a": {Process: &proc}}
	put(t, s, e)
	first := s.SessionLease()
	if _, err := s.Client().Revoke(context.Background(), first); err != nil {
		t.Fatal(err)
	}
	if _, ok := depKV(t, s, 1, "a"); ok {
		t.Fatal("dependent still there after its lease ended")
	}
	touchHeld := func() {
		t.Helper()
		err := s.UpdateEntries(context.Background(), []string{testKey(1).ID()}, func(tx *state.Txn) (bool, error) {
			n := tx.Get(testKey(1)).Clone()
			n.Dependents = map[string]state.Dependent{"b": {Process: &proc}}
			tx.Put(n)
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	touchHeld()
	l, ok := depKV(t, s, 1, "b")
	if !ok || l == int64(first) || l != int64(s.SessionLease()) {
		t.Fatalf("new dependent on lease %x (present %v); the ended session's was %x, the current one's %x", l, ok, first, s.SessionLease())
	}
	if n := s.Stats().Sessions; n != 2 {
		t.Fatalf("%d sessions started, want 2", n)
	}
}
