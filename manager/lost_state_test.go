package manager_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestStateFileLostBesideItsPrevious: a state.json deleted while its
// previous version remains (an operator, a partial restore) is an error
// for every read and write, and start-up refuses: nothing is written, and
// no published entry is taken for an orphan and deleted. doctor --rebuild
// (Rebuild, without force) brings the entry back.
func TestStateFileLostBesideItsPrevious(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	func() {
		m := newManager(t, root)
		for _, dep := range []string{"a", "b"} { // two commits at least: a previous version
			if _, err := getWait(t, m, dep, k); err != nil {
				t.Fatal(err)
			}
		}
	}()
	if _, err := os.Stat(filepath.Join(root, state.StateFile+state.PrevSuffix)); err != nil {
		t.Fatalf("no previous version to test with: %v", err)
	}
	if err := os.Remove(filepath.Join(root, state.StateFile)); err != nil {
		t.Fatal(err)
	}
	before := listDir(t, filepath.Join(root, "entries"))

	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.Update(ctx, func(st *state.State) (bool, error) { return true, nil }); !errors.Is(err, state.ErrCorrupt) {
		t.Errorf("Update with the state file lost: %v, want ErrCorrupt", err)
	}
	if _, err := s.View(ctx); !errors.Is(err, state.ErrCorrupt) {
		t.Errorf("View with the state file lost: %v, want ErrCorrupt", err)
	}
	m, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	if stop, err := m.Start(ctx); err == nil {
		stop()
		t.Fatal("a manager started on a root whose state file is lost")
	}
	if _, err := os.Stat(filepath.Join(root, state.StateFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("something wrote a new state file: %v", err)
	}
	if after := listDir(t, filepath.Join(root, "entries")); len(after) != len(before) {
		t.Fatalf("published content changed: %v -> %v", before, after)
	}
	if _, err := m.Rebuild(ctx, false); err != nil {
		t.Fatalf("Rebuild of a lost state file: %v", err)
	}
	if e := viewEntry(t, root, k); e == nil || e.Stage != state.Ready {
		t.Errorf("entry after the rebuild: %+v", e)
	}
}

// TestForeignDirectoryInEntries: a --root pointed at a directory that has
// an entries/ of its own. What is not named as depcache names a
// generation's directory (KEYID-gN) is not depcache's: start-up neither
// asks for a rebuild because of it nor moves it aside, sweeps leave it,
// and doctor says it is there. An orphan of depcache's own name beside it
// is still moved aside.
func TestForeignDirectoryInEntries(t *testing.T) {
	root := t.TempDir()
	foreign := []string{"photos", "0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789ABCDEF-g1", "0123456789abcdef0123456789abcdef-g", "0123456789abcdef0123456789abcdef-g1x", "0123456789abcdef0123456789abcdef-g007", "0123456789abcdef0123456789abcdef-g+7", "0123456789abcdef0123456789abcdef-g99999999999999999999"}
	for _, d := range foreign {
		if err := os.MkdirAll(filepath.Join(root, "entries", d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "entries", d, "p.jpg"), []byte("important"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	m := newManager(t, root) // fails the test if start-up refuses
	if _, err := getWait(t, m, "a", k); err != nil {
		t.Fatal(err)
	}
	orphan := "fedcba9876543210fedcba9876543210-g3"
	if err := os.MkdirAll(filepath.Join(root, "entries", orphan), 0o755); err != nil {
		t.Fatal(err)
	}
	newManager(t, root) // a second start-up reconciles with a state
	if _, err := m.Sweep(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	for _, d := range foreign {
		if b, err := os.ReadFile(filepath.Join(root, "entries", d, "p.jpg")); err != nil || string(b) != "important" {
			t.Errorf("entries/%s/p.jpg, not depcache's, after start-ups and a sweep: %q, %v", d, b, err)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "entries", orphan)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the orphan %s, named as depcache names its own, was not moved aside: %v", orphan, err)
	}
	found := false
	for _, c := range m.Doctor(context.Background()) {
		if c.Name == "orphans" && c.Status == "warn" && strings.Contains(c.Detail, "not depcache's") && strings.Contains(c.Detail, "photos") {
			found = true
		}
	}
	if !found {
		t.Errorf("doctor does not list photos as not depcache's: %+v", m.Doctor(context.Background()))
	}
}

// TestContentLostUnderNamedDependent: a READY entry whose content went
// missing (deleted by hand, a restore without it) is fetched again at the
// next start-up under a new generation, and keeps its dependents: a named
// one can still be released, and holds the new content meanwhile. With no
// dependent, the entry is dropped.
func TestContentLostUnderNamedDependent(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	ctx := context.Background()
	m := newManager(t, root)
	if _, err := m.Get(ctx, "d1", k, manager.Detached()); err != nil {
		t.Fatal(err)
	}
	e, err := m.Wait(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	p, err := m.Abs(e)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(p); err != nil {
		t.Fatal(err)
	}

	m2 := newManager(t, root)
	if got := viewEntry(t, root, k); got == nil || got.Stage != state.Downloading || got.Owner != nil || got.Dependents["d1"] == (state.Dependent{}) {
		t.Fatalf("after start-up with the content missing: %+v, want an unowned download that keeps d1", got)
	}
	if _, err := m2.Get(ctx, "d2", k, manager.Detached()); err != nil {
		t.Fatal(err)
	}
	e2, err := m2.Wait(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if e2.Generation <= e.Generation || len(e2.Dependents) != 2 {
		t.Errorf("fetched again: generation %d (was %d), dependents %v; want a later generation held by d1 and d2", e2.Generation, e.Generation, e2.Dependents)
	}
	if p2, err := m2.Abs(e2); err != nil || !exists(t, root, mustRel(t, root, p2)) {
		t.Errorf("the content fetched again, %s: %v", p2, err)
	}
	for _, d := range []string{"d1", "d2"} {
		if err := m2.Release(ctx, d, k); err != nil {
			t.Errorf("release of %s: %v", d, err)
		}
	}

	// Lost again with no dependent left: dropped.
	e3 := viewEntry(t, root, k)
	if e3 == nil || e3.Stage != state.Ready || len(e3.Dependents) != 0 {
		t.Fatalf("after both releases: %+v, want a READY entry without dependents", e3)
	}
	p3, err := m2.Abs(*e3)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(p3); err != nil {
		t.Fatal(err)
	}
	newManager(t, root)
	if got := viewEntry(t, root, k); got != nil {
		t.Errorf("a READY entry without dependents whose content is missing: %+v, want it dropped", got)
	}
}

func mustRel(t *testing.T, root, p string) string {
	t.Helper()
	r, err := filepath.Rel(root, p)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
