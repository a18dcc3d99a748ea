package state_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/depcache/depcache/state"
)

// manifestRefs returns the shard records of the manifest at path.
func manifestRefs(t *testing.T, path string) (version int, refs map[string]struct {
	File   string `json:"file"`
	Offset int64  `json:"offset"`
}) {
	t.Helper()
	var m struct {
		Version int `json:"version"`
		Shards  map[string]struct {
			File   string `json:"file"`
			Offset int64  `json:"offset"`
		} `json:"shards"`
	}
	if err := json.Unmarshal(readBytes(t, path), &m); err != nil {
		t.Fatal(err)
	}
	return m.Version, m.Shards
}

// A commit of a few shards writes them into one pack, each at its offset;
// a pack stays while any of its shards is named, and goes once none is.
func TestPackHoldsACommitsShards(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(ctx, putN(6)); err != nil {
		t.Fatal(err)
	}
	files := shardFiles(t, dir)
	if len(files) != 1 || !strings.HasPrefix(files[0], "pk-") {
		t.Fatalf("shard files %v, want one pack", files)
	}
	pack := files[0]
	_, refs := manifestRefs(t, s.Path())
	var offsets []int64
	for _, r := range refs {
		if r.File != pack {
			t.Fatalf("shard in %s, want the pack %s", r.File, pack)
		}
		offsets = append(offsets, r.Offset)
	}
	slices.Sort(offsets)
	if len(offsets) < 2 || offsets[0] != 0 || slices.Contains(offsets[1:], 0) {
		t.Fatalf("offsets %v: want one shard at 0 and the others after it", offsets)
	}
	check := func(when string, want func(i int) int64) {
		t.Helper()
		st, err := openStore(t, dir).View(ctx) // no cache: every shard read from disk
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		for i := range 6 {
			if e := st.Get(bundleKey(i)); e == nil || e.SizeBytes != want(i) {
				t.Fatalf("%s: entry %d is %+v, want size %d", when, i, e, want(i))
			}
		}
		for _, c := range openStore(t, dir).Checks(ctx) {
			if c.Status == "fail" || c.Name == "unreferenced shards" && c.Status != "ok" {
				t.Fatalf("%s: doctor: %+v", when, c)
			}
		}
	}
	check("after the pack's commit", func(i int) int64 { return int64(i) })
	// Entries change one at a time: each shard leaves the pack for a file
	// of its own, and the pack stays until the last one has left.
	for i := range 6 {
		bump(t, s, i)
		bump(t, s, i) // the commit after the one that retired a file deletes it
		_, refs = manifestRefs(t, s.Path())
		named := false
		for _, r := range refs {
			named = named || r.File == pack
		}
		_, err := os.Lstat(filepath.Join(dir, state.ShardDir, pack))
		if named && err != nil {
			t.Fatalf("after entry %d: the pack, still named, is gone: %v", i, err)
		}
		if !named && !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("after entry %d: the pack, named by no manifest, is still there (%v)", i, err)
		}
		check(fmt.Sprintf("after entry %d", i), func(j int) int64 {
			if j <= i {
				return int64(j) + 2
			}
			return int64(j)
		})
	}
}

// A root of format 2 (shard files, no packs) is read as it is and becomes
// format 3 at its first write, keeping the format 2 manifest as .prev; a
// format 2 manifest naming a pack, or an offset outside a pack, is corrupt.
func TestUpgradeFromFormat2(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(ctx, putN(200)); err != nil { // 200 shards: a file each
		t.Fatal(err)
	}
	sf := s.Path()
	v3 := readBytes(t, sf)
	v2 := bytes.Replace(v3, []byte(`{"version":4,`), []byte(`{"version":2,`), 1)
	if bytes.Equal(v2, v3) || bytes.Contains(v3, []byte(`"pk-`)) || bytes.Contains(v3, []byte(`"delta"`)) {
		t.Fatalf("setup: want a manifest of version 4 without packs or deltas:\n%.200s", v3)
	}
	if err := os.WriteFile(sf, v2, 0o644); err != nil {
		t.Fatal(err)
	}
	fresh := openStore(t, dir)
	st, err := fresh.View(ctx)
	if err != nil || len(st.Entries) != 200 {
		t.Fatalf("View of a format 2 root: %d entries, %v", len(st.Entries), err)
	}
	bump(t, fresh, 3)
	if v, _ := manifestRefs(t, sf); v != state.FormatVersion {
		t.Fatalf("after the first write: version %d, want %d", v, state.FormatVersion)
	}
	if got := readBytes(t, sf+state.PrevSuffix); !bytes.Equal(got, v2) {
		t.Error("state.json.prev is not the format 2 manifest")
	}
	st, err = openStore(t, dir).View(ctx)
	if err != nil || len(st.Entries) != 200 || st.Get(bundleKey(3)).SizeBytes != 4 {
		t.Fatalf("after the upgrade: %d entries, %v", len(st.Entries), err)
	}

	for name, bad := range map[string][]byte{
		"a pack in format 2":        bytes.Replace(v2, []byte(`"file":"`), []byte(`"file":"pk-`), 1),
		"an offset in a shard file": bytes.Replace(v3, []byte(`"bytes":`), []byte(`"offset":5,"bytes":`), 1),
	} {
		if name == "a pack in format 2" {
			// pk-SERIAL-NONCE.json is as long as a shard file's name: cut
			// the two hex digits the replacement pushed in front.
			i := bytes.Index(bad, []byte(`"file":"pk-`)) + len(`"file":"pk-`)
			bad = append(bad[:i:i], bad[i+3:]...)
		}
		if err := os.WriteFile(sf, bad, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := openStore(t, dir).View(ctx)
		if !errors.Is(err, state.ErrCorrupt) {
			t.Errorf("%s: View: %v, want ErrCorrupt", name, err)
		}
	}
}

// Emptying a shard that shares a pack with others commits its removal,
// though no file is retired (the pack was taken for unchanged).
func TestPackShardEmptied(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(ctx, putN(2)); err != nil {
		t.Fatal(err)
	}
	if err := openStore(t, dir).Update(ctx, func(st *state.State) (bool, error) {
		st.Delete(bundleKey(1))
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*state.Store{s, openStore(t, dir)} {
		st, err := r.View(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Get(bundleKey(1)) != nil || st.Get(bundleKey(0)) == nil {
			t.Fatalf("after deleting entry 1: %d entries (0: %v, 1: %v)", len(st.Entries), st.Get(bundleKey(0)) != nil, st.Get(bundleKey(1)) != nil)
		}
	}
}
