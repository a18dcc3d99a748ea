package manager_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/transitions"
	"golang.org/x/sys/unix"
)

func ptr[T any](v T) *T { return &v }

// TestEvictBigTreeHoldsLockOnce: evicting a 1 GiB tree takes one lock hold
// (decide, drop the entry, rename the tree into trash); the delete happens
// after the lock is released.
func TestEvictBigTreeHoldsLockOnce(t *testing.T) {
	root := t.TempDir()
	key := state.Key{Kind: state.Bundle, Source: "https://example.com/big.tar"}
	rel := filepath.Join("entries", key.ID()+"-g1", "content")
	dir := filepath.Join(root, rel)
	const files, each = 1024, 1 << 20
	for i := range files {
		p := filepath.Join(dir, fmt.Sprintf("d%02d", i%32), fmt.Sprintf("f%04d", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		err = unix.Fallocate(int(f.Fd()), 0, 0, each)
		if cerr := f.Close(); cerr != nil {
			t.Fatalf("closing %s: %v", p, cerr)
		}
		switch {
		case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS):
			rigtest.Missing(t, fmt.Sprintf("fallocate(2) is not supported on the filesystem of %s (%v)", root, err))
		case errors.Is(err, unix.ENOSPC):
			rigtest.Missing(t, fmt.Sprintf("%d MiB free for the tree under %s (%v)", files*each>>20, root, err))
		case err != nil:
			t.Fatalf("fallocate %s: %v", p, err)
		}
	}
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: key, Stage: state.Ready, Path: rel, SizeBytes: files * each,
			Created: time.Now().Add(-time.Hour), LastUsed: time.Now().Add(-time.Hour)})
		return true, nil
	}); err != nil {
		t.Fatalf("seeding the entry: %v", err)
	}
	var mu sync.Mutex
	var holds []time.Duration
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(), SetPolicy: true,
		Cleanup: manager.PolicyChange{MaxSizeBytes: ptr[int64](1 << 20), MinAge: ptr(time.Duration(0))},
		OnLockHold: func(d time.Duration) {
			mu.Lock()
			holds = append(holds, d)
			mu.Unlock()
		}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Settle(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	holds = nil
	mu.Unlock()
	rep, err := m.Sweep(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("evicted %d entries, %d bytes; lock holds during the sweep: %v", len(rep.Victims), rep.Freed, holds)
	if len(rep.Victims) != 1 || rep.Freed != files*each {
		t.Fatalf("sweep evicted %+v", rep.Victims)
	}
	if len(holds) != 1 {
		t.Errorf("%d lock holds for one eviction, want 1", len(holds))
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("content still there: %v", err)
	}
	if ents := trashContent(root); len(ents) != 0 {
		t.Errorf("trash not emptied: %v", ents)
	}
}

// trashContent lists what lies in root's trash besides the owner notes of
// the managers' trash directories. A trash that cannot be walked is not
// empty: each error is listed, so that a caller's "trash not emptied"
// reports it. A missing trash directory is empty.
func trashContent(root string) []string {
	var out []string
	trash := filepath.Join(root, "trash")
	err := filepath.WalkDir(trash, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == trash && errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			out = append(out, fmt.Sprintf("cannot walk %s: %v", p, err))
			return nil
		}
		if p == trash || d.IsDir() && filepath.Dir(p) == trash {
			return nil
		}
		if d.Name() != "owner.json" {
			out = append(out, p)
			if d.IsDir() {
				return filepath.SkipDir
			}
		}
		return nil
	})
	if err != nil {
		out = append(out, fmt.Sprintf("cannot walk %s: %v", trash, err))
	}
	return out
}

// A TTL is judged on the sweeper's clock with a tolerance for skew: a host
// whose clock runs 4 minutes ahead of the registering host's does not reap
// a 1 h TTL dependent when its clock first passes the expiry, and a fresh
// sweeper (as a one-shot gc is) reaps it once its clock is past the expiry
// by the tolerance.
func TestTTLOnASkewedClock(t *testing.T) {
	root := t.TempDir()
	src := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(src, []byte("ttl"), 0o644); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "file://"+src, "")
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	registering := newManager(t, root, func(c *manager.Config) { c.Clock = &fakeClock{now: t0} })
	ctx := context.Background()
	if _, err := registering.Get(ctx, "job", k, manager.WithTTL(time.Hour), manager.Detached()); err != nil {
		t.Fatal(err)
	}
	if _, err := registering.Wait(ctx, k); err != nil {
		t.Fatal(err)
	}

	ahead := &fakeClock{now: t0.Add(58*time.Minute + 4*time.Minute)} // 58 min later, read 4 min ahead
	for _, step := range []struct {
		advance time.Duration
		reaped  bool
	}{{0, false}, {2*time.Minute + 59*time.Second, false}, {time.Second, true}} {
		ahead.advance(step.advance)
		// A new manager each time, as each gc is: it has watched nothing.
		other, err := manager.New(manager.Config{Root: root, Log: quietLog(), Clock: ahead})
		if err != nil {
			t.Fatal(err)
		}
		rep, err := other.Sweep(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(rep.Reaped[k.Source]) == 1; got != step.reaped {
			t.Fatalf("at %s on the sweeper's clock (expiry %s): reaped %v, want %v", ahead.Now().Format("15:04:05"), t0.Add(time.Hour).Format("15:04:05"), rep.Reaped, step.reaped)
		}
	}
}

// Content that verify failed stays while the runs that held it do: the
// entry is not retried after its cool-down (a new generation would leave
// the old directory named by nothing, deleted at the next start-up), and
// once they are gone it is pruned and the content deleted then.
func TestVerifyFailedContentStaysForItsRuns(t *testing.T) {
	root := t.TempDir()
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	m := newManager(t, root, func(c *manager.Config) { c.Clock = clock })
	k, ready, content, _ := heldAndVerifyFailed(t, m)
	ctx := context.Background()
	clock.advance(2 * time.Hour) // past the 1 h cool-down

	var failed *manager.FailedError
	e, err := m.Wait(ctx, k)
	if !errors.As(err, &failed) || e.Generation != ready.Generation {
		t.Fatalf("after the cool-down: %s gen %d, %v; want still FAILED at gen %d", e.Stage, e.Generation, err, ready.Generation)
	}
	// Nor does a new get retry it.
	if _, err := m.Get(ctx, "another-run", k); err != nil {
		t.Fatal(err)
	}
	if e, err := m.Wait(ctx, k); !errors.As(err, &failed) || e.Generation != ready.Generation {
		t.Fatalf("a get after the cool-down: %s gen %d, %v; want still FAILED at gen %d", e.Stage, e.Generation, err, ready.Generation)
	}
	if err := m.Release(ctx, "another-run", k); err != nil {
		t.Fatal(err)
	}
	newManager(t, root) // a start-up reconciles the root
	if _, err := os.Stat(content); err != nil {
		t.Fatalf("the content a run holds was deleted: %v", err)
	}

	if err := m.Release(ctx, "run", k); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool {
		_, err := os.Stat(filepath.Dir(content))
		return errors.Is(err, os.ErrNotExist)
	}, func() string { return "the pruned entry's content is still there after its last run left" })
	if _, err := m.Wait(ctx, k); !errors.Is(err, manager.ErrNotFound) {
		t.Errorf("after the prune: %v, want ErrNotFound", err)
	}
}

// TestPolicyChangeSweepsAtOnce: a change of the stored policy (policy set,
// from any process) makes a running loop sweep by it at its next pass,
// not at its next cleanup interval (an hour here).
func TestPolicyChangeSweepsAtOnce(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	budget, minAge := int64(1<<30), time.Duration(0)
	m := newManager(t, root, func(c *manager.Config) {
		c.CleanupInterval = time.Hour
		c.SetPolicy = true
		c.Cleanup = manager.PolicyChange{MaxSizeBytes: &budget, MinAge: &minAge}
	})
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	if _, err := getWait(t, m, "run", k); err != nil {
		t.Fatal(err)
	}
	if err := m.Release(ctx, "run", k); err != nil {
		t.Fatal(err)
	}
	// Another process sets a budget the entry does not fit in.
	one := int64(1)
	other, err := manager.New(manager.Config{Root: root, Log: quietLog(), SetPolicy: true,
		Cleanup: manager.PolicyChange{MaxSizeBytes: &one}})
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Settle(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		st, err := m.Entries(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Get(k) == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the entry is still there a minute after the budget went to 1 byte: the loop waits for its cleanup interval")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSweepTidiesDeadLockAttempts: a sweep (what gc and serve's loop run)
// removes the file a process of this machine left when it was killed
// while it waited for the state lock, and keeps a live one's; a dry run
// removes nothing.
func TestSweepTidiesDeadLockAttempts(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root)
	if _, err := m.Sweep(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	procs, err := state.System()
	if err != nil {
		t.Fatal(err)
	}
	live := procs.Self()
	dead := live
	dead.PID, dead.StartTime = gone.ProcessState.Pid(), 1
	write := func(name string, p state.Process) string {
		t.Helper()
		f := filepath.Join(root, state.LockFile+".tmp-"+name)
		b := fmt.Sprintf(`{"host":%q,"boot_id":%q,"pid_ns":%q,"pid":%d,"start_time":%d,"nonce":%q}`, p.Host, p.BootID, p.PIDNS, p.PID, p.StartTime, name)
		if err := os.WriteFile(f, []byte(b), 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	deadFile, liveFile := write("0a", dead), write("0b", live)
	if _, err := m.Sweep(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(deadFile); err != nil {
		t.Fatalf("a dry run removed a dead attempt's file: %v", err)
	}
	if _, err := m.Sweep(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(deadFile); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the dead attempt's file after a sweep: %v, want it removed", err)
	}
	if _, err := os.Stat(liveFile); err != nil {
		t.Errorf("the live attempt's file after a sweep: %v, want it kept", err)
	}
}

// TestAbandonedDownloadCancelled: a DOWNLOADING entry whose only
// dependent belonged to a process that is gone (a get interrupted before
// it released) is cancelled by a sweep, which reaps the dependent, and rm
// removes one too; one with a live dependent stays, and rm refuses it.
func TestAbandonedDownloadCancelled(t *testing.T) {
	root := t.TempDir()
	machine := &fakeMachine{dead: map[int]bool{20: true, 21: true}}
	self := fakeProcess("h", 11)
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(), Processes: fakeProc{m: machine, self: self}})
	if err != nil {
		t.Fatal(err)
	}
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	key := func(n string) state.Key { return mustKey(t, "https://example.com/"+n+".tar.gz", "") }
	bound := func(pid int) map[string]state.Dependent {
		p := fakeProcess("h", pid)
		return map[string]state.Dependent{"get": {Since: time.Now(), Process: &p}}
	}
	if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: key("swept"), Stage: state.Downloading, Generation: 1, Created: time.Now(), Dependents: bound(20)})
		st.Put(&state.Entry{Key: key("removed"), Stage: state.Downloading, Generation: 2, Created: time.Now(), Dependents: bound(21)})
		st.Put(&state.Entry{Key: key("live"), Stage: state.Downloading, Generation: 3, Created: time.Now(), Dependents: bound(11)})
		st.MaxGeneration = 3
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Remove(context.Background(), []state.Key{key("removed")}, false); err != nil {
		t.Fatalf("rm of a download whose only dependent is dead: %v", err)
	}
	var inUse *manager.InUseError
	if _, err := m.Remove(context.Background(), []state.Key{key("live")}, false); !errors.As(err, &inUse) {
		t.Fatalf("rm of a download a live process waits for: %v, want InUseError", err)
	}
	rep, err := m.Sweep(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Cancelled) != 1 || rep.Cancelled[0] != key("swept") {
		t.Errorf("sweep cancelled %v, want the swept download", rep.Cancelled)
	}
	for n, want := range map[string]bool{"swept": false, "removed": false, "live": true} {
		if got := viewEntry(t, root, key(n)) != nil; got != want {
			t.Errorf("entry %s present after the sweep: %v, want %v", n, got, want)
		}
	}
}

// TestStopSweepsWhatAPublishOwes: a loop stopped right after its download
// published (what a get does) still runs the sweep that the publish asked
// for, so the cache is not left over its budget until the next command.
func TestStopSweepsWhatAPublishOwes(t *testing.T) {
	body := strings.Repeat("x", 6000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte(body)) }))
	defer srv.Close()
	for i := range 3 {
		root := t.TempDir()
		m, stop := startManager(t, root, func(c *manager.Config) {
			c.SetPolicy = true
			c.Cleanup = manager.PolicyChange{MaxSizeBytes: ptr[int64](10000), MinAge: ptr(time.Duration(0))}
		})
		a, b := mustKey(t, srv.URL+"/a", ""), mustKey(t, srv.URL+"/b", "")
		if _, err := getWait(t, m, "run", a); err != nil {
			t.Fatal(err)
		}
		if err := m.Release(context.Background(), "run", a); err != nil {
			t.Fatal(err)
		}
		if _, err := getWait(t, m, "run", b); err != nil {
			t.Fatal(err)
		}
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		if viewEntry(t, root, a) != nil || viewEntry(t, root, b) == nil {
			t.Fatalf("round %d: after the stop, a present %v, b present %v; want a evicted to stay under the 10,000-byte budget", i, viewEntry(t, root, a) != nil, viewEntry(t, root, b) != nil)
		}
	}
}

// TestTrashWithUnwrittenNote: a trash directory whose owner note is empty
// or missing (a full disk cut the note short, then the manager died with
// evicted content in it) is adopted and emptied by a sweep once it stayed
// so for 10 minutes; a younger one, whose manager may be writing the note
// now, and one whose note does not parse, are left alone.
func TestTrashWithUnwrittenNote(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root)
	mk := func(id string, note []byte, age time.Duration) string { return makeTrashDir(t, root, id, note, age) }
	emptyOld := mk("aaaa000000000001", []byte{}, 11*time.Minute)
	missingOld := mk("aaaa000000000002", nil, 11*time.Minute)
	emptyNew := mk("aaaa000000000003", []byte{}, time.Minute)
	garbled := mk("aaaa000000000004", []byte("{not json"), 11*time.Minute)
	if _, err := m.Sweep(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	for dir, kept := range map[string]bool{emptyOld: false, missingOld: false, emptyNew: true, garbled: true} {
		_, err := os.Stat(filepath.Join(dir, "x-g1", "content"))
		if got := err == nil; got != kept {
			t.Errorf("%s: content kept %v, want %v", filepath.Base(dir), got, kept)
		}
	}
	if c := trashContent(root); len(c) != 2 {
		t.Errorf("trash after the sweep: %v, want only the two left alone", c)
	}
}

// makeTrashDir makes trash/id in root holding one entry directory of 1000
// bytes, with note as its owner note (nil: none), note and directory
// last changed age ago.
func makeTrashDir(t *testing.T, root, id string, note []byte, age time.Duration) string {
	t.Helper()
	dir := filepath.Join(root, "trash", id)
	if err := os.MkdirAll(filepath.Join(dir, "x-g1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "x-g1", "content"), make([]byte, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	if note != nil {
		if err := os.WriteFile(filepath.Join(dir, "owner.json"), note, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-age)
	for _, p := range []string{filepath.Join(dir, "owner.json"), dir} {
		os.Chtimes(p, old, old)
	}
	return dir
}

// Content that verify failed, once nobody holds it, does not keep its entry
// FAILED for ever: a get registers itself before any pass could prune the
// entry, so the get's own request drops the content (to trash) and
// retries. Here no loop runs between the last release and the get, as
// between two CLI commands.
func TestVerifyFailedContentNobodyHoldsIsRetried(t *testing.T) {
	root := t.TempDir()
	ctx := context.Background()
	m, stop := startManager(t, root)
	k, ready, content, good := heldAndVerifyFailed(t, m)
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	idle, err := manager.New(manager.Config{Root: root, Log: quietLog(), Policy: transitions.Policy{FailureCooldown: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	if err := idle.Release(ctx, "run", k); err != nil {
		t.Fatal(err)
	}
	e, err := idle.Get(ctx, "again", k, manager.Retry())
	if err != nil {
		t.Fatal(err)
	}
	if e.Stage != state.Downloading || e.Path != "" {
		t.Fatalf("get --retry of a FAILED entry whose kept content nobody holds: %s, path %q; want a download, no path", e.Stage, e.Path)
	}
	if _, err := os.Stat(filepath.Dir(content)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dropped content is still in entries/: %v", err)
	}

	m2 := newManager(t, root)
	again, err := getWait(t, m2, "again", k) // a waiting get drives the download
	if err != nil || again.Stage != state.Ready || again.Generation <= ready.Generation {
		t.Fatalf("after the retry: %s gen %d, %v; want READY past gen %d", again.Stage, again.Generation, err, ready.Generation)
	}
	p, err := m2.Abs(again)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(p, "hello", "README.txt")); err != nil || string(b) != string(good) {
		t.Fatalf("the content fetched again: %q, %v; want the original", b, err)
	}
}

// heldAndVerifyFailed gets the hello bundle for dependent "run" through m,
// tampers with its README and verifies: the entry is FAILED, its content
// kept for "run". It returns the key, the READY entry before, its content
// path, and the README's good bytes.
func heldAndVerifyFailed(t *testing.T, m *manager.Manager) (state.Key, state.Entry, string, []byte) {
	t.Helper()
	k, ready, content := getHello(t, m)
	readme := filepath.Join(content, "hello", "README.txt")
	good, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(readme, []byte("tampered\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res, err := m.Verify(context.Background(), nil); err != nil || len(res) != 1 || res[0].OK {
		t.Fatalf("verify: %+v, %v; want one failure", res, err)
	}
	return k, ready, content, good
}

// getHello gets the hello bundle of testdata for dependent "run" through m
// and returns its key, the READY entry and its content's path.
func getHello(t *testing.T, m *manager.Manager) (state.Key, state.Entry, string) {
	t.Helper()
	abs, err := filepath.Abs("../testdata/bundles/hello.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "file://"+abs, "")
	ready, err := getWait(t, m, "run", k)
	if err != nil {
		t.Fatal(err)
	}
	content, err := m.Abs(ready)
	if err != nil {
		t.Fatal(err)
	}
	return k, ready, content
}

// TestReapedOfEntriesSharingASource: two entries of one source (with and
// without --sha256) each have a dependent reaped in one sweep; the report,
// keyed by source, lists both (the second overwrote the first).
func TestReapedOfEntriesSharingASource(t *testing.T) {
	root := t.TempDir()
	src := filepath.Join(t.TempDir(), "blob")
	body := []byte("shared source")
	if err := os.WriteFile(src, body, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(body)
	plain, pinned := mustKey(t, "file://"+src, ""), mustKey(t, "file://"+src, hex.EncodeToString(sum[:]))
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m := newManager(t, root, func(c *manager.Config) { c.Clock = &fakeClock{now: t0} })
	ctx := context.Background()
	for name, k := range map[string]state.Key{"a": plain, "b": pinned} {
		if _, err := m.Get(ctx, name, k, manager.WithTTL(time.Hour), manager.Detached()); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Wait(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	later, err := manager.New(manager.Config{Root: root, Log: quietLog(), Clock: &fakeClock{now: t0.Add(2 * time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := later.Sweep(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if got := slices.Sorted(slices.Values(rep.Reaped[plain.Source])); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("reaped from %s: %v, want [a b]", plain.Source, rep.Reaped)
	}
}
