package state_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest/slowfs"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

// hostStore opens root as a process of host name would: the lock judges
// the other test hosts' holders by their lease only.
func hostStore(t *testing.T, root, name string, lease time.Duration, onHold func(time.Duration)) (*state.Store, *logtest.Hook) {
	t.Helper()
	log, hook := logtest.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	procs := &fakeProcs{self: state.Process{Host: name, BootID: "boot-" + name, PIDNS: "ns-" + name, PID: 1, StartTime: 1}}
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Lease: lease, Processes: procs, Log: log}, OnHold: onHold})
	if err != nil {
		t.Fatal(err)
	}
	return s, hook
}

func broke(hook *logtest.Hook) int {
	n := 0
	for _, e := range hook.AllEntries() {
		if e.Message == "broke a stale lock" {
			n++
		}
	}
	return n
}

// On a filesystem where every operation takes a millisecond and every fsync
// 20 more, two hosts with four goroutines each lose no update, and no live
// holder is judged stale: a lock hold stays far below the lease.
func TestSlowFilesystemNoLostUpdates(t *testing.T) {
	shared := t.TempDir()
	slowA, slowB := slowfs.Mount(t, shared), slowfs.Mount(t, shared)
	slowA.SetDelay(time.Millisecond, 20*time.Millisecond)
	slowB.SetDelay(time.Millisecond, 20*time.Millisecond)
	const lease = 3 * time.Second
	var mu sync.Mutex
	var holds []time.Duration
	onHold := func(d time.Duration) { mu.Lock(); holds = append(holds, d); mu.Unlock() }
	a, hookA := hostStore(t, slowA.Mnt, "a", lease, onHold)
	b, hookB := hostStore(t, slowB.Mnt, "b", lease, onHold)
	counter := state.Key{Kind: state.Bundle, Source: "https://example.com/counter"}
	const perWorker = 5
	var wg sync.WaitGroup
	errs := make(chan error, 8*perWorker)
	for w := range 8 {
		s := a
		if w%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perWorker {
				errs <- s.Update(context.Background(), func(st *state.State) (bool, error) {
					e := st.Get(counter)
					if e == nil {
						e = &state.Entry{Key: counter, Stage: state.Downloading}
					} else {
						e = e.Clone() // shared with the store's cache: never modified in place
					}
					st.Put(e)
					e.Progress.Heartbeat++
					return true, nil
				})
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	st, err := a.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Get(counter).Progress.Heartbeat; got != 8*perWorker {
		t.Errorf("counter %d after %d increments: updates were lost", got, 8*perWorker)
	}
	if n := broke(hookA) + broke(hookB); n > 0 {
		t.Errorf("%d live locks broken on a slow filesystem", n)
	}
	longest := slices.Max(holds)
	if longest > lease/2 {
		t.Errorf("longest lock hold %s, more than half the lease %s", longest, lease)
	}
	fsyncs := slowA.Count(slowfs.Fsync) + slowB.Count(slowfs.Fsync)
	if fsyncs < 8*perWorker { // the file's; a directory fsync is not sent to a FUSE server
		t.Errorf("only %d fsyncs went through the slow filesystem", fsyncs)
	}
	t.Logf("%d updates, longest hold %s, %d fsyncs delayed", len(holds), longest, fsyncs)
}

// A holder whose filesystem hangs past the lease before its commit point
// finds at the commit that it lost the lock, and writes nothing over the
// state that the host which took the lock over committed. (A hang inside the
// final rename itself, after the last check, is the window no lease lock can
// close on a filesystem without compare-and-swap; the README says so.)
func TestSlowFilesystemStallPastLeaseIsFenced(t *testing.T) {
	shared := t.TempDir()
	slowA, slowB := slowfs.Mount(t, shared), slowfs.Mount(t, shared)
	const lease = time.Second
	a, _ := hostStore(t, slowA.Mnt, "a", lease, nil)
	b, hookB := hostStore(t, slowB.Mnt, "b", lease, nil)
	ctx := context.Background()
	key := func(name string) state.Key {
		return state.Key{Kind: state.Bundle, Source: "https://example.com/" + name}
	}
	putKey := func(name string) func(*state.State) (bool, error) {
		return func(st *state.State) (bool, error) {
			st.Put(&state.Entry{Key: key(name), Stage: state.Downloading})
			return true, nil
		}
	}
	if err := a.Update(ctx, putKey("seed")); err != nil {
		t.Fatal(err)
	}
	// Hang host a in the middle of its commit: keeping the previous version
	// comes after the state is written to a temporary file and before the
	// last check of the lock. Held at the link of its own temporary name
	// for state.json.prev, a links once b has committed, finds its lock
	// lost at the check that follows, and writes nothing.
	hold := slowA.HoldNext(slowfs.Link, "."+state.StateFile+state.PrevSuffix+"*")
	errA := make(chan error, 1)
	go func() { errA <- a.Update(ctx, putKey("from-a")) }()
	<-hold.Hit()
	start := time.Now()
	if err := b.Update(ctx, putKey("from-b")); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	hold.Release()
	err := <-errA
	if !errors.Is(err, state.ErrLockLost) {
		t.Fatalf("host a after its stall: %v, want ErrLockLost", err)
	}
	if broke(hookB) != 1 {
		t.Errorf("host b broke %d locks, want 1", broke(hookB))
	}
	if took < lease {
		t.Errorf("host b took the lock after %s, before the lease of %s ran out", took, lease)
	}
	st, err := b.View(ctx)
	if err != nil {
		t.Fatalf("state after the stall: %v", err)
	}
	got := []bool{st.Get(key("seed")) != nil, st.Get(key("from-b")) != nil, st.Get(key("from-a")) != nil}
	if fmt.Sprint(got) != "[true true false]" {
		t.Errorf("seed, from-b, from-a present: %v; want the seed and b's entry, not a's", got)
	}
	// a wrote nothing: state.json.prev is b's previous version, and a's
	// link is gone.
	prev, err := state.DecodeFile(shared, state.StateFile+state.PrevSuffix)
	if err != nil {
		t.Fatalf("state.json.prev after the stall: %v", err)
	}
	if got := []bool{prev.Get(key("seed")) != nil, prev.Get(key("from-b")) != nil}; fmt.Sprint(got) != "[true false]" {
		t.Errorf("seed, from-b in state.json.prev: %v; want b's previous version, the seed alone", got)
	}
	if links, _ := filepath.Glob(filepath.Join(shared, "."+state.StateFile+state.PrevSuffix+"*")); len(links) != 0 {
		t.Errorf("host a left its link: %v", links)
	}
}
