package state_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
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

// A shard that no commit since rewrote is named by state.json and by its
// previous version alike, so damage to it leaves no state that parses
// whole; a Reset still hands over every other shard, dependents and all,
// and says which shard it could not read. A damaged shard that only the
// last commit wrote is taken from the previous version instead.
func TestResetAfterADamagedShard(t *testing.T) {
	ctx := context.Background()
	const n = 300
	for _, tc := range []struct {
		name string
		// Which shards to damage: one that both manifests name, the
		// one that only state.json names (entry 0's).
		shared, changed bool
	}{
		{"named by both", true, false},
		{"named by the last commit only", false, true},
		{"one of each", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			if err := s.Update(ctx, func(st *state.State) (bool, error) {
				for i := range n {
					st.Put(&state.Entry{Key: bundleKey(i), Stage: state.Ready, Generation: uint64(i + 1), Path: fmt.Sprintf("entries/x-g%d/content", i+1),
						Dependents: map[string]state.Dependent{fmt.Sprintf("job%d", i): {}}})
				}
				st.MaxGeneration = n
				return true, nil
			}); err != nil {
				t.Fatal(err)
			}
			// The second commit changes entry 0 only: its shard gets a
			// new file, the others stay as they were.
			if err := s.UpdateEntries(ctx, []string{bundleKey(0).ID()}, func(v *state.Txn) (bool, error) {
				e := v.Get(bundleKey(0)).Clone()
				e.Dependents = map[string]state.Dependent{"job0": {}, "late": {}}
				v.Put(e)
				return true, nil
			}); err != nil {
				t.Fatal(err)
			}
			cur, prev := shardRefs(t, s.Path()), shardRefs(t, s.Path()+state.PrevSuffix)
			var shared, changed string // the prefixes of the shards to damage
			for _, p := range slices.Sorted(maps.Keys(cur)) {
				if cur[p] != prev[p] {
					changed = p
				} else if shared == "" {
					shared = p
				}
			}
			if shared == "" || changed == "" {
				t.Fatalf("shards: shared %q, changed %q, of %d", shared, changed, len(cur))
			}
			damaged := map[string][]byte{} // file: its bytes once damaged
			damage := func(p string) {
				ref := cur[p]
				defer func() {
					b, err := os.ReadFile(filepath.Join(dir, state.ShardDir, ref.File))
					if err != nil {
						t.Fatal(err)
					}
					damaged[ref.File] = b
				}()
				f, err := os.OpenFile(filepath.Join(dir, state.ShardDir, ref.File), os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if _, err := f.WriteAt([]byte("#"), ref.Offset+int64(ref.Bytes)/2); err != nil {
					t.Fatal(err)
				}
			}
			want := n // entries handed over
			var wantUnread []state.UnreadShard
			if tc.shared {
				damage(shared)
				want -= cur[shared].Entries
				wantUnread = append(wantUnread, state.UnreadShard{Shard: shared})
			}
			if tc.changed {
				damage(changed)
				if tc.shared {
					wantUnread = append(wantUnread, state.UnreadShard{Shard: changed, From: s.Path() + state.PrevSuffix})
				}
			}
			slices.SortFunc(wantUnread, func(a, b state.UnreadShard) int { return strings.Compare(a.Shard, b.Shard) })
			wantLast := s.Path()
			if !tc.shared {
				wantLast = s.Path() + state.PrevSuffix // it parses whole
			}
			prevBefore, _ := os.ReadFile(s.Path() + state.PrevSuffix)
			// doctor names each bad shard by its prefix, not only its
			// file: a pack holds the shards of a whole commit.
			var detail string
			for _, c := range s.Checks(ctx) {
				if c.Name == "state shards" {
					detail = c.Detail
				}
			}
			for p, bad := range map[string]bool{shared: tc.shared, changed: tc.changed} {
				if bad && !strings.Contains(detail, "shard "+p+" (") {
					t.Errorf("doctor's state shards check does not name shard %s: %q", p, detail)
				}
			}

			var handed *state.State
			rep, err := s.Reset(ctx, func(st, last *state.State) error {
				handed = last
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if handed == nil {
				t.Fatal("Reset's function was given no last state")
			}
			if rep.LastFile != wantLast {
				t.Errorf("LastFile %q, want %q", rep.LastFile, wantLast)
			}
			if len(rep.Unread) != len(wantUnread) {
				t.Fatalf("Unread %+v, want %+v", rep.Unread, wantUnread)
			}
			for i, u := range rep.Unread {
				if w := wantUnread[i]; u.Shard != w.Shard || u.From != w.From || u.Reason == "" || u.File == "" {
					t.Errorf("Unread[%d] = %+v, want shard %s from %q, with its file and reason", i, u, w.Shard, w.From)
				}
			}
			if len(handed.Entries) != want {
				t.Errorf("handed %d entries, want %d", len(handed.Entries), want)
			}
			for _, e := range handed.Entries {
				if len(e.Dependents) == 0 {
					t.Errorf("%s handed without its dependents", e.Key.Source)
				}
			}
			if e := handed.Get(bundleKey(0)); tc.changed && (e == nil || len(e.Dependents) != 1) {
				t.Errorf("entry 0 handed as %+v, want the previous version's (one dependent)", e)
			}
			if handed.MaxGeneration != n {
				t.Errorf("MaxGeneration %d, want %d", handed.MaxGeneration, n)
			}
			// The damaged state.json never becomes the previous version.
			if after, _ := os.ReadFile(s.Path() + state.PrevSuffix); !bytes.Equal(after, prevBefore) {
				t.Error("state.json.prev was replaced by the damaged state")
			}
			if kept, err := state.DecodeFile(dir, filepath.Base(rep.LastCopy)); err != nil || len(kept.Entries) != want {
				t.Errorf("the copy at %q: %v", rep.LastCopy, err)
			}
			// The damaged files' bytes are kept aside: the rebuilt state
			// names them no more, and a later holder deletes them.
			copies, _ := filepath.Glob(s.Path() + state.BadSuffix + "*")
			for f, b := range damaged {
				found := false
				for _, c := range copies {
					if cb, err := os.ReadFile(c); err == nil && bytes.Equal(cb, b) {
						found = true
					}
				}
				if !found {
					t.Errorf("no copy of the damaged %s among %v", f, copies)
				}
			}
			for _, u := range rep.Unread {
				if cb, err := os.ReadFile(u.Copy); err != nil || !bytes.Equal(cb, damaged[filepath.Base(u.File)]) {
					t.Errorf("Unread %s: Copy %q (%v) is not the damaged file's bytes", u.Shard, u.Copy, err)
				}
			}
		})
	}
}

// shardRef is what a manifest records of one shard.
type shardRef struct {
	File    string `json:"file"`
	Offset  int64  `json:"offset"`
	Bytes   int    `json:"bytes"`
	Entries int    `json:"entries"`
	SHA256  string `json:"sha256"`
}

func shardRefs(t *testing.T, manifest string) map[string]shardRef {
	t.Helper()
	b, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Shards map[string]shardRef `json:"shards"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m.Shards
}

// With every shard gone (state.d lost), the manifests that parse say
// nothing of what the state held: a Reset hands over no last state, so
// that a rebuild says what it dropped is unknown, not that it was
// nothing.
func TestResetWithEveryShardGone(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	for i := range 2 {
		if err := s.Update(ctx, put(i, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.RemoveAll(filepath.Join(dir, state.ShardDir)); err != nil {
		t.Fatal(err)
	}
	if last, file, unread := state.ReadablePart(dir); last != nil || file != "" || unread != nil {
		t.Errorf("ReadablePart: %v, %q, %+v; want nothing", last, file, unread)
	}
	rep, err := s.Reset(ctx, func(st, last *state.State) error {
		if last != nil {
			t.Errorf("Reset handed %d entries over from no shard", len(last.Entries))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Last != nil || rep.LastFile != "" || rep.LastCopy != "" {
		t.Errorf("report %+v, want no last state", rep)
	}
}
