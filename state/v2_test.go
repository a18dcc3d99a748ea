package state_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// shardFiles lists root's state.d.
func shardFiles(t *testing.T, root string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(root, state.ShardDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func putN(n int) func(*state.State) (bool, error) {
	return func(st *state.State) (bool, error) {
		for i := range n {
			st.Put(&state.Entry{Key: bundleKey(i), Stage: state.Ready, Path: "entries/x/content", SizeBytes: int64(i)})
		}
		return true, nil
	}
}

// bump changes entry i alone, through UpdateEntries.
func bump(t *testing.T, s *state.Store, i int) {
	t.Helper()
	err := s.UpdateEntries(context.Background(), []string{bundleKey(i).ID()}, func(tx *state.Txn) (bool, error) {
		e := tx.Get(bundleKey(i)).Clone()
		e.SizeBytes++
		tx.Put(e)
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A v1 root is read as it is, and converted under the lock at the first
// write, which keeps the v1 file as state.json.prev and loses nothing.
func TestUpgradeFromFormat1(t *testing.T) {
	dir := t.TempDir()
	v1 := state.New()
	if _, err := putN(300)(v1); err != nil {
		t.Fatal(err)
	}
	p := state.DefaultPolicy()
	p.MaxSizeBytes = 7 << 20
	v1.Policy, v1.MaxGeneration = &p, 99
	b, err := state.Encode(v1)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte(`{"version":1,`)) {
		t.Fatalf("Encode did not write format 1: %.40s", b)
	}
	sf := filepath.Join(dir, state.StateFile)
	if err := os.WriteFile(sf, b, 0o644); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, dir)
	st, err := s.View(context.Background())
	if err != nil || len(st.Entries) != 300 {
		t.Fatalf("View of a v1 root: %v entries, %v", len(st.Entries), err)
	}
	if got := readBytes(t, sf); !bytes.Equal(got, b) {
		t.Fatal("a read rewrote the v1 file")
	}
	bump(t, s, 7)
	if got := readBytes(t, sf+state.PrevSuffix); !bytes.Equal(got, b) {
		t.Error("state.json.prev is not the v1 file")
	}
	if got := readBytes(t, sf); !bytes.HasPrefix(got, []byte(fmt.Sprintf(`{"version":%d,`, state.FormatVersion))) {
		t.Errorf("not converted: %.60s", got)
	}
	for _, r := range []*state.Store{s, openStore(t, dir)} { // its cache, and a fresh one
		st, err := r.View(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Entries) != 300 || st.Policy == nil || st.Policy.MaxSizeBytes != 7<<20 || st.MaxGeneration != 99 {
			t.Fatalf("after the upgrade: %d entries, policy %+v, max generation %d", len(st.Entries), st.Policy, st.MaxGeneration)
		}
		if e := st.Get(bundleKey(7)); e == nil || e.SizeBytes != 8 {
			t.Fatalf("the converting update is lost: %+v", e)
		}
	}
	// 300 random IDs fill about 176 of the 256 shards; the converting
	// update wrote one of them again.
	if n := len(shardFiles(t, dir)); n < 150 || n > 257 {
		t.Errorf("%d shard files for 300 entries", n)
	}
}

// A state of a later format is refused by name: both versions and what to
// do. A v1 depcache meets a v2 root the same way (the manifest's unknown
// fields and version 2), and it writes nothing either.
func TestNewerFormatRefused(t *testing.T) {
	dir := t.TempDir()
	sf := filepath.Join(dir, state.StateFile)
	newer := []byte(`{"version":5,"serial":1,"shards":{},"segments":[]}` + "\n")
	if err := os.WriteFile(sf, newer, 0o644); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, dir)
	_, err := s.View(context.Background())
	if !errors.Is(err, state.ErrUnsupportedVersion) {
		t.Fatalf("View: %v, want ErrUnsupportedVersion", err)
	}
	for _, want := range []string{"version 5", "versions 1 to 4", "upgrade depcache", sf} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
	err = s.Update(context.Background(), putN(1))
	if !errors.Is(err, state.ErrUnsupportedVersion) {
		t.Fatalf("Update: %v", err)
	}
	if got := readBytes(t, sf); !bytes.Equal(got, newer) {
		t.Error("a newer state was rewritten")
	}
	// A manifest is not a self-contained document: Decode, the reader of
	// format 1 documents, refuses it and names its version.
	if err := os.Remove(sf); err != nil {
		t.Fatal(err)
	}
	if err := s.Update(context.Background(), putN(2)); err != nil {
		t.Fatal(err)
	}
	if _, err := state.Decode(readBytes(t, sf)); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("version %d", state.FormatVersion)) {
		t.Errorf("Decode of a manifest: %v", err)
	}
}

// An operation writes only the shard it changed, and the manifest; the
// next commit deletes what the one before retired, so that state.d holds
// what state.json and state.json.prev name, no more.
func TestWritesOnlyTheChangedShard(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(context.Background(), putN(1000)); err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		before := shardFiles(t, dir)
		bump(t, s, round)
		after := shardFiles(t, dir)
		var added []string
		for _, f := range after {
			if !slices.Contains(before, f) {
				added = append(added, f)
			}
		}
		if len(added) != 1 || !strings.HasPrefix(added[0], bundleKey(round).ID()[:2]+"-") {
			t.Fatalf("round %d: new shard files %v, want one of shard %s", round, added, bundleKey(round).ID()[:2])
		}
		unnamed, err := state.UnnamedShards(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(unnamed) != 0 {
			t.Fatalf("round %d: files no manifest names: %v", round, unnamed)
		}
	}
}

// TestUpdateEntriesDecodesOnlyNamed: a write of named entries decodes
// only their lines and carries the other lines of their shard over as
// bytes, including lines another store changed since; a later whole read
// decodes them, and every entry comes back as written.
func TestUpdateEntriesDecodesOnlyNamed(t *testing.T) {
	dir := t.TempDir()
	const n = 20000 // about 80 entries a shard
	a := openStore(t, dir)
	if err := a.Update(context.Background(), putN(n)); err != nil {
		t.Fatal(err)
	}
	b := openStore(t, dir)
	bump(t, b, 0)
	if got := state.UndecodedLines(b); got < 20 {
		t.Fatalf("after one write of a named entry, %d lines undecoded: want the rest of its shard", got)
	}
	j := 1
	for bundleKey(j).ID()[:2] != bundleKey(0).ID()[:2] {
		j++
	}
	bump(t, a, j) // another store changes a line that b holds undecoded
	bump(t, b, 0)
	want := map[string]int64{bundleKey(0).ID(): 2, bundleKey(j).ID(): int64(j) + 1}
	check := func(who string, st *state.State) {
		t.Helper()
		if len(st.Entries) != n {
			t.Fatalf("%s: %d entries, want %d", who, len(st.Entries), n)
		}
		for i := range n {
			id := bundleKey(i).ID()
			size, changed := want[id]
			if !changed {
				size = int64(i)
			}
			if e := st.Entries[id]; e == nil || e.SizeBytes != size || e.Key != bundleKey(i) {
				t.Fatalf("%s: entry %d is %+v, want size %d", who, i, e, size)
			}
		}
	}
	c := openStore(t, dir)
	st, err := c.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	check("a fresh store's view", st)
	if st, err = b.View(context.Background()); err != nil {
		t.Fatal(err)
	}
	check("the view of the store that wrote undecoded lines", st)
	if got := state.UndecodedLines(b); got != 0 {
		t.Errorf("after a whole read, %d lines undecoded", got)
	}
}

// Litter (a shard file no manifest names) is deleted by a holder once it
// stayed unnamed past the grace period; a named shard never is.
func TestShardLitterCollected(t *testing.T) {
	dir := t.TempDir()
	s, err := state.Open(dir, state.Options{Lock: state.LockOptions{Log: quietLog()}, ShardGrace: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(context.Background(), putN(50)); err != nil {
		t.Fatal(err)
	}
	litter := filepath.Join(dir, state.ShardDir, "ab-00000000000000ff-12345678.json")
	other := filepath.Join(dir, state.ShardDir, "notes.txt") // not a shard's name: never touched
	for _, f := range []string{litter, other} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	nothing := func(*state.State) (bool, error) { return false, nil }
	if err := s.Update(context.Background(), nothing); err != nil { // first sighting
		t.Fatal(err)
	}
	if _, err := os.Stat(litter); err != nil {
		t.Fatalf("litter deleted at its first sighting: %v", err)
	}
	if err := s.Update(context.Background(), nothing); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(litter); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("litter still there after the grace period: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("a file not named like a shard was touched: %v", err)
	}
	st, err := openStore(t, dir).View(context.Background())
	if err != nil || len(st.Entries) != 50 {
		t.Fatalf("after collecting litter: %d entries, %v", len(st.Entries), err)
	}
}

// A shard that is missing or damaged is an error naming it, under the
// lock and without; nothing is deleted, doctor's checks say which, and a
// Reset rebuilds a state that works.
func TestBadShard(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(path string) error
		want   string
	}{
		{"missing", os.Remove, "missing"},
		{"flipped", func(p string) error {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			b[len(b)/2] ^= 1
			return os.WriteFile(p, b, 0o644)
		}, "sha256"},
		{"cut", func(p string) error { return os.Truncate(p, 10) }, "bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			if err := s.Update(context.Background(), putN(20)); err != nil {
				t.Fatal(err)
			}
			before := len(shardFiles(t, dir))
			victim := filepath.Join(dir, state.ShardDir, shardFiles(t, dir)[0])
			if err := tc.damage(victim); err != nil {
				t.Fatal(err)
			}
			fresh := openStore(t, dir) // no cache of the shard
			_, verr := fresh.View(context.Background())
			uerr := fresh.Update(context.Background(), putN(1))
			for _, err := range []error{verr, uerr} {
				if !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), victim) || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("err = %v, want ErrCorrupt naming %s and %q", err, victim, tc.want)
				}
			}
			if n := len(shardFiles(t, dir)); n < before-1 || (tc.name != "missing" && n < before) {
				t.Errorf("%d shard files left: something was deleted", n)
			}
			var found bool
			for _, c := range fresh.Checks(context.Background()) {
				if c.Name == "state shards" {
					found = c.Status == "fail" && strings.Contains(c.Detail, victim)
				}
			}
			if !found {
				t.Errorf("doctor's checks do not name the bad shard: %+v", fresh.Checks(context.Background()))
			}
			if _, err := fresh.Reset(context.Background(), func(st, last *state.State) error {
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if err := fresh.Update(context.Background(), putN(3)); err != nil {
				t.Fatalf("after a Reset: %v", err)
			}
		})
	}
}

// Unlocked reads racing commits that retire and delete shards never fail
// and never see a torn state: a shard gone means the manifest moved on.
func TestViewRacesCommits(t *testing.T) {
	dir := t.TempDir()
	w := openStore(t, dir)
	if err := w.Update(context.Background(), putN(64)); err != nil {
		t.Fatal(err)
	}
	r := openStore(t, dir)
	var wg sync.WaitGroup
	done := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(done)
		for i := range 300 {
			bump(t, w, i%64)
		}
	}()
	views := 0
	for {
		select {
		case <-done:
			wg.Wait()
			if views == 0 {
				t.Fatal("no view ran beside the commits")
			}
			t.Logf("%d views beside 300 commits", views)
			return
		default:
		}
		st, err := r.View(context.Background())
		if err != nil {
			t.Fatalf("view %d: %v", views, err)
		}
		if len(st.Entries) != 64 {
			t.Fatalf("view %d: %d entries", views, len(st.Entries))
		}
		views++
	}
}

// A View whose every unlocked try finds a shard gone (commits replacing
// it faster than a slow reader reads, as on a busy sshfs root) reads once
// more under the lock, where no commit can, instead of reporting a state
// that only moved as corrupt. Here the shard is away during the unlocked
// tries and back when the locked read runs.
func TestViewFallsBackToLockedRead(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(context.Background(), putN(20)); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, state.ShardDir, shardFiles(t, dir)[0])
	if err := os.Rename(victim, victim+".away"); err != nil {
		t.Fatal(err)
	}
	fell := 0
	state.SetLockedViewHook(t, func() {
		fell++
		if err := os.Rename(victim+".away", victim); err != nil {
			t.Error(err)
		}
	})
	fresh := openStore(t, dir) // no cache of the shard
	st, err := fresh.View(context.Background())
	if err != nil {
		t.Fatalf("view: %v", err)
	}
	if fell != 1 || len(st.Entries) != 20 {
		t.Errorf("fell back to the locked read %d times, %d entries; want once and 20", fell, len(st.Entries))
	}
}

// TestOldLitterCollectedAtOnce: a holder that has never seen them deletes,
// at its first whole Update, the shard files and the manifest temporaries
// that no manifest names and that were written more than the grace period
// before the manifest (by the file server's clock): a short-lived process
// never watches one for the grace period. Younger ones stay.
func TestOldLitterCollectedAtOnce(t *testing.T) {
	dir := t.TempDir()
	if err := openStore(t, dir).Update(context.Background(), putN(20)); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, state.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	committed := fi.ModTime()
	// Every named shard as old as can be: still never deleted.
	named, err := filepath.Glob(filepath.Join(dir, state.ShardDir, "*"))
	if err != nil || len(named) == 0 {
		t.Fatalf("shard files: %v %v", named, err)
	}
	for _, f := range named {
		at := committed.Add(-24 * time.Hour)
		if err := os.Chtimes(f, at, at); err != nil {
			t.Fatal(err)
		}
	}
	plant := func(p string, age time.Duration) string {
		t.Helper()
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		at := committed.Add(-age)
		if err := os.Chtimes(p, at, at); err != nil {
			t.Fatal(err)
		}
		return p
	}
	oldShard := plant(filepath.Join(dir, state.ShardDir, "ab-00000000000000ff-12345678.json"), time.Hour)
	oldTemp := plant(filepath.Join(dir, "."+state.StateFile+"3992757080353307965"), time.Hour)
	youngShard := plant(filepath.Join(dir, state.ShardDir, "cd-00000000000000fe-12345678.json"), time.Minute)
	youngTemp := plant(filepath.Join(dir, "."+state.StateFile+"123"), time.Minute)
	oldKeptTemp := plant(filepath.Join(dir, "."+state.StateFile+state.KeptSuffix+"0123456789ab"+"42"), time.Hour)
	oldPrevLink := plant(filepath.Join(dir, "."+state.StateFile+state.PrevSuffix+"2840562345"), time.Hour) // keepPrev's, killed before its rename
	notOurs := plant(filepath.Join(dir, "."+state.StateFile+".swp"), time.Hour)                            // an editor's: never touched
	nothing := func(*state.State) (bool, error) { return false, nil }
	if err := openStore(t, dir).Update(context.Background(), nothing); err != nil {
		t.Fatal(err)
	}
	for p, gone := range map[string]bool{oldShard: true, oldTemp: true, oldKeptTemp: true, oldPrevLink: true, youngShard: false, youngTemp: false, notOurs: false} {
		_, err := os.Stat(p)
		if gotGone := errors.Is(err, os.ErrNotExist); gotGone != gone {
			t.Errorf("%s: gone %v, want %v", filepath.Base(p), gotGone, gone)
		}
	}
	if st, err := openStore(t, dir).View(context.Background()); err != nil || len(st.Entries) != 20 {
		t.Fatalf("after collecting litter: %v, %v", st, err)
	}
}

// A shard that cannot be read (a directory in its place here; permissions
// or an I/O error elsewhere) is not one a rebuild would fix: a rebuild
// reads it too. doctor names it, and does not send the operator to
// --rebuild.
func TestDoctorOnUnreadableShard(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(context.Background(), putN(20)); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, state.ShardDir, shardFiles(t, dir)[0])
	if err := os.Remove(victim); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	var got *state.Check
	for _, c := range openStore(t, dir).Checks(context.Background()) {
		if c.Name == "state shards" {
			got = &c
		}
	}
	if got == nil || got.Status != "fail" || !strings.Contains(got.Detail, victim) || !strings.Contains(got.Detail, "is a directory") || strings.Contains(got.Detail, "--rebuild") {
		t.Errorf("doctor's shard check on a shard that cannot be read: %+v; want a failure naming it and its error, without --rebuild", got)
	}
}

// Files in state.d that depcache never writes there (by name or by type)
// are left alone, and doctor lists them.
func TestDoctorListsForeignFilesInShardDir(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(context.Background(), putN(20)); err != nil {
		t.Fatal(err)
	}
	sd := filepath.Join(dir, state.ShardDir)
	if err := os.WriteFile(filepath.Join(sd, "notes.txt"), []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(sd, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(shardFiles(t, dir)[0], filepath.Join(sd, "00-0000000000000099-0000abcd.json")); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		bump(t, s, i)
	}
	var detail string
	for _, c := range openStore(t, dir).Checks(context.Background()) {
		if strings.Contains(c.Detail, "not depcache's") {
			detail = c.Detail
		}
	}
	for _, n := range []string{"notes.txt", "sub", "00-0000000000000099-0000abcd.json"} {
		if _, err := os.Lstat(filepath.Join(sd, n)); err != nil {
			t.Errorf("%s, not depcache's, after commits: %v", n, err)
		}
		if !strings.Contains(detail, n) {
			t.Errorf("doctor does not list %s as not depcache's: %q", n, detail)
		}
	}
}

// A generation past GenerationLimit, in the header or in an entry, is a
// damaged (or forged) state, refused naming it; and a commit that would
// count past the limit is refused, leaving the state as it was: counting
// on from 2^64-1 wrapped to 0 and reused an earlier incarnation's paths.
func TestGenerationsPastTheLimit(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(ctx, put(1, 1)); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	forged := regexp.MustCompile(`"max_generation":\d+`).ReplaceAll(b, []byte(`"max_generation":18446744073709551615`))
	if bytes.Equal(forged, b) {
		t.Fatalf("no max_generation in %s", b)
	}
	if err := os.WriteFile(s.Path(), forged, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := openStore(t, dir).View(ctx); !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), "max_generation 18446744073709551615") {
		t.Fatalf("View of a max_generation of 2^64-1: %v; want ErrCorrupt naming it", err)
	}

	at := regexp.MustCompile(`"max_generation":\d+`).ReplaceAll(b, []byte(fmt.Sprintf(`"max_generation":%d`, uint64(state.GenerationLimit))))
	if err := os.WriteFile(s.Path(), at, 0o644); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, dir)
	st, err := s2.View(ctx)
	if err != nil || st.MaxGeneration != state.GenerationLimit {
		t.Fatalf("View at the limit: %v, %v", st, err)
	}
	err = s2.Update(ctx, func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: bundleKey(2), Stage: state.Downloading, Generation: st.MaxGeneration + 1})
		return true, nil
	})
	if err == nil || !strings.Contains(err.Error(), "past") {
		t.Fatalf("a commit past the limit: %v; want it refused", err)
	}
	if now, _ := os.ReadFile(s.Path()); !bytes.Equal(now, at) {
		t.Fatal("the refused commit changed the state file")
	}
}
