package state_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
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
// runs out after a known number of polls without any sleeping. When limit
// is set, the clock stops at the limit-th reading and calls atLimit (a
// context's cancel): a wait then ends after a known number of polls, never
// after an amount of wall time that a loaded machine can fill with fewer
// polls than the test needs.
type tickClock struct {
	mu       sync.Mutex
	now      time.Time
	step     time.Duration
	readings int
	limit    int
	atLimit  func()
}

func (c *tickClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.limit > 0 && c.readings >= c.limit {
		return c.now
	}
	c.readings++
	c.now = c.now.Add(c.step)
	if c.readings == c.limit && c.atLimit != nil {
		c.atLimit()
	}
	return c.now
}

// freeze stops the clock where it is, so that no lease can run out
// however long the waiter goes on. With more > 0 the limit (and atLimit)
// comes after more further readings; with 0 there is none.
func (c *tickClock) freeze(more int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.step = 0
	c.limit = 0
	if more > 0 {
		c.limit = c.readings + more
	}
}

// limitedClock is a tickClock whose limit cancels the returned context.
func limitedClock(t *testing.T, step time.Duration, limit int) (*tickClock, context.Context) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return &tickClock{now: time.Unix(0, 0), step: step, limit: limit, atLimit: cancel}, ctx
}

func machine(host string, pid int) state.Process {
	return state.Process{Host: host, BootID: "boot-" + host, PIDNS: "pid:[1]", PID: pid, StartTime: 100}
}

// writeHolder plants a lock file as if p had taken it.
func writeHolder(t *testing.T, path string, p state.Process, nonce string) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"host": p.Host, "boot_id": p.BootID, "pid_ns": p.PIDNS,
		"pid": p.PID, "start_time": p.StartTime, "nonce": nonce})
	if err != nil {
		t.Fatal(err)
	}
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

// The waits here are bounded by readings of the waiter's clock, not by a
// deadline: a case that must break does so after a known number of
// readings, far below its limit, and a case that must not is watched for
// its full number of readings, however slowly a loaded machine runs them.
func TestLockBreaksStaleHolders(t *testing.T) {
	tests := []struct {
		name   string
		holder state.Process
		dead   bool
		lease  time.Duration
		step   time.Duration
		limit  int // readings of the clock after which the wait is cancelled
		wbreak bool
	}{
		{name: "same machine, holder dead: broken at once", holder: machine("h1", 7), dead: true, lease: time.Hour, step: time.Millisecond, limit: 1000, wbreak: true},
		// Alive, but unchanged past the lease (stopped, or stuck): broken
		// as another host's would be, at about the 62nd reading.
		{name: "same machine, holder alive, unchanged past the lease: broken", holder: machine("h1", 7), lease: time.Minute, step: time.Second, limit: 1000, wbreak: true},
		// Alive and within the lease, stopped at 50 s: kept.
		{name: "same machine, holder alive, within the lease: kept", holder: machine("h1", 7), lease: time.Minute, step: time.Second, limit: 50},
		// Two readings a poll: broken at about the 62nd.
		{name: "other host, unchanged past the lease: broken", holder: machine("h2", 7), lease: time.Minute, step: time.Second, limit: 1000, wbreak: true},
		// The same lease and clock, stopped at 50 s: kept.
		{name: "other host, within the lease: kept", holder: machine("h2", 7), lease: time.Minute, step: time.Second, limit: 50},
		{name: "other pid namespace, same pid number, dead there: not judged by pid", holder: func() state.Process {
			p := machine("h1", 7)
			p.PIDNS = "pid:[2]"
			return p
		}(), dead: true, lease: time.Hour, step: time.Millisecond, limit: 40},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "lock")
			writeHolder(t, path, tc.holder, "0123456789abcdef0123456789abcdef")
			procs := &fakeProcs{self: machine("h1", 1), dead: map[int]bool{}}
			if tc.dead {
				procs.dead[tc.holder.PID] = true
			}
			clock, ctx := limitedClock(t, tc.step, tc.limit)
			l := newLock(t, path, procs, clock, tc.lease)
			unlock, err := l.Lock(ctx)
			if tc.wbreak {
				if err != nil {
					t.Fatalf("stale lock not broken within %d readings of the clock: %v", tc.limit, err)
				}
				if err := unlock(); err != nil {
					t.Fatal(err)
				}
			} else {
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("err = %v, want the wait to be cancelled at the clock's limit", err)
				}
				if !strings.Contains(err.Error(), tc.holder.Host) {
					t.Errorf("error %q does not name the holder", err)
				}
				if !strings.Contains(readFile(t, path), "0123456789abcdef0123456789abcdef") {
					t.Fatal("a live lock was removed")
				}
			}
			noLitter(t, path)
		})
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// noLitter fails t if a temporary, breaker or stale file of the lock at
// path is left.
func noLitter(t *testing.T, path string) {
	t.Helper()
	litter, err := filepath.Glob(path + ".*")
	if err != nil {
		t.Fatal(err)
	}
	if len(litter) != 0 {
		t.Errorf("litter left: %v", litter)
	}
}

// A breaker that died while breaking is itself broken, and the lock is
// still taken.
func TestLockBreaksDeadBreaker(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	stale := "0123456789abcdef0123456789abcdef"
	writeHolder(t, path, machine("h1", 7), stale)
	writeHolder(t, path+".break-"+stale, machine("h1", 8), "fedcba9876543210fedcba9876543210")
	// Judged on our machine, by pid, where the waiter reads no clock: its
	// judgments are what bound the wait.
	judged := 0
	procs := &watchProcs{fakeProcs: fakeProcs{self: machine("h1", 1), dead: map[int]bool{7: true, 8: true}}}
	procs.onAlive = func(state.Process) {
		if judged++; judged > 1000 {
			t.Fatalf("lock not taken after %d judgments of its dead holder and breaker", judged)
		}
	}
	clock, ctx := limitedClock(t, time.Millisecond, 1000)
	l := newLock(t, path, procs, clock, time.Hour)
	unlock, err := l.Lock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	noLitter(t, path)
}

// freezeOnBreak is a log hook that freezes clocks at the first "broke a
// stale lock", which a breaker logs before anyone can take the lock anew.
type freezeOnBreak struct {
	once   sync.Once
	clocks []*tickClock
	breaks atomic.Int32
}

func (*freezeOnBreak) Levels() []logrus.Level { return logrus.AllLevels }

func (f *freezeOnBreak) Fire(e *logrus.Entry) error {
	if e.Message == "broke a stale lock" {
		f.breaks.Add(1)
		f.once.Do(func() {
			for _, c := range f.clocks {
				c.freeze(0)
			}
		})
	}
	return nil
}

// Many waiters on other hosts judge the same stale holder at once: one
// breaks it, and each gets the lock in turn, never two at a time. The
// waiters' clocks run only until the stale holder is broken: a live holder
// that a loaded machine keeps from releasing for many polls must not be
// judged stale by a lease measured in polls.
func TestLockConcurrentBreakers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	writeHolder(t, path, machine("dead-host", 7), "0123456789abcdef0123456789abcdef")
	const waiters = 8
	freeze := &freezeOnBreak{}
	locks := make([]*state.Lock, waiters)
	for i := range locks {
		clock := &tickClock{now: time.Unix(0, 0), step: time.Second}
		freeze.clocks = append(freeze.clocks, clock)
		log, _ := logtest.NewNullLogger()
		log.AddHook(freeze)
		procs := &fakeProcs{self: machine("host"+string(rune('a'+i)), 1)}
		l, err := state.NewLock(path, state.LockOptions{Lease: time.Minute, Processes: procs, Clock: clock, Log: log})
		if err != nil {
			t.Fatal(err)
		}
		locks[i] = l
	}
	var inside, overlaps, done atomic.Int32
	var wg sync.WaitGroup
	for _, l := range locks {
		wg.Add(1)
		go func() {
			defer wg.Done()
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
	if done.Load() != waiters {
		t.Fatalf("%d of %d waiters got the lock", done.Load(), waiters)
	}
	if n := freeze.breaks.Load(); n != 1 {
		t.Errorf("the stale lock was broken %d times, want once", n)
	}
	noLitter(t, path)
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
	if err := cmd.Process.Kill(); err != nil { // not reaped yet: a zombie must count as dead
		t.Fatal(err)
	}
	defer func() {
		if err := cmd.Wait(); !killed(err) {
			t.Errorf("lock holder ended with %v, not by the SIGKILL", err)
		}
	}()
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
			hout, err := holder.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := holder.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if t.Failed() { // it may never be told to release
					if err := holder.Process.Kill(); err != nil {
						t.Error(err)
					}
				}
				if err := holder.Wait(); err != nil && !t.Failed() {
					t.Errorf("lock holder: %v", err)
				}
			}()
			expectLine(t, lines(t, hout), "locked")

			waiter := rigtest.FakeHost(t, "host-b", tc.waiterPID, os.Args[0])
			waiter.Env = append(waiter.Env, "DEPCACHE_TEST_ROLE=lock-waiter", "DT_DIR="+dir, "DT_LEASE=1h")
			waiter.Stderr = os.Stderr
			wout, err := waiter.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
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

// breakRig is a waiter on host h1 in front of a lock held by a holder on
// host h2 that stays unchanged: the waiter judges it stale after the lease,
// and the test acts in the gaps of the break through the hooks of
// state.SetBreakHooks.
type breakRig struct {
	path  string
	lock  *state.Lock
	clock *tickClock
	ctx   context.Context
	log   *logtest.Hook
}

const (
	staleNonce = "0123456789abcdef0123456789abcdef"
	freshNonce = "00112233445566778899aabbccddeeff"
)

func newBreakRig(t *testing.T) *breakRig {
	t.Helper()
	path := filepath.Join(t.TempDir(), "lock")
	writeHolder(t, path, machine("h2", 7), staleNonce)
	clock, ctx := limitedClock(t, time.Second, 1000)
	log, hook := logtest.NewNullLogger()
	l, err := state.NewLock(path, state.LockOptions{Lease: time.Minute, Processes: &fakeProcs{self: machine("h1", 1)}, Clock: clock, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	return &breakRig{path: path, lock: l, clock: clock, ctx: ctx, log: hook}
}

// takeFresh makes the lock look released by the stale holder and taken by
// a new one on host h3, and stops the waiter's clock so that the new
// holder stays within its lease: the waiter must wait for it, and gives up
// 20 readings later.
func (r *breakRig) takeFresh(t *testing.T) {
	t.Helper()
	if err := os.Remove(r.path); err != nil {
		t.Fatal(err)
	}
	writeHolder(t, r.path, machine("h3", 9), freshNonce)
	r.clock.freeze(20)
}

// waitsForFresh checks that the waiter's Lock, which returned err, did not
// take the lock and that the new holder's lock is in place.
func (r *breakRig) waitsForFresh(t *testing.T, unlock func() error, err error) {
	t.Helper()
	if err == nil {
		if uerr := unlock(); uerr != nil {
			t.Error(uerr)
		}
		t.Fatal("the waiter took the lock of a holder within its lease")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want the wait for the new holder to be cancelled", err)
	}
	if got := readFile(t, r.path); !strings.Contains(got, freshNonce) {
		t.Fatalf("lock now %s, want the new holder's", got)
	}
	noLitter(t, r.path)
}

// The lock changed between the judgment and the break (its holder released
// it and another took it): the winner of the break link re-reads it and
// leaves the new holder's lock alone, without even moving it aside.
func TestBreakerSparesLockTakenBeforeReread(t *testing.T) {
	r := newBreakRig(t)
	var won, renamed int
	state.SetBreakHooks(t, func(name string) {
		if name == r.path {
			won++
			r.takeFresh(t)
		}
	}, func(string) { renamed++ })
	unlock, err := r.lock.Lock(r.ctx)
	r.waitsForFresh(t, unlock, err)
	if won != 1 {
		t.Fatalf("the break link was won %d times, want once", won)
	}
	if renamed != 0 {
		t.Errorf("the breaker went on to move the lock aside %d times after re-reading a changed lock", renamed)
	}
	if n := broke(r.log); n != 0 {
		t.Errorf("%d breaks logged, want none", n)
	}
}

// The lock changed between the breaker's re-read and its rename (the stale
// holder resumed and released, another took it): the rename moved the new
// holder's lock aside, and the breaker, reading back what it moved, puts
// it back.
func TestBreakerRestoresLockTakenBeforeRename(t *testing.T) {
	r := newBreakRig(t)
	var renamed int
	state.SetBreakHooks(t, nil, func(name string) {
		if name == r.path {
			renamed++
			r.takeFresh(t)
		}
	})
	unlock, err := r.lock.Lock(r.ctx)
	r.waitsForFresh(t, unlock, err)
	if renamed != 1 {
		t.Fatalf("the breaker reached the rename %d times, want once", renamed)
	}
}

// The same gap, seen from the new holder: it checks its lock while the
// breaker has it aside. The lock is still its own (the breaker links it
// back), so its Check waits for the return instead of reporting the lock
// lost, and its release then succeeds. Under load this gap once failed a
// release in TestCleanupModel with "lock vanished".
func TestHolderWaitsOutBreakerRestoring(t *testing.T) {
	r := newBreakRig(t)
	fresh, err := state.NewLock(r.path, state.LockOptions{Lease: time.Minute, Processes: &fakeProcs{self: machine("h3", 9)}})
	if err != nil {
		t.Fatal(err)
	}
	var unlockFresh func() error
	checked := make(chan error, 1)
	vanished := make(chan struct{})
	var once sync.Once
	state.SetBreakHooks(t, nil, func(name string) {
		if name != r.path {
			return
		}
		if err := os.Remove(r.path); err != nil { // the stale holder released
			t.Error(err)
		}
		u, err := fresh.Lock(context.Background())
		if err != nil {
			t.Error(err)
			return
		}
		unlockFresh = u
		r.clock.freeze(20)
	})
	state.SetBreakAsideHook(t, func(name string) {
		if name != r.path || unlockFresh == nil {
			return
		}
		go func() { checked <- fresh.Check() }()
		// Let the breaker restore the name once the holder saw it
		// missing, or once its check is over.
		select {
		case <-vanished:
		case err := <-checked:
			checked <- err
		}
	}, func(name string) {
		if name == r.path {
			once.Do(func() { close(vanished) })
		}
	})
	unlock, err := r.lock.Lock(r.ctx)
	if err == nil {
		_ = unlock()
		t.Fatal("the waiter took the lock of a holder within its lease")
	}
	if unlockFresh == nil {
		t.Fatal("the breaker never reached its rename")
	}
	if err := <-checked; err != nil {
		t.Fatalf("the holder's check while its lock was aside: %v, want it still held", err)
	}
	if err := unlockFresh(); err != nil {
		t.Fatalf("release after the breaker restored the lock: %v", err)
	}
	noLitter(t, r.path)
}

// A holder that finds its lock's name missing waits only for a live
// breaker that moved it aside by mistake (TestHolderWaitsOutBreakerRestoring);
// otherwise its lock is lost, and it never links the name back itself:
// the name was free meanwhile, and another may have held it.
func TestHolderLockGoneAside(t *testing.T) {
	for _, tc := range []struct {
		name string
		// aside renames the lock away as a breaker would, given the
		// hold's nonce; it returns the break link to leave in place ("" for
		// none).
		aside func(nonce string) (id string, breakLink bool)
	}{
		{"moved aside by a breaker that died", func(string) (string, bool) { return "0123456789abcdef", false }},
		{"broken as stale (the aside is named after us)", func(n string) (string, bool) { return n, true }},
		{"gone", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "lock")
			l := newLock(t, path, &fakeProcs{self: machine("h1", 1)}, nil, time.Minute)
			h, err := l.Acquire(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if tc.aside == nil {
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			} else {
				id, link := tc.aside(h.Nonce())
				if err := os.Rename(path, path+".stale-"+id); err != nil {
					t.Fatal(err)
				}
				if link {
					writeHolder(t, path+".break-"+id, machine("h2", 5), freshNonce)
				}
			}
			start := time.Now()
			if err := h.Check(); !errors.Is(err, state.ErrLockLost) {
				t.Fatalf("check: %v, want ErrLockLost", err)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("check took %s: it waited for a breaker that will never link the lock back", d)
			}
			if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the lock's name is back (%v): a lost hold was linked back", err)
			}
			if err := h.Release(); !errors.Is(err, state.ErrLockLost) {
				t.Fatalf("release: %v, want ErrLockLost", err)
			}
		})
	}
}

// The stale holder released the lock between the judgment and the break:
// the breaker finds nothing to break, and the waiter takes the lock.
func TestBreakerFindsLockReleased(t *testing.T) {
	r := newBreakRig(t)
	var won int
	state.SetBreakHooks(t, func(name string) {
		if name == r.path {
			won++
			if err := os.Remove(r.path); err != nil {
				t.Fatal(err)
			}
		}
	}, nil)
	unlock, err := r.lock.Lock(r.ctx)
	if err != nil {
		t.Fatalf("lock released during the break not taken: %v", err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	if won != 1 {
		t.Fatalf("the break link was won %d times, want once", won)
	}
	if n := broke(r.log); n != 0 {
		t.Errorf("%d breaks logged, want none", n)
	}
	noLitter(t, r.path)
}

// watchProcs calls onAlive, in the waiter's goroutine, each time the
// waiter asks whether a holder on its machine is alive: the test's view of
// the waiter's progress where no clock is read.
type watchProcs struct {
	fakeProcs
	onAlive func(state.Process)
}

func (w *watchProcs) Alive(p state.Process) (bool, error) {
	w.onAlive(p)
	return w.fakeProcs.Alive(p)
}

// Of two waiters that judge the same holder stale only the one that wins
// the break link breaks it: the other, finding the link held by a live
// breaker, leaves the lock alone until that breaker is done.
func TestBreakerDefersToLiveBreaker(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	writeHolder(t, path, machine("h1", 7), staleNonce)
	breaker := path + ".break-" + staleNonce
	writeHolder(t, breaker, machine("h1", 8), freshNonce)
	const judgments = 50
	judged := 0
	procs := &watchProcs{fakeProcs: fakeProcs{self: machine("h1", 1), dead: map[int]bool{7: true}}}
	procs.onAlive = func(p state.Process) {
		if p.PID != 8 {
			return
		}
		judged++
		if got := readFile(t, path); !strings.Contains(got, staleNonce) {
			t.Fatalf("lock now %s: broken behind the live breaker's back", got)
		}
		if judged == judgments {
			// The live breaker is done: it broke the lock and let go of
			// its link.
			for _, name := range []string{path, breaker} {
				if err := os.Remove(name); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	clock, ctx := limitedClock(t, time.Millisecond, 1000)
	l := newLock(t, path, procs, clock, time.Hour)
	unlock, err := l.Lock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	if judged < judgments {
		t.Fatalf("lock taken after the live breaker was judged %d times, before it was done", judged)
	}
	noLitter(t, path)
}

// A breaker that died while breaking is broken like any holder: at once on
// our machine (TestLockBreaksDeadBreaker), after the lease from another
// host. Breakers of breakers are broken too, up to a depth beyond which an
// operator must act.
func TestLockBreaksDeadBreakers(t *testing.T) {
	for _, tc := range []struct {
		name     string
		breakers int
		operator bool // the waiter must wait for the operator
	}{
		{"one dead breaker", 1, false},
		{"three dead breakers in a chain", 3, false},
		{"four dead breakers in a chain: left to the operator", 4, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "lock")
			writeHolder(t, path, machine("h2", 7), staleNonce)
			var chain []string
			name, nonce := path, staleNonce
			for i := range tc.breakers {
				name += ".break-" + nonce
				nonce = fmt.Sprintf("%032x", i+1)
				writeHolder(t, name, machine(fmt.Sprintf("b%d", i), 8), nonce)
				chain = append(chain, name)
			}
			// At the clock's limit, 500 s, far past every lease of the
			// chain, the operator removes the breakers (the lock itself is
			// still for the waiter to break).
			acted := false
			clock := &tickClock{now: time.Unix(0, 0), step: time.Second, limit: 500, atLimit: func() {
				acted = true
				for _, name := range chain {
					if err := os.Remove(name); err != nil {
						t.Error(err)
					}
				}
			}}
			l := newLock(t, path, &fakeProcs{self: machine("h1", 1)}, clock, time.Minute)
			unlock, err := l.Lock(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if err := unlock(); err != nil {
				t.Fatal(err)
			}
			if acted != tc.operator {
				t.Errorf("lock taken only once the operator removed the breakers: %v, want %v", acted, tc.operator)
			}
			noLitter(t, path)
		})
	}
}

// The stale holder released the lock between the breaker's re-read and its
// rename: the rename finds nothing, and the waiter takes the lock.
func TestBreakerFindsLockReleasedBeforeRename(t *testing.T) {
	r := newBreakRig(t)
	var renamed int
	state.SetBreakHooks(t, nil, func(name string) {
		if name == r.path {
			renamed++
			if err := os.Remove(r.path); err != nil {
				t.Fatal(err)
			}
		}
	})
	unlock, err := r.lock.Lock(r.ctx)
	if err != nil {
		t.Fatalf("lock released during the break not taken: %v", err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	if renamed != 1 {
		t.Fatalf("the breaker reached the rename %d times, want once", renamed)
	}
	noLitter(t, r.path)
}

// A lock whose content names no holder (a hand edit, a filesystem that
// lost it) cannot be judged by pid: it is broken after the lease, like one
// from another host. The waiter says why it waits once the content stayed
// unparseable for a second, long before the lease ends, and says it once.
func TestLockBreaksUnreadableHolder(t *testing.T) {
	for _, content := range []string{"not a lock\n", ""} {
		t.Run(fmt.Sprintf("%q", content), func(t *testing.T) { testLockBreaksUnreadableHolder(t, content) })
	}
}

func testLockBreaksUnreadableHolder(t *testing.T, content string) {
	path := filepath.Join(t.TempDir(), "lock")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	clock, ctx := limitedClock(t, 100*time.Millisecond, 10000)
	log, hook := logtest.NewNullLogger()
	l, err := state.NewLock(path, state.LockOptions{Lease: time.Minute, Processes: &fakeProcs{self: machine("h1", 1)}, Clock: clock, Log: log, WarnAfter: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := l.Lock(ctx)
	if err != nil {
		t.Fatalf("unreadable lock not broken within 10000 readings of the clock: %v", err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	noLitter(t, path)
	told := 0
	for _, e := range hook.AllEntries() {
		if strings.Contains(e.Message, "does not parse as a holder record") {
			told++
			if e.Level != logrus.WarnLevel || e.Data["begins"] != content {
				t.Errorf("told %s %q with %v, want a warning with the content's beginning", e.Level, e.Message, e.Data)
			}
		}
	}
	if told != 1 {
		t.Errorf("told %d times that the lock does not parse, want once", told)
	}
}

// TestHolderRereadsCutLock: on sshfs, the holder's read of its own lock
// may come back cut (the first read after the name was linked to a file
// of another size). Check and unlock read again instead of taking the lock
// for lost: before, unlock refused to remove it ("taken over by an
// unreadable holder while held") and the whole root waited out the lease
// (seen in the 1-hour soak on the sshfs rig). A lock that really holds
// another record is still reported lost and left alone.
func TestHolderRereadsCutLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	l := newLock(t, path, &fakeProcs{self: machine("h1", 1)}, state.RealClock(), time.Hour)
	unlock, err := l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var cut atomic.Int32 // reads still to cut
	state.SetLockReadHook(t, func(name string, b []byte) []byte {
		if name == path && cut.Add(-1) >= 0 {
			return b[:len(b)/2]
		}
		return b
	})
	cut.Store(1)
	if err := l.Check(); err != nil {
		t.Fatalf("Check after one cut read: %v", err)
	}
	cut.Store(2)
	if err := unlock(); err != nil {
		t.Fatalf("unlock after two cut reads: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the lock is still there after unlock: %v", err)
	}
	if cut.Load() >= 0 {
		t.Fatal("no read was cut: the test proved nothing")
	}

	unlock, err = l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	writeHolder(t, path, machine("h2", 5), "0123456789abcdef0123456789abcdef")
	cut.Store(1)
	if err := unlock(); !errors.Is(err, state.ErrLockLost) || !strings.Contains(err.Error(), "pid 5") {
		t.Fatalf("unlock of a lock another holder took, first read cut: %v, want ErrLockLost naming it", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal("unlock removed a lock that was not ours")
	}
}

// A holder whose check reads another holder's record (a stale read: on
// sshfs the previous holder's bytes, of the same size) reads again before
// it believes it: the check and the release succeed. The sshfs soak once
// lost 30 s to one such read.
func TestHolderRereadsStaleRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	l := newLock(t, path, &fakeProcs{self: machine("h1", 1)}, state.RealClock(), time.Hour)
	unlock, err := l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	prev, err := json.Marshal(map[string]any{"host": "h2", "boot_id": "boot-h2", "pid_ns": "pid:[1]", "pid": 5, "start_time": 100, "nonce": staleNonce})
	if err != nil {
		t.Fatal(err)
	}
	var stale atomic.Int32 // reads still to answer with the previous record
	state.SetLockReadHook(t, func(name string, b []byte) []byte {
		if name == path && stale.Add(-1) >= 0 {
			return prev
		}
		return b
	})
	stale.Store(2)
	if err := l.Check(); err != nil {
		t.Fatalf("Check after two stale reads: %v", err)
	}
	stale.Store(1)
	if err := unlock(); err != nil {
		t.Fatalf("unlock after a stale read: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the lock is still there after unlock: %v", err)
	}
	if stale.Load() >= 0 {
		t.Fatal("no read was stale: the test proved nothing")
	}

	// With a short lease the rereads stop within a quarter of it: a holder
	// that reread for longer than its lease would be judged stale, and
	// broken, while it still works.
	short := newLock(t, path, &fakeProcs{self: machine("h1", 1)}, state.RealClock(), 2*time.Second)
	unlock, err = short.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var reads atomic.Int32
	state.SetLockReadHook(t, func(name string, b []byte) []byte {
		if name == path {
			reads.Add(1)
			return prev
		}
		return b
	})
	if err := short.Check(); !errors.Is(err, state.ErrLockLost) {
		t.Fatalf("Check reading another's record every time: %v, want ErrLockLost", err)
	}
	// 0, 10 and 100 ms fit in 500 ms; the next reread, 500 ms later, does not.
	if n := reads.Load(); n < 1 || n > 3 {
		t.Errorf("%d reads within a 2 s lease's check, want at most 3 (the rereads must end within lease/4)", n)
	}
	state.SetLockReadHook(t, nil)
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
}

// A long wait is a warning only when it points at a problem: one holder
// unchanged for WarnAfter, or a wait past the lease. Behind a queue of
// holders that keep changing it is load, logged at info.
func TestLockWaitWarnings(t *testing.T) {
	tests := []struct {
		name     string
		changing bool          // a new holder on every poll
		lease    time.Duration // the waiter's lease
		warn     bool
	}{
		{"one holder unchanged past WarnAfter", false, time.Hour, true},
		{"holders changing, within the lease", true, time.Hour, false},
		{"holders changing, past the lease", true, 30 * time.Second, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "lock")
			writeHolder(t, path, machine("h1", 7), staleNonce)
			n := 0
			procs := &watchProcs{fakeProcs: fakeProcs{self: machine("h1", 1)}}
			procs.onAlive = func(state.Process) {
				if tt.changing {
					n++
					writeHolder(t, path, machine("h1", 7), fmt.Sprintf("%032x", n))
				}
			}
			// One second a reading, 200 readings: 200 s of waiting,
			// past WarnAfter (5 s) many times and past a 30 s lease, not an
			// hour's.
			clock, ctx := limitedClock(t, time.Second, 200)
			log, hook := logtest.NewNullLogger()
			l, err := state.NewLock(path, state.LockOptions{Lease: tt.lease, WarnAfter: 5 * time.Second,
				Processes: procs, Clock: clock, Log: log})
			if err != nil {
				t.Fatal(err)
			}
			if unlock, err := l.Lock(ctx); err == nil {
				_ = unlock()
				t.Fatal("took a lock held by a live holder")
			}
			var warns, infos int
			for _, e := range hook.AllEntries() {
				switch {
				case e.Level == logrus.WarnLevel && e.Message == "waiting for the state lock":
					warns++
				case e.Level == logrus.InfoLevel && strings.HasPrefix(e.Message, "waiting for the state lock"):
					infos++
				case e.Level <= logrus.WarnLevel:
					t.Errorf("unexpected %s: %s %v", e.Level, e.Message, e.Data)
				}
			}
			if tt.warn && warns == 0 {
				t.Errorf("no warning in 200 s of waiting (%d info records)", infos)
			}
			if !tt.warn && (warns != 0 || infos == 0) {
				t.Errorf("%d warnings and %d info records, want only info records", warns, infos)
			}
		})
	}
}

// TestBreakHolderStoppedHere: doctor's break of the state lock held by a
// live process of this machine that left it unchanged for the lease (a
// stopped holder) breaks it, as a waiter would.
func TestBreakHolderStoppedHere(t *testing.T) {
	dir := t.TempDir()
	self := machine("h1", 1)
	s, err := state.Open(dir, state.Options{Lock: state.LockOptions{Log: quietLog(), Lease: 300 * time.Millisecond, Processes: &fakeProcs{self: self}}})
	if err != nil {
		t.Fatal(err)
	}
	lock := filepath.Join(dir, state.LockFile)
	writeHolder(t, lock, machine("h1", 2), staleNonce)
	if err := s.BreakHolder(context.Background(), s.Holder()); err != nil {
		t.Fatalf("break of a live holder of this machine unchanged for the lease: %v", err)
	}
	if _, err := os.Stat(lock); !os.IsNotExist(err) {
		t.Fatalf("lock after the break: %v, want it gone", err)
	}
}

// TestLockLeftBehindHere: a release whose remove fails is tried again; one
// that fails every time leaves the lock with its nonce, and a waiter of
// the same process (another Lock on the path, as a second Store on the
// root has) breaks it at once, where it waited out the lease (here an
// hour) for a live holder that was its own process. A hold that is not
// over is not broken so.
func TestLockLeftBehindHere(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	var fail atomic.Int32 // removes still to fail
	var calls atomic.Int32
	var unreadable atomic.Bool // the failed remove leaves the lock unreadable
	state.SetLockRemoveHook(t, func(name string) error {
		calls.Add(1)
		if unreadable.CompareAndSwap(true, false) {
			if err := os.Rename(name, name+".aside"); err != nil {
				return err
			}
			if err := os.Mkdir(name, 0o755); err != nil {
				return err
			}
			return &os.PathError{Op: "remove", Path: name, Err: syscall.EIO}
		}
		if fail.Add(-1) >= 0 {
			return &os.PathError{Op: "remove", Path: name, Err: syscall.EIO}
		}
		return os.Remove(name)
	})
	a := newLock(t, path, nil, nil, time.Hour)
	b := newLock(t, path, nil, nil, time.Hour)

	// One failed remove: the retry removes it, and nothing is reported.
	unlock, err := a.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	fail.Store(1)
	if err := unlock(); err != nil {
		t.Fatalf("release whose first remove failed: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) || calls.Load() != 2 {
		t.Fatalf("after a failed remove and its retry: stat %v, %d removes, want the lock gone after 2", err, calls.Load())
	}

	// Every remove fails: the error names the remove, the lock stays.
	unlock, err = a.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	left, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fail.Store(100)
	if err := unlock(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("release whose removes all failed: %v, want EIO", err)
	}
	if got, err := os.ReadFile(path); err != nil || string(got) != string(left) {
		t.Fatalf("the lock after its removes failed: %q, %v; want %q", got, err, left)
	}
	fail.Store(0)

	// Within a minute, not the lease's hour. A hold of this process
	// that is not over is waited for.
	bctx, bcancel := context.WithTimeout(context.Background(), time.Minute)
	defer bcancel()
	unlockB, err := b.Lock(bctx)
	if err != nil {
		t.Fatalf("the lock left behind by this process was not broken: %v", err)
	}
	held, err := os.ReadFile(path)
	if err != nil || string(held) == string(left) {
		t.Fatalf("the lock after b took it: %q, %v", held, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := a.Lock(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a took the lock b holds: %v", err)
	}
	if err := unlockB(); err != nil {
		t.Fatal(err)
	}

	// A remove fails, and the read before the next try fails too (EISDIR
	// here, an EIO on a file server): the lock may still be there with
	// this nonce, so it is left behind as when every remove fails.
	unlock, err = a.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	unreadable.Store(true)
	if err := unlock(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("release whose remove and reads failed: %v, want the remove's EIO", err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".aside", path); err != nil {
		t.Fatal(err)
	}
	bctx2, bcancel2 := context.WithTimeout(context.Background(), time.Minute)
	defer bcancel2()
	unlockB, err = b.Lock(bctx2)
	if err != nil {
		t.Fatalf("a lock left behind unread by this process was not broken: %v", err)
	}
	if err := unlockB(); err != nil {
		t.Fatal(err)
	}
}

// TestTurnMarkerLeftBehindHere: a waiter whose turn marker cannot be
// removed once it holds the lock leaves the marker behind under the same
// nonce as its live hold. Another Lock of this process breaks the marker
// at once, and still waits for the hold: what is left behind is a name
// with a nonce, never the nonce alone.
func TestTurnMarkerLeftBehindHere(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	turn := path + ".turn"
	var failTurn atomic.Bool
	state.SetLockRemoveHook(t, func(name string) error {
		if name == turn && failTurn.Load() {
			return &os.PathError{Op: "remove", Path: name, Err: syscall.EIO}
		}
		return os.Remove(name)
	})
	a := newLock(t, path, nil, nil, time.Hour)
	b := newLock(t, path, nil, nil, time.Hour)
	unlockA, err := a.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		unlock func() error
		err    error
	}
	got := make(chan result, 1)
	go func() {
		unlock, err := b.Lock(context.Background())
		got <- result{unlock, err}
	}()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
		if _, err := os.Lstat(turn); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("b, waiting for a's hold, never left a turn marker")
		}
	}
	failTurn.Store(true)
	if err := unlockA(); err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.err != nil {
		t.Fatal(r.err)
	}
	marker, err := os.ReadFile(turn)
	if err != nil {
		t.Fatalf("b's marker, whose remove failed: %v", err)
	}
	held, err := os.ReadFile(path)
	if err != nil || string(held) != string(marker) {
		t.Fatalf("b's hold %q (%v) and its marker %q: want one record, one nonce", held, err, marker)
	}
	failTurn.Store(false)

	// c's clock stands still, so no lease or grace runs out for it: it
	// waits out 500 of its readings for b's live hold, and takes the lock
	// once b releases only by breaking the marker as this process's own
	// leftover.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := newLock(t, path, nil, &tickClock{now: time.Now(), limit: 500, atLimit: cancel}, time.Hour)
	if _, err := c.Lock(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("c took the lock b holds, whose nonce a marker left behind shares: %v", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != string(held) {
		t.Fatalf("b's hold after c waited: %q, %v", b, err)
	}
	if err := r.unlock(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(turn); err != nil {
		t.Fatalf("b's marker left behind, before another waiter: %v", err)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), time.Minute)
	defer cancel2()
	d := newLock(t, path, nil, &tickClock{now: time.Now()}, time.Hour)
	unlockD, err := d.Lock(ctx2)
	if err != nil {
		t.Fatalf("the marker this process left behind was not broken at once: %v", err)
	}
	if _, err := os.Lstat(turn); !os.IsNotExist(err) {
		t.Errorf("the marker left behind, after d took the lock: %v", err)
	}
	if err := unlockD(); err != nil {
		t.Fatal(err)
	}
}
