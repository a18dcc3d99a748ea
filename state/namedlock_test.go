package state_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

// manualClock moves only when the test says, and counts its readings.
type manualClock struct {
	mu    sync.Mutex
	now   time.Time
	reads int
}

func (c *manualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reads++
	return c.now
}

func (c *manualClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func (c *manualClock) readings() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reads
}

// TestLeaseRenewalKeepsAWaiterOut: a holder on another host that renews
// its 1 s lease is never broken by a waiter whose clock passes 18 s of
// leases while it waits, 0.9 s between renewals; once the holder stops
// renewing, the waiter breaks it, and the holder's Renew, Check, NextToken
// and Release report the loss. Tokens go 1, 2 across the two holds.
func TestLeaseRenewalKeepsAWaiterOut(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.lock")
	tokens := filepath.Join(dir, "x.token")
	holder := newLock(t, path, &fakeProcs{self: machine("h1", 7)}, &tickClock{now: time.Unix(0, 0), step: time.Millisecond}, time.Second)
	s, err := holder.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := s.NextToken(tokens)
	if err != nil || tok != 1 {
		t.Fatalf("first token %d, %v; want 1", tok, err)
	}
	clock := &manualClock{now: time.Unix(0, 0)}
	waiter := newLock(t, path, &fakeProcs{self: machine("h2", 7)}, clock, time.Second)
	type result struct {
		s   *state.Lease
		err error
	}
	got := make(chan result, 1)
	go func() {
		w, err := waiter.Acquire(context.Background())
		got <- result{w, err}
	}()
	// A waiter's poll reads the lock, then the clock twice: once four
	// readings passed after a renewal, it has seen the renewed content.
	seen := func() {
		from := clock.readings()
		for clock.readings() < from+4 {
			select {
			case r := <-got:
				t.Fatalf("the waiter took a lock whose holder renews: %v", r.err)
			case <-time.After(time.Millisecond):
			}
		}
	}
	seen()
	for i := range 20 {
		clock.advance(900 * time.Millisecond)
		if err := s.Renew(); err != nil {
			t.Fatalf("renewal %d: %v", i, err)
		}
		info, ok, err := state.ReadLockInfo(path)
		if err != nil || !ok || info.Renewals != uint64(i+1) || info.Nonce != s.Nonce() {
			t.Fatalf("after renewal %d: %+v %v %v", i+1, info, ok, err)
		}
		seen()
	}
	// The holder stops renewing: the waiter breaks it.
	clock.advance(2 * time.Second)
	r := <-got
	if r.err != nil {
		t.Fatal(r.err)
	}
	w := r.s
	if tok, err := w.NextToken(tokens); err != nil || tok != 2 {
		t.Fatalf("the next holder's token %d, %v; want 2", tok, err)
	}
	for what, err := range map[string]error{"Renew": s.Renew(), "Check": s.Check()} {
		if !errors.Is(err, state.ErrLockLost) {
			t.Errorf("%s after the break: %v; want ErrLockLost", what, err)
		}
	}
	if _, err := s.NextToken(tokens); !errors.Is(err, state.ErrLockLost) {
		t.Errorf("NextToken after the break: %v; want ErrLockLost", err)
	}
	if err := s.Release(); !errors.Is(err, state.ErrLockLost) {
		t.Errorf("Release after the break: %v; want ErrLockLost", err)
	}
	if tok, _ := state.ReadToken(tokens); tok != 2 {
		t.Errorf("token file %d after the old holder's tries; want 2", tok)
	}
	if err := w.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("lock file after release: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, "*"))
	if len(left) != 1 || left[0] != tokens {
		t.Errorf("files left: %v; want only the token file", left)
	}
}

// TestLeaseBreakStale: BreakStale breaks a dead holder of this machine at
// once, and any other holder (a live one of this machine, another host's)
// only after watching it unchanged for the lease.
func TestLeaseBreakStale(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.lock")
	procs := &fakeProcs{self: machine("h1", 1), dead: map[int]bool{}}
	l := newLock(t, path, procs, &tickClock{now: time.Unix(0, 0), step: 10 * time.Second}, time.Minute)
	writeHolder(t, path, machine("h1", 7), "aa")
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond) // a few polls, not the lease's readings
	defer cancel()
	if broken, why, err := l.BreakStale(short); err == nil || broken {
		t.Fatalf("live local holder within the lease: broken %v (%s), %v; want the wait cut short", broken, why, err)
	}
	if broken, why, err := l.BreakStale(context.Background()); err != nil || !broken {
		t.Fatalf("live local holder unchanged for the lease (stopped): broken %v (%s), %v", broken, why, err)
	}
	writeHolder(t, path, machine("h1", 7), "aa")
	procs.dead[7] = true
	if broken, why, err := l.BreakStale(context.Background()); err != nil || !broken {
		t.Fatalf("dead local holder: broken %v (%s), %v", broken, why, err)
	}
	writeHolder(t, path, machine("h2", 7), "bb")
	broken, why, err := l.BreakStale(context.Background())
	if err != nil || !broken {
		t.Fatalf("remote holder unchanged for the lease: broken %v (%s), %v", broken, why, err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("lock file after the break: %v", err)
	}
}

// TestLeaseBreakStaleThroughADeadBreaker: a breaker that died at its break
// (a holder killed while breaking) leaves its break link. BreakStale used
// to give up on it at once ("another process is breaking it"), every time;
// it now watches the link as a waiter does and breaks it, then the lock,
// within twice the lease.
func TestLeaseBreakStaleThroughADeadBreaker(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.lock")
	procs := &fakeProcs{self: machine("h1", 1), dead: map[int]bool{}}
	l := newLock(t, path, procs, &tickClock{now: time.Unix(0, 0), step: 10 * time.Second}, time.Minute)
	writeHolder(t, path, machine("h2", 7), "bb")
	writeHolder(t, path+".break-bb", machine("h3", 9), "cc")
	broken, why, err := l.BreakStale(context.Background())
	if err != nil || !broken {
		t.Fatalf("remote holder behind a dead breaker's link: broken %v (%s), %v", broken, why, err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Errorf("left after the break: %v", left)
	}
	// A breaker link that keeps changing is a live breaker: left alone
	// until ctx ends, and said so.
	writeHolder(t, path, machine("h2", 7), "bb")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ctx.Err() == nil; i++ {
			writeHolder(t, path+".break-bb", machine("h3", 9), fmt.Sprintf("%02x", i%256))
			time.Sleep(20 * time.Millisecond) // a live breaker renewing, not synchronisation
		}
	}()
	broken, why, err = l.BreakStale(ctx)
	<-done
	if err != nil || broken || !strings.Contains(why, "another process is breaking it") {
		t.Errorf("beside a live breaker: broken %v (%s), %v", broken, why, err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the lock beside a live breaker: %v", err)
	}
}

// TestLeaseRenewInPlace: Renew rewrites the lock file itself, never
// replaces it: a descriptor opened before the renewals reads them, and the
// file is the same. (A rename over the lock, on sshfs with the lock open on
// the same mount, leaves the name missing on the server for a moment: see
// TestLeaseRenewKeepsTheNameOnSharedFS.)
func TestLeaseRenewInPlace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	l := newLock(t, path, &fakeProcs{self: machine("h1", 7)}, &tickClock{now: time.Unix(0, 0), step: time.Millisecond}, time.Second)
	s, err := l.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	before, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for range 3 {
		if err := s.Renew(); err != nil {
			t.Fatal(err)
		}
	}
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Nonce   string `json:"nonce"`
		Renewal string `json:"renewal"`
	}
	if err := json.Unmarshal(b, &r); err != nil || r.Nonce != s.Nonce() || r.Renewal != "00000000000000000003" {
		t.Errorf("the lock read through a descriptor opened before 3 renewals: %s (%v); want our nonce, renewal 3", b, err)
	}
	if after, err := os.Stat(path); err != nil || !os.SameFile(before, after) {
		t.Errorf("the lock file was replaced by a renewal (%v)", err)
	}
	if err := s.Release(); err != nil {
		t.Fatal(err)
	}
}

// TestLeaseRenewKeepsTheNameOnSharedFS: on the sshfs rig, with the lock
// held open on the holder's mount (as by a waiter of the same host), the
// lock's name never disappears from the server while the holder renews:
// the export directory, read directly, always has it. A renewal by rename
// fails this (libfuse hides the open target by a first rename on the
// server).
func TestLeaseRenewKeepsTheNameOnSharedFS(t *testing.T) {
	mnt1, _ := rigtest.SharedFS(t)
	export := rigtest.Env(t, "SHAREDFS_EXPORT")
	sub := fmt.Sprintf("renew-%d", time.Now().UnixNano())
	if err := os.Mkdir(filepath.Join(mnt1, sub), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	path := filepath.Join(mnt1, sub, "x.lock")
	l := newLock(t, path, &fakeProcs{self: machine("h1", 7)}, &tickClock{now: time.Unix(0, 0), step: time.Millisecond}, time.Second)
	s, err := l.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var stop atomic.Bool
	missing := make(chan int)
	go func() {
		n := 0
		for !stop.Load() {
			if _, err := os.Lstat(filepath.Join(export, sub, "x.lock")); err != nil {
				n++
			}
		}
		missing <- n
	}()
	for i := range 200 {
		if err := s.Renew(); err != nil {
			t.Fatalf("renewal %d: %v", i+1, err)
		}
	}
	stop.Store(true)
	if n := <-missing; n != 0 {
		t.Errorf("the server had no lock in %d polls during 200 renewals", n)
	}
	if info, ok, err := state.ReadLockInfo(path); err != nil || !ok || info.Renewals != 200 {
		t.Errorf("after 200 renewals: %+v %v %v", info, ok, err)
	}
	if err := s.Release(); err != nil {
		t.Fatal(err)
	}
}
