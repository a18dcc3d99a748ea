package etcdstore

import (
	"context"
	"time"

	"github.com/depcache/depcache/state"
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
		rctx, cancel := s.rctx(ctx)
		defer cancel()
		g, err := s.cli.Grant(rctx, leaseSeconds(d.Expires.Sub(d.Since)))
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
	rctx, cancel := s.rctx(ctx)
	defer cancel()
	g, err := s.cli.Grant(rctx, secs)
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
	rctx, cancel := s.rctx(ctx)
	r, err := s.cli.TimeToLive(rctx, sess.Lease())
	cancel()
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
