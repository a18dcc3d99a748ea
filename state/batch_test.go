package state

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

func batchStore(t *testing.T, dir string, holds *atomic.Int32) *Store {
	t.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	s, err := Open(dir, Options{Lock: LockOptions{Log: log}, OnHold: func(time.Duration) { holds.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func queued(s *Store) int {
	s.batch.mu.Lock()
	defer s.batch.mu.Unlock()
	return len(s.batch.queue)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func putKey(i int) func(*State) (bool, error) {
	return func(st *State) (bool, error) {
		st.Put(&Entry{Key: Key{Kind: Bundle, Source: fmt.Sprintf("https://example.com/%d", i)}, Stage: Downloading})
		return true, nil
	}
}

// blockLock holds the root's lock through a second store until release is
// closed, so that operations queue up behind it.
func blockLock(t *testing.T, dir string) (release func(), done <-chan error) {
	var none atomic.Int32
	other := batchStore(t, dir, &none)
	held, rel := make(chan struct{}), make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- other.Update(context.Background(), func(*State) (bool, error) {
			close(held)
			<-rel
			return false, nil
		})
	}()
	<-held
	return func() { close(rel) }, errc
}

// behindLock opens a store on a fresh root whose lock a second store holds,
// so that operations queue up; release lets the holder go and waits until
// it has.
func behindLock(t *testing.T) (s *Store, holds *atomic.Int32, release func()) {
	t.Helper()
	dir := t.TempDir()
	holds = new(atomic.Int32)
	s = batchStore(t, dir, holds)
	rel, blocked := blockLock(t, dir)
	return s, holds, func() {
		rel()
		if err := <-blocked; err != nil {
			t.Error(err)
		}
	}
}

func entryCount(t *testing.T, s *Store) int {
	t.Helper()
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return len(st.Entries)
}

// Operations that wait together are committed in one lock hold, each
// result is its own, and a failing operation leaves the others committed.
func TestUpdateBatchedGroupCommit(t *testing.T) {
	s, holds, release := behindLock(t)

	const n = 40
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i == 7 {
				errs[i] = s.UpdateBatched(context.Background(), func(*State) (bool, error) { return false, errors.New("refused") })
				return
			}
			errs[i] = s.UpdateBatched(context.Background(), putKey(i))
		}()
	}
	waitFor(t, "all operations queued", func() bool { return queued(s) == n })
	release()
	wg.Wait()
	if got := holds.Load(); got != 1 {
		t.Errorf("%d lock holds for %d queued operations, want 1", got, n)
	}
	for i, err := range errs {
		if i == 7 {
			if err == nil || err.Error() != "refused" {
				t.Errorf("operation 7: %v, want its own error", err)
			}
			continue
		}
		if err != nil {
			t.Errorf("operation %d: %v", i, err)
		}
	}
	if got := entryCount(t, s); got != n-1 {
		t.Errorf("%d entries committed, want %d", got, n-1)
	}
}

// A commit that fails fails every operation of the batch, and commits none.
func TestUpdateBatchedCommitFailure(t *testing.T) {
	s, _, release := behindLock(t)
	bad := func(st *State) (bool, error) {
		st.Put(&Entry{Key: Key{Kind: Bundle, Source: "https://example.com/bad"}, Stage: Ready, Path: "../outside"})
		return true, nil
	}
	errs := make(chan error, 2)
	go func() { errs <- s.UpdateBatched(context.Background(), putKey(1)) }()
	go func() { errs <- s.UpdateBatched(context.Background(), bad) }()
	waitFor(t, "both operations queued", func() bool { return queued(s) == 2 })
	release()
	for range 2 {
		if err := <-errs; !errors.Is(err, ErrOutsideRoot) {
			t.Errorf("got %v, want the batch's validation error for both", err)
		}
	}
	if got := entryCount(t, s); got != 0 {
		t.Errorf("%d entries committed by a failed batch", got)
	}
}

// An operation whose context ends while it waits is withdrawn and never
// runs; the one leading keeps waiting for the lock.
func TestUpdateBatchedCancelWhileQueued(t *testing.T) {
	s, _, release := behindLock(t)
	first := make(chan error, 1)
	go func() { first <- s.UpdateBatched(context.Background(), putKey(1)) }()
	waitFor(t, "the first operation queued", func() bool { return queued(s) == 1 })
	ctx, cancel := context.WithCancel(context.Background())
	ran := atomic.Bool{}
	second := make(chan error, 1)
	go func() {
		second <- s.UpdateBatched(ctx, func(st *State) (bool, error) { ran.Store(true); return putKey(2)(st) })
	}()
	waitFor(t, "the second operation queued", func() bool { return queued(s) == 2 })
	cancel()
	if err := <-second; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled operation: %v", err)
	}
	release()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if ran.Load() {
		t.Error("a withdrawn operation ran")
	}
	if got := entryCount(t, s); got != 1 {
		t.Errorf("%d entries, want 1", got)
	}
}

// An operation that panics takes nothing of its batch into the file, the
// panic reaches its own caller, the others get an error, and the store
// keeps working.
func TestUpdateBatchedPanic(t *testing.T) {
	s, _, release := behindLock(t)
	other := make(chan error, 1)
	panicked := make(chan any, 1)
	go func() { other <- s.UpdateBatched(context.Background(), putKey(1)) }()
	waitFor(t, "the first operation queued", func() bool { return queued(s) == 1 })
	go func() {
		defer func() { panicked <- recover() }()
		s.UpdateBatched(context.Background(), func(st *State) (bool, error) {
			putKey(2)(st)
			panic("boom")
		})
	}()
	waitFor(t, "both operations queued", func() bool { return queued(s) == 2 })
	release()
	if p := <-panicked; p != "boom" {
		t.Errorf("the panicking caller got %v, want its panic", p)
	}
	if err := <-other; !errors.Is(err, errBatchPanic) {
		t.Errorf("the other operation: %v, want errBatchPanic", err)
	}
	if got := entryCount(t, s); got != 0 {
		t.Errorf("%d entries committed by a batch with a panic", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.UpdateBatched(ctx, putKey(3)); err != nil {
		t.Fatalf("the store after a panic: %v", err)
	}
}
