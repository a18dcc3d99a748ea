package state_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// TestLockWaitsForALiveBreaker: a waiter that judges the holder stale but
// finds a live breaker at work (its break link taken) waits for it through
// the poll's sleep, and so still hears its context: it used to loop
// straight back to the link, at full speed and deaf to ctx, for as long as
// the breaker lived.
func TestLockWaitsForALiveBreaker(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	stale := "0123456789abcdef0123456789abcdef"
	writeHolder(t, path, machine("h1", 7), stale)                                              // dead
	writeHolder(t, path+".break-"+stale, machine("h1", 8), "fedcba9876543210fedcba9876543210") // alive, breaking
	procs := &fakeProcs{self: machine("h1", 1), dead: map[int]bool{7: true}}
	clock, ctx := limitedClock(t, time.Millisecond, 200)
	l := newLock(t, path, procs, clock, time.Hour)
	done := make(chan error, 1)
	go func() {
		unlock, err := l.Lock(ctx)
		if err == nil {
			err = unlock()
			if err == nil {
				err = errors.New("took the lock while another breaker was at work")
			}
		}
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Lock = %v, want the wait cancelled at the clock's limit", err)
		}
	case <-time.After(time.Minute): // a bound on a hang, not a synchronisation
		t.Fatal("the waiter never heard its context: it spins while the breaker is alive")
	}
	if got := readFile(t, path); got == "" {
		t.Error("the lock was removed while another breaker was at work")
	}
}
