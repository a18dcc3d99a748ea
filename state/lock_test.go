package state_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
)

// fakeProcs is a machine whose processes the test decides.
type fakeProcs struct {
	self state.Process
	dead map[int]bool
}

func (f *fakeProcs) Self() state.Process { return f.self }
func (f *fakeProcs) Alive(p state.Process) (bool, error) {
	return !f.dead[p.PID], nil
}

// tickClock advances by step on every reading, so that a waiter's lease
// runs out after a known number of polls without any sleeping.
type tickClock struct {
	mu   sync.Mutex
	now  time.Time
	step time.Duration
}

func (c *tickClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(c.step)
	return c.now
}

func machine(host string, pid int) state.Process {
	return state.Process{Host: host, BootID: "boot-" + host, PIDNS: "pid:[1]", PID: pid, StartTime: 100}
}

// writeHolder plants a lock file as if p had taken it.
func writeHolder(t *testing.T, path string, p state.Process, nonce string) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"host": p.Host, "boot_id": p.BootID, "pid_ns": p.PIDNS,
		"pid": p.PID, "start_time": p.StartTime, "nonce": nonce})
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func newLock(t *testing.T, path string, procs state.Processes, clock state.Clock, lease time.Duration) *state.Lock {
	t.Helper()
	l, err := state.NewLock(path, state.LockOptions{Lease: lease, Processes: procs, Clock: clock, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestLockBreaksStaleHolders(t *testing.T) {
	tests := []struct {
		name   string
		holder state.Process
		dead   bool
		lease  time.Duration
		step   time.Duration
		wbreak bool
	}{
		{name: "same machine, holder dead: broken at once", holder: machine("h1", 7), dead: true, lease: time.Hour, step: time.Millisecond, wbreak: true},
		{name: "same machine, holder alive: never broken", holder: machine("h1", 7), lease: time.Second, step: time.Minute},
		{name: "other host, unchanged past the lease: broken", holder: machine("h2", 7), lease: time.Minute, step: time.Second, wbreak: true},
		{name: "other host, within the lease: kept", holder: machine("h2", 7), lease: time.Hour, step: time.Millisecond},
		{name: "other pid namespace, same pid number, dead there: not judged by pid", holder: func() state.Process {
			p := machine("h1", 7)
			p.PIDNS = "pid:[2]"
			return p
		}(), dead: true, lease: time.Hour, step: time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "lock")
			writeHolder(t, path, tc.holder, "0123456789abcdef0123456789abcdef")
			procs := &fakeProcs{self: machine("h1", 1), dead: map[int]bool{}}
			if tc.dead {
				procs.dead[tc.holder.PID] = true
			}
			l := newLock(t, path, procs, &tickClock{now: time.Unix(0, 0), step: tc.step}, tc.lease)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			unlock, err := l.Lock(ctx)
			if tc.wbreak {
				if err != nil {
					t.Fatalf("stale lock not broken: %v", err)
				}
				if err := unlock(); err != nil {
					t.Fatal(err)
				}
			} else {
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("err = %v, want the wait to time out", err)
				}
				if !strings.Contains(err.Error(), tc.holder.Host) {
					t.Errorf("timeout error %q does not name the holder", err)
				}
				b, _ := os.ReadFile(path)
				if !strings.Contains(string(b), "0123456789abcdef0123456789abcdef") {
					t.Fatal("a live lock was removed")
				}
			}
			litter, _ := filepath.Glob(path + ".*")
			if len(litter) != 0 {
				t.Errorf("litter left: %v", litter)
			}
		})
	}
}

// A breaker that died while breaking is itself broken, and the lock is
// still taken.
func TestLockBreaksDeadBreaker(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	stale := "0123456789abcdef0123456789abcdef"
	writeHolder(t, path, machine("h1", 7), stale)
	writeHolder(t, path+".break-"+stale, machine("h1", 8), "fedcba9876543210fedcba9876543210")
	procs := &fakeProcs{self: machine("h1", 1), dead: map[int]bool{7: true, 8: true}}
	l := newLock(t, path, procs, &tickClock{now: time.Unix(0, 0), step: time.Millisecond}, time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	unlock, err := l.Lock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
}

// Many waiters on other hosts judge the same stale holder at once: each gets
// the lock in turn, never two at a time.
func TestLockConcurrentBreakers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	writeHolder(t, path, machine("dead-host", 7), "0123456789abcdef0123456789abcdef")
	var inside, overlaps, done atomic.Int32
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			procs := &fakeProcs{self: machine("host"+string(rune('a'+i)), 1)}
			l := newLock(t, path, procs, &tickClock{now: time.Unix(0, 0), step: time.Second}, time.Minute)
			unlock, err := l.Lock(context.Background())
			if err != nil {
				t.Error(err)
				return
			}
			if inside.Add(1) != 1 {
				overlaps.Add(1)
			}
			time.Sleep(time.Millisecond) // hold it a little, so that overlaps would show
			inside.Add(-1)
			if err := unlock(); err != nil {
				t.Error(err)
			}
			done.Add(1)
		}()
	}
	wg.Wait()
	if overlaps.Load() != 0 {
		t.Fatalf("%d overlapping holds", overlaps.Load())
	}
	if done.Load() != 8 {
		t.Fatalf("%d of 8 waiters got the lock", done.Load())
	}
}

func TestUnlockAfterBreakReportsLoss(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	l := newLock(t, path, &fakeProcs{self: machine("h1", 1)}, state.RealClock(), time.Hour)
	unlock, err := l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	writeHolder(t, path, machine("h2", 5), "0123456789abcdef0123456789abcdef")
	if err := l.Check(); !errors.Is(err, state.ErrLockLost) {
		t.Fatalf("Check = %v, want ErrLockLost", err)
	}
	if err := unlock(); !errors.Is(err, state.ErrLockLost) {
		t.Fatalf("unlock = %v, want ErrLockLost", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal("unlock removed a lock that was not ours")
	}
}

// TestLockDeadOwnerSameHost: a real process takes the lock and is
// SIGKILLed; we take it although the lease is an hour, so it was judged by
// the pid check, not by the lease.
func TestLockDeadOwnerSameHost(t *testing.T) {
	dir := t.TempDir()
	cmd := child("lock-holder", "DT_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	expectLine(t, lines(t, out), "locked")
	cmd.Process.Kill() // not reaped yet: a zombie must count as dead
	defer cmd.Wait()
	l, err := state.NewLock(filepath.Join(dir, "lock"), state.LockOptions{Lease: time.Hour, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	unlock, err := l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dead owner's lock taken after %v", time.Since(start))
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
}

// TestLockLiveOwnerOtherPIDNamespace: a holder on fake host A with the same
// pid number as the waiter on fake host B (or a pid B does not have) is
// alive and must never be broken: B gets the lock only after A released it.
func TestLockLiveOwnerOtherPIDNamespace(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		holderPID, waiterPID int
	}{
		{"same pid number", 40, 40},
		{"pid unknown to the waiter", 300, 40},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			holder := rigtest.FakeHost(t, "host-a", tc.holderPID, os.Args[0])
			holder.Env = append(holder.Env, "DEPCACHE_TEST_ROLE=lock-holder", "DT_DIR="+dir, "DT_LEASE=1h")
			holder.Stderr = os.Stderr
			hout, _ := holder.StdoutPipe()
			if err := holder.Start(); err != nil {
				t.Fatal(err)
			}
			defer holder.Wait()
			expectLine(t, lines(t, hout), "locked")

			waiter := rigtest.FakeHost(t, "host-b", tc.waiterPID, os.Args[0])
			waiter.Env = append(waiter.Env, "DEPCACHE_TEST_ROLE=lock-waiter", "DT_DIR="+dir, "DT_LEASE=1h")
			waiter.Stderr = os.Stderr
			wout, _ := waiter.StdoutPipe()
			if err := waiter.Start(); err != nil {
				t.Fatal(err)
			}
			wl := lines(t, wout)
			expectLine(t, wl, "waiting 40")
			wdone := make(chan error, 1)
			go func() { wdone <- waiter.Wait() }()
			// The waiter must still be blocked; a timer is only used to
			// check that, never to wait for progress.
			select {
			case err := <-wdone:
				t.Fatalf("waiter finished while the holder was alive: %v", err)
			case <-time.After(500 * time.Millisecond):
			}
			if err := os.WriteFile(filepath.Join(dir, "release"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := <-wdone; err != nil {
				t.Fatalf("waiter: %v (exit 5 means it took a live lock)", err)
			}
		})
	}
}
