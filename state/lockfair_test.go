package state_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

// The fairness tests' child processes. TestMain's table of roles lives in
// main_test.go; these roles start from init, before TestMain, so that the
// turn marker's tests stay in the files of the lock.
func init() {
	roles := map[string]func() int{
		"fair-hammer":     fairHammer,
		"fair-waiter":     fairWaiter,
		"fair-turn-owner": fairTurnOwner,
	}
	if f, ok := roles[os.Getenv("DEPCACHE_TEST_ROLE")]; ok {
		os.Exit(f())
	}
}

// fairLock is the lock at DT_DIR/lock with DT_TURN_AFTER and
// DT_TURN_GRACE. The tests give a grace of an hour: a live owner's marker
// must then never be judged stalled, however slowly a loaded machine runs
// it, so that what the tests count is the marker's effect alone.
func fairLock() (*state.Lock, string, error) {
	dir := os.Getenv("DT_DIR")
	l, err := state.NewLock(filepath.Join(dir, "lock"), state.LockOptions{Lease: time.Hour, Log: quietLog(),
		TurnAfter: envDur("DT_TURN_AFTER", 0), TurnGrace: envDur("DT_TURN_GRACE", 0)})
	return l, dir, err
}

// appendLine appends s to DT_DIR/log; the caller holds the lock.
func appendLine(dir, s string) error {
	f, err := os.OpenFile(filepath.Join(dir, "log"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(s + "\n"); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// logLines counts the holds logged so far.
func logLines(dir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "log"))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	return bytes.Count(b, []byte("\n")), err
}

// fairHammer takes and releases the lock back to back, logging each hold,
// until DT_DIR/stop exists: the releaser that an unfair lock favours.
func fairHammer() int {
	l, dir, err := fairLock()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println("ready")
	n := 0
	for {
		if _, err := os.Stat(filepath.Join(dir, "stop")); err == nil {
			break
		}
		unlock, err := l.Lock(context.Background())
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		if err := appendLine(dir, "h"+os.Getenv("DT_ID")); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		if err := unlock(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		n++
	}
	fmt.Println("holds", n)
	return 0
}

// fairWaiter takes the lock DT_ROUNDS times. In each round where it left
// the turn marker, it counts the holds of others logged between its claim
// and its own hold, and prints "round CLAIMED OTHERS".
func fairWaiter() int {
	l, dir, err := fairLock()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var claimedAt int
	claimed := false
	state.SetTurnHook(func(string) {
		n, err := logLines(dir)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		claimed, claimedAt = true, n
	})
	for range envInt("DT_ROUNDS", 20) {
		claimed = false
		unlock, err := l.Lock(context.Background())
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		n, err := logLines(dir)
		if err == nil {
			err = appendLine(dir, "w")
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		if err := unlock(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		fmt.Println("round", claimed, n-claimedAt)
		// Let the others take the lock before the next round, so that
		// its first attempt finds the lock held and the round waits:
		// right after our release we would only win it back at once.
		for {
			m, err := logLines(dir)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 2
			}
			if m > n+1 {
				break
			}
			time.Sleep(100 * time.Microsecond) // polls a condition; the order comes from the log
		}
	}
	return 0
}

// fairTurnOwner waits for the lock, which the test holds, says "turn" once
// it has left its marker, and goes on waiting until the test kills it.
func fairTurnOwner() int {
	l, _, err := fairLock()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	state.SetTurnHook(func(string) { fmt.Println("turn") })
	unlock, err := l.Lock(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	unlock()
	fmt.Fprintln(os.Stderr, "fair-turn-owner: got the lock the test holds")
	return 5
}

// TestLockTurnBoundsHandoffs: four processes take and release the lock back
// to back, and a fifth takes it over and over. Each time the fifth leaves
// the turn marker, it gets the lock within a bounded number of holds of the
// others: at most two for each other process (one that looked for a marker
// just before it was left, or the hold in progress, and one that the
// releaser may take past a marker, see passWindow). Without the marker, a
// waiter that backs off loses to releasers that come straight back, for
// any number of holds.
func TestLockTurnBoundsHandoffs(t *testing.T) {
	dir := t.TempDir()
	const hammers = 4
	type hammer struct {
		cmd *exec.Cmd
		out <-chan string
	}
	var hs []hammer
	defer func() {
		if t.Failed() {
			for _, h := range hs {
				h.cmd.Process.Kill()
				h.cmd.Wait()
			}
		}
	}()
	for i := range hammers {
		// TurnAfter 1h: only the waiter below ever leaves a marker, so
		// that each of its rounds that waits has the turn.
		cmd := child("fair-hammer", "DT_DIR="+dir, "DT_ID="+strconv.Itoa(i), "DT_TURN_AFTER=1h", "DT_TURN_GRACE=1h")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		hs = append(hs, hammer{cmd, lines(t, out)})
	}
	for _, h := range hs {
		expectLine(t, h.out, "ready")
	}

	// TurnAfter 1ns: the waiter leaves its marker after its first failed
	// attempt of each round.
	const rounds = 60
	w := child("fair-waiter", "DT_DIR="+dir, "DT_ROUNDS="+strconv.Itoa(rounds), "DT_TURN_AFTER=1ns", "DT_TURN_GRACE=1h")
	wout, err := w.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	claimedRounds, worst := 0, 0
	for l := range lines(t, wout) {
		var claimed bool
		var others int
		if _, err := fmt.Sscanf(l, "round %t %d", &claimed, &others); err != nil {
			t.Errorf("waiter said %q", l)
			continue
		}
		if !claimed {
			continue
		}
		claimedRounds++
		worst = max(worst, others)
		if others > 2*hammers {
			t.Errorf("the marker's owner got the lock after %d holds of others, want at most %d", others, 2*hammers)
		}
	}
	if err := w.Wait(); err != nil {
		t.Fatalf("waiter: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "stop"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for i, h := range hs {
		holds := expectLine(t, h.out, "holds") // read to the end before Wait closes the pipe
		if err := h.cmd.Wait(); err != nil {
			t.Fatalf("hammer %d: %v", i, err)
		}
		t.Logf("hammer %d: %s", i, holds)
	}
	t.Logf("%d of %d rounds with the marker, at most %d holds of others before the owner's", claimedRounds, rounds, worst)
	if claimedRounds < rounds/10 {
		t.Fatalf("the waiter left its marker in only %d of %d rounds: the test proved little", claimedRounds, rounds)
	}
	noLitter(t, filepath.Join(dir, "lock"))
}

// TestLockDeadTurnOwner: a process that left the turn marker is SIGKILLed
// while it waits. Another process of this machine takes the lock once it
// is free, although the grace for a stalled owner is an hour: the dead
// owner is judged by its pid, like a dead holder, and its marker broken.
func TestLockDeadTurnOwner(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "lock")
	log, hook := logtest.NewNullLogger()
	l, err := state.NewLock(path, state.LockOptions{Lease: time.Hour, TurnGrace: time.Hour, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cmd := child("fair-turn-owner", "DT_DIR="+dir, "DT_TURN_AFTER=1ns", "DT_TURN_GRACE=1h")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	expectLine(t, lines(t, out), "turn")
	if got := readFile(t, path+".turn"); !strings.Contains(got, fmt.Sprintf(`"pid":%d`, cmd.Process.Pid)) {
		t.Fatalf("marker %s, want the child's", got)
	}
	if err := cmd.Process.Kill(); err != nil { // not reaped yet: a zombie must count as dead
		t.Fatal(err)
	}
	defer func() {
		if err := cmd.Wait(); !killed(err) {
			t.Errorf("turn owner ended with %v, not by the SIGKILL", err)
		}
	}()
	// Twice: the first may pass the marker as a releaser (passWindow);
	// the second must judge it. A bound on a hang, not a synchronisation:
	// the lock is free and its only obstacle is the dead owner's marker.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for range 2 {
		if err := unlock(); err != nil {
			t.Fatal(err)
		}
		unlock, err = l.Lock(ctx)
		if err != nil {
			t.Fatalf("lock free but for a dead owner's marker not taken: %v", err)
		}
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range hook.AllEntries() {
		if e.Message == "broke a stale turn marker" && e.Data["reason"] == "marker owner is gone" {
			found = true
		}
	}
	if !found {
		t.Error("the dead owner's marker was not judged by its pid and broken")
	}
	// The dead child's private file (the marker's other name) is its own
	// litter, which nothing on our side knows to remove.
	tmps, _ := filepath.Glob(path + ".tmp-*")
	for _, f := range tmps {
		os.Remove(f)
	}
	noLitter(t, path)
}

// newTurnLock is newLock with the turn marker's options.
func newTurnLock(t *testing.T, path string, procs state.Processes, clock state.Clock, after, grace time.Duration) (*state.Lock, *logtest.Hook) {
	t.Helper()
	log, hook := logtest.NewNullLogger()
	l, err := state.NewLock(path, state.LockOptions{Lease: time.Hour, Processes: procs, Clock: clock, Log: log,
		TurnAfter: after, TurnGrace: grace})
	if err != nil {
		t.Fatal(err)
	}
	return l, hook
}

func brokeTurn(hook *logtest.Hook) int {
	n := 0
	for _, e := range hook.AllEntries() {
		if e.Message == "broke a stale turn marker" {
			n++
		}
	}
	return n
}

// A marker left by another waiter is honoured by a newcomer while its
// owner may be alive, even with the lock free; it is broken, and the lock
// taken, once its owner is provably gone (our machine) or the lock stayed
// free with the marker unchanged for the grace on our clock (stopped, or
// dead on another host). The waits are bounded by readings of the clock.
func TestLockTurnMarkerJudged(t *testing.T) {
	for _, tc := range []struct {
		name   string
		owner  state.Process
		dead   bool
		grace  time.Duration
		limit  int
		wbreak bool
	}{
		{name: "other host, within the grace: honoured", owner: machine("h2", 7), grace: time.Hour, limit: 200},
		{name: "other host, lock free past the grace: broken", owner: machine("h2", 7), grace: time.Minute, limit: 1000, wbreak: true},
		{name: "same machine, alive, within the grace: honoured", owner: machine("h1", 7), grace: time.Hour, limit: 200},
		{name: "same machine, alive but stalled past the grace: broken", owner: machine("h1", 7), grace: time.Minute, limit: 1000, wbreak: true},
		{name: "same machine, gone: broken at once", owner: machine("h1", 7), dead: true, grace: time.Hour, limit: 1000, wbreak: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "lock")
			writeHolder(t, path+".turn", tc.owner, staleNonce)
			procs := &fakeProcs{self: machine("h1", 1), dead: map[int]bool{7: tc.dead}}
			clock, ctx := limitedClock(t, time.Second, tc.limit)
			l, hook := newTurnLock(t, path, procs, clock, 0, tc.grace)
			unlock, err := l.Lock(ctx)
			if !tc.wbreak {
				if err == nil {
					unlock()
					t.Fatal("a newcomer took the lock past a live waiter's marker")
				}
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("err = %v, want the wait cancelled at the clock's limit", err)
				}
				if msg := err.Error(); !strings.Contains(msg, "turn of") || !strings.Contains(msg, fmt.Sprintf("pid %d", tc.owner.PID)) {
					t.Errorf("err = %q, want it to name the turn and its owner, pid %d", msg, tc.owner.PID)
				}
				if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("lock file left: %v", err)
				}
				if got := readFile(t, path+".turn"); !strings.Contains(got, staleNonce) {
					t.Errorf("marker now %s, want the live owner's", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("marker not broken within %d readings of the clock: %v", tc.limit, err)
			}
			if err := unlock(); err != nil {
				t.Fatal(err)
			}
			if n := brokeTurn(hook); n != 1 {
				t.Errorf("%d markers broken, want 1", n)
			}
			noLitter(t, path)
		})
	}
}

// A marker grants nothing: a waiter that left its marker still waits for a
// live holder, and takes its marker away when it gives up.
func TestLockTurnMarkerGrantsNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	writeHolder(t, path, machine("h2", 7), staleNonce) // alive, within the lease
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var marker string
	clock := &tickClock{now: time.Unix(0, 0), step: time.Millisecond, limit: 200, atLimit: func() {
		b, err := os.ReadFile(path + ".turn")
		if err != nil {
			t.Errorf("no marker after 200 readings of the waiter's clock: %v", err)
		}
		marker = string(b)
		cancel()
	}}
	l, _ := newTurnLock(t, path, &fakeProcs{self: machine("h1", 1)}, clock, time.Nanosecond, time.Hour)
	unlock, err := l.Lock(ctx)
	if err == nil {
		unlock()
		t.Fatal("the marker's owner took a live lock")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want the wait cancelled at the clock's limit", err)
	}
	if !strings.Contains(marker, `"host":"h1"`) {
		t.Errorf("marker %q, want the waiter's", marker)
	}
	if got := readFile(t, path); !strings.Contains(got, staleNonce) {
		t.Fatalf("lock now %s, want the live holder's", got)
	}
	os.Remove(path)
	noLitter(t, path)
}
