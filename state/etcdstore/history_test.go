package etcdstore

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// revisionNow returns the cluster's current revision.
func revisionNow(t *testing.T, cli *clientv3.Client) int64 {
	t.Helper()
	resp, err := cli.Get(context.Background(), "/depcache-test/revision-probe")
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// checkHistory replays every change under prefix from revision from on,
// as etcd recorded it, and checks two invariants at each revision:
//
//   - no READY entry is deleted while a dependent key of it existed at the
//     revision before (eviction and pruning only take entries nobody
//     holds; a DOWNLOADING entry goes with its last dependent, in one
//     transaction, which is a release);
//   - every READY that follows a DOWNLOADING is its owner's publish: the
//     entry before had an owner, and the same generation.
//
// It returns how many revisions it checked and what broke the invariants.
func checkHistory(t *testing.T, cli *clientv3.Client, prefix string, from int64) (revs int, broken []string) {
	t.Helper()
	report := func(format string, args ...any) { broken = append(broken, fmt.Sprintf(format, args...)) }
	l := layout{prefix}
	sentinel := prefix + "/zz-history-end"
	if _, err := cli.Put(context.Background(), sentinel, "end"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	wch := cli.Watch(ctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithRev(from))
	entries := map[string]*state.Entry{}
	deps := map[string]map[string]bool{}
	// What there was before from.
	seed, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithRev(from-1))
	if err != nil {
		t.Fatalf("reading the state at revision %d: %v", from-1, err)
	}
	for _, kv := range seed.Kvs {
		id, name, isDep, err := l.parseStateKey(string(kv.Key))
		switch {
		case err != nil:
		case isDep:
			if deps[id] == nil {
				deps[id] = map[string]bool{}
			}
			deps[id][name] = true
		default:
			if e, err := decodeEntry(kv.Value); err == nil {
				entries[id] = e
			}
		}
	}
	var group []*clientv3.Event
	apply := func() {
		if len(group) == 0 {
			return
		}
		revs++
		rev := group[0].Kv.ModRevision
		before := map[string]*state.Entry{}
		depsBefore := map[string]int{}
		for _, ev := range group {
			if id, _, isDep, err := l.parseStateKey(string(ev.Kv.Key)); err == nil && !isDep {
				before[id] = entries[id]
				depsBefore[id] = len(deps[id])
			}
		}
		for _, ev := range group {
			k := string(ev.Kv.Key)
			id, name, isDep, err := l.parseStateKey(k)
			if err != nil {
				continue // owner keys, the header, records
			}
			switch {
			case isDep && ev.Type == mvccpb.PUT:
				if deps[id] == nil {
					deps[id] = map[string]bool{}
				}
				deps[id][name] = true
			case isDep:
				delete(deps[id], name)
			case ev.Type == mvccpb.DELETE:
				if old := before[id]; old != nil && old.Stage == state.Ready && depsBefore[id] > 0 {
					report("revision %d: READY entry %s deleted while %d dependent key(s) existed", rev, id, depsBefore[id])
				}
				delete(entries, id)
			default:
				e, err := decodeEntry(ev.Kv.Value)
				if err != nil {
					report("revision %d: entry %s: %v", rev, id, err)
					continue
				}
				if old := before[id]; e.Stage == state.Ready && old != nil && old.Stage == state.Downloading &&
					(old.Owner == nil || old.Generation != e.Generation) {
					report("revision %d: entry %s READY at generation %d after DOWNLOADING at %d owned by %v: not its owner's publish",
						rev, id, e.Generation, old.Generation, old.Owner)
				}
				entries[id] = e
			}
		}
		group = group[:0]
	}
	for wr := range wch {
		if err := wr.Err(); err != nil {
			t.Fatalf("reading the history from revision %d: %v", from, err)
		}
		for _, ev := range wr.Events {
			if len(group) > 0 && ev.Kv.ModRevision != group[0].Kv.ModRevision {
				apply()
			}
			if string(ev.Kv.Key) == sentinel {
				apply()
				return revs, broken
			}
			group = append(group, ev)
		}
	}
	t.Fatalf("the history from revision %d ended before its end mark: %v", from, ctx.Err())
	return 0, nil
}

// TestCheckHistory: the checker sees a READY entry evicted under a
// dependent and a READY put by no owner.
func TestCheckHistory(t *testing.T) {
	eps, prefix := leaseRig(t, "history")
	s := open(t, eps, prefix)
	from := revisionNow(t, s.Client()) + 1
	e := readyEntry(1)
	e.Dependents = map[string]state.Dependent{"job": {}}
	put(t, s, e)
	// Deleted by hand under its dependent, as no commit of the store would.
	if _, err := s.Client().Delete(context.Background(), s.l.entry(testKey(1).ID())); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Client().Delete(context.Background(), s.l.deps(testKey(1).ID()), clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	d := testEntry(2) // DOWNLOADING, no owner
	put(t, s, d)
	r := readyEntry(2)
	r.Generation = d.Generation
	b, _ := encodeEntry(r)
	if _, err := s.Client().Put(context.Background(), s.l.entry(testKey(2).ID()), string(b)); err != nil {
		t.Fatal(err)
	}
	_, broken := checkHistory(t, s.Client(), prefix, from)
	if len(broken) != 2 || !strings.Contains(broken[0], "deleted while 1 dependent") || !strings.Contains(broken[1], "not its owner's publish") {
		t.Fatalf("the checker found %q; want the eviction under a dependent and the READY without its owner", broken)
	}
}

// TestStormHistory: managers getting, waiting for and releasing keys
// leave a history that keeps both invariants, and download no key twice
// at once.
func TestStormHistory(t *testing.T) {
	eps, prefix := leaseRig(t, "storm")
	s := startStorm(t, eps, prefix, 4)
	s.awaitCycles(t, 0, 40, "storm")
	s.stop()
	s.check(t)
}
