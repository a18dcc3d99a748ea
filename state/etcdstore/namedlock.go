package etcdstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/depcache/depcache/state"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// NamedLock is a hold of a lock of `depcache lock` on etcd: a
// concurrency.Mutex under PREFIX/locks/<id>/ on a session lease of its own,
// timed by the server. Unlike the file store's lock, it needs no shared
// filesystem: every host that uses the prefix excludes every other, and a
// holder that dies or is cut off past its lease loses the lock when etcd
// ends the lease, without any waiter judging it.
type NamedLock struct {
	s     *Store
	name  string
	sess  *concurrency.Session
	mu    *concurrency.Mutex
	token uint64
}

// NamedLockInfo is what PREFIX/lockinfo/<id> records of a holder, for
// `depcache locks`.
type NamedLockInfo struct {
	Name     string    `json:"name"`
	Host     string    `json:"host"`
	PID      int       `json:"pid"`
	Acquired time.Time `json:"acquired"` // the holder's wall clock: for humans
	Token    uint64    `json:"token"`
	Lease    int64     `json:"lease"`
}

func (l layout) lockMutex(id string) string { return l.p + "/locks/" + id }
func (l layout) lockInfo(id string) string  { return l.p + "/lockinfo/" + id }
func (l layout) lockInfos() string          { return l.p + "/lockinfo/" }

// LockNamed blocks until it holds the lock name, or ctx ends (the error
// then wraps ctx.Err()). lease is the TTL of the hold's own session lease,
// rounded up to whole seconds: a holder that stops renewing (the client
// renews it by itself every third of it) loses the lock that long after.
// The fencing token is the revision at which the hold was granted, which
// etcd never reuses: every later hold of name has a larger one.
func (s *Store) LockNamed(ctx context.Context, name string, lease time.Duration) (*NamedLock, error) {
	ttl := int(math.Ceil(lease.Seconds()))
	if ttl < 1 {
		ttl = 1
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(ttl), concurrency.WithContext(s.life))
	if err != nil {
		return nil, s.fail(ctx, "lock "+fmt.Sprintf("%q", name)+": granting its lease", err)
	}
	id := state.NamedLockID(name)
	mu := concurrency.NewMutex(sess, s.l.lockMutex(id))
	if err := mu.Lock(ctx); err != nil {
		sess.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s: lock %q: %w", s, name, ctx.Err())
		}
		return nil, s.fail(ctx, fmt.Sprintf("lock %q", name), err)
	}
	l := &NamedLock{s: s, name: name, sess: sess, mu: mu, token: uint64(mu.Header().Revision)}
	host, _ := os.Hostname()
	info, err := json.Marshal(NamedLockInfo{Name: name, Host: host, PID: os.Getpid(), Acquired: time.Now(), Token: l.token, Lease: int64(sess.Lease())})
	if err != nil {
		l.Release(context.WithoutCancel(ctx))
		return nil, err
	}
	// The record is on the hold's lease, written only while we own the
	// lock: it goes when the hold goes, however it ends.
	rctx, cancel := s.rctx(context.WithoutCancel(ctx))
	resp, err := s.cli.Txn(rctx).If(mu.IsOwner()).Then(clientv3.OpPut(s.l.lockInfo(id), string(info), clientv3.WithLease(sess.Lease()))).Commit()
	cancel()
	switch {
	case err != nil:
		l.Release(context.WithoutCancel(ctx))
		return nil, s.fail(ctx, fmt.Sprintf("lock %q: recording the holder", name), err)
	case !resp.Succeeded:
		l.Release(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("%s: lock %q: %w: its lease ended as it was granted", s, name, state.ErrLockLost)
	}
	return l, nil
}

// Token returns the hold's fencing token.
func (l *NamedLock) Token() uint64 { return l.token }

// Lost is closed when the hold's lease ended (or could not be renewed
// before it would): the lock may then be another's.
func (l *NamedLock) Lost() <-chan struct{} { return l.sess.Done() }

// Check reports whether the lock is still held by this hold: an error
// wrapping state.ErrLockLost when its lease ended, another error when the
// cluster did not answer (the hold may still be ours: ask again).
func (l *NamedLock) Check(ctx context.Context) error {
	select {
	case <-l.sess.Done():
		return fmt.Errorf("%s: lock %q: %w: its lease ended", l.s, l.name, state.ErrLockLost)
	default:
	}
	var resp *clientv3.TxnResponse
	err := l.s.read(ctx, func(rctx context.Context) (err error) {
		resp, err = l.s.cli.Txn(rctx).If(l.mu.IsOwner()).Commit()
		return err
	})
	if err != nil {
		return l.s.fail(ctx, fmt.Sprintf("lock %q: checking the hold", l.name), err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%s: lock %q: %w: its key is gone", l.s, l.name, state.ErrLockLost)
	}
	return nil
}

// Release gives the lock up and ends the hold's lease. It reports an
// error wrapping state.ErrLockLost if the hold had been lost already.
func (l *NamedLock) Release(ctx context.Context) error {
	lost := l.Check(ctx)
	rctx, cancel := l.s.rctx(context.WithoutCancel(ctx))
	_ = l.mu.Unlock(rctx)
	cancel()
	if err := l.sess.Close(); err != nil && lost == nil && !errors.Is(err, context.Canceled) {
		lost = l.s.fail(ctx, fmt.Sprintf("lock %q: ending its lease", l.name), err)
	}
	if lost != nil && !errors.Is(lost, state.ErrLockLost) {
		// The cluster did not answer the check: the lease's end,
		// asked for above, settles it either way.
		return nil
	}
	return lost
}

// NamedLocks lists the holders of the named locks under the prefix.
func (s *Store) NamedLocks(ctx context.Context) ([]NamedLockInfo, error) {
	var resp *clientv3.GetResponse
	err := s.read(ctx, func(rctx context.Context) (err error) {
		resp, err = s.cli.Get(rctx, s.l.lockInfos(), clientv3.WithPrefix())
		return err
	})
	if err != nil {
		return nil, s.fail(ctx, "listing the named locks", err)
	}
	var out []NamedLockInfo
	for _, kv := range resp.Kvs {
		var info NamedLockInfo
		if err := json.Unmarshal(kv.Value, &info); err != nil {
			return nil, fmt.Errorf("%s: %s: %w: %v", s, kv.Key, state.ErrCorrupt, err)
		}
		out = append(out, info)
	}
	return out, nil
}

// NamedLockHolder returns the record of the holder of name, if it is held.
func (s *Store) NamedLockHolder(ctx context.Context, name string) (NamedLockInfo, bool, error) {
	all, err := s.NamedLocks(ctx)
	if err != nil {
		return NamedLockInfo{}, false, err
	}
	for _, info := range all {
		if info.Name == name {
			return info, true, nil
		}
	}
	return NamedLockInfo{}, false, nil
}
