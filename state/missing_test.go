package state_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/depcache/depcache/state"
)

// TestViewLooksAgainWhenTheFileIsMissingForAMoment: on sshfs a commit's
// rename over a state file open on its mount is two server renames, and
// between them the name is missing. A View (no lock) that finds the file
// missing beside its previous version looks again instead of reporting an
// empty state, and Exists does not report that no state was committed.
func TestViewLooksAgainWhenTheFileIsMissingForAMoment(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	k := state.Key{Kind: state.Bundle, Source: "https://example.com/missing-for-a-moment"}
	for range 2 { // two commits: the second leaves a previous version
		if err := s.Update(ctx, func(st *state.State) (bool, error) {
			e := &state.Entry{Key: k, Stage: state.Downloading}
			if old := st.Get(k); old != nil {
				e.Generation = old.Generation + 1
			}
			st.Put(e)
			return true, nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	hidden := s.Path() + ".fuse_hidden0001"
	for _, name := range []string{"View", "Exists"} {
		if err := os.Rename(s.Path(), hidden); err != nil {
			t.Fatal(err)
		}
		looked := 0
		state.SetMissingHook(t, func(string) {
			looked++
			if looked == 2 { // back after the second look
				if err := os.Rename(hidden, s.Path()); err != nil {
					t.Error(err)
				}
			}
		})
		if name == "View" {
			st, err := s.View(ctx)
			if err != nil || st.Get(k) == nil {
				t.Errorf("View of a state file missing for a moment: %v, entry %v", err, st.Get(k))
			}
		} else {
			// Exists has no hook of its own: put the file back first.
			if err := os.Rename(hidden, s.Path()); err != nil {
				t.Fatal(err)
			}
			if ok, err := s.Exists(ctx); err != nil || !ok {
				t.Errorf("Exists: %v %v", ok, err)
			}
		}
		if name == "View" && looked < 2 {
			t.Errorf("View looked again %d times, want it to wait for the file", looked)
		}
	}
}

// A shard file that is not a regular file (a FIFO, a link to a device or
// to a copy of itself) is refused at once, naming it, by reads and writes
// alike: a FIFO made every command wait in open(2), and a link to
// /dev/zero read until memory ran out. Nothing is deleted.
func TestNonRegularShardIsRefused(t *testing.T) {
	for _, kind := range []string{"fifo", "devzero", "link to a copy"} {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			s := openStore(t, dir)
			for i := range 4 {
				if err := s.Update(ctx, put(i, 1)); err != nil {
					t.Fatal(err)
				}
			}
			files, _ := filepath.Glob(filepath.Join(dir, state.ShardDir, "[0-9a-f][0-9a-f]-*.json"))
			if len(files) == 0 {
				t.Fatal("no shard file of its own")
			}
			victim := files[0]
			copyOf := filepath.Join(t.TempDir(), "copy.json")
			b, err := os.ReadFile(victim)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(copyOf, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(victim); err != nil {
				t.Fatal(err)
			}
			switch kind {
			case "fifo":
				err = syscall.Mkfifo(victim, 0o644)
			case "devzero":
				err = os.Symlink("/dev/zero", victim)
			default:
				err = os.Symlink(copyOf, victim)
			}
			if err != nil {
				t.Fatal(err)
			}
			fresh := openStore(t, dir) // nothing cached
			_, verr := fresh.View(ctx)
			uerr := fresh.Update(ctx, func(st *state.State) (bool, error) { return true, nil })
			for what, err := range map[string]error{"View": verr, "Update": uerr} {
				if !errors.Is(err, state.ErrLayout) || !strings.Contains(err.Error(), filepath.Base(victim)) {
					t.Errorf("%s with a shard that is a %s: %v; want ErrLayout naming %s", what, kind, err, filepath.Base(victim))
				}
			}
			if left, _ := filepath.Glob(filepath.Join(dir, state.ShardDir, "*")); len(left) < len(files) {
				t.Errorf("shard files after the refusals: %d, before: %d", len(left), len(files))
			}
		})
	}
}
