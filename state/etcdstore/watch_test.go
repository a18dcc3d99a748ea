package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// waitAsync runs WaitEntries in a goroutine; its result arrives on the
// channel.
func waitAsync(ctx context.Context, s *Store, ids []string, since state.Mark) <-chan error {
	done := make(chan error, 1)
	go func() { done <- s.WaitEntries(ctx, ids, since) }()
	return done
}

// mustBlock checks that done has not delivered within a moment.
func mustBlock(t *testing.T, done <-chan error, what string) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("%s: WaitEntries returned (%v), want it still blocked", what, err)
	case <-time.After(300 * time.Millisecond):
	}
}

func mustReturn(t *testing.T, done <-chan error, what string) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: WaitEntries: %v", what, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: WaitEntries still blocked after 30 s", what)
	}
}

// touch gives entry i a new dependent named dep (a change of its
// dependents only).
func touch(t *testing.T, s *Store, i int, dep string) {
	t.Helper()
	id := testKey(i).ID()
	err := s.UpdateEntries(context.Background(), []string{id}, func(tx *state.Txn) (bool, error) {
		e := tx.Get(testKey(i)).Clone()
		if e.Dependents == nil {
			e.Dependents = map[string]state.Dependent{}
		}
		e.Dependents[dep] = state.Dependent{}
		tx.Put(e)
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestWaitEntries: a waiter wakes for a change of a named entry's
// dependents and for its removal, not for other entries, and returns the
// caller's error when its context ends.
func TestWaitEntries(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/watch")
	put(t, s, testEntry(1), testEntry(2))
	id1 := testKey(1).ID()

	mark := s.Mark()
	if mark == 0 {
		t.Fatal("Mark is 0 after a commit")
	}
	done := waitAsync(context.Background(), s, []string{id1}, mark)
	touch(t, s, 2, "other")
	mustBlock(t, done, "after a change of another entry")
	touch(t, s, 1, "job")
	mustReturn(t, done, "after a new dependent")

	mark = s.Mark()
	done = waitAsync(context.Background(), s, []string{id1}, mark)
	mustBlock(t, done, "without a change")
	if err := s.UpdateEntries(context.Background(), []string{id1}, func(tx *state.Txn) (bool, error) {
		tx.Delete(testKey(1))
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	mustReturn(t, done, "after the removal")

	// A change between the mark and the wait is not missed.
	mark = s.Mark()
	put(t, s, testEntry(1))
	mustReturn(t, waitAsync(context.Background(), s, []string{id1}, mark), "a change before the wait began")

	// An entry missing at the mark and still missing is unchanged, however
	// far the cluster moved on: its waiter blocks (it is not woken again
	// and again).
	gone := testKey(99).ID()
	mark = s.Mark()
	touch(t, s, 2, "moves the revision on")
	done = waitAsync(context.Background(), s, []string{gone}, mark)
	mustBlock(t, done, "on an entry missing then and now")
	put(t, s, testEntry(99))
	mustReturn(t, done, "after the missing entry was created")
	// One that existed at the mark and was removed before the wait began
	// is a change.
	mark = s.Mark()
	if err := s.UpdateEntries(context.Background(), []string{gone}, func(tx *state.Txn) (bool, error) {
		tx.Delete(testKey(99))
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	mustReturn(t, waitAsync(context.Background(), s, []string{gone}, mark), "removed before the wait began")

	ctx, cancel := context.WithCancel(context.Background())
	done = waitAsync(ctx, s, []string{id1}, s.Mark())
	mustBlock(t, done, "before the cancel")
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("WaitEntries after cancel: %v, want context.Canceled", err)
	}
	if err := s.WaitEntries(context.Background(), []string{"a/b"}, mark); !errors.Is(err, state.ErrBadKey) {
		t.Fatalf("WaitEntries of a bad ID: %v, want ErrBadKey", err)
	}
	if err := s.WaitEntries(context.Background(), []string{id1}, 0); err != nil {
		t.Fatalf("WaitEntries from mark 0: %v, want nil at once", err)
	}
}

// TestWaitEntriesMany: past watchKeysMax names the waiter watches the
// range of all entries and filters it.
func TestWaitEntriesMany(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/watch")
	var es []*state.Entry
	var ids []string
	for i := range watchKeysMax + 5 {
		es = append(es, testEntry(i))
		ids = append(ids, testKey(i).ID())
	}
	put(t, s, append(es, testEntry(100))...)
	done := waitAsync(context.Background(), s, ids, s.Mark())
	touch(t, s, 100, "other")
	mustBlock(t, done, "after a change of an entry not named")
	touch(t, s, watchKeysMax+3, "job")
	mustReturn(t, done, "after a change of a named entry")
}

// TestWaitEntriesCompacted: a waiter whose mark the cluster compacted
// lists the entries (it never asks for the history): it returns at once if
// one changed after its mark, and otherwise keeps waiting for the next
// change; a compaction while it waits changes nothing either.
func TestWaitEntriesCompacted(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/watch")
	put(t, s, testEntry(1), testEntry(2))
	id1 := testKey(1).ID()
	compact := func() {
		t.Helper()
		resp, err := s.Client().Get(context.Background(), "/")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Client().Compact(context.Background(), resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
			t.Fatal(err)
		}
	}

	// Changed after the mark, then compacted: returns at once.
	mark := s.Mark()
	touch(t, s, 1, "job")
	touch(t, s, 2, "a")
	touch(t, s, 2, "b")
	compact()
	lists := s.Stats().Lists
	mustReturn(t, waitAsync(context.Background(), s, []string{id1}, mark), "changed before the compaction")
	if got := s.Stats().Lists; got != lists+1 {
		t.Fatalf("lists: %d, want %d: the waiter did not list what it could not watch", got, lists+1)
	}

	// Unchanged after the mark, then compacted: waits on.
	mark = s.Mark()
	touch(t, s, 2, "c")
	touch(t, s, 2, "d")
	compact()
	done := waitAsync(context.Background(), s, []string{id1}, mark)
	mustBlock(t, done, "unchanged before the compaction")
	if got := s.Stats().Lists; got != lists+2 {
		t.Fatalf("lists: %d, want %d", got, lists+2)
	}
	// A compaction during the wait, then more changes elsewhere.
	touch(t, s, 2, "e")
	compact()
	touch(t, s, 2, "f")
	mustBlock(t, done, "after a compaction during the wait")
	touch(t, s, 1, "job2")
	mustReturn(t, done, "after the change")
}

// setBudget commits a policy with budget n and no minimum age.
func setBudget(t *testing.T, s *Store, n int64) {
	t.Helper()
	if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		p := state.DefaultPolicy()
		if st.Policy != nil {
			p = *st.Policy
		}
		p.MaxSizeBytes, p.MinAge = n, 0
		st.Policy = &p
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestWaitEntriesPolicy: the policy is a watched key: a waiter wakes when
// it changes, with entries named and with none, also when it changed
// between the mark and the wait; a change of an entry not named wakes
// neither.
func TestWaitEntriesPolicy(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/watch")
	put(t, s, testEntry(1), testEntry(2))
	for _, ids := range [][]string{nil, {testKey(1).ID()}} {
		done := waitAsync(context.Background(), s, ids, s.Mark())
		touch(t, s, 2, "other")
		mustBlock(t, done, fmt.Sprintf("%d named: after a change of an entry not named", len(ids)))
		setBudget(t, s, 1<<20+int64(len(ids)))
		mustReturn(t, done, fmt.Sprintf("%d named: after a policy change", len(ids)))

		mark := s.Mark()
		setBudget(t, s, 2<<20+int64(len(ids)))
		mustReturn(t, waitAsync(context.Background(), s, ids, mark), "a policy change before the wait began")
	}
}

// TestWaitEntriesLeaseEnds: the end of a lease deletes keys without
// putting the entry key; a waiter on the entry still wakes: for its
// owner's key (the waiters take the download over), and for a dependent's
// (its manager learns that it lost it), while it waits and between the
// mark and the wait. Another entry's lapsed dependent wakes nobody.
func TestWaitEntriesLeaseEnds(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/watch")
	s.LeaseOwners(time.Minute)
	s.LeaseDependents(time.Minute)
	for _, many := range []bool{false, true} {
		ids := []string{testKey(1).ID()}
		if many {
			for i := range watchKeysMax {
				ids = append(ids, testKey(200+i).ID())
			}
		}
		revoke := func(lease int64) {
			t.Helper()
			if lease == 0 {
				t.Fatal("the key is on no lease")
			}
			if _, err := s.Client().Revoke(context.Background(), clientv3.LeaseID(lease)); err != nil {
				t.Fatal(err)
			}
		}
		// The owner's lease.
		e := testEntry(1)
		e.Stage, e.Generation = state.Downloading, 3
		e.Owner = &state.Owner{Process: state.Process{Host: "h", PID: 1}, ManagerID: "m"}
		put(t, s, e, testEntry(2))
		o, _ := ownerKey(t, s, ids[0])
		done := waitAsync(context.Background(), s, ids, s.Mark())
		mustBlock(t, done, "before the owner's lease ended")
		revoke(int64(o.lease))
		mustReturn(t, done, fmt.Sprintf("many=%v: after the owner's lease ended", many))

		// A dependent's lease, while waiting and before the wait.
		for _, before := range []bool{false, true} {
			exp := time.Now().Add(time.Hour)
			for _, i := range []int{1, 2} {
				e := testEntry(i)
				e.Dependents = map[string]state.Dependent{"ttl": {Since: time.Now(), Expires: &exp}}
				put(t, s, e)
			}
			other, _ := depKV(t, s, 2, "ttl")
			mine, _ := depKV(t, s, 1, "ttl")
			mark := s.Mark()
			if before {
				revoke(mine)
				mustReturn(t, waitAsync(context.Background(), s, ids, mark),
					fmt.Sprintf("many=%v: a dependent's lease ended before the wait began", many))
				revoke(other)
				continue
			}
			done := waitAsync(context.Background(), s, ids, mark)
			revoke(other)
			mustBlock(t, done, "after another entry's dependent lapsed")
			revoke(mine)
			mustReturn(t, done, fmt.Sprintf("many=%v: after a dependent's lease ended", many))
		}
	}
}
