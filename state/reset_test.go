package state_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/depcache/depcache/state"
)

// TestResetKeepsTheLastGoodState: whatever is wrong with the state file
// (cut short, garbage, empty, missing), a Reset hands its function the
// previous version, keeps state.json.prev as it was, and keeps a copy of
// it that the next commits do not replace; an unreadable file is kept
// aside and never becomes state.json.prev.
func TestResetKeepsTheLastGoodState(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		corrupt func(good []byte) []byte // nil: remove the file
	}{
		{"truncated", func(good []byte) []byte { return good[:len(good)/2] }},
		{"garbage", func([]byte) []byte { return []byte("\x00\x17 not json at all {{{") }},
		{"empty", func([]byte) []byte { return nil }},
		{"missing", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			p := state.DefaultPolicy()
			p.MaxSizeBytes = 5 << 30
			if err := s.Update(ctx, func(st *state.State) (bool, error) {
				st.Put(&state.Entry{Key: bundleKey(1), Stage: state.Ready, Generation: 3, Path: "entries/x-g3/content",
					Dependents: map[string]state.Dependent{"job1": {}, "run-7": {Process: &state.Process{Host: "h", PID: 7}}}})
				st.Policy = &p
				return true, nil
			}); err != nil {
				t.Fatal(err)
			}
			good, err := os.ReadFile(s.Path())
			if err != nil {
				t.Fatal(err)
			}
			// The good state becomes the previous version; the file is
			// then damaged.
			if err := os.WriteFile(s.Path()+state.PrevSuffix, good, 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.corrupt == nil {
				os.Remove(s.Path())
			} else if err := os.WriteFile(s.Path(), tc.corrupt(good), 0o644); err != nil {
				t.Fatal(err)
			}

			var handed *state.State
			rep, err := s.Reset(ctx, func(st, last *state.State) error {
				handed = last
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if handed == nil || handed.Get(bundleKey(1)) == nil || len(handed.Get(bundleKey(1)).Dependents) != 2 || handed.Policy == nil || handed.Policy.MaxSizeBytes != 5<<30 {
				t.Fatalf("Reset's function was given %+v, want the previous version", handed)
			}
			if rep.LastFile != s.Path()+state.PrevSuffix {
				t.Errorf("LastFile %q, want the previous version", rep.LastFile)
			}
			if prev, _ := os.ReadFile(s.Path() + state.PrevSuffix); !bytes.Equal(prev, good) {
				t.Errorf("state.json.prev was replaced:\n%s", prev)
			}
			switch {
			case tc.corrupt == nil && (rep.Unreadable != "" || rep.UnreadableErr != nil):
				t.Errorf("a missing file reported as unreadable: %+v", rep)
			case tc.corrupt != nil:
				if !errors.Is(rep.UnreadableErr, state.ErrCorrupt) {
					t.Errorf("UnreadableErr %v, want ErrCorrupt", rep.UnreadableErr)
				}
				if b, err := os.ReadFile(rep.Unreadable); err != nil || !bytes.Equal(b, tc.corrupt(good)) {
					t.Errorf("the unreadable file is not kept aside at %q: %v", rep.Unreadable, err)
				}
			}

			// The next commits replace state.json.prev; the copy stays.
			for i := 2; i < 4; i++ {
				if err := s.Update(ctx, put(i, uint64(i))); err != nil {
					t.Fatal(err)
				}
			}
			if filepath.Dir(rep.LastCopy) != dir {
				t.Fatalf("LastCopy %q not in the root", rep.LastCopy)
			}
			// A self-contained copy: the next commits may delete the
			// shards of the state it copies.
			kept, err := state.DecodeFile(dir, filepath.Base(rep.LastCopy))
			if err != nil || kept.Get(bundleKey(1)) == nil || len(kept.Get(bundleKey(1)).Dependents) != 2 || kept.Policy == nil || kept.Policy.MaxSizeBytes != 5<<30 {
				t.Errorf("the copy of the last good state at %q: %+v, %v", rep.LastCopy, kept, err)
			}
		})
	}
}

// A forced reset of a state that parses hands over that state, and it
// becomes the previous version as at every commit.
func TestResetOfAReadableState(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	if err := s.Update(ctx, put(1, 1)); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(s.Path())
	rep, err := s.Reset(ctx, func(st, last *state.State) error {
		if last == nil || last.Get(bundleKey(1)) == nil {
			t.Errorf("Reset's function was given %+v, want the current state", last)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if rep.LastFile != s.Path() || rep.Unreadable != "" || rep.UnreadableErr != nil {
		t.Errorf("report %+v", rep)
	}
	if prev, _ := os.ReadFile(s.Path() + state.PrevSuffix); !bytes.Equal(prev, good) {
		t.Errorf("state.json.prev is not the replaced state:\n%s", prev)
	}
}
