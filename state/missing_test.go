package state_test

import (
	"context"
	"os"
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
