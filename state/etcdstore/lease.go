package etcdstore

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/depcache/depcache/state"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// defaultSessionTTL is the TTL of the session's lease when
// LeaseDependents is given none: the manager's default dependent lease.
const defaultSessionTTL = time.Minute

// LeaseDependents makes the store put, from its next commit on, every
// dependent bound to a process that it writes on the lease of its
// session, of ttl, and every named dependent with a TTL on a lease of its
// own. A session already running keeps its TTL.
func (s *Store) LeaseDependents(ttl time.Duration) {
	s.sessMu.Lock()
	s.sessTTL = ttl
	s.leasing = true
	s.sessMu.Unlock()
}

// leaseSeconds is d in whole seconds, rounded up (a lease ends late, never
// early), at least 1; etcd raises a TTL below its minimum.
func leaseSeconds(d time.Duration) int64 {
	return max(int64((d+time.Second-1)/time.Second), 1)
}

// depLease returns the lease that dependent d is put on, 0 for none: the
// session's for one bound to a process (its TTL, if any, is judged by the
// managers, as before), a lease of its own of its TTL for a named one
// (granted now: it ends at the TTL from this commit, not before). Only
// after LeaseDependents.
func (s *Store) depLease(ctx context.Context, d state.Dependent) (clientv3.LeaseID, error) {
	s.sessMu.Lock()
	leasing := s.leasing
	s.sessMu.Unlock()
	switch {
	case !leasing:
		return 0, nil
	case d.Process != nil:
		return s.sessionLease(ctx)
	case d.Expires != nil:
		g, err := s.grant(ctx, leaseSeconds(d.Expires.Sub(d.Since)))
		if err != nil {
			return 0, s.fail(ctx, "granting a dependent's lease", err)
		}
		return g.ID, nil
	}
	return 0, nil
}

// sessionLease returns the lease of this store's session, starting a new
// session when there is none or the last one ended (its lease expired:
// the dependents on it are gone; or the store is closing).
func (s *Store) sessionLease(ctx context.Context) (clientv3.LeaseID, error) {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if s.sess != nil {
		select {
		case <-s.sess.Done():
			s.sess = nil
		default:
			return s.sess.Lease(), nil
		}
	}
	ttl := s.sessTTL
	if ttl <= 0 {
		ttl = defaultSessionTTL
	}
	secs := leaseSeconds(ttl)
	g, err := s.grant(ctx, secs)
	if err != nil {
		return 0, s.fail(ctx, "granting the session's lease", err)
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(g.ID), concurrency.WithTTL(int(secs)), concurrency.WithContext(s.life))
	if err != nil {
		return 0, s.fail(ctx, "starting the session", err)
	}
	s.sess = sess
	s.sessions.Add(1)
	return g.ID, nil
}

// checkSession forgets the session if its lease is gone, after a commit
// was refused for a lease that was not found: the session's keep-alive
// may not have noticed yet.
func (s *Store) checkSession(ctx context.Context) {
	s.sessMu.Lock()
	sess := s.sess
	s.sessMu.Unlock()
	if sess == nil {
		return
	}
	var r *clientv3.LeaseTimeToLiveResponse
	err := s.read(ctx, func(rctx context.Context) (err error) {
		r, err = s.cli.TimeToLive(rctx, sess.Lease())
		return err
	})
	if err != nil || r.TTL > 0 {
		return
	}
	sess.Orphan()
	s.sessMu.Lock()
	if s.sess == sess {
		s.sess = nil
	}
	s.sessMu.Unlock()
}

// endSession revokes the session's lease, which removes the dependents
// bound to this process at once: the process is done with them.
func (s *Store) endSession() {
	s.sessMu.Lock()
	sess := s.sess
	s.sess = nil
	s.sessMu.Unlock()
	if sess == nil {
		return
	}
	sess.Orphan()
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	_, _ = s.cli.Revoke(ctx, sess.Lease()) // if it fails, the lease expires by itself
}

// SessionLease returns the lease of this store's session, 0 if none runs.
func (s *Store) SessionLease() clientv3.LeaseID {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if s.sess == nil {
		return 0
	}
	return s.sess.Lease()
}

var _ state.DependentLeaser = (*Store)(nil)

// ownerKV is an owner key as read: the generation it holds, on its lease.
type ownerKV struct {
	gen   uint64
	lease clientv3.LeaseID
}

// LeaseOwners makes the store hold the owner of every DOWNLOADING entry
// it writes on a lease of ttl: the commit that claims the entry puts its
// owner key (PREFIX/e/<keyID>/owner, the generation) on a new lease, each
// commit of the owner that changes its progress renews that lease first,
// and a commit that publishes, fails, hands back or removes the entry
// deletes the key. A lease that ended is never renewed: its owner's
// next reports commit, but the waiters take over.
func (s *Store) LeaseOwners(ttl time.Duration) {
	s.ownMu.Lock()
	s.ownerTTL = ttl
	if s.lapsed == nil {
		s.lapsed = map[string]uint64{}
	}
	s.ownMu.Unlock()
}

// OwnerLapsed reports whether a read of this store found entry id
// DOWNLOADING at generation gen with an owner but without its owner key:
// the owner's lease ended. It stays true until the entry moves on.
func (s *Store) OwnerLapsed(id string, gen uint64) bool {
	s.ownMu.Lock()
	defer s.ownMu.Unlock()
	g, ok := s.lapsed[id]
	return ok && g == gen
}

// noteOwners records, after a read, the owners whose lease ended.
func (s *Store) noteOwners(sn *snapshot, st *state.State) {
	s.ownMu.Lock()
	defer s.ownMu.Unlock()
	if s.ownerTTL <= 0 {
		return
	}
	if sn.whole {
		for id, gen := range s.lapsed {
			if e := st.Entries[id]; e == nil || e.Generation != gen || e.Stage != state.Downloading {
				delete(s.lapsed, id)
			}
		}
	}
	for id, e := range st.Entries {
		if e.Stage != state.Downloading || e.Owner == nil {
			continue
		}
		if o, ok := sn.owners[id]; !ok || o.gen != e.Generation {
			s.lapsed[id] = e.Generation
		}
	}
}

// planOwner adds to t what the commit of ne does to its owner key: put it
// on a new lease at a claim, renew its lease at a progress report of its
// owner, delete it when the entry is no longer owned. old is the entry as
// read, nil if there was none.
func (s *Store) planOwner(ctx context.Context, t *txn, sn *snapshot, id string, ne, old *state.Entry) error {
	s.ownMu.Lock()
	ttl := s.ownerTTL
	s.ownMu.Unlock()
	if ttl <= 0 {
		return nil
	}
	o, hasKey := sn.owners[id]
	if ne.Stage != state.Downloading || ne.Owner == nil {
		if hasKey {
			t.del(s.l.owner(id))
		}
		return nil
	}
	switch {
	case old == nil || old.Owner == nil || old.Generation != ne.Generation || *old.Owner != *ne.Owner:
		g, err := s.grant(ctx, leaseSeconds(ttl))
		if err != nil {
			return s.fail(ctx, "granting an owner's lease", err)
		}
		t.put(s.l.owner(id), []byte(strconv.FormatUint(ne.Generation, 10)), clientv3.WithLease(g.ID))
	case old.Progress != ne.Progress && hasKey && o.gen == ne.Generation && o.lease != 0:
		// A report of the owner: renew its lease first. One that ended
		// stays ended (etcd refuses to renew it): the waiters take over,
		// and this owner's publish will be fenced.
		_ = s.read(ctx, func(rctx context.Context) error {
			_, err := s.cli.KeepAliveOnce(rctx, o.lease)
			if errors.Is(err, rpctypes.ErrLeaseNotFound) || errors.Is(err, rpctypes.ErrGRPCLeaseNotFound) {
				return nil
			}
			return err
		})
	}
	return nil
}

var _ state.OwnerLeaser = (*Store)(nil)
