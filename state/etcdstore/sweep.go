package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/depcache/depcache/state"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// evictBatch is how many victims one eviction transaction removes: 3
// compares and 2 deletes each, and one put of the removal counter, stay
// within MaxTxnOps.
const evictBatch = 30

// Evict removes the entries ids that exist, were not changed after since
// and have no dependent key, evictBatch to a transaction. Each victim's
// removal compares its entry key's creation (it exists) and mod revision
// (at most since) and that no key exists under its dependents' prefix,
// and deletes its entry and owner keys; each transaction also bumps the
// removal counter, which conflicts every whole-state commit that read
// before it. A batch whose compare fails is retried victim by victim, so
// that one changed victim keeps only itself. A lost answer is settled by
// reading the victims' keys back: a deletion is its own record.
func (s *Store) Evict(ctx context.Context, ids []string, since state.Mark) ([]string, error) {
	ids = slices.Clone(ids)
	slices.Sort(ids)
	ids = slices.Compact(ids)
	for _, id := range ids {
		if err := checkID(id); err != nil {
			return nil, fmt.Errorf("%s: %w", s, err)
		}
	}
	var removed []string
	for i := 0; i < len(ids); i += evictBatch {
		batch := ids[i:min(i+evictBatch, len(ids))]
		ok, err := s.evictTxn(ctx, batch, since)
		if err != nil {
			return removed, err
		}
		if ok {
			removed = append(removed, batch...)
			continue
		}
		for j := 0; len(batch) > 1 && j < len(batch); j++ {
			ok, err := s.evictTxn(ctx, batch[j:j+1], since)
			if err != nil {
				return removed, err
			}
			if ok {
				removed = append(removed, batch[j])
			}
		}
	}
	return removed, nil
}

// evictTxn removes all of ids or none.
func (s *Store) evictTxn(ctx context.Context, ids []string, since state.Mark) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	t := &txn{}
	for _, id := range ids {
		t.cmp(clientv3.Compare(clientv3.CreateRevision(s.l.entry(id)), ">", 0))
		t.cmp(clientv3.Compare(clientv3.ModRevision(s.l.entry(id)), "<", int64(since)+1))
		t.cmp(clientv3.Compare(clientv3.CreateRevision(s.l.deps(id)).WithPrefix(), "=", 0))
		t.del(s.l.entry(id))
		t.del(s.l.owner(id))
	}
	t.put(s.l.removals(), []byte(s.l.nonce(newNonce())))
	if len(t.ops) > MaxTxnOps || len(t.cmps) > MaxTxnOps || t.bytes > MaxRequestBytes-16*1024 {
		return false, fmt.Errorf("%s: %w: eviction of %d entries", s, ErrTooBig, len(ids))
	}
	rctx, cancel := s.rctx(ctx)
	resp, err := s.cli.Txn(rctx).If(t.cmps...).Then(t.ops...).Commit()
	cancel()
	if err == nil {
		s.saw(resp.Header.Revision)
		if resp.Succeeded {
			s.commits.Add(1)
		} else {
			s.conflicts.Add(1)
		}
		return resp.Succeeded, nil
	}
	if definite(err) {
		return false, s.fail(ctx, "evicting", err)
	}
	// Lost answer: the transaction deleted all of the entry keys or none.
	s.settled.Add(1)
	var r *clientv3.GetResponse
	rerr := s.read(context.WithoutCancel(ctx), func(rctx context.Context) (err error) {
		r, err = s.cli.Get(rctx, s.l.entry(ids[0]), clientv3.WithCountOnly())
		return err
	})
	if rerr != nil {
		return false, fmt.Errorf("%s: evicting: %v; %w", s, err, outcomeUnknown("reading back", rerr))
	}
	// Gone: deleted by this transaction, or by another sweeper's; either
	// way no entry names the content now.
	return r.Count == 0, nil
}

// MaySweep reports whether this store is the elected sweeper of its
// prefix. The election is etcd's (concurrency.Election's layout: each
// candidate a key PREFIX/sweeper/<lease in hex> on its session's lease,
// the leader the oldest), but a campaign does not wait: MaySweep puts this
// store's key if it is missing and reads the oldest, in one transaction,
// and a candidate that is not the leader stays queued behind it. Waiting
// would block the manager's loop while another leads (and two that
// campaign at once would each wait for the request timeout). A leader
// stays elected while its session lives: Close, or a lease that ended,
// hands the election to the next candidate.
func (s *Store) MaySweep(ctx context.Context) (bool, error) {
	lease, err := s.sessionLease(ctx)
	if err != nil {
		return false, err
	}
	mine := s.l.sweeper() + fmt.Sprintf("%x", int64(lease))
	oldest := clientv3.OpGet(s.l.sweeper(), clientv3.WithFirstCreate()...)
	// A put-if-absent of our own key: a repeat after a lost answer finds
	// it and only reads.
	var resp *clientv3.TxnResponse
	err = s.read(ctx, func(rctx context.Context) (err error) {
		resp, err = s.cli.Txn(rctx).
			If(clientv3.Compare(clientv3.CreateRevision(mine), "=", 0)).
			Then(clientv3.OpPut(mine, s.name, clientv3.WithLease(lease)), oldest).
			Else(oldest).Commit()
		return err
	})
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) || errors.Is(err, rpctypes.ErrGRPCLeaseNotFound) {
			s.checkSession(ctx) // the session ended: the next call campaigns anew
			return false, nil
		}
		return false, s.fail(ctx, "campaigning for the sweeper election", err)
	}
	s.saw(resp.Header.Revision)
	r := rangeResp(resp, len(resp.Responses)-1)
	return len(r.Kvs) > 0 && string(r.Kvs[0].Key) == mine, nil
}

var (
	_ state.Evictor      = (*Store)(nil)
	_ state.SweepElector = (*Store)(nil)
)
