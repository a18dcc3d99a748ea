package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// readyEntry is entry i, READY, old and unused.
func readyEntry(i int) *state.Entry {
	e := testEntry(i)
	e.Stage, e.SizeBytes = state.Ready, 1000
	e.Path = fmt.Sprintf("entries/%s-g%d/content", e.Key.ID(), e.Generation)
	e.LastUsed = e.Created
	return e
}

// putMany stores es in commits of 50.
func putMany(t *testing.T, s *Store, es []*state.Entry) {
	t.Helper()
	for i := 0; i < len(es); i += 50 {
		put(t, s, es[i:min(i+50, len(es))]...)
	}
}

// TestEvict: a victim is removed only if it still exists, no commit
// changed it after the mark, and it has no dependent; one changed victim
// in a batch keeps only itself.
func TestEvict(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/evict")
	var es []*state.Entry
	var ids []string
	for i := range 70 {
		es = append(es, readyEntry(i))
		ids = append(ids, testKey(i).ID())
	}
	putMany(t, s, es)
	mark := s.Mark()
	touch(t, s, 3, "job") // a dependent since
	e := readyEntry(40)   // changed since
	e.SizeBytes = 2000
	put(t, s, e)
	if err := s.UpdateEntries(context.Background(), []string{testKey(50).ID()}, func(tx *state.Txn) (bool, error) {
		tx.Delete(testKey(50)) // removed since
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	removed, err := s.Evict(context.Background(), ids, mark)
	if err != nil {
		t.Fatal(err)
	}
	keep := []string{testKey(3).ID(), testKey(40).ID(), testKey(50).ID()}
	var want []string
	for _, id := range ids {
		if !slices.Contains(keep, id) {
			want = append(want, id)
		}
	}
	slices.Sort(want)
	if !slices.Equal(removed, want) {
		t.Fatalf("removed %d entries, want %d (all but the changed ones)", len(removed), len(want))
	}
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Entries) != 2 || st.Get(testKey(3)) == nil || st.Get(testKey(40)) == nil {
		t.Fatalf("left: %d entries, want entries 3 and 40", len(st.Entries))
	}
	// A dependent registered after the mark, without a change of the
	// entry key (as the end of a lease leaves none), still protects it:
	// the compare is on the dependent keys themselves.
	if _, err := s.Client().Put(context.Background(), s.l.dep(testKey(40).ID(), "raw"), "{}"); err != nil {
		t.Fatal(err)
	}
	if removed, err := s.Evict(context.Background(), []string{testKey(40).ID()}, s.Mark()); err != nil || len(removed) != 0 {
		t.Fatalf("evicting an entry with a dependent key: %v %v, want nothing removed", removed, err)
	}
}

// TestSweep500: a manager's sweep of 500 victims removes them all, in
// transactions within etcd's limits; one commit of all, as a sweep on a
// store without Evictor makes, is refused with ErrTooBig.
func TestSweep500(t *testing.T) {
	m := etcdtest.Start(t)
	root := t.TempDir()
	s := open(t, []string{m.Endpoint}, "/sweep", func(o *Options) { o.Root = root })
	var es []*state.Entry
	for i := range 500 {
		es = append(es, readyEntry(i))
	}
	held := readyEntry(1000)
	held.Dependents = map[string]state.Dependent{"job": {}}
	putMany(t, s, append(es, held))
	one, zero := int64(1), time.Duration(0)
	// Without Evictor the sweep is one commit: refused, nothing removed.
	whole, err := manager.New(manager.Config{Root: root, State: polling{s}, Log: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := whole.SweepWith(context.Background(), false, manager.PolicyChange{MaxSizeBytes: &one, MinAge: &zero}); !errors.Is(err, ErrTooBig) {
		t.Fatalf("a sweep of 500 in one commit: %v, want ErrTooBig", err)
	}
	mg, err := manager.New(manager.Config{Root: root, State: s, Log: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	commits := s.Stats().Commits
	from := revisionNow(t, s.Client()) + 1
	rep, err := mg.SweepWith(context.Background(), false, manager.PolicyChange{MaxSizeBytes: &one, MinAge: &zero})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Victims) != 500 || rep.Freed != 500*1000 {
		t.Fatalf("sweep: %d victims, %d bytes freed; want 500 and 500000", len(rep.Victims), rep.Freed)
	}
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Entries) != 1 || st.Get(held.Key) == nil {
		t.Fatalf("left: %d entries, want only the held one", len(st.Entries))
	}
	if n := s.Stats().Commits - commits; n < 500/evictBatch || n > 500/evictBatch+3 {
		t.Fatalf("%d commits for 500 victims, want about %d", n, 500/evictBatch+1)
	}
	if _, broken := checkHistory(t, s.Client(), "/sweep", from); len(broken) > 0 {
		t.Fatalf("the sweep's history: %q", broken)
	}
}

// TestSweeperElection: one store of a prefix is the sweeper; when it
// closes (its session's lease revoked), another is elected.
func TestSweeperElection(t *testing.T) {
	m := etcdtest.Start(t)
	a := open(t, []string{m.Endpoint}, "/elect")
	b := open(t, []string{m.Endpoint}, "/elect")
	ctx := context.Background()
	if ok, err := a.MaySweep(ctx); err != nil || !ok {
		t.Fatalf("first campaign: %v %v, want elected", ok, err)
	}
	if ok, err := b.MaySweep(ctx); err != nil || ok {
		t.Fatalf("second store: %v %v, want not elected", ok, err)
	}
	if ok, err := a.MaySweep(ctx); err != nil || !ok {
		t.Fatalf("leader again: %v %v, want still elected", ok, err)
	}
	// etcd's own election API agrees.
	sess, err := concurrency.NewSession(b.Client())
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	leader, err := concurrency.NewElection(sess, "/elect/sweeper").Leader(ctx)
	if err != nil || len(leader.Kvs) == 0 || leader.Kvs[0].Lease != int64(a.SessionLease()) {
		t.Fatalf("concurrency.Election.Leader: %v %v, want the key of a's session %x", leader, err, a.SessionLease())
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.MaySweep(ctx); err != nil || !ok {
		t.Fatalf("after the leader closed: %v %v, want elected", ok, err)
	}
}
