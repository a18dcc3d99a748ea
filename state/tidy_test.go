package state_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// attempt writes a lock attempt's file: p's holder record under nonce.
func attempt(t *testing.T, path string, p state.Process, nonce string) {
	t.Helper()
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var rec map[string]any
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	rec["nonce"] = nonce
	if b, err = json.Marshal(rec); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestTidy: Tidy removes the lock attempts (state lock and named locks) of
// dead processes of this machine, and empty ones (of a process killed
// between creating its file and writing its record) older than an hour
// before the last commit; it keeps a live waiter's, another host's,
// unparseable ones however old (a cut read of a live one looks the same),
// an empty one made since, one whose record names another nonce, and
// anything that is not a regular file.
func TestTidy(t *testing.T) {
	dir := t.TempDir()
	self := state.Process{Host: "h", BootID: "boot", PIDNS: "ns", PID: 1, StartTime: 1}
	procs := &fakeProcs{self: self, dead: map[int]bool{2: true}}
	s, err := state.Open(dir, state.Options{Lock: state.LockOptions{Log: quietLog(), Processes: procs}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(context.Background(), put(1, 1)); err != nil {
		t.Fatal(err)
	}
	lock := filepath.Join(dir, state.LockFile)
	dead, alive := self, self
	dead.PID, alive.PID = 2, 3
	elsewhere := dead
	elsewhere.Host = "other"
	if err := os.MkdirAll(filepath.Join(dir, state.LocksDir), 0o755); err != nil {
		t.Fatal(err)
	}
	named := filepath.Join(dir, state.LocksDir, "0a1b.lock")
	attempt(t, lock+".tmp-aa", dead, "aa")
	attempt(t, lock+".tmp-bb", alive, "bb")
	attempt(t, lock+".tmp-cc", elsewhere, "cc")
	attempt(t, lock+".tmp-dd", dead, "zz")
	attempt(t, named+".tmp-ee", dead, "ee")
	attempt(t, named+".tmp-ff", alive, "ff")
	for name, c := range map[string]struct {
		age  time.Duration
		data string
	}{
		"gg": {0, `{"host":"h","pi`},
		"hh": {2 * time.Hour, `{"host":"h","pi`},
		"jj": {3 * time.Hour, ""},
		"kk": {50 * time.Minute, ""},
		// Older than an hour, but not an hour older than the last
		// commit (below): kept.
		"ll": {90 * time.Minute, ""},
		"mm": {3 * time.Hour, ""}, // a named lock's
	} {
		f := lock + ".tmp-" + name
		if name == "mm" {
			f = named + ".tmp-" + name
		}
		age := c.age
		if err := os.WriteFile(f, []byte(c.data), 0o644); err != nil {
			t.Fatal(err)
		}
		at := time.Now().Add(-age)
		if err := os.Chtimes(f, at, at); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(lock+".tmp-aa", lock+".tmp-ii"); err != nil {
		t.Fatal(err)
	}
	// The last commit an hour ago: the age of an empty file counts from it.
	committed := time.Now().Add(-time.Hour)
	if err := os.Chtimes(filepath.Join(dir, state.StateFile), committed, committed); err != nil {
		t.Fatal(err)
	}

	n, err := s.Tidy(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if n != 4 {
		t.Errorf("Tidy removed %d files, want 4", n)
	}
	left := func() []string {
		t.Helper()
		a, _ := filepath.Glob(lock + ".tmp-*")
		b, _ := filepath.Glob(named + ".tmp-*")
		var names []string
		for _, f := range append(a, b...) {
			names = append(names, filepath.Base(f))
		}
		slices.Sort(names)
		return names
	}
	want := []string{"0a1b.lock.tmp-ff", "state.lock.tmp-bb", "state.lock.tmp-cc", "state.lock.tmp-dd", "state.lock.tmp-gg", "state.lock.tmp-hh", "state.lock.tmp-ii", "state.lock.tmp-kk", "state.lock.tmp-ll"}
	if got := left(); !slices.Equal(got, want) {
		t.Fatalf("left after Tidy: %v, want %v", got, want)
	}
	if n, err := s.Tidy(context.Background()); n != 0 || err != nil {
		t.Fatalf("a second Tidy: %d, %v, want nothing removed", n, err)
	}
}

// TestTidyKilledWaiter: a real process killed while it waited for the
// state lock leaves its attempt's file; Tidy, with the real view of this
// machine's processes, removes it and keeps a live waiter's.
func TestTidyKilledWaiter(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(context.Background(), put(1, 1)); err != nil {
		t.Fatal(err)
	}
	l, err := state.NewLock(filepath.Join(dir, state.LockFile), state.LockOptions{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	attempts := func() []string {
		f, _ := filepath.Glob(filepath.Join(dir, state.LockFile+".tmp-*"))
		// Written, not only made: a waiter killed between its O_EXCL
		// create and its write leaves an empty file, which only the hour's
		// rule removes (CI once killed one there, under load).
		return slices.DeleteFunc(f, func(p string) bool {
			fi, err := os.Stat(p)
			return err != nil || fi.Size() == 0
		})
	}
	for i := range 2 {
		c := child("lock-waiter", "DT_DIR="+dir, "DT_LOCK="+state.LockFile)
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = c.Process.Kill(); _ = c.Wait() }()
		for deadline := time.Now().Add(time.Minute); len(attempts()) < i+1; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("waiter %d left no attempt's file within a minute", i)
			}
		}
		if i == 0 {
			if err := c.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			_, _ = c.Process.Wait()
		}
	}
	before := attempts()
	n, err := s.Tidy(context.Background())
	if err != nil || n != 1 {
		t.Fatalf("Tidy: %d, %v, want the killed waiter's file removed", n, err)
	}
	if after := attempts(); len(after) != 1 || !slices.Contains(before, after[0]) {
		t.Fatalf("attempts after Tidy: %v (before: %v), want the live waiter's", after, before)
	}
}

// TestTidyEmptyAttemptWithoutState: with no commit to count from, an empty
// lock-attempt file stays, however old.
func TestTidyEmptyAttemptWithoutState(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	f := filepath.Join(dir, state.LockFile+".tmp-nn")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	at := time.Now().Add(-24 * time.Hour)
	if err := os.Chtimes(f, at, at); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Tidy(context.Background()); n != 0 || err != nil {
		t.Errorf("Tidy without a state: %d, %v; want nothing removed", n, err)
	}
	if _, err := os.Stat(f); err != nil {
		t.Errorf("the empty attempt without a state: %v; want it kept", err)
	}
}
