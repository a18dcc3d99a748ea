package manager_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestRebuildReportsWhatItDrops: a rebuild of a state file cut short,
// garbage, empty or missing takes what it drops from state.json.prev, which
// it leaves in place: the dependents (named and bound to a process) by
// entry, the download in flight, and the policy, which it carries over.
func TestRebuildReportsWhatItDrops(t *testing.T) {
	ctx := context.Background()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	never := mustKey(t, "http://127.0.0.1:1/never", "")
	for _, tc := range []struct {
		name    string
		corrupt func(good []byte) []byte // nil: removed
	}{
		{"truncated", func(g []byte) []byte { return g[:len(g)-10] }},
		{"garbage", func([]byte) []byte { return []byte("garbage") }},
		{"empty", func([]byte) []byte { return []byte("\n") }},
		{"missing", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			budget, minAge := int64(3<<30), 9*time.Minute
			m, err := manager.New(manager.Config{Root: root, Log: quietLog(), SetPolicy: true,
				Cleanup: manager.PolicyChange{MaxSizeBytes: &budget, MinAge: &minAge}})
			if err != nil {
				t.Fatal(err)
			}
			stop, err := m.Start(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := getWait(t, m, "bound-run", k); err != nil { // bound to this process
				t.Fatal(err)
			}
			if _, err := m.Get(ctx, "named-job", k, manager.Detached()); err != nil {
				t.Fatal(err)
			}
			if _, err := m.Sweep(ctx, false); err != nil { // stores the policy
				t.Fatal(err)
			}
			// Stopped, so that no pass of it writes while the file is
			// damaged; its dependents stay in the state.
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			sf := filepath.Join(root, state.StateFile)
			// The download in flight, registered from another manager
			// that does not drive it.
			other, err := manager.New(manager.Config{Root: root, Log: quietLog()})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := other.Get(ctx, "waiter", never, manager.Detached()); err != nil {
				t.Fatal(err)
			}
			good, err := os.ReadFile(sf)
			if err != nil {
				t.Fatal(err)
			}
			if st, err := state.DecodeFile(root, state.StateFile); err != nil || st.Policy == nil || st.Policy.MaxSizeBytes != budget {
				t.Fatalf("setup: %v, %+v", err, st)
			}
			os.WriteFile(sf+state.PrevSuffix, good, 0o644)
			if tc.corrupt == nil {
				os.Remove(sf)
			} else {
				os.WriteFile(sf, tc.corrupt(good), 0o644)
			}

			doc, err := manager.New(manager.Config{Root: root, Log: quietLog()})
			if err != nil {
				t.Fatal(err)
			}
			rep, err := doc.Rebuild(ctx, false)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Entries != 1 || rep.LastState != sf+state.PrevSuffix || rep.LastStateCopy == "" || len(rep.Failed) != 0 {
				t.Errorf("report %+v", rep)
			}
			if tc.corrupt != nil && (rep.Unreadable == "" || rep.UnreadableReason == "") {
				t.Errorf("the unreadable file: %q, %q", rep.Unreadable, rep.UnreadableReason)
			}
			deps := map[string]string{}
			for _, d := range rep.DroppedDependents {
				for _, dep := range d.Dependents {
					deps[d.Key.Source+" "+dep.Name] = dep.Process
				}
			}
			if p, ok := deps[k.Source+" bound-run"]; !ok || p == "" {
				t.Errorf("bound-run not reported with its process: %v", deps)
			}
			if p, ok := deps[k.Source+" named-job"]; !ok || p != "" {
				t.Errorf("named-job not reported as a named dependent: %v", deps)
			}
			if _, ok := deps[never.Source+" waiter"]; !ok || len(deps) != 3 {
				t.Errorf("dropped dependents %v, want bound-run, named-job and waiter", deps)
			}
			if len(rep.DroppedDownloads) != 1 || rep.DroppedDownloads[0].Key.Source != never.Source {
				t.Errorf("dropped downloads %+v", rep.DroppedDownloads)
			}
			if !rep.Policy.Carried || rep.Policy.Rebuilt.MaxSizeBytes != budget || time.Duration(rep.Policy.Rebuilt.MinAge) != minAge {
				t.Errorf("policy %+v, want the stored one carried over", rep.Policy)
			}
			if prev, _ := os.ReadFile(sf + state.PrevSuffix); string(prev) != string(good) {
				t.Error("state.json.prev was replaced")
			}
			if kept, err := state.DecodeFile(root, filepath.Base(rep.LastStateCopy)); err != nil || len(kept.Entries) != 2 || kept.Policy == nil || kept.Policy.MaxSizeBytes != budget {
				t.Errorf("the copy of the last good state: %+v, %v", kept, err)
			}
			b, _ := json.Marshal(rep)
			for _, field := range []string{`"failed":[]`, `"dropped_entries":[]`, `"dropped_dependents":[{`, `"carried":true`} {
				if !strings.Contains(string(b), field) {
					t.Errorf("JSON lacks %s: %s", field, b)
				}
			}
		})
	}
}

// TestRebuildKeepsVerifyFailed: verify records its verdict next to the
// content, so that a rebuild, even one that has no earlier state, keeps the
// entry FAILED with the reason, and Wait reports it FAILED instead of
// serving the content.
func TestRebuildKeepsVerifyFailed(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m := newManager(t, root)
	k, ready, content := getHello(t, m)
	if err := os.Remove(filepath.Join(content, "hello", "data", "numbers.txt")); err != nil {
		t.Fatal(err)
	}
	res, err := m.Verify(ctx, nil)
	if err != nil || len(res) != 1 || !res[0].Failed {
		t.Fatalf("verify: %+v, %v; want one failure", res, err)
	}
	b, err := os.ReadFile(filepath.Join(filepath.Dir(content), "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	var meta manager.Meta
	if err := json.Unmarshal(b, &meta); err != nil || !meta.Failed || meta.FailedReason == "" || meta.FailedAt.IsZero() || meta.ContentSHA256 == "" {
		t.Fatalf("meta.json after verify (%v):\n%s", err, b)
	}

	// No earlier state at all: the mark next to the content is all there is.
	for _, f := range []string{state.StateFile, state.StateFile + state.PrevSuffix} {
		os.Remove(filepath.Join(root, f))
	}
	doc, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := doc.Rebuild(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Failed) != 1 || rep.Failed[0].Key != k || rep.Failed[0].Reason != "verify: "+meta.FailedReason || rep.LastState != "" {
		t.Errorf("report %+v", rep)
	}
	e := viewEntry(t, root, k)
	if e == nil || e.Stage != state.Failed || e.Message != "verify: "+meta.FailedReason || e.Path != ready.Path {
		t.Fatalf("rebuilt entry %+v, want FAILED with verify's reason, naming its content", e)
	}
	var failed *manager.FailedError
	if _, err := getWait(t, newManager(t, root), "another", k); !errors.As(err, &failed) {
		t.Errorf("get after the rebuild: %v, want FAILED", err)
	}
}

// A verify mark left without its commit (a crash between the two) is true,
// and a rebuild honours it; an older depcache's FAILED in the last state
// for the same generation is honoured even without a mark.
func TestRebuildHonoursEitherRecordOfAFailure(t *testing.T) {
	ctx := context.Background()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	for _, which := range []string{"mark only", "state only"} {
		t.Run(which, func(t *testing.T) {
			root := t.TempDir()
			m := newManager(t, root)
			ready, err := getWait(t, m, "run", k)
			if err != nil {
				t.Fatal(err)
			}
			metaPath := filepath.Join(root, filepath.Dir(ready.Path), "meta.json")
			sf := filepath.Join(root, state.StateFile)
			good, _ := os.ReadFile(sf)
			switch which {
			case "mark only": // the state still says READY
				b, _ := os.ReadFile(metaPath)
				var fields map[string]any
				json.Unmarshal(b, &fields)
				fields["failed"], fields["failed_reason"] = true, "content digest x, recorded y"
				b, _ = json.Marshal(fields)
				os.WriteFile(metaPath, b, 0o644)
				os.WriteFile(sf+state.PrevSuffix, good, 0o644)
			case "state only": // FAILED in the last state, no mark
				st, err := state.DecodeFile(root, state.StateFile)
				if err != nil {
					t.Fatal(err)
				}
				e := st.Get(k).Clone()
				e.Stage, e.Message, e.FailedAt, e.Failures = state.Failed, "verify: by an older depcache", time.Now(), 1
				st.Put(e)
				b, err := state.Encode(st) // a self-contained previous version
				if err != nil {
					t.Fatal(err)
				}
				os.WriteFile(sf+state.PrevSuffix, b, 0o644)
			}
			os.WriteFile(sf, []byte("{"), 0o644)
			doc, err := manager.New(manager.Config{Root: root, Log: quietLog()})
			if err != nil {
				t.Fatal(err)
			}
			rep, err := doc.Rebuild(ctx, false)
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Failed) != 1 || !strings.HasPrefix(rep.Failed[0].Reason, "verify: ") {
				t.Errorf("report %+v, want the entry rebuilt FAILED", rep)
			}
			if e := viewEntry(t, root, k); e == nil || e.Stage != state.Failed {
				t.Errorf("rebuilt %+v, want FAILED", e)
			}
		})
	}
}

// TestRebuildKeepsLRUOrder: a rebuild keeps each entry's last use and age
// from the last state that parses, so that the eviction order survives it
// (from the metadata alone every entry would be as old as its publish).
func TestRebuildKeepsLRUOrder(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m := newManager(t, root)
	a, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	b, _ := filepath.Abs("../testdata/hostile/README.md")
	ka, kb := mustKey(t, "file://"+a, ""), mustKey(t, "file://"+b, "")
	for _, k := range []state.Key{ka, kb} {
		if _, err := getWait(t, m, "run", k); err != nil {
			t.Fatal(err)
		}
		if err := m.Release(ctx, "run", k); err != nil {
			t.Fatal(err)
		}
	}
	// b was published last, but a was used last, and is the older.
	usedA, createdA := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC), time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	usedB := time.Date(2026, 11, 2, 0, 0, 0, 0, time.UTC)
	s, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		ea, eb := st.Get(ka).Clone(), st.Get(kb).Clone()
		ea.LastUsed, ea.Created = usedA, createdA
		eb.LastUsed = usedB
		st.Put(ea)
		st.Put(eb)
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := newManager(t, root).Rebuild(ctx, true); err != nil {
		t.Fatal(err)
	}
	st, err := s.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ea, eb := st.Get(ka), st.Get(kb)
	if ea == nil || eb == nil {
		t.Fatalf("rebuilt entries: %v %v", ea, eb)
	}
	if !ea.LastUsed.Equal(usedA) || !ea.Created.Equal(createdA) || !eb.LastUsed.Equal(usedB) {
		t.Errorf("after the rebuild: a used %s created %s, b used %s; want %s, %s, %s",
			ea.LastUsed, ea.Created, eb.LastUsed, usedA, createdA, usedB)
	}
}

// TestVerifyNamesUnreadableMetadata: an entry whose meta.json does not
// parse is reported unchecked, naming the file, and is neither marked
// FAILED nor touched.
func TestVerifyNamesUnreadableMetadata(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m := newManager(t, root)
	k, _, content := getHello(t, m)
	metaPath := filepath.Join(filepath.Dir(content), "meta.json")
	if err := os.WriteFile(metaPath, []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := m.Verify(ctx, nil)
	if err != nil || len(res) != 1 {
		t.Fatalf("verify: %+v, %v; want one result", res, err)
	}
	if r := res[0]; r.OK || r.Failed || !strings.Contains(r.Detail, metaPath) || !strings.Contains(r.Detail, "does not parse") {
		t.Errorf("verify of unreadable metadata: %+v, want not checked, naming %s", r, metaPath)
	}
	if e := viewEntry(t, root, k); e == nil || e.Stage != state.Ready {
		t.Errorf("entry after verify: %+v, want it READY still", e)
	}
	if _, err := os.Stat(filepath.Join(content, "hello")); err != nil {
		t.Errorf("content after verify: %v", err)
	}
}

// TestRebuildAfterADamagedShard: damage to a shard that state.json and
// state.json.prev both name leaves no state that parses whole. The
// rebuild still carries over what every other shard says (each entry's
// last use) and reports, from them, the dependents it drops; the damaged
// shard is named as unread, its contents unknown.
func TestRebuildAfterADamagedShard(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m, stop := startManager(t, root)
	// Two sources in different shards (a key ID's first byte): their
	// IDs hash the checkout's absolute paths.
	var ka, kb state.Key
	files := []string{"../testdata/bundles/hello.tar.gz", "../testdata/hostile/README.md", "../testdata/hostile/gen.py", "../testdata/hostile/gen_zip.py"}
	for _, f := range files {
		abs, _ := filepath.Abs(f)
		k := mustKey(t, "file://"+abs, "")
		switch {
		case ka.Source == "":
			ka = k
		case kb.Source == "" && k.ID()[:2] != ka.ID()[:2]:
			kb = k
		}
	}
	if kb.Source == "" {
		t.Fatalf("no two of %d files in different shards", len(files))
	}
	for _, k := range []state.Key{ka, kb} {
		if _, err := getWait(t, m, "job-"+k.ID()[:6], k); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Get(ctx, "named", k, manager.Detached()); err != nil {
			t.Fatal(err)
		}
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	s, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	shardsBefore := manifestShards(t, root, state.StateFile)
	if len(shardsBefore) != 2 {
		t.Fatalf("the two entries share a shard (%v): pick other files", shardsBefore)
	}
	// The last commit writes b's shard only: a's is then named by both
	// state.json and state.json.prev.
	usedB := time.Date(2026, 11, 2, 0, 0, 0, 0, time.UTC)
	if err := s.UpdateEntries(ctx, []string{kb.ID()}, func(tx *state.Txn) (bool, error) {
		e := tx.Get(kb).Clone()
		e.LastUsed = usedB
		tx.Put(e)
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	cur, prev := manifestShards(t, root, state.StateFile), manifestShards(t, root, state.StateFile+state.PrevSuffix)
	var shared string
	for p, f := range cur {
		if prev[p] == f {
			shared = p
		}
	}
	if shared == "" {
		t.Fatalf("no shard named by both manifests: %v, %v", cur, prev)
	}
	damaged := filepath.Join(root, state.ShardDir, cur[shared])
	if err := os.WriteFile(damaged, []byte("{not a shard"), 0o644); err != nil {
		t.Fatal(err)
	}

	rm, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := rm.Rebuild(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Entries != 2 {
		t.Errorf("rebuilt %d entries, want both", rep.Entries)
	}
	if rep.LastState != filepath.Join(root, state.StateFile) || len(rep.UnreadShards) != 1 || rep.UnreadShards[0].Shard != shared || rep.UnreadShards[0].From != "" {
		t.Fatalf("last state %q, unread %+v; want state.json with shard %s unread", rep.LastState, rep.UnreadShards, shared)
	}
	// b's shard read: its dependents are reported, its last use kept.
	if len(rep.DroppedDependents) != 1 || rep.DroppedDependents[0].Key != kb || len(rep.DroppedDependents[0].Dependents) != 2 {
		t.Errorf("dropped dependents %+v, want b's two", rep.DroppedDependents)
	}
	st, err := s.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if e := st.Get(kb); e == nil || !e.LastUsed.Equal(usedB) {
		t.Errorf("b rebuilt as %+v, want its last use %s kept", e, usedB)
	}
	if st.Get(ka) == nil {
		t.Error("a was not rebuilt from its metadata")
	}
}

// manifestShards maps each shard of a format 2 state file to its file.
func manifestShards(t *testing.T, root, name string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, name))
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Shards map[string]struct {
			File string `json:"file"`
		} `json:"shards"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for p, r := range m.Shards {
		out[p] = r.File
	}
	return out
}
