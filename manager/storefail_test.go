package manager_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// errStoreDown is what the failing store answers: the etcd store's
// ErrUnavailable, or a file store whose commit failed.
var errStoreDown = errors.New("state store unavailable (test)")

// failPublish is a store whose first commit of key going READY fails, as
// a commit does when the etcd cluster loses its leader or a member at that
// moment; every other commit works.
type failPublish struct {
	*state.Store
	key    state.Key
	failed atomic.Int64
	// every: every publish commit fails, with err (else the first, with
	// errStoreDown).
	every bool
	err   error
}

func (s *failPublish) UpdateEntries(ctx context.Context, ids []string, fn func(*state.Txn) (bool, error)) error {
	return s.Store.UpdateEntries(ctx, ids, func(tx *state.Txn) (bool, error) {
		named := false
		for _, id := range ids {
			named = named || id == s.key.ID()
		}
		var before state.Stage
		if named {
			if e := tx.Get(s.key); e != nil {
				before = e.Stage
			}
		}
		changed, err := fn(tx)
		if err == nil && named && before == state.Downloading {
			if e := tx.Get(s.key); e != nil && e.Stage == state.Ready {
				if n := s.failed.Add(1); s.every {
					return false, s.err
				} else if n == 1 {
					return false, errStoreDown
				}
			}
		}
		return changed, err
	})
}

// failingPublish is a root, the key of a file bundle "the bundle", and a
// failPublish store over the root's file store for that key.
func failingPublish(t *testing.T, every bool, err error) (string, state.Key, *failPublish) {
	t.Helper()
	root := t.TempDir()
	blob := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(blob, []byte("the bundle"), 0o644); err != nil {
		t.Fatal(err)
	}
	fs, oerr := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if oerr != nil {
		t.Fatal(oerr)
	}
	k := mustKey(t, "file://"+blob, "")
	return root, k, &failPublish{Store: fs, key: k, every: every, err: err}
}

// TestPublishCommitFailureIsNotAFailedDownload: a download whose bytes
// arrived and verified, but whose publish commit failed because the state
// store did, is not a failed download: the entry must not become FAILED
// with the store's error (every get of it would then fail for the
// cool-down, for a fault of the store, not of the source). It is fetched
// again and published.
func TestPublishCommitFailureIsNotAFailedDownload(t *testing.T) {
	root, k, store := failingPublish(t, false, nil)
	var log logRecorder
	m := newManager(t, root, func(c *manager.Config) {
		c.State = store
		c.Log = log.logger()
	})
	e, err := getWait(t, m, "job", k)
	if store.failed.Load() == 0 {
		t.Fatal("no publish commit failed: the test proved nothing")
	}
	if err != nil || e.Stage != state.Ready {
		t.Fatalf("after a publish commit that failed once: %s %q, %v; want READY", e.Stage, e.Message, err)
	}
	if e.Generation != 2 {
		t.Errorf("READY at generation %d, want 2 (fetched again after the failed commit)", e.Generation)
	}
	p, err := m.Abs(e)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "the bundle" {
		t.Errorf("content %q (%v)", b, err)
	}
	if got := dirNames(t, root, "entries"); len(got) != 1 || got[0] != gen(k, 2) {
		t.Errorf("entries/ holds %v, want only %s", got, gen(k, 2))
	}
	for _, msg := range log.messages() {
		if strings.HasSuffix(msg, "download failed") {
			t.Errorf("logged %q: the download did not fail, the store did", msg)
		}
	}
}

// TestPublishOnAFullDiskFails: a publish commit that fails because the
// disk is full (ENOSPC) makes the entry FAILED, transient, under its
// cool-down: handed back, it was claimed and fetched again at once,
// thousands of times a minute.
func TestPublishOnAFullDiskFails(t *testing.T) {
	root, k, store := failingPublish(t, true, fmt.Errorf("writing shard: %w", syscall.ENOSPC))
	m := newManager(t, root, func(c *manager.Config) { c.State = store })
	e, err := getWait(t, m, "job", k)
	var failed *manager.FailedError
	if !errors.As(err, &failed) || e.Stage != state.Failed || e.Permanent || !strings.Contains(e.Message, "disk is full") {
		t.Fatalf("a publish on a full disk: %+v, %v; want FAILED (transient), naming the full disk", e, err)
	}
	if n := store.failed.Load(); n != 1 {
		t.Errorf("%d publish commits tried, want 1 (no refetch before the cool-down)", n)
	}
}

// outage is a store that answers state.ErrUnavailable, as the etcd store
// does without quorum, while down is set.
type outage struct {
	*state.Store
	down   atomic.Bool
	failed atomic.Int64
}

func (s *outage) fail() error {
	if !s.down.Load() {
		return nil
	}
	s.failed.Add(1)
	return fmt.Errorf("no quorum (test): %w", state.ErrUnavailable)
}

func (s *outage) View(ctx context.Context) (*state.State, error) {
	if err := s.fail(); err != nil {
		return nil, err
	}
	return s.Store.View(ctx)
}

func (s *outage) Update(ctx context.Context, fn func(*state.State) (bool, error)) error {
	if err := s.fail(); err != nil {
		return err
	}
	return s.Store.Update(ctx, fn)
}

func (s *outage) UpdateEntries(ctx context.Context, ids []string, fn func(*state.Txn) (bool, error)) error {
	if err := s.fail(); err != nil {
		return err
	}
	return s.Store.UpdateEntries(ctx, ids, fn)
}

func (s *outage) Propose(ctx context.Context, p state.Proposal) ([]byte, error) {
	if err := s.fail(); err != nil {
		return nil, err
	}
	return s.Store.Propose(ctx, p)
}

// TestWaitOutlastsAnUnavailableStore: a Wait whose loop cannot reach the
// store because it is out (an etcd cluster without quorum) waits the
// outage out, past the failed passes that end a Wait on a state that
// does not read, and gets the entry once the store answers again.
func TestWaitOutlastsAnUnavailableStore(t *testing.T) {
	root := t.TempDir()
	fs, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	store := &outage{Store: fs}
	g := newGate(false)
	m, _ := startManager(t, root, func(c *manager.Config) {
		c.State = store
		c.Sources = g.sources()
	})
	t.Cleanup(g.close)
	k := mustKey(t, "http://h/x", "")
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	if _, err := m.Get(ctx, "job", k); err != nil {
		t.Fatal(err)
	}
	type result struct {
		e   state.Entry
		err error
	}
	done := make(chan result, 1)
	go func() {
		e, err := m.Wait(ctx, k)
		done <- result{e, err}
	}()
	call := g.next(t)
	store.down.Store(true)
	for store.failed.Load() < 20 { // many times the failed passes that end a Wait otherwise
		select {
		case r := <-done:
			t.Fatalf("Wait ended during the outage: %s, %v", r.e.Stage, r.err)
		case <-ctx.Done():
			t.Fatal("the store was not asked during the outage")
		case <-time.After(5 * time.Millisecond):
		}
	}
	store.down.Store(false)
	if call.ctx.Err() != nil {
		call = g.next(t) // the download was handed back meanwhile, and claimed again
	}
	call.body <- []byte("the body")
	r := <-done
	if r.err != nil || r.e.Stage != state.Ready {
		t.Fatalf("after the outage: %s, %v; want READY", r.e.Stage, r.err)
	}
}
