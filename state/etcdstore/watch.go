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
// revision since, or ctx ends. Every commit that changes an entry or its
// dependents puts its entry key, and removing it deletes the key, so the
// entry keys' events cover both.
//
// It watches the entry keys from the revision at which the watch is
// created, not from since: etcd delivers the events of a watch that starts
// in the past only at its next resync (every 100 ms), which would delay
// every waiter on a busy cluster. What happened between since and the
// watch's start is read instead: if the cluster moved past since, the
// entry keys are listed at the current revision, and one changed after
// since (or gone since) returns nil at once. The same listing covers a
// watch that the cluster cannot resume after a lost connection because it
// compacted the revisions in between (ErrCompacted). No part of the
// history is required: only whether a key missing now existed at since is
// read at since, and a compacted since counts as a change. A watch that
// the cluster cancels (no leader: the watch requires one) is an error
// wrapping ErrUnavailable. The end of a dependent's lease deletes its key
// without putting the entry key: it wakes no waiter.
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
	if len(ids) == 0 {
		<-ctx.Done() // nothing named can change
		return ctx.Err()
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

// watch watches the entry keys of ids until one changes after rev (true),
// ctx ends (false, nil), the watch could not resume past a compaction (an
// error wrapping rpctypes.ErrCompacted) or it fails.
func (s *Store) watch(ctx context.Context, ids []string, rev int64) (bool, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	var chans []clientv3.WatchChan
	want := map[string]bool{}
	if len(ids) <= watchKeysMax {
		for _, id := range ids {
			chans = append(chans, s.cli.Watch(wctx, s.l.entry(id), clientv3.WithCreatedNotify()))
		}
	} else {
		for _, id := range ids {
			want[s.l.entry(id)] = true
		}
		chans = append(chans, s.cli.Watch(wctx, s.l.entry(""), clientv3.WithPrefix(), clientv3.WithCreatedNotify()))
	}
	// One select over the watches, without a goroutine per watch.
	cases := make([]reflect.SelectCase, 0, len(chans)+1)
	cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())})
	for _, ch := range chans {
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
			if created == len(chans) && startedAt > rev {
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
		for _, ev := range wr.Events {
			if len(want) == 0 || want[string(ev.Kv.Key)] {
				s.saw(ev.Kv.ModRevision)
				return true, nil
			}
		}
	}
}

// relist reads the entry keys of ids at the current revision: changed
// when one was changed after rev, or is missing but existed at rev (or rev
// was compacted: then it cannot tell), else that revision. A key missing
// then and now is unchanged: a waiter on an entry that is gone (a named
// dependent's entry evicted) must not be woken again and again.
func (s *Store) relist(ctx context.Context, ids []string, rev int64) (bool, int64, error) {
	var at int64
	for i := 0; i < len(ids); i += MaxTxnOps {
		chunk := ids[i:min(i+MaxTxnOps, len(ids))]
		ops := make([]clientv3.Op, len(chunk))
		for j, id := range chunk {
			var opts []clientv3.OpOption
			if at != 0 {
				opts = append(opts, clientv3.WithRev(at))
			}
			ops[j] = clientv3.OpGet(s.l.entry(id), append(opts, clientv3.WithKeysOnly())...)
		}
		var resp *clientv3.TxnResponse
		err := s.read(ctx, func(rctx context.Context) (err error) {
			resp, err = s.cli.Txn(rctx).Then(ops...).Commit()
			return err
		})
		if err != nil {
			return false, 0, s.fail(ctx, "listing watched entries", err)
		}
		if at == 0 {
			at = resp.Header.Revision
			s.saw(at)
		}
		for j, id := range chunk {
			kv, ok := one(rangeResp(resp, j))
			if ok && kv.mod > rev {
				return true, at, nil
			}
			if !ok {
				existed, err := s.existedAt(ctx, id, rev)
				if err != nil || existed {
					return true, at, err
				}
			}
		}
	}
	return false, at, nil
}

// existedAt reports whether the entry key of id existed at revision rev,
// true also when rev was compacted (it cannot tell).
func (s *Store) existedAt(ctx context.Context, id string, rev int64) (bool, error) {
	var r *clientv3.GetResponse
	err := s.read(ctx, func(rctx context.Context) (err error) {
		r, err = s.cli.Get(rctx, s.l.entry(id), clientv3.WithRev(rev), clientv3.WithCountOnly())
		return err
	})
	if errors.Is(err, rpctypes.ErrCompacted) {
		return true, nil
	}
	if err != nil {
		return false, s.fail(ctx, "reading a watched entry's past", err)
	}
	return r.Count > 0, nil
}

var _ state.Watcher = (*Store)(nil)
