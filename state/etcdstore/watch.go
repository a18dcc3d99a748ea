package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"

	"github.com/depcache/depcache/state"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// watchKeysMax is how many entries WaitEntries watches key by key; more
// are watched as the range of all entry keys, filtered here.
const watchKeysMax = 16

// Mark returns the highest revision this store has seen in an answer: a
// linearizable read started later is at that revision or after it.
func (s *Store) Mark() state.Mark { return state.Mark(s.seen.Load()) }

// WaitEntries blocks until one of the entries ids changed after the
// revision since, or the policy did, or ctx ends. Every commit that
// changes an entry or its dependents puts its entry key, and removing it
// deletes the key, so the entry keys' events cover both. Three changes put
// no entry key, and are watched apart: the owner key deleted when the
// owner's lease ended (the waiters take the download over at once, not at
// their next timed pass), a dependent key deleted when its lease ended
// (its manager learns at once that it lost it), and the header, which
// holds the policy (a new budget is swept by at once).
//
// It watches from the revision at which the watch is created, not from
// since: etcd delivers the events of a watch that starts in the past only
// at its next resync (every 100 ms), which would delay every waiter on a
// busy cluster. What happened between since and the watch's start is read
// instead: if the cluster moved past since, the watched keys are listed at
// the current revision and counted at since, in one transaction, and a key
// changed after since, or gone since, returns nil at once. The same
// listing covers a watch that the cluster cannot resume after a lost
// connection because it compacted the revisions in between
// (ErrCompacted). No part of the history is required: when since was
// compacted, an entry key missing now counts as a change, and an owner or
// a dependent whose lease ended in that window is seen by the next timed
// pass. A watch
// that the cluster cancels (no leader: the watch requires one) is an
// error wrapping ErrUnavailable.
func (s *Store) WaitEntries(ctx context.Context, ids []string, since state.Mark) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ids = slices.Clone(ids)
	slices.Sort(ids)
	ids = slices.Compact(ids)
	for _, id := range ids {
		if err := checkID(id); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	if since <= 0 {
		return nil // nothing known to compare with: read again
	}
	for {
		changed, err := s.watch(ctx, ids, int64(since))
		switch {
		case err == nil && changed:
			return nil
		case err == nil:
			return ctx.Err() // only the caller's end stops a watch quietly
		case !errors.Is(err, rpctypes.ErrCompacted):
			return err
		}
		// Resumed past a compaction: list again, then watch anew.
		s.lists.Add(1)
		changed, at, err := s.relist(ctx, ids, int64(since))
		if err != nil || changed {
			return err
		}
		since = state.Mark(at)
	}
}

// watched is one watch of WaitEntries, and which of its events count.
type watched struct {
	key  string
	opts []clientv3.OpOption
	// counts reports whether an event of the watch is a change the
	// waiter wants; nil counts every event.
	counts func(*clientv3.Event) bool
}

// watches returns the watches that cover ids and the header: key by key
// (an entry with its owner, and its dependents' deletions) up to
// watchKeysMax entries, past that the ranges of all entries and all
// dependents, filtered here.
func (s *Store) watches(ids []string) []watched {
	ws := []watched{{key: s.l.header()}}
	deletes := func(ev *clientv3.Event) bool { return ev.Type == clientv3.EventTypeDelete }
	if len(ids) <= watchKeysMax {
		for _, id := range ids {
			entry, owner := s.l.entry(id), s.l.owner(id)
			ws = append(ws,
				// [entry, owner]: the two keys, and whatever sorts between
				// them (another ID that extends this one with a byte
				// below '/'), which is filtered out.
				watched{key: entry, opts: []clientv3.OpOption{clientv3.WithRange(owner + "\x00")},
					counts: func(ev *clientv3.Event) bool { k := string(ev.Kv.Key); return k == entry || k == owner }},
				// Puts of dependents come with a put of the entry key;
				// only a lease's end deletes one without it.
				watched{key: s.l.deps(id), opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithFilterPut()}, counts: deletes})
		}
		return ws
	}
	want := make(map[string]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	return append(ws,
		watched{key: s.l.entry(""), opts: []clientv3.OpOption{clientv3.WithPrefix()}, counts: func(ev *clientv3.Event) bool {
			k := string(ev.Kv.Key)
			if id, ok := s.l.parseOwnerKey(k); ok {
				return want[id]
			}
			id, _, dep, err := s.l.parseStateKey(k)
			return err == nil && !dep && want[id]
		}},
		watched{key: s.l.depsAll(), opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithFilterPut()}, counts: func(ev *clientv3.Event) bool {
			id, _, dep, err := s.l.parseStateKey(string(ev.Kv.Key))
			return err == nil && dep && want[id] && ev.Type == clientv3.EventTypeDelete
		}},
	)
}

// watch watches ids and the header until one changes after rev (true),
// ctx ends (false, nil), the watch could not resume past a compaction (an
// error wrapping rpctypes.ErrCompacted) or it fails.
func (s *Store) watch(ctx context.Context, ids []string, rev int64) (bool, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	ws := s.watches(ids)
	// One select over the watches, without a goroutine per watch.
	cases := make([]reflect.SelectCase, 0, len(ws)+1)
	cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())})
	for _, w := range ws {
		ch := s.cli.Watch(wctx, w.key, append(w.opts, clientv3.WithCreatedNotify())...)
		cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ch)})
	}
	created, startedAt := 0, int64(0)
	for {
		i, v, ok := reflect.Select(cases)
		if i == 0 || ctx.Err() != nil {
			return false, nil
		}
		if !ok {
			return false, fmt.Errorf("%s: watching entries: %w: the watch closed", s, ErrUnavailable)
		}
		wr := v.Interface().(clientv3.WatchResponse)
		if wr.CompactRevision != 0 {
			return false, fmt.Errorf("%s: watching entries: %w (compacted at %d)", s, rpctypes.ErrCompacted, wr.CompactRevision)
		}
		if err := wr.Err(); err != nil {
			return false, fmt.Errorf("%s: watching entries: %w: %w", s, ErrUnavailable, err)
		}
		if wr.Canceled {
			return false, fmt.Errorf("%s: watching entries: %w: the watch was cancelled", s, ErrUnavailable)
		}
		if wr.Created {
			created++
			startedAt = max(startedAt, wr.Header.Revision)
			if created == len(ws) && startedAt > rev {
				// Every watch is in place: what came before them is
				// read, at a revision no earlier than any of their starts.
				s.lists.Add(1)
				changed, _, err := s.relist(ctx, ids, rev)
				if err != nil || changed {
					return changed, err
				}
			}
			continue
		}
		counts := ws[i-1].counts
		for _, ev := range wr.Events {
			if counts == nil || counts(ev) {
				s.saw(ev.Kv.ModRevision)
				return true, nil
			}
		}
	}
}

// relistChunk is how many entries one listing transaction covers: six
// ranges each, within MaxTxnOps.
const relistChunk = (MaxTxnOps - 2) / 6

// relist reads the watched keys of ids and the header at the current
// revision, and counts them at rev, in one transaction per chunk: changed
// when one was changed after rev, or one that existed at rev is missing
// (a range that lost keys), else that revision. A key missing then and now
// is unchanged: a waiter on an entry that is gone (a named dependent's
// entry evicted) must not be woken again and again. When rev was
// compacted, the counts at rev cannot be read: an entry key missing now
// is then taken as changed, and an owner key or a range of dependents as
// unchanged (only a lease's end removes one unannounced, and the next
// timed pass sees it).
func (s *Store) relist(ctx context.Context, ids []string, rev int64) (bool, int64, error) {
	var at int64
	compacted := false
	for i := 0; i == 0 || i < len(ids); i += relistChunk {
		chunk := ids[i:min(i+relistChunk, len(ids))]
		type span struct {
			key  string
			opts []clientv3.OpOption
			// gone: a key missing now that the past could not be read
			// for counts as a change.
			gone bool
		}
		var spans []span
		if i == 0 {
			spans = append(spans, span{key: s.l.header()})
		}
		for _, id := range chunk {
			spans = append(spans, span{key: s.l.entry(id), gone: true}, span{key: s.l.owner(id)},
				span{key: s.l.deps(id), opts: []clientv3.OpOption{clientv3.WithPrefix()}})
		}
		var resp *clientv3.TxnResponse
		for {
			ops := make([]clientv3.Op, 0, 2*len(spans))
			for _, sp := range spans {
				now := append(slices.Clip(sp.opts), clientv3.WithKeysOnly(), clientv3.WithLimit(1),
					clientv3.WithSort(clientv3.SortByModRevision, clientv3.SortDescend))
				if at != 0 {
					now = append(now, clientv3.WithRev(at))
				}
				ops = append(ops, clientv3.OpGet(sp.key, now...))
				if !compacted {
					ops = append(ops, clientv3.OpGet(sp.key, append(slices.Clip(sp.opts), clientv3.WithRev(rev), clientv3.WithCountOnly())...))
				}
			}
			err := s.read(ctx, func(rctx context.Context) (err error) {
				resp, err = s.cli.Txn(rctx).Then(ops...).Commit()
				return err
			})
			if errors.Is(err, rpctypes.ErrCompacted) && !compacted {
				compacted = true
				continue
			}
			if err != nil {
				return false, 0, s.fail(ctx, "listing watched entries", err)
			}
			break
		}
		if at == 0 {
			at = resp.Header.Revision
			s.saw(at)
		}
		step := 2
		if compacted {
			step = 1
		}
		for j, sp := range spans {
			now := rangeResp(resp, j*step)
			if len(now.Kvs) > 0 && now.Kvs[0].ModRevision > rev {
				return true, at, nil
			}
			if compacted {
				if sp.gone && now.Count == 0 {
					return true, at, nil
				}
				continue
			}
			if then := rangeResp(resp, j*step+1); now.Count < then.Count {
				return true, at, nil
			}
		}
	}
	return false, at, nil
}

var _ state.Watcher = (*Store)(nil)
