package manager_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestDoctorSaysContentWaitsInTrash: a READY entry whose content an
// interrupted sweep (of an older depcache, which moved before committing)
// left in trash/ is reported as missing and waiting there, not only as
// missing.
func TestDoctorSaysContentWaitsInTrash(t *testing.T) {
	root := t.TempDir()
	key := state.Key{Kind: state.Bundle, Source: "https://example.com/in-trash"}
	name := key.ID() + "-g1"
	held := filepath.Join(root, "trash", "oldmanager", name)
	if err := os.MkdirAll(held, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(held, "content"), []byte("still needed"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: key, Stage: state.Ready, Path: filepath.Join("entries", name, "content"), SizeBytes: 12})
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	m, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	var detail string
	for _, c := range m.Doctor(context.Background()) {
		if c.Name == "content" && c.Status == "fail" {
			detail = c.Detail
		}
	}
	if want := filepath.Join("trash", "oldmanager", name); !strings.Contains(detail, "waiting in "+want) {
		t.Errorf("doctor's content check: %q, want it to say the content waits in %s", detail, want)
	}
}
