package manager_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// The file moves that go with a commit: publish renames and then commits
// (and renames back when the commit fails); eviction commits and then
// renames into trash (and leaves an orphan for reconcile when it cannot).

// TestPublishRenameFails: when the rename of staging into entries/ fails
// at publish (here the target is taken by a directory that is not empty),
// the entry is FAILED with the reason, nothing is published over what was
// there, and the staging data is removed.
func TestPublishRenameFails(t *testing.T) {
	root := t.TempDir()
	blob := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(blob, []byte("the bundle"), 0o644); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "file://"+blob, "")
	m := newManager(t, root)
	// After the start-up, whose reconcile would move it aside.
	target := filepath.Join(root, "entries", gen(k, 1))
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "in-the-way"), []byte("not depcache's"), 0o644); err != nil {
		t.Fatal(err)
	}
	e, err := getWait(t, m, "run", k)
	var fe *manager.FailedError
	if !errors.As(err, &fe) || !strings.Contains(fe.Reason, "rename") || e.Stage != state.Failed || e.Path != "" {
		t.Fatalf("after a failed rename: %s %q, %v; want FAILED naming the rename", e.Stage, e.Path, err)
	}
	if got := dirNames(t, root, filepath.Join("entries", gen(k, 1))); !slices.Equal(got, []string{"in-the-way"}) {
		t.Errorf("the rename's target now holds %v, want it untouched", got)
	}
	waitNoStaging(t, root)
}

// TestPublishUndoneWhenCommitFails: a publish whose rename succeeded but
// whose commit failed (here every commit fails: the state's previous
// version cannot be kept) moves the content back out of entries/, so that
// no content is in place without its entry. Once commits work again, the
// owner claims the next generation and publishes that.
func TestPublishUndoneWhenCommitFails(t *testing.T) {
	root := t.TempDir()
	g := newGate(false)
	k := mustKey(t, "http://gate.test/undo", "")
	var log logRecorder
	m := newManager(t, root, func(c *manager.Config) {
		c.Sources = g.sources()
		c.Log = log.logger()
	})
	t.Cleanup(g.close)
	if _, err := m.Get(context.Background(), "run", k); err != nil {
		t.Fatal(err)
	}
	first := g.next(t)
	// A commit keeps the state file as state.json.prev first: a directory
	// in its place makes every commit fail after its callback ran.
	blocker := filepath.Join(root, state.StateFile+state.PrevSuffix)
	if err := os.Remove(blocker); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(blocker, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	first.serve(t, "v1")
	// Until the hand-back that follows the failed publish (not a FAILED
	// mark: the download did not fail, the store did) has failed to commit
	// too: the blocker must stay until then, so that the state checked
	// below is the one before the publish.
	waitFor(t, within, func() bool {
		msgs := log.messages()
		at := slices.IndexFunc(msgs, func(m string) bool { return strings.HasSuffix(m, "handing the entry back") })
		return at >= 0 && slices.ContainsFunc(msgs[at+1:], func(m string) bool { return strings.Contains(m, "state update failed") })
	}, func() string {
		return fmt.Sprintf("the publish and its hand-back did not both fail: %q", log.messages())
	})
	if got := log.find("download failed"); len(got) != 0 {
		t.Errorf("a publish whose commit failed was logged as a failed download: %v", got)
	}
	for _, rel := range []string{filepath.Join("entries", gen(k, 1)), filepath.Join("staging", gen(k, 1))} {
		if exists(t, root, rel) {
			t.Errorf("%s is there after the failed commit", rel)
		}
	}
	if got := log.find("could not undo"); len(got) != 0 {
		t.Errorf("the undo failed: %v", got)
	}
	// Read past the store's layout check, which refuses the directory
	// where state.json.prev belongs.
	before, err := state.DecodeFile(root, state.StateFile)
	if err != nil {
		t.Fatal(err)
	}
	if e := before.Get(k); e == nil || e.Stage != state.Downloading || e.Generation != 1 {
		t.Fatalf("a failed commit changed the state: %+v", e)
	}
	if err := os.RemoveAll(blocker); err != nil {
		t.Fatal(err)
	}
	g.next(t).serve(t, "v2")
	waitFor(t, within, func() bool { e := viewEntry(t, root, k); return e != nil && e.Stage == state.Ready },
		func() string { return fmt.Sprintf("not published once commits work: %+v", viewEntry(t, root, k)) })
	e := viewEntry(t, root, k)
	if e.Generation != 2 {
		t.Errorf("READY at generation %d, want 2", e.Generation)
	}
	if got := dirNames(t, root, "entries"); !slices.Equal(got, []string{gen(k, 2)}) {
		t.Errorf("published: %v, want only %s", got, gen(k, 2))
	}
	if b, err := os.ReadFile(filepath.Join(root, e.Path)); err != nil || string(b) != "v2" {
		t.Errorf("content %q (%v)", b, err)
	}
}

// TestEvictedContentThatCannotBeMovedIsAnOrphan: when a sweep has
// committed an eviction but cannot move the content into its trash, it
// says so and the content stays where it was, named by no entry; the next
// start-up's reconcile moves it aside and deletes it.
func TestEvictedContentThatCannotBeMovedIsAnOrphan(t *testing.T) {
	root := t.TempDir()
	src := t.TempDir()
	var log logRecorder
	m := newManager(t, root, func(c *manager.Config) {
		c.Log = log.logger()
		c.CleanupInterval = time.Hour // only the test sweeps
	})
	ctx := context.Background()
	everything := manager.PolicyChange{MaxSizeBytes: ptr[int64](1), MinAge: ptr(time.Duration(0))}
	fetch := func(name string) state.Entry {
		p := filepath.Join(src, name)
		if err := os.WriteFile(p, []byte("content of "+name), 0o644); err != nil {
			t.Fatal(err)
		}
		k := mustKey(t, "file://"+p, "")
		e, err := getWait(t, m, "run", k)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Release(ctx, "run", k); err != nil {
			t.Fatal(err)
		}
		return e
	}
	// A first eviction makes the manager's trash directory.
	fetch("first")
	if rep, err := m.SweepWith(ctx, false, everything); err != nil || len(rep.Victims) != 1 {
		t.Fatalf("first sweep: %+v, %v", rep.Victims, err)
	}
	trash := dirNames(t, root, "trash")
	if len(trash) != 1 {
		t.Fatalf("trash holds %v, want one manager's directory", trash)
	}
	e := fetch("second")
	dir := filepath.Dir(e.Path) // entries/ID-gN
	// The manager's trash cannot be used: a file took its place.
	own := filepath.Join(root, "trash", trash[0])
	if err := os.RemoveAll(own); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(own, []byte("in the way"), 0o644); err != nil {
		t.Fatal(err)
	}
	rep, err := m.SweepWith(ctx, false, everything)
	if err != nil || len(rep.Victims) != 1 || rep.Victims[0].Key.ID() != e.Key.ID() {
		t.Fatalf("second sweep: %+v, %v", rep.Victims, err)
	}
	if st, err := m.Entries(ctx); err != nil || st.Get(e.Key) != nil {
		t.Fatalf("the evicted entry is still in the state (%v)", err)
	}
	if b, err := os.ReadFile(filepath.Join(root, e.Path)); err != nil || string(b) != "content of second" {
		t.Fatalf("the content that could not be moved: %q, %v; want it left in place", b, err)
	}
	warned := false
	for _, w := range log.find("stays as an orphan") {
		warned = warned || w.Data["dir"] == dir
	}
	if !warned {
		t.Errorf("no warning names %s: %q", dir, log.messages())
	}
	if err := os.Remove(own); err != nil {
		t.Fatal(err)
	}
	newManager(t, root) // a start-up
	if exists(t, root, dir) {
		t.Errorf("reconcile left the orphan %s", dir)
	}
	if c := trashContent(root); len(c) != 0 {
		t.Errorf("trash not emptied: %v", c)
	}
}
