package manager_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// Ownership, takeover and fencing: each test puts a download in flight at
// a chosen moment (a gate source), changes who owns it (another manager, or
// the state changed behind the owner's back) and checks what the state and
// the disk say afterwards.

// TestDeadOwnerTakenOverAndItsStagingRemoved: a DOWNLOADING entry whose
// owner on this machine is provably dead is taken over at once by a manager
// with a dependent on it (generation + 1, counted as dead_owner), and the
// dead writer's staging data is removed then, not left for the next
// start-up.
func TestDeadOwnerTakenOverAndItsStagingRemoved(t *testing.T) {
	root := t.TempDir()
	blob := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(blob, []byte("fetched by the successor"), 0o644); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "file://"+blob, "")
	machine := &fakeMachine{dead: map[int]bool{}}
	reg := prometheus.NewRegistry()
	m := newManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("h", 11)}
		c.Metrics = reg
		c.Policy.DownloadTimeout = time.Hour // a takeover now is for the death, not a stall
	})
	// Left by a process of this machine killed mid-download, after m's
	// start-up (whose reconcile would remove the staging data): its staging
	// directory and its entry, held by a named dependent.
	dead := state.Owner{Process: fakeProcess("h", 10), ManagerID: "dead"}
	machine.kill(dead.PID)
	staging := filepath.Join("staging", gen(k, 1))
	if err := os.MkdirAll(filepath.Join(root, staging), 0o755); err != nil {
		t.Fatal(err)
	}
	rec, err := json.Marshal(map[string]any{"owner": dead, "generation": 1})
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"owner.json": rec, "content": []byte("half")} {
		if err := os.WriteFile(filepath.Join(root, staging, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	behind(t, root, func(st *state.State) {
		st.Put(&state.Entry{Key: k, Stage: state.Downloading, Owner: &dead, Generation: 1, Created: now, LastUsed: now,
			Dependents: map[string]state.Dependent{"job": {Since: now}}})
	})

	e, err := getWait(t, m, "run", k)
	if err != nil {
		t.Fatal(err)
	}
	if e.Stage != state.Ready || e.Generation != 2 || e.Path != filepath.Join("entries", gen(k, 2), "content") {
		t.Fatalf("after the takeover: %s gen %d at %q, want READY gen 2", e.Stage, e.Generation, e.Path)
	}
	if _, ok := e.Dependents["job"]; !ok {
		t.Errorf("the takeover lost the dependent of the dead owner's time: %v", e.Dependents)
	}
	waitFor(t, within, func() bool { return !exists(t, root, staging) },
		func() string {
			return "the dead writer's staging data is still there: " + fmt.Sprint(dirNames(t, root, "staging"))
		})
	// Counted when the takeover's actions are carried out, after its
	// commit: a sweep may have removed the staging data before that.
	waitFor(t, within, func() bool { return counter(t, reg, "depcache_takeovers_total", "reason", "dead_owner") == 1 },
		func() string {
			return fmt.Sprintf("%v takeovers from a dead owner counted, want 1", counter(t, reg, "depcache_takeovers_total", "reason", "dead_owner"))
		})
	if n := counter(t, reg, "depcache_takeovers_total", "reason", "stalled"); n != 0 {
		t.Errorf("%v takeovers of a stalled owner counted, want 0", n)
	}
}

// TestDeadOwnerStagingRemovedByTheTakeover: the RemoveStaging action of a
// takeover from a dead owner removes the dead writer's staging data itself,
// while the successor's download is still running. With a source that
// cannot resume (no RangeSource: the gate), no attempt looks at older
// generations' staging for a prefix to copy; only the loop's first sweep,
// if it runs after the data is planted, may remove it first, as every
// sweep removes a dead writer's staging
// (TestDeadOwnerTakenOverAndItsStagingRemoved, with a file:// source, has
// the first attempt remove it too).
func TestDeadOwnerStagingRemovedByTheTakeover(t *testing.T) {
	root := t.TempDir()
	g := newGate(false)
	k := mustKey(t, "http://gate.test/dead-owner", "")
	machine := &fakeMachine{dead: map[int]bool{}}
	reg := prometheus.NewRegistry()
	m := newManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("h", 11)}
		c.Sources = g.sources()
		c.Metrics = reg
		c.Policy.DownloadTimeout = time.Hour // a takeover now is for the death, not a stall
	})
	t.Cleanup(g.close)
	// Left, after m's start-up, by a process of this machine killed
	// mid-download: its staging data (no checkpoint) and its entry.
	dead := state.Owner{Process: fakeProcess("h", 10), ManagerID: "dead"}
	machine.kill(dead.PID)
	staging := filepath.Join("staging", gen(k, 1))
	if err := os.MkdirAll(filepath.Join(root, staging), 0o755); err != nil {
		t.Fatal(err)
	}
	rec, err := json.Marshal(map[string]any{"owner": dead, "generation": 1})
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"owner.json": rec, "content": []byte("half")} {
		if err := os.WriteFile(filepath.Join(root, staging, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	behind(t, root, func(st *state.State) {
		st.Put(&state.Entry{Key: k, Stage: state.Downloading, Owner: &dead, Generation: 1, Created: now, LastUsed: now,
			Dependents: map[string]state.Dependent{"job": {Since: now}}})
	})

	if _, err := m.Get(context.Background(), "run", k); err != nil {
		t.Fatal(err)
	}
	call := g.next(t) // the successor's fetch, held until served
	if e := viewEntry(t, root, k); e.Generation != 2 || !m.IsSelf(e.Owner) {
		t.Fatalf("after the takeover: gen %d owner %+v, want this manager at 2", e.Generation, e.Owner)
	}
	waitFor(t, within, func() bool { return !exists(t, root, staging) },
		func() string {
			return "the dead writer's staging data is still there: " + fmt.Sprint(dirNames(t, root, "staging"))
		})
	select {
	case err := <-call.returned:
		t.Fatalf("the successor's fetch returned (%v) before it was served: the staging data was removed by its end, not by the takeover", err)
	default:
	}
	if !exists(t, root, filepath.Join("staging", gen(k, 2))) {
		t.Error("the successor's own staging data is gone")
	}
	// Counted when the takeover's actions are carried out, after its
	// commit: a sweep may have removed the staging data before that.
	waitFor(t, within, func() bool { return counter(t, reg, "depcache_takeovers_total", "reason", "dead_owner") == 1 },
		func() string {
			return fmt.Sprintf("%v takeovers from a dead owner counted, want 1", counter(t, reg, "depcache_takeovers_total", "reason", "dead_owner"))
		})
	call.serve(t, "fetched by the successor")
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	e, err := m.Wait(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if e.Generation != 2 {
		t.Errorf("READY at generation %d, want 2", e.Generation)
	}
	if b, err := os.ReadFile(filepath.Join(root, e.Path)); err != nil || string(b) != "fetched by the successor" {
		t.Errorf("content %q (%v), want the successor's", b, err)
	}
}

// TestStalledOwnerFencedAtPublish: an owner that stops making progress (a
// stopped or partitioned process: alive, but its loop does not run) is
// taken over once its progress stayed unchanged for the download timeout
// on the successor's clock. Its staging data stays, since its writer is
// alive. When it wakes up and finishes, its publish is fenced inside the
// commit: it publishes nothing, counts no failure, and removes its own
// staging data; the successor's content stays READY.
//
// Nothing may tell A of the takeover before its publish commits: its loop
// does not run, and the gate is mute, since the size a source announces
// asks for a progress report at once, which would find A fenced and stop
// the download before it publishes (TestFencedHeartbeatStopsTheDownload).
// So the fence here is the commit's own: the download ends with
// transitions.ErrFenced, which neither the heartbeat nor a pass gives (they
// stop it as superseded), and its directory, already renamed into
// entries/ for the commit, is moved back and removed.
func TestStalledOwnerFencedAtPublish(t *testing.T) {
	root := t.TempDir()
	g := newGate(false)
	g.mute = true
	k := mustKey(t, "http://gate.test/stalled", "")
	machine := &fakeMachine{dead: map[int]bool{}}
	regA, regB := prometheus.NewRegistry(), prometheus.NewRegistry()
	var logA logRecorder
	// A's loop never runs on its own (an hour between passes, no
	// heartbeat): nothing tells it that it was taken over until it tries
	// to publish.
	a := newManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("h", 10)}
		c.Sources = g.sources()
		c.PollInterval, c.ProgressInterval = time.Hour, time.Hour
		c.Metrics, c.Log = regA, logA.logger()
	})
	ctx := context.Background()
	if _, err := a.Get(ctx, "run-a", k); err != nil {
		t.Fatal(err)
	}
	first := g.next(t)
	clock := &fakeClock{now: time.Now()}
	b := newManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("h", 11)}
		c.Sources = g.sources()
		c.Clock = clock
		c.Policy.DownloadTimeout = time.Minute
		c.Metrics = regB
	})
	t.Cleanup(g.close)
	if _, err := b.Get(ctx, "run-b", k); err != nil {
		t.Fatal(err)
	}
	// B has watched A's progress; it stays unchanged for the timeout.
	waitFor(t, within, func() bool {
		e, ok := b.Snapshot(k)
		_, mine := e.Dependents["run-b"]
		return ok && mine && e.Owner != nil && e.Owner.PID == 10
	}, func() string { return "B never saw A's download" })
	clock.advance(2 * time.Minute)
	second := g.next(t)
	if e := viewEntry(t, root, k); e.Generation != 2 || e.Owner == nil || e.Owner.PID != 11 {
		t.Fatalf("after the stall: %+v, want B the owner of generation 2", e)
	}
	second.serve(t, "fresh")
	waitFor(t, within, func() bool { e := viewEntry(t, root, k); return e != nil && e.Stage == state.Ready },
		func() string { return fmt.Sprintf("B did not publish: %+v", viewEntry(t, root, k)) })
	if !exists(t, root, filepath.Join("staging", gen(k, 1))) {
		t.Error("the stalled owner's staging data was removed while its writer is alive")
	}
	if n := counter(t, regB, "depcache_takeovers_total", "reason", "stalled"); n != 1 {
		t.Errorf("%v takeovers of a stalled owner counted, want 1", n)
	}

	// A wakes up and finishes.
	first.serve(t, "stale")
	// However it ends: discarded, published, failed or handed back.
	waitFor(t, within, func() bool {
		published := slices.ContainsFunc(logA.find("published"), func(e logrus.Entry) bool { return e.Message == "published" })
		return published || len(logA.find("discarding download")) > 0 || len(logA.find("download failed")) > 0 || len(logA.find("handing the entry back")) > 0
	}, func() string { return fmt.Sprintf("A's download did not end: %q", logA.messages()) })
	discarded := logA.find("discarding download: superseded")
	if len(discarded) != 1 {
		t.Fatalf("A's download did not end as superseded: %q", logA.messages())
	}
	if err, _ := discarded[0].Data[logrus.ErrorKey].(error); !errors.Is(err, transitions.ErrFenced) {
		t.Errorf("A's download ended with %v, want the publish's commit fenced (%v): it was stopped before it published", err, transitions.ErrFenced)
	}
	waitFor(t, within, func() bool { return !exists(t, root, filepath.Join("staging", gen(k, 1))) },
		func() string { return "A left its staging data after it was fenced" })
	e := viewEntry(t, root, k)
	if e.Stage != state.Ready || e.Generation != 2 || e.Path != filepath.Join("entries", gen(k, 2), "content") {
		t.Fatalf("after the fenced publish: %s gen %d at %q, want B's READY gen 2", e.Stage, e.Generation, e.Path)
	}
	if got := dirNames(t, root, "entries"); !slices.Equal(got, []string{gen(k, 2)}) {
		t.Errorf("published: %v, want only B's %s", got, gen(k, 2))
	}
	if b, err := os.ReadFile(filepath.Join(root, e.Path)); err != nil || string(b) != "fresh" {
		t.Errorf("content %q (%v), want B's", b, err)
	}
	for _, ev := range []string{"failed", "finished"} {
		if n := counter(t, regA, "depcache_downloads_total", "event", ev); n != 0 {
			t.Errorf("A counted %v downloads %s, want 0", n, ev)
		}
	}
}

// TestLiveDownloadReplaced: when the entry says this manager owns it at a
// generation that is not the one its download runs (the state was changed
// behind its back), the manager claims a new generation, and the download
// it replaces, told to stop, discards what it fetched when it returns: it
// neither fails the entry nor publishes. The replacement publishes.
func TestLiveDownloadReplaced(t *testing.T) {
	root := t.TempDir()
	g := newGate(true) // the old download does not return until the test says so
	k := mustKey(t, "http://gate.test/replaced", "")
	reg := prometheus.NewRegistry()
	var log logRecorder
	m := newManager(t, root, func(c *manager.Config) {
		c.Sources = g.sources()
		c.Metrics, c.Log = reg, log.logger()
	})
	t.Cleanup(g.close)
	if _, err := m.Get(context.Background(), "run", k); err != nil {
		t.Fatal(err)
	}
	old := g.next(t)
	changeEntry(t, root, k, func(e *state.Entry) { e.Generation = 5 }) // still ours
	repl := g.next(t)
	old.stopped(t, "replaced")
	if e := viewEntry(t, root, k); e.Generation != 6 || !m.IsSelf(e.Owner) {
		t.Fatalf("after the change: gen %d owner %+v, want this manager at 6", e.Generation, e.Owner)
	}
	old.serve(t, "old")
	waitFor(t, within, func() bool { return len(log.find("discarding download: superseded")) > 0 },
		func() string { return fmt.Sprintf("the replaced download was not discarded: %q", log.messages()) })
	if exists(t, root, filepath.Join("staging", gen(k, 1))) {
		t.Error("the replaced download left its staging data")
	}
	repl.serve(t, "new")
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	e, err := m.Wait(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if e.Generation != 6 {
		t.Errorf("READY at generation %d, want 6", e.Generation)
	}
	if got := dirNames(t, root, "entries"); !slices.Equal(got, []string{gen(k, 6)}) {
		t.Errorf("published: %v, want only %s", got, gen(k, 6))
	}
	if b, err := os.ReadFile(filepath.Join(root, e.Path)); err != nil || string(b) != "new" {
		t.Errorf("content %q (%v), want the replacement's", b, err)
	}
	if n := counter(t, reg, "depcache_downloads_total", "event", "failed"); n != 0 {
		t.Errorf("%v downloads counted failed, want 0 (the replaced one is discarded)", n)
	}
	if n := len(log.find("discarding download: superseded")); n != 1 {
		t.Errorf("%d superseded downloads discarded, want 1: %q", n, log.messages())
	}
}

// TestFencedHeartbeatStopsTheDownload: a heartbeat that finds its entry
// taken by another owner stops the download at once, on its own, even
// while the manager's loop is stuck (here in an OnLost hook that blocks);
// the download discards its staging data and leaves the new owner's entry
// as it is.
func TestFencedHeartbeatStopsTheDownload(t *testing.T) {
	root := t.TempDir()
	g := newGate(false)
	k := mustKey(t, "http://gate.test/heartbeat", "")
	lost := make(chan manager.LostDependent, 4)
	unblock := make(chan struct{})
	var once sync.Once
	reg := prometheus.NewRegistry()
	var log logRecorder
	m := newManager(t, root, func(c *manager.Config) {
		c.Sources = g.sources()
		c.ProgressInterval = 20 * time.Millisecond
		c.OnLost = func(l manager.LostDependent) {
			lost <- l
			<-unblock
		}
		c.Metrics, c.Log = reg, log.logger()
	})
	t.Cleanup(func() { once.Do(func() { close(unblock) }) })
	t.Cleanup(g.close)
	ctx := context.Background()
	for _, dep := range []string{"run", "spare"} {
		if _, err := m.Get(ctx, dep, k); err != nil {
			t.Fatal(err)
		}
	}
	call := g.next(t)
	// Its loop gets stuck: a dependent of it is removed behind its back,
	// and the OnLost hook blocks.
	changeEntry(t, root, k, func(e *state.Entry) { delete(e.Dependents, "spare") })
	select {
	case <-lost:
	case <-time.After(within):
		t.Fatal("the removed dependent was never reported lost")
	}
	// Another host takes the entry over.
	other := state.Owner{Process: fakeProcess("elsewhere", 99), ManagerID: "other"}
	changeEntry(t, root, k, func(e *state.Entry) { e.Owner, e.Generation = &other, e.Generation+1 })
	call.stopped(t, "a heartbeat fenced")
	waitFor(t, within, func() bool { return !exists(t, root, filepath.Join("staging", gen(k, 1))) },
		func() string { return "the fenced download left its staging data" })
	waitFor(t, within, func() bool { return len(log.find("discarding download: superseded")) > 0 },
		func() string { return fmt.Sprintf("the download did not end as superseded: %q", log.messages()) })
	e := viewEntry(t, root, k)
	if e.Stage != state.Downloading || e.Generation != 2 || !e.Owner.Same(&other) {
		t.Errorf("the new owner's entry was changed: %s gen %d owner %+v", e.Stage, e.Generation, e.Owner)
	}
	if n := counter(t, reg, "depcache_downloads_total", "event", "failed"); n != 0 {
		t.Errorf("%v downloads counted failed, want 0", n)
	}
	once.Do(func() { close(unblock) })
}

// TestShutdownHandsTheDownloadBack: a manager stopped mid-download hands
// its entry back unowned (same generation, dependents kept, staging data
// removed), so that another host's manager claims it at once instead of
// waiting out the download timeout.
func TestShutdownHandsTheDownloadBack(t *testing.T) {
	root := t.TempDir()
	g := newGate(false)
	k := mustKey(t, "http://gate.test/shutdown", "")
	machine := &fakeMachine{dead: map[int]bool{}}
	a, stopA := startManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("a", 10)}
		c.Sources = g.sources()
	})
	t.Cleanup(g.close)
	if _, err := a.Get(context.Background(), "run-a", k); err != nil {
		t.Fatal(err)
	}
	call := g.next(t)
	if err := stopA(); err != nil {
		t.Fatal(err)
	}
	call.stopped(t, "shutdown")
	e := viewEntry(t, root, k)
	if e.Stage != state.Downloading || e.Owner != nil || e.Generation != 1 {
		t.Fatalf("after the shutdown: %s gen %d owner %+v, want DOWNLOADING gen 1 unowned", e.Stage, e.Generation, e.Owner)
	}
	if _, ok := e.Dependents["run-a"]; !ok {
		t.Errorf("the shutdown dropped the dependent: %v", e.Dependents)
	}
	if exists(t, root, filepath.Join("staging", gen(k, 1))) {
		t.Error("the interrupted download left its staging data")
	}
	b := newManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("b", 20)}
		c.Sources = g.sources()
		c.Policy.DownloadTimeout = time.Hour // another host's owner could only be judged stalled
	})
	if _, err := b.Get(context.Background(), "run-b", k); err != nil {
		t.Fatal(err)
	}
	g.next(t).serve(t, "content")
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	e2, err := b.Wait(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if e2.Generation != 2 {
		t.Errorf("READY at generation %d, want 2", e2.Generation)
	}
}

// TestReleasedDownloadCancelled: a download whose entry lost its last
// dependent (released here, released by another process, or reaped when
// its TTL lapsed) is stopped within a pass as released, not as superseded
// nor as failed: its staging data is removed, the entry is gone, and a
// later Get downloads again.
func TestReleasedDownloadCancelled(t *testing.T) {
	for _, how := range []string{"released here", "released by another process", "ttl lapsed"} {
		t.Run(how, func(t *testing.T) {
			root := t.TempDir()
			g := newGate(false)
			k := mustKey(t, "http://gate.test/released", "")
			clock := &fakeClock{now: time.Now()}
			reg := prometheus.NewRegistry()
			var log logRecorder
			m := newManager(t, root, func(c *manager.Config) {
				c.Sources = g.sources()
				c.Clock = clock
				c.Metrics, c.Log = reg, log.logger()
			})
			t.Cleanup(g.close)
			ctx := context.Background()
			opts := []manager.GetOption{manager.Detached()}
			if how == "ttl lapsed" {
				opts = append(opts, manager.WithTTL(time.Minute))
			}
			if _, err := m.Get(ctx, "job", k, opts...); err != nil {
				t.Fatal(err)
			}
			call := g.next(t)
			switch how {
			case "released here":
				if err := m.Release(ctx, "job", k); err != nil {
					t.Fatal(err)
				}
			case "released by another process":
				other, err := manager.New(manager.Config{Root: root, Log: quietLog()})
				if err != nil {
					t.Fatal(err)
				}
				if err := other.Release(ctx, "job", k); err != nil {
					t.Fatal(err)
				}
			case "ttl lapsed":
				// Once the loop has watched the registration, the TTL
				// passes on its clock.
				waitFor(t, within, func() bool { e, ok := m.Snapshot(k); _, has := e.Dependents["job"]; return ok && has },
					func() string { return "the loop never saw the dependent" })
				clock.advance(2 * time.Minute)
			}
			call.stopped(t, how)
			waitFor(t, within, func() bool { return len(log.find("download cancelled: no dependent left")) > 0 },
				func() string { return fmt.Sprintf("the download did not end as released: %q", log.messages()) })
			if got := log.find("discarding download: superseded"); len(got) != 0 {
				t.Errorf("a released download was discarded as superseded: %q", log.messages())
			}
			if n := counter(t, reg, "depcache_downloads_total", "event", "failed"); n != 0 {
				t.Errorf("%v downloads counted failed, want 0", n)
			}
			if e := viewEntry(t, root, k); e != nil {
				t.Errorf("the entry is still there: %+v", e)
			}
			waitNoStaging(t, root)
			if _, err := m.Get(ctx, "again", k); err != nil {
				t.Fatal(err)
			}
			g.next(t).serve(t, "content")
			wctx, cancel := context.WithTimeout(ctx, within)
			defer cancel()
			if e, err := m.Wait(wctx, k); err != nil || e.Generation != 2 {
				t.Fatalf("a Get after the cancel: gen %d, %v; want READY at 2", e.Generation, err)
			}
		})
	}
}

// TestOtherHostsSupersededStagingRemoved: the staging data of a writer on
// another host, whose liveness no process here can judge, is removed at
// start-up, or by a running manager's next sweep, once a later generation
// of its entry settled (READY); one of the generation still DOWNLOADING,
// one of an entry this state does not know, and one of this host's live
// writer stay.
func TestOtherHostsSupersededStagingRemoved(t *testing.T) {
	for _, when := range []string{"start-up", "sweep"} {
		t.Run(when, func(t *testing.T) { testOtherHostsSupersededStagingRemoved(t, when) })
	}
}

func testOtherHostsSupersededStagingRemoved(t *testing.T, when string) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	ready := mustKey(t, "file://"+abs, "")
	downloading := mustKey(t, "https://example.com/still-downloading.tar.gz", "")
	unknown := mustKey(t, "https://example.com/unknown.tar.gz", "")
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	other := state.Owner{Process: fakeProcess("other-host", 10), ManagerID: "other"}
	if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: downloading, Stage: state.Downloading, Generation: 40, Owner: &other})
		st.MaxGeneration = 40
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	m := newManager(t, root)
	e, err := getWait(t, m, "run", ready)
	if err != nil {
		t.Fatal(err)
	}
	plant := func(name string, owner state.Owner) string {
		t.Helper()
		p := filepath.Join(root, "staging", name)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		rec, err := json.Marshal(map[string]any{"owner": owner})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "owner.json"), rec, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "part"), []byte("partial"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	procs, err := state.System()
	if err != nil {
		t.Fatal(err)
	}
	live := state.Owner{Process: procs.Self(), ManagerID: "live"}
	superseded := plant(gen(ready, e.Generation-1), other)
	kept := []string{
		plant(gen(downloading, 40), other),
		plant(gen(downloading, 39), other), // the takeover of 40 may resume from it
		plant(gen(unknown, 3), other),
		plant(gen(ready, e.Generation-2), live),
	}
	if e.Generation < 3 {
		t.Fatalf("READY at generation %d: the test needs two before it", e.Generation)
	}
	if when == "start-up" {
		newManager(t, root) // its start-up reconciles
	} else if _, err := m.Sweep(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(superseded); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("superseded staging of another host after a %s: %v, want it removed", when, err)
	}
	for _, p := range kept {
		if _, err := os.Stat(filepath.Join(p, "part")); err != nil {
			t.Errorf("staging %s after a %s: %v, want it kept", filepath.Base(p), when, err)
		}
	}
}

// TestSweepKeepsEveryCheckpointOfADownload: an owner of a DOWNLOADING
// entry, in any process, may hold a checkpoint of its own before it has
// copied an older generation's prefix. So a sweep, and start-up, keep the
// checkpointed staging data of every generation of the entry while it
// downloads, a dead writer's included (CI once fetched from 0 when a
// sweep kept only the newest), and remove a dead writer's that has no
// checkpoint. Once the entry is READY, a sweep removes the dead writer's
// checkpointed data too.
func TestSweepKeepsEveryCheckpointOfADownload(t *testing.T) {
	root := t.TempDir()
	k := mustKey(t, "http://gate.test/checkpointed", "")
	machine := &fakeMachine{dead: map[int]bool{}}
	disk := roomyDisk()
	m := newManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("h", 11)}
		c.Policy.DownloadTimeout = time.Hour // no takeover of the live owner
		c.Disk = disk
	})
	dead := state.Owner{Process: fakeProcess("h", 10), ManagerID: "dead"}
	live := state.Owner{Process: fakeProcess("h", 12), ManagerID: "live"}
	machine.kill(dead.PID)
	raw := make([]byte, 64<<10+1) // past the bytes that tell the format (unpack.SniffHead)
	stageOf := func(k state.Key, g uint64, o state.Owner, checkpointed bool) string {
		dir := filepath.Join("staging", gen(k, g))
		files := map[string][]byte{"content": raw}
		var err error
		if files["owner.json"], err = json.Marshal(map[string]any{"owner": o, "generation": g}); err != nil {
			t.Fatal(err)
		}
		if checkpointed {
			files["checkpoint.json"], err = json.Marshal(map[string]any{"version": 1, "source": k.Source, "raw": "content",
				"offset": len(raw), "validator": map[string]any{"etag": `"v1"`}, "sha256_state": []byte("state")})
			if err != nil {
				t.Fatal(err)
			}
		}
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(root, dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	stage := func(g uint64, o state.Owner, checkpointed bool) string { return stageOf(k, g, o, checkpointed) }
	// The entry first: the loop's own sweeps remove the staging data of
	// an entry the state does not have (unless recently checkpointed).
	now := time.Now()
	behind(t, root, func(st *state.State) {
		st.Put(&state.Entry{Key: k, Stage: state.Downloading, Owner: &live, Generation: 3, Created: now, LastUsed: now,
			Dependents: map[string]state.Dependent{"job": {Since: now}}})
	})
	older := stage(1, dead, true)  // a dead writer's, checkpointed, not the newest
	bare := stage(2, dead, false)  // a dead writer's, nothing to resume from
	newest := stage(3, live, true) // the live owner's own checkpoint
	ctx := context.Background()
	if _, err := m.Sweep(ctx, false); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{older, newest} {
		if !exists(t, root, dir) {
			t.Errorf("a sweep removed %s, checkpointed staging data of a DOWNLOADING entry; left %v", dir, dirNames(t, root, "staging"))
		}
	}
	if exists(t, root, bare) {
		t.Errorf("a sweep left %s, a dead writer's staging data with no checkpoint", bare)
	}
	// Start-up reconciliation, in another process, keeps them too.
	newManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("h", 13)}
		c.Policy.DownloadTimeout = time.Hour
		c.Disk = disk
	})
	if !exists(t, root, older) {
		t.Errorf("start-up removed %s, checkpointed staging data of a DOWNLOADING entry", older)
	}

	changeEntry(t, root, k, func(e *state.Entry) {
		e.Stage, e.Owner, e.Path = state.Ready, nil, filepath.Join("entries", gen(k, 3))
	})
	if _, err := m.Sweep(ctx, false); err != nil {
		t.Fatal(err)
	}
	if exists(t, root, older) {
		t.Errorf("a sweep left %s, a dead writer's staging data of an entry now READY", older)
	}

	// An entry that is gone (an interrupted get's, reaped with its last
	// dependent): its dead writer's checkpointed data stays for a later
	// get to resume from, for abandonedResume (10 min) after the
	// checkpoint; its data without a checkpoint goes at once.
	gone := mustKey(t, "http://gate.test/gone", "")
	recent := stageOf(gone, 1, dead, true)
	goneBare := stageOf(gone, 2, dead, false)
	if _, err := m.Sweep(ctx, false); err != nil {
		t.Fatal(err)
	}
	if !exists(t, root, recent) || exists(t, root, goneBare) {
		t.Errorf("after a sweep: %s kept %v (want true), %s kept %v (want false)", recent, exists(t, root, recent), goneBare, exists(t, root, goneBare))
	}
	old := time.Now().Add(-11 * time.Minute)
	if err := os.Chtimes(filepath.Join(root, recent, "checkpoint.json"), old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Sweep(ctx, false); err != nil {
		t.Fatal(err)
	}
	if exists(t, root, recent) {
		t.Errorf("a sweep left %s, checkpointed 11 minutes ago, of an entry that is gone", recent)
	}

	// On a disk short of room (under 1 GiB, or under 5 %, free beyond the
	// policy's floor), room beats a resume: recent data goes too.
	for _, free := range []int64{1<<30 - 1, 5<<30 - 1} {
		recent := stageOf(gone, 3, dead, true)
		disk.setFree(free)
		if _, err := m.Sweep(ctx, false); err != nil {
			t.Fatal(err)
		}
		if exists(t, root, recent) {
			t.Errorf("with %d of %d bytes free, a sweep left %s, a gone entry's recent checkpoint", free, disk.size, recent)
		}
	}
	disk.setFree(90 << 30)
	recent = stageOf(gone, 4, dead, true)
	if _, err := m.Sweep(ctx, false); err != nil {
		t.Fatal(err)
	}
	if !exists(t, root, recent) {
		t.Errorf("with room again, a sweep removed %s, a gone entry's recent checkpoint", recent)
	}
}
