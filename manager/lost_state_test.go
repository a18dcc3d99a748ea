package manager_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
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
