package manager_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

// lockBreaker is the real file store, whose lock another host takes over
// (as when it judged this process stopped past the lease) inside the first
// hold of UpdateEntries, before that hold can commit.
type lockBreaker struct {
	state.Backend
	root string
	once sync.Once
}

func (b *lockBreaker) UpdateEntries(ctx context.Context, ids []string, fn func(*state.Txn) (bool, error)) error {
	return b.Backend.UpdateEntries(ctx, ids, func(tx *state.Txn) (bool, error) {
		b.once.Do(func() {
			rec, _ := json.Marshal(map[string]any{"host": "another-host", "boot_id": "b", "pid_ns": "ns", "pid": 4242,
				"start_time": 1, "nonce": "00112233445566778899aabbccddeeff", "acquired": time.Now()})
			lock := filepath.Join(b.root, state.LockFile)
			if err := os.WriteFile(lock+".taken", rec, 0o644); err != nil {
				panic(err)
			}
			if err := os.Rename(lock+".taken", lock); err != nil {
				panic(err)
			}
		})
		return fn(tx)
	})
}

// TestGetAfterTheLockWasBroken: a get whose hold of the state lock was
// broken before its commit (the other host's lock is then itself broken
// after the lease) is applied again instead of failing, says so once, and
// registers its dependent once.
func TestGetAfterTheLockWasBroken(t *testing.T) {
	root := t.TempDir()
	log, hook := logtest.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	s, err := state.Open(root, state.Options{NoCombine: true, Lock: state.LockOptions{Log: quietLog(), Lease: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	m, err := manager.New(manager.Config{Root: root, State: &lockBreaker{Backend: s, root: root}, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "https://example.com/stopped.tar.gz", "")
	if _, err := m.Get(context.Background(), "job", k); err != nil {
		t.Fatalf("get after its lock was broken: %v, want it applied again", err)
	}
	e := viewEntry(t, root, k)
	if e == nil || len(e.Dependents) != 1 {
		t.Fatalf("entry after the get: %+v, want it with the one dependent", e)
	}
	told := 0
	for _, en := range hook.AllEntries() {
		if strings.Contains(en.Message, "state lock was broken while this process held it") {
			told++
		}
	}
	if told != 1 {
		t.Errorf("told %d times that the lock was broken, want once", told)
	}
}

// zeroMark is the real file store presented as a Watcher that has seen
// nothing yet (Mark 0), as an etcd store is before its first read.
type zeroMark struct {
	state.Backend
	zero atomic.Int32 // WaitEntries calls without a mark
}

func (z *zeroMark) Mark() state.Mark { return 0 }
func (z *zeroMark) WaitEntries(ctx context.Context, ids []string, since state.Mark) error {
	if since == 0 {
		z.zero.Add(1)
		return nil // what a store answers: read again, at once
	}
	<-ctx.Done()
	return ctx.Err()
}

// TestNoWatchWithoutAMark: the loop never waits on a watch without a mark
// (a watch then returns at once, and a loop whose passes fail would spin);
// it polls instead.
func TestNoWatchWithoutAMark(t *testing.T) {
	root := t.TempDir()
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	z := &zeroMark{Backend: s}
	m := newManager(t, root, func(c *manager.Config) { c.State = z })
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	if _, err := getWait(t, m, "run", mustKey(t, "file://"+abs, "")); err != nil {
		t.Fatal(err)
	}
	if n := z.zero.Load(); n != 0 {
		t.Fatalf("the loop waited on %d watches without a mark", n)
	}
}
