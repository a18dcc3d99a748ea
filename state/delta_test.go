package state_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// keysOfShard returns n bundle keys whose IDs fall in shard p.
func keysOfShard(p string, n int) []state.Key {
	var out []state.Key
	for i := 0; len(out) < n; i++ {
		if k := bundleKey(i); strings.HasPrefix(k.ID(), p) {
			out = append(out, k)
		}
	}
	return out
}

func addDep(e *state.Entry, name string) {
	if e.Dependents == nil {
		e.Dependents = map[string]state.Dependent{}
	}
	e.Dependents[name] = state.Dependent{Since: time.Unix(1700000000, 0).UTC()}
}

// shardRecord is a shard's line of a manifest, as the tests read it.
type shardRecord struct {
	File  string `json:"file"`
	Bytes int    `json:"bytes"`
	Delta *struct {
		File    string `json:"file"`
		Entries int    `json:"entries"`
	} `json:"delta"`
}

func shardRecordOf(t *testing.T, dir, p string) (version int, rec shardRecord) {
	t.Helper()
	var m struct {
		Version int                    `json:"version"`
		Shards  map[string]shardRecord `json:"shards"`
	}
	if err := json.Unmarshal(readBytes(t, filepath.Join(dir, state.StateFile)), &m); err != nil {
		t.Fatal(err)
	}
	return m.Version, m.Shards[p]
}

// sameEntries fails unless got holds exactly want's entries, field for
// field.
func sameEntries(t *testing.T, what string, got *state.State, want map[string]*state.Entry) {
	t.Helper()
	if len(got.Entries) != len(want) {
		t.Fatalf("%s: %d entries, want %d", what, len(got.Entries), len(want))
	}
	for id, w := range want {
		g, ok := got.Entries[id]
		if !ok || !g.Equal(w) {
			t.Fatalf("%s: entry %s is %+v, want %+v", what, id, g, w)
		}
	}
}

// A write of named entries in a large shard writes a delta over the
// shard's base, not the shard: the base's file stays named until a
// deletion or a delta grown past a quarter of the base merges both. Two
// stores (two processes' caches) take turns at random gets, releases,
// additions and deletions in one shard; every 25 of them, every reader
// (each store, a fresh one, DecodeFile) sees the model's entries, and no
// file of state.d is unnamed; doctor finds nothing wrong at the end.
func TestDeltaOverLargeShard(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	stores := []*state.Store{openStore(t, dir), openStore(t, dir)}
	keys := keysOfShard("3f", 360)
	model := map[string]*state.Entry{}
	entry := func(k state.Key, size int64) *state.Entry {
		return &state.Entry{Key: k, Stage: state.Ready, Path: "entries/" + k.ID() + "-g1/content", SizeBytes: size, Generation: 1}
	}
	if err := stores[0].Update(ctx, func(st *state.State) (bool, error) {
		for _, k := range keys[:240] {
			e := entry(k, 4096)
			st.Put(e)
			model[k.ID()] = e
		}
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	v, rec := shardRecordOf(t, dir, "3f")
	if v != state.FormatVersion || rec.Bytes < state.DeltaMinBase || rec.Delta != nil {
		t.Fatalf("setup: version %d, shard 3f of %d bytes with delta %v: want a base of %d bytes or more alone", v, rec.Bytes, rec.Delta, state.DeltaMinBase)
	}
	rng := rand.New(rand.NewPCG(crashSeed(t), 3))
	var deltas, merges, kept int
	base := rec.File
	for op := range 400 {
		s := stores[op%2]
		k := keys[rng.IntN(len(keys))]
		id := k.ID()
		var ids []string
		var change func(tx *state.Txn)
		switch r := rng.IntN(20); {
		case r == 0 && model[id] != nil: // rm
			ids, change = []string{id}, func(tx *state.Txn) { tx.Delete(k) }
			delete(model, id)
		case model[id] == nil: // a get of a new entry
			e := entry(k, int64(op))
			ids, change = []string{id}, func(tx *state.Txn) { tx.Put(e) }
			model[id] = e
		case model[id].Dependents["run"] != (state.Dependent{}): // release
			e := model[id].Clone()
			if delete(e.Dependents, "run"); len(e.Dependents) == 0 {
				e.Dependents = nil // as the file has it
			}
			ids, change = []string{id}, func(tx *state.Txn) { tx.Put(e) }
			model[id] = e
		default: // get of two at once
			k2 := keys[rng.IntN(240)]
			ids = []string{id}
			e := model[id].Clone()
			addDep(e, "run")
			puts := []*state.Entry{e}
			model[id] = e
			if k2.ID() != id && model[k2.ID()] != nil {
				e2 := model[k2.ID()].Clone()
				e2.SizeBytes++
				puts = append(puts, e2)
				model[k2.ID()] = e2
				ids = append(ids, k2.ID())
			}
			change = func(tx *state.Txn) {
				for _, e := range puts {
					tx.Put(e)
				}
			}
		}
		if err := s.UpdateEntries(ctx, ids, func(tx *state.Txn) (bool, error) {
			change(tx)
			return true, nil
		}); err != nil {
			t.Fatalf("op %d: %v", op, err)
		}
		_, rec := shardRecordOf(t, dir, "3f")
		switch {
		case rec.File != base:
			merges++
			base = rec.File
		case rec.Delta != nil:
			deltas++
		default:
			kept++ // back to the base alone
		}
		if op%25 == 0 || op == 399 {
			for n, r := range stores {
				st, err := r.View(ctx)
				if err != nil {
					t.Fatal(err)
				}
				sameEntries(t, fmt.Sprintf("op %d, store %d", op, n), st, model)
			}
			st, err := openStore(t, dir).View(ctx)
			if err != nil {
				t.Fatal(err)
			}
			sameEntries(t, fmt.Sprintf("op %d, a fresh store", op), st, model)
			st, err = state.DecodeFile(dir, state.StateFile)
			if err != nil {
				t.Fatal(err)
			}
			sameEntries(t, fmt.Sprintf("op %d, DecodeFile", op), st, model)
			unnamed, err := state.UnnamedShards(dir)
			if err != nil || len(unnamed) > 0 {
				t.Fatalf("op %d: unnamed shard files %v (%v)", op, unnamed, err)
			}
		}
	}
	t.Logf("%d writes kept a delta, %d merged, %d went back to the base alone", deltas, merges, kept)
	if deltas < 100 || merges < 3 {
		t.Errorf("%d writes kept a delta, %d merged, %d went back to the base alone: want deltas and merges both", deltas, merges, kept)
	}
	// A whole write (a sweep) that changes the shard writes it whole.
	if err := stores[1].Update(ctx, func(st *state.State) (bool, error) {
		e := st.Entries[keys[0].ID()]
		if e == nil {
			e = entry(keys[0], 1)
		}
		e = e.Clone()
		e.SizeBytes = 12345
		st.Put(e)
		model[e.Key.ID()] = e
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, rec := shardRecordOf(t, dir, "3f"); rec.Delta != nil || rec.File == base {
		t.Errorf("a whole write left shard 3f as %+v", rec)
	}
	st, err := openStore(t, dir).View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameEntries(t, "after a whole write", st, model)
	for _, c := range openStore(t, dir).Checks(ctx) {
		if c.Status == "fail" {
			t.Errorf("doctor: %s: %s", c.Name, c.Detail)
		}
	}
}

// A delta's file that is missing or does not match is an error naming it,
// and nothing is deleted: the base stays, and doctor names the delta.
func TestDeltaMissingOrBad(t *testing.T) {
	ctx := context.Background()
	for _, fault := range []string{"missing", "changed"} {
		t.Run(fault, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			keys := keysOfShard("3f", 240)
			if err := s.Update(ctx, func(st *state.State) (bool, error) {
				for _, k := range keys {
					st.Put(&state.Entry{Key: k, Stage: state.Ready, Path: "entries/" + k.ID() + "-g1/content", SizeBytes: 4096, Generation: 1})
				}
				return true, nil
			}); err != nil {
				t.Fatal(err)
			}
			if err := s.UpdateEntries(ctx, []string{keys[3].ID()}, func(tx *state.Txn) (bool, error) {
				e := tx.Get(keys[3]).Clone()
				e.SizeBytes = 7
				tx.Put(e)
				return true, nil
			}); err != nil {
				t.Fatal(err)
			}
			_, rec := shardRecordOf(t, dir, "3f")
			if rec.Delta == nil || rec.Delta.Entries != 1 {
				t.Fatalf("setup: shard 3f is %+v, want a delta of one entry", rec)
			}
			dpath := filepath.Join(dir, state.ShardDir, rec.Delta.File)
			switch fault {
			case "missing":
				if err := os.Remove(dpath); err != nil {
					t.Fatal(err)
				}
			default:
				b := readBytes(t, dpath)
				if err := os.WriteFile(dpath, bytes.Replace(b, []byte(`"size_bytes":7`), []byte(`"size_bytes":8`), 1), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			before := shardFiles(t, dir)
			_, err := openStore(t, dir).View(ctx)
			if !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), rec.Delta.File) {
				t.Fatalf("View with a %s delta: %v, want ErrCorrupt naming %s", fault, err, rec.Delta.File)
			}
			if after := shardFiles(t, dir); !slices.Equal(before, after) {
				t.Errorf("the read changed state.d: %v, then %v", before, after)
			}
			failed := false
			for _, c := range openStore(t, dir).Checks(ctx) {
				if c.Name == "state shards" && c.Status == "fail" && strings.Contains(c.Detail, rec.Delta.File) {
					failed = true
				}
			}
			if !failed {
				t.Errorf("doctor does not name the %s delta %s", fault, rec.Delta.File)
			}
		})
	}
}

// A format 3 root is read as it is and becomes format 4 at its first
// write, with the format 3 manifest kept as .prev; a format 3 manifest
// with a delta is corrupt.
func TestUpgradeFromFormat3(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(ctx, putN(300)); err != nil {
		t.Fatal(err)
	}
	// A root that format 3 wrote: packs of a few shards (a write that names
	// entries of several shards), shards under 32 KiB, so no deltas.
	for round := range 3 {
		var ids []string
		for i := range 4 {
			ids = append(ids, bundleKey(round*4+i).ID())
		}
		err := s.UpdateEntries(ctx, ids, func(tx *state.Txn) (bool, error) {
			for i := range 4 {
				e := tx.Get(bundleKey(round*4 + i)).Clone()
				e.SizeBytes += 1000
				tx.Put(e)
			}
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	sf := s.Path()
	v4 := readBytes(t, sf)
	v3 := bytes.Replace(v4, []byte(`{"version":4,`), []byte(`{"version":3,`), 1)
	if bytes.Equal(v3, v4) || !bytes.Contains(v3, []byte(`"file":"pk-`)) || bytes.Contains(v3, []byte(`"delta"`)) {
		t.Fatalf("setup: want a version 4 manifest naming packs, without deltas:\n%.300s", v4)
	}
	want := map[string]int64{}
	if st, err := s.View(ctx); err == nil {
		for id, e := range st.Entries {
			want[id] = e.SizeBytes
		}
	}
	if err := os.WriteFile(sf, v3, 0o644); err != nil {
		t.Fatal(err)
	}
	fresh := openStore(t, dir)
	if st, err := fresh.View(ctx); err != nil || len(st.Entries) != 300 {
		t.Fatalf("View of a format 3 root: %v", err)
	}
	for _, c := range fresh.Checks(ctx) {
		if c.Name == "state format" && !strings.Contains(c.Detail, "version 3") {
			t.Errorf("doctor on a format 3 root: %s", c.Detail)
		}
	}
	bump(t, fresh, 5)
	if v, _ := manifestRefs(t, sf); v != state.FormatVersion {
		t.Fatalf("after the first write: version %d", v)
	}
	if got := readBytes(t, sf+state.PrevSuffix); !bytes.Equal(got, v3) {
		t.Error("state.json.prev is not the format 3 manifest")
	}
	want[bundleKey(5).ID()]++ // bump's
	st, err := openStore(t, dir).View(ctx)
	if err != nil || len(st.Entries) != len(want) {
		t.Fatalf("after the upgrade: %d entries, %v; want %d", len(st.Entries), err, len(want))
	}
	for id, size := range want {
		if e := st.Entries[id]; e == nil || e.SizeBytes != size {
			t.Fatalf("after the upgrade, entry %s: %+v, want size %d", id, e, size)
		}
	}
	// Version 3 with a delta: no depcache of format 3 wrote it.
	withDelta := bytes.Replace(v3, []byte(`,"sha256":`), []byte(`,"delta":{"file":"00-0000000000000009-00000000.json","bytes":9,"entries":1,"sha256":"0123456789abcdef"},"sha256":`), 1)
	if err := os.WriteFile(sf, withDelta, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = openStore(t, dir).View(ctx)
	if !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), "deltas are format 4") {
		t.Errorf("a format 3 manifest with a delta: %v", err)
	}
}

// A write that puts back what the base holds drops the delta, even when
// the delta's pack stays, named by another shard's delta.
func TestDeltaDroppedWhenBackToBase(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	a, b := keysOfShard("3f", 240), keysOfShard("a1", 240)
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		for _, k := range append(slices.Clone(a), b...) {
			st.Put(&state.Entry{Key: k, Stage: state.Ready, Path: "entries/" + k.ID() + "-g1/content", SizeBytes: 4096, Generation: 1})
		}
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	setSize := func(size int64, keys ...state.Key) {
		t.Helper()
		var ids []string
		for _, k := range keys {
			ids = append(ids, k.ID())
		}
		if err := s.UpdateEntries(ctx, ids, func(tx *state.Txn) (bool, error) {
			for _, k := range keys {
				e := tx.Get(k).Clone()
				e.SizeBytes = size
				tx.Put(e)
			}
			return true, nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	setSize(7, a[0], b[0])
	_, ra := shardRecordOf(t, dir, "3f")
	_, rb := shardRecordOf(t, dir, "a1")
	if ra.Delta == nil || rb.Delta == nil || ra.Delta.File != rb.Delta.File || !strings.HasPrefix(ra.Delta.File, "pk-") {
		t.Fatalf("setup: want both deltas in one pack: %+v, %+v", ra.Delta, rb.Delta)
	}
	setSize(4096, a[0])
	if _, ra := shardRecordOf(t, dir, "3f"); ra.Delta != nil {
		t.Fatalf("shard 3f back to its base keeps the delta %+v", ra.Delta)
	}
	st, err := openStore(t, dir).View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Get(a[0]).SizeBytes; got != 4096 {
		t.Errorf("entry back to its base: size %d", got)
	}
	if got := st.Get(b[0]).SizeBytes; got != 7 {
		t.Errorf("the other shard's delta: size %d", got)
	}
}

// A read of named entries in a large base that the store read before, but
// whose lines it did not decode, reads those lines alone from the base's
// file, each checked against the hash taken when the whole file was
// checked; a line whose bytes are not those (damage) sends the read to the
// whole file, which refuses it as corrupt and deletes nothing.
func TestNamedReadOfSeenBase(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	keys := keysOfShard("3f", 200)
	want := map[string]*state.Entry{}
	writer := openStore(t, dir)
	if err := writer.Update(ctx, func(st *state.State) (bool, error) {
		for i, k := range keys {
			e := &state.Entry{Key: k, Stage: state.Ready, Path: "entries/" + k.ID() + "-g1/content", SizeBytes: int64(4096 + i), Generation: 1}
			st.Put(e)
			want[k.ID()] = e
		}
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	_, rec := shardRecordOf(t, dir, "3f")
	if rec.Bytes < state.DeltaMinBase {
		t.Fatalf("setup: shard 3f of %d bytes, want %d or more", rec.Bytes, state.DeltaMinBase)
	}
	basePath := filepath.Join(dir, state.ShardDir, rec.File)
	named := func(s *state.Store, k state.Key) (*state.Entry, error) {
		var got *state.Entry
		err := s.UpdateEntries(ctx, []string{k.ID()}, func(tx *state.Txn) (bool, error) {
			got = tx.Get(k)
			return false, nil
		})
		return got, err
	}
	reader := openStore(t, dir)
	if got, err := named(reader, keys[0]); err != nil || !got.Equal(want[keys[0].ID()]) {
		t.Fatalf("first named read: %+v, %v", got, err)
	}

	// Damage a line the reader has not decoded (same length, so the
	// others stay where they were): a read of another line does not
	// read it, and gets its entry.
	orig := readBytes(t, basePath)
	damage := func(k state.Key) []byte {
		t.Helper()
		b := bytes.Clone(orig)
		i := bytes.Index(b, []byte(`"`+k.ID()+`":`))
		j := bytes.Index(b[i:], []byte(`"size_bytes":`))
		if i < 0 || j < 0 {
			t.Fatalf("setup: no line of %s with a size in %s", k.ID(), basePath)
		}
		b[i+j+len(`"size_bytes":`)] = '9' // 4xxx → 9xxx
		return b
	}
	if err := os.WriteFile(basePath, damage(keys[1]), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys[2:6] {
		if got, err := named(reader, k); err != nil || !got.Equal(want[k.ID()]) {
			t.Fatalf("named read of %s in the base seen before: %+v, %v; want %+v", k.ID(), got, err, want[k.ID()])
		}
	}
	// The damaged line itself: refused, named, and nothing deleted.
	_, err := named(reader, keys[1])
	if !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), rec.File) {
		t.Fatalf("named read of the damaged line: %v, want ErrCorrupt naming %s", err, rec.File)
	}
	if got := readBytes(t, basePath); !bytes.Equal(got, damage(keys[1])) {
		t.Error("the damaged base was changed or deleted")
	}
	// A whole read checks every line, undecoded or not.
	if _, err := openStore(t, dir).View(ctx); !errors.Is(err, state.ErrCorrupt) {
		t.Errorf("View of a root whose base has a damaged line: %v, want ErrCorrupt", err)
	}
	if err := os.WriteFile(basePath, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	st, err := openStore(t, dir).View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameEntries(t, "after the repair", st, want)
}
