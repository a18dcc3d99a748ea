package manager_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestRootLayoutRefused: with any of entries/, staging/ or trash/ a
// symlink (to a directory holding someone's files) or a file, and with the
// state or lock file a symlink, depcache refuses with ErrLayout naming the
// path, and nothing outside the root is written, moved or deleted.
func TestRootLayoutRefused(t *testing.T) {
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	for _, name := range []string{"entries", "staging", "trash", state.ShardDir, "state.json", "state.json.prev", "state.lock", state.RootIDFile} {
		for _, kind := range []string{"symlink", "file"} {
			if kind == "file" && filepath.Ext(name) != "" && name != state.ShardDir || kind == "file" && (name == "state.lock" || name == state.RootIDFile) {
				continue // a file is what these should be
			}
			t.Run(name+" as a "+kind, func(t *testing.T) {
				root := t.TempDir()
				k := mustKey(t, "file://"+abs, "")
				// A root with one entry, released and old enough to evict.
				func() {
					m, stop := startManager(t, root)
					if _, err := getWait(t, m, "job", k); err != nil {
						t.Fatal(err)
					}
					if err := m.Release(context.Background(), "job", k); err != nil {
						t.Fatal(err)
					}
					// Stopped before the root is tampered with: a loop
					// still running would take and release the state lock
					// over the planted symlink (it did once under CI load).
					if err := stop(); err != nil {
						t.Fatal(err)
					}
				}()
				outside := t.TempDir()
				precious := filepath.Join(outside, "precious")
				if err := os.WriteFile(precious, []byte("not depcache's"), 0o644); err != nil {
					t.Fatal(err)
				}
				p := filepath.Join(root, name)
				if name == "entries" || name == "staging" || name == "trash" {
					// Moved to another disk by an administrator.
					if err := os.RemoveAll(p); err != nil {
						t.Fatal(err)
					}
				} else if err := os.Rename(p, filepath.Join(outside, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
					t.Fatal(err)
				}
				if kind == "symlink" {
					if err := os.Symlink(outside, p); err != nil {
						t.Fatal(err)
					}
				} else if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
					t.Fatal(err)
				}
				before := listDir(t, outside)
				_, err := manager.New(manager.Config{Root: root, Log: quietLog()})
				if !errors.Is(err, state.ErrLayout) {
					t.Fatalf("New with %s as a %s: %v, want ErrLayout", name, kind, err)
				}
				if !strings.Contains(err.Error(), p) {
					t.Errorf("the error does not name %s: %v", p, err)
				}
				if after := listDir(t, outside); len(after) != len(before) {
					t.Errorf("outside the root changed: %v -> %v", before, after)
				}
				if b, err := os.ReadFile(precious); err != nil || string(b) != "not depcache's" {
					t.Errorf("a file outside the root was touched: %q %v", b, err)
				}
			})
		}
	}
}

// TestLayoutSwappedWhileRunning: a sweep of a running manager whose
// entries/ became a symlink after it started refuses, and deletes nothing
// where it points.
func TestLayoutSwappedWhileRunning(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root)
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	e, err := getWait(t, m, "job", k)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Release(context.Background(), "job", k); err != nil {
		t.Fatal(err)
	}
	moved := t.TempDir()
	if err := os.Rename(filepath.Join(root, "entries"), filepath.Join(moved, "entries")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(moved, "entries"), filepath.Join(root, "entries")); err != nil {
		t.Fatal(err)
	}
	oneShot := manager.PolicyChange{MaxSizeBytes: ptr[int64](1), MinAge: ptr(time.Duration(0))}
	if _, err := m.SweepWith(context.Background(), false, oneShot); !errors.Is(err, state.ErrLayout) {
		t.Fatalf("Sweep through a symlinked entries/: %v, want ErrLayout", err)
	}
	if _, err := os.Stat(filepath.Join(moved, e.Path)); err != nil {
		t.Errorf("content behind the symlink is gone: %v", err)
	}
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		out = append(out, p)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
