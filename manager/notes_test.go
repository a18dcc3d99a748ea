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
