package manager_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestRebuildFrom: a root that moves to a store with no state of its own
// (here the file store with its state files gone) is rebuilt from its
// content, with what the state it leaves (from) knew carried over: the
// policy, the entry's last use and age, the generation counter. The report
// names from as the last state and lists what the rebuild drops of it:
// dependents, the download in flight, an entry without content. A store
// that has a last state of its own rebuilds from that one, and from is not
// used.
func TestRebuildFrom(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	blob := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(blob, []byte("published content"), 0o644); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "file://"+blob, "")
	a, stop := startManager(t, root)
	ready, err := getWait(t, a, "run", k)
	if err != nil {
		t.Fatal(err)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{state.StateFile, state.StateFile + state.PrevSuffix, state.ShardDir} {
		if err := os.RemoveAll(filepath.Join(root, f)); err != nil {
			t.Fatal(err)
		}
	}

	// The state the root leaves, as another store held it.
	long := time.Date(2025, 3, 1, 8, 0, 0, 0, time.UTC)
	budget := int64(5 << 30)
	downloading := mustKey(t, "http://127.0.0.1:1/in-flight", "")
	failed := mustKey(t, "http://127.0.0.1:1/failed", "")
	elsewhere := state.Owner{Process: fakeProcess("elsewhere", 7), ManagerID: "elsewhere"}
	from := state.New()
	from.Policy = &state.Policy{MaxSizeBytes: budget, HighWatermark: 90, LowWatermark: 70, Pins: []string{"https://pinned/*"}}
	from.MaxGeneration = 40
	from.Put(&state.Entry{Key: k, Stage: state.Ready, Generation: ready.Generation, Path: ready.Path, SizeBytes: ready.SizeBytes,
		Created: long, LastUsed: long.Add(time.Hour), Dependents: map[string]state.Dependent{"job": {Since: long}}})
	from.Put(&state.Entry{Key: downloading, Stage: state.Downloading, Generation: 39, Owner: &elsewhere,
		Progress: state.Progress{Bytes: 10, Total: 100}, Created: long, LastUsed: long,
		Dependents: map[string]state.Dependent{"waiter": {Since: long}}})
	from.Put(&state.Entry{Key: failed, Stage: state.Failed, Generation: 38, Message: "404", Failures: 1, FailedAt: long, Created: long, LastUsed: long})

	doc, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := doc.RebuildFrom(ctx, false, from, "etcd://old/prefix")
	if err != nil {
		t.Fatal(err)
	}
	if rep.Entries != 1 || rep.LastState != "etcd://old/prefix" || rep.LastStateCopy != "" || len(rep.Failed) != 0 {
		t.Errorf("report %+v, want 1 entry rebuilt from etcd://old/prefix, no copy of it", rep)
	}
	if !rep.Policy.Carried || rep.Policy.Rebuilt.MaxSizeBytes != budget || len(rep.Policy.Rebuilt.Pins) != 1 {
		t.Errorf("policy %+v, want from's carried over", rep.Policy)
	}
	if len(rep.DroppedDependents) != 2 {
		t.Errorf("dropped dependents %+v, want job and waiter", rep.DroppedDependents)
	}
	for _, d := range rep.DroppedDependents {
		if want := map[state.Key]string{k: "job", downloading: "waiter"}[d.Key]; len(d.Dependents) != 1 || d.Dependents[0].Name != want {
			t.Errorf("dropped dependents of %s: %+v, want %s", d.Key.Source, d.Dependents, want)
		}
	}
	if len(rep.DroppedDownloads) != 1 || rep.DroppedDownloads[0].Key != downloading || rep.DroppedDownloads[0].Bytes != 10 ||
		rep.DroppedDownloads[0].Owner != elsewhere.Process.String() {
		t.Errorf("dropped downloads %+v, want the one in flight elsewhere", rep.DroppedDownloads)
	}
	if len(rep.DroppedEntries) != 1 || rep.DroppedEntries[0].Key != failed || rep.DroppedEntries[0].Message != "404" {
		t.Errorf("dropped entries %+v, want the FAILED one", rep.DroppedEntries)
	}
	st, err := state.DecodeFile(root, state.StateFile)
	if err != nil {
		t.Fatal(err)
	}
	e := st.Get(k)
	if e == nil || e.Stage != state.Ready || e.Path != ready.Path || len(e.Dependents) != 0 {
		t.Fatalf("rebuilt entry %+v, want READY at %s without dependents", e, ready.Path)
	}
	if !e.Created.Equal(long) || !e.LastUsed.Equal(long.Add(time.Hour)) {
		t.Errorf("rebuilt entry created %v, last used %v; want from's %v and %v", e.Created, e.LastUsed, long, long.Add(time.Hour))
	}
	if st.MaxGeneration < 40 {
		t.Errorf("generation counter %d, want at least from's 40: a generation may not be reused", st.MaxGeneration)
	}
	if st.Policy == nil || st.Policy.MaxSizeBytes != budget {
		t.Errorf("stored policy %+v, want from's", st.Policy)
	}

	// Now the store has a state of its own: a rebuild of its damaged file
	// takes the previous version, not from.
	sf := filepath.Join(root, state.StateFile)
	good, err := os.ReadFile(sf)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sf+state.PrevSuffix, good, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sf, []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	other := state.New()
	other.Policy = &state.Policy{MaxSizeBytes: 7 << 30, HighWatermark: 95, LowWatermark: 85}
	other.Put(&state.Entry{Key: downloading, Stage: state.Downloading, Generation: 99, Created: long, LastUsed: long,
		Dependents: map[string]state.Dependent{"ignored": {Since: long}}})
	rep, err = doc.RebuildFrom(ctx, false, other, "etcd://other/prefix")
	if err != nil {
		t.Fatal(err)
	}
	if rep.LastState != sf+state.PrevSuffix || rep.Unreadable == "" {
		t.Errorf("report %+v, want the store's own previous version as the last state", rep)
	}
	if rep.Policy.Rebuilt.MaxSizeBytes != budget || len(rep.DroppedDependents) != 0 || len(rep.DroppedDownloads) != 0 {
		t.Errorf("report %+v: it used the other state", rep)
	}
}
