package manager_test

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestPlantedNotesDoNotHang: the small files depcache reads back from
// staging (a checkpoint, an owner note) are not trusted to be what their
// names say. A FIFO there hung every start-up on the root, and a symlink
// to /dev/zero ran it out of memory; now both are passed over, and the
// manager starts and serves.
func TestPlantedNotesDoNotHang(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: k, Stage: state.Downloading, Generation: 1,
			Dependents: map[string]state.Dependent{"job": {Since: time.Now()}}})
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, plant := range []func(dir string) error{
		func(dir string) error { return syscall.Mkfifo(filepath.Join(dir, "checkpoint.json"), 0o644) },
		func(dir string) error { return syscall.Mkfifo(filepath.Join(dir, "owner.json"), 0o644) },
		func(dir string) error { return os.Symlink("/dev/zero", filepath.Join(dir, "checkpoint.json")) },
		func(dir string) error { return os.Symlink("/dev/zero", filepath.Join(dir, "owner.json")) },
	} {
		dir := filepath.Join(root, "staging", k.ID()+"-g"+string(rune('1'+i)))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := plant(dir); err != nil {
			t.Fatal(err)
		}
	}
	started := make(chan *manager.Manager, 1)
	go func() {
		m, _ := startManager(t, root)
		started <- m
	}()
	var m *manager.Manager
	select {
	case m = <-started:
	case <-time.After(time.Minute):
		t.Fatal("the manager did not start within a minute beside planted FIFOs in staging")
	}
	if e, err := getWait(t, m, "job", k); err != nil || e.Stage != state.Ready {
		t.Fatalf("get beside the planted notes: %+v %v", e, err)
	}
}

// TestOrphanWithUnreadableMetaKept: published content that no entry names
// (what a rebuild leaves when the content's meta.json does not parse) is
// not moved to trash and deleted at the next start-up, as an eviction's
// leftover is: it is left in place, with a warning naming it.
func TestOrphanWithUnreadableMetaKept(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	func() {
		m, stop := startManager(t, root)
		if _, err := getWait(t, m, "job", k); err != nil {
			t.Fatal(err)
		}
		if err := stop(); err != nil {
			t.Fatal(err)
		}
	}()
	dirs, _ := filepath.Glob(filepath.Join(root, "entries", k.ID()+"-g*"))
	if len(dirs) != 1 {
		t.Fatalf("entry directories %v", dirs)
	}
	if err := os.WriteFile(filepath.Join(dirs[0], "meta.json"), []byte("xx"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		delete(st.Entries, k.ID())
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	rec := &logRecorder{}
	startManager(t, root, func(c *manager.Config) { c.Log = rec.logger() })
	if _, err := os.Stat(filepath.Join(dirs[0], "content")); err != nil {
		t.Errorf("the content of an orphan with unreadable metadata is gone: %v", err)
	}
	if !rec.said("metadata that cannot be read") {
		t.Errorf("no warning naming it: %q", rec.messages())
	}
}
