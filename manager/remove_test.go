package manager_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// removeFixture is a root with three READY entries (free, free but for a
// dependent whose process is gone, held by a named dependent), a download
// in flight on another host, and a manager of this machine that is not
// running (so that no pass reaps the dead dependent before Remove judges
// it).
type removeFixture struct {
	root                 string
	m                    *manager.Manager
	free, deadDep, held  state.Entry
	downloading, missing state.Key
}

func newRemoveFixture(t *testing.T) *removeFixture {
	t.Helper()
	root := t.TempDir()
	ctx := context.Background()
	f := &removeFixture{root: root}
	blobs := t.TempDir()
	key := func(name, body string) state.Key {
		p := filepath.Join(blobs, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return mustKey(t, "file://"+p, "")
	}
	a, stop := startManager(t, root)
	for _, tc := range []struct {
		e    *state.Entry
		key  state.Key
		keep bool // its dependent stays
	}{
		{&f.free, key("free", "free content"), false},
		{&f.deadDep, key("dead-dep", "content whose dependent died"), false},
		{&f.held, key("held", "content a job holds"), true},
	} {
		if _, err := a.Get(ctx, "job", tc.key, manager.Detached()); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, within)
		e, err := a.Wait(wctx, tc.key)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if !tc.keep {
			if err := a.Release(ctx, "job", tc.key); err != nil {
				t.Fatal(err)
			}
		}
		*tc.e = e
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	f.downloading = mustKey(t, "http://127.0.0.1:1/downloading", "")
	f.missing = mustKey(t, "http://127.0.0.1:1/missing", "")
	machine := &fakeMachine{dead: map[int]bool{50: true}}
	now := time.Now()
	behind(t, root, func(st *state.State) {
		crashed := fakeProcess("h", 50)
		e := st.Get(f.deadDep.Key).Clone()
		e.Dependents = map[string]state.Dependent{"crashed": {Since: now, Process: &crashed}}
		st.Put(e)
		elsewhere := state.Owner{Process: fakeProcess("elsewhere", 7), ManagerID: "elsewhere"}
		st.Put(&state.Entry{Key: f.downloading, Stage: state.Downloading, Owner: &elsewhere, Generation: st.MaxGeneration + 1,
			Created: now, LastUsed: now, Dependents: map[string]state.Dependent{"waiter": {Since: now}}})
	})
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(), Processes: fakeProc{m: machine, self: fakeProcess("h", 11)}})
	if err != nil {
		t.Fatal(err)
	}
	f.m = m
	return f
}

// joined returns the errors an errors.Join holds (err itself otherwise).
func joined(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// TestRemoveRefusesAllOrNothing: Remove of entries one of which is
// missing, one held by a live dependent and one downloading removes none
// of them, not even the free one asked for with them, and says why for
// each refused key: ErrNotFound, and an *InUseError (ErrInUse) naming the
// live dependents or the download.
func TestRemoveRefusesAllOrNothing(t *testing.T) {
	f := newRemoveFixture(t)
	ctx := context.Background()
	rep, err := f.m.Remove(ctx, []state.Key{f.free.Key, f.held.Key, f.downloading, f.missing}, false)
	if err == nil {
		t.Fatalf("Remove succeeded: %+v", rep)
	}
	if !errors.Is(err, manager.ErrNotFound) || !errors.Is(err, manager.ErrInUse) {
		t.Errorf("err = %v, want it to wrap both ErrNotFound and ErrInUse", err)
	}
	if len(rep.Removed) != 0 || rep.Freed != 0 {
		t.Errorf("a refused Remove reports removals: %+v", rep)
	}
	errs := joined(err)
	if len(errs) != 3 {
		t.Fatalf("%d errors, want one per refused key (3): %v", len(errs), err)
	}
	inUse := map[string]*manager.InUseError{}
	for _, e := range errs {
		var iu *manager.InUseError
		switch {
		case errors.As(e, &iu):
			inUse[iu.Key.ID()] = iu
		case errors.Is(e, manager.ErrNotFound):
			if !strings.Contains(e.Error(), f.missing.Source) {
				t.Errorf("the missing key's error %q does not name it", e)
			}
		default:
			t.Errorf("unexpected error %v", e)
		}
	}
	if iu := inUse[f.held.Key.ID()]; iu == nil {
		t.Errorf("no InUseError for the held entry: %v", err)
	} else {
		if !slices.Equal(iu.Dependents, []string{"job"}) || iu.Stage != state.Ready {
			t.Errorf("held: dependents %v stage %s, want [job] READY", iu.Dependents, iu.Stage)
		}
		if !strings.HasPrefix(iu.Error(), f.held.Key.Source+": ") || !strings.Contains(iu.Error(), "in use by job") {
			t.Errorf("held: %q", iu.Error())
		}
	}
	if iu := inUse[f.downloading.ID()]; iu == nil {
		t.Errorf("no InUseError for the download: %v", err)
	} else if iu.Stage != state.Downloading || !strings.Contains(iu.Reason, "downloading for waiter") || !slices.Equal(iu.Dependents, []string{"waiter"}) {
		// The refusal names the live dependents a download is for, as
		// the README says refusals do (it named none).
		t.Errorf("downloading: %+v", iu)
	}
	for _, e := range []state.Entry{f.free, f.held} {
		if viewEntry(t, f.root, e.Key) == nil {
			t.Errorf("%s was removed by a refused Remove", e.Key.Source)
		}
		if !exists(t, f.root, e.Path) {
			t.Errorf("the content of %s is gone after a refused Remove", e.Key.Source)
		}
	}
}

// TestRemoveDryRunThenRemove: a dry run reports what Remove would remove
// (each key once, however often asked) and what it frees, and changes
// nothing; the Remove itself takes the entries out of the state and their
// content off the disk, and leaves the others. A dependent whose process
// is gone does not keep its entry.
func TestRemoveDryRunThenRemove(t *testing.T) {
	f := newRemoveFixture(t)
	ctx := context.Background()
	keys := []state.Key{f.free.Key, f.deadDep.Key, f.free.Key}
	want := []string{f.free.Key.Source, f.deadDep.Key.Source}
	freed := f.free.SizeBytes + f.deadDep.SizeBytes
	sources := func(rep manager.RemoveReport) []string {
		var out []string
		for _, r := range rep.Removed {
			out = append(out, r.Key.Source)
		}
		return out
	}

	dry, err := f.m.Remove(ctx, keys, true)
	if err != nil {
		t.Fatal(err)
	}
	if !dry.DryRun || !slices.Equal(sources(dry), want) || dry.Freed != freed || freed <= 0 {
		t.Errorf("dry run: %+v, want %v freeing %d", dry, want, freed)
	}
	if e := viewEntry(t, f.root, f.deadDep.Key); e == nil || len(e.Dependents) != 1 {
		t.Errorf("the dry run changed the state: %+v", e)
	}
	for _, e := range []state.Entry{f.free, f.deadDep} {
		if !exists(t, f.root, e.Path) {
			t.Errorf("the dry run removed the content of %s", e.Key.Source)
		}
	}

	rep, err := f.m.Remove(ctx, keys, false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.DryRun || !slices.Equal(sources(rep), want) || rep.Freed != freed {
		t.Errorf("Remove: %+v, want %v freeing %d", rep, want, freed)
	}
	for i, r := range rep.Removed {
		e := []state.Entry{f.free, f.deadDep}[i]
		if r.Path != e.Path || r.Bytes != e.SizeBytes || r.Stage != state.Ready {
			t.Errorf("removed %+v, want the entry's path %s and size %d", r, e.Path, e.SizeBytes)
		}
	}
	for _, e := range []state.Entry{f.free, f.deadDep} {
		if viewEntry(t, f.root, e.Key) != nil {
			t.Errorf("%s is still in the state", e.Key.Source)
		}
		if exists(t, f.root, filepath.Dir(e.Path)) {
			t.Errorf("the content of %s is still there", e.Key.Source)
		}
	}
	// Deleted, not left in trash.
	err = filepath.WalkDir(filepath.Join(f.root, "trash"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		for _, e := range []state.Entry{f.free, f.deadDep} {
			if d.Name() == filepath.Base(filepath.Dir(e.Path)) {
				t.Errorf("the content of %s is left in trash: %s", e.Key.Source, p)
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	if viewEntry(t, f.root, f.held.Key) == nil || viewEntry(t, f.root, f.downloading) == nil || !exists(t, f.root, f.held.Path) {
		t.Error("Remove took entries it was not asked for")
	}
	if _, err := f.m.Remove(ctx, []state.Key{f.free.Key}, false); !errors.Is(err, manager.ErrNotFound) {
		t.Errorf("a second Remove: %v, want ErrNotFound", err)
	}
}

// TestDescribeEntryAndTotals: DescribeEntry says of one entry what
// Describe says of each (its dependents, live or not and why, and what
// keeps it), and ErrNotFound for a key without an entry; TotalsOf counts
// the entries by stage and the bytes they take.
func TestDescribeEntryAndTotals(t *testing.T) {
	f := newRemoveFixture(t)
	ctx := context.Background()
	e, d, err := f.m.DescribeEntry(ctx, f.held.Key)
	if err != nil {
		t.Fatal(err)
	}
	if e.Key != f.held.Key || e.Stage != state.Ready || e.Path != f.held.Path {
		t.Errorf("entry %+v, want the held READY one", e)
	}
	if len(d.Dependents) != 1 || d.Dependents[0].Name != "job" || !d.Dependents[0].Live || d.Dependents[0].Liveness != "until released" {
		t.Errorf("dependents %+v, want job live until released", d.Dependents)
	}
	if d.Kept != "in use by [job]" {
		t.Errorf("kept %q, want in use by [job]", d.Kept)
	}
	_, d, err = f.m.DescribeEntry(ctx, f.deadDep.Key)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Dependents) != 1 || d.Dependents[0].Name != "crashed" || d.Dependents[0].Live || !strings.Contains(d.Dependents[0].Liveness, "process 50 is gone") {
		t.Errorf("dependents %+v, want crashed, not live: its process is gone", d.Dependents)
	}
	if strings.HasPrefix(d.Kept, "in use") {
		t.Errorf("kept %q: a dead dependent keeps nothing", d.Kept)
	}
	_, d, err = f.m.DescribeEntry(ctx, f.free.Key)
	if err != nil || d.Dependents == nil || len(d.Dependents) != 0 {
		t.Errorf("free entry: %+v, %v; want no dependents (an empty list)", d, err)
	}
	_, all, err := f.m.Describe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := all[f.held.Key.ID()]; got.Kept != "in use by [job]" {
		t.Errorf("Describe says %q of the held entry, DescribeEntry in use by [job]", got.Kept)
	}
	if _, _, err := f.m.DescribeEntry(ctx, f.missing); !errors.Is(err, manager.ErrNotFound) {
		t.Errorf("missing key: %v, want ErrNotFound", err)
	}

	st, err := f.m.Entries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tot := f.m.TotalsOf(st)
	if tot.Ready != 3 || tot.Downloading != 1 || tot.Failed != 0 {
		t.Errorf("totals: %d READY, %d DOWNLOADING, %d FAILED; want 3, 1, 0", tot.Ready, tot.Downloading, tot.Failed)
	}
	if want := f.free.SizeBytes + f.deadDep.SizeBytes + f.held.SizeBytes; tot.UsageBytes != want {
		t.Errorf("usage %d bytes, want the READY entries' %d (the download reported nothing yet)", tot.UsageBytes, want)
	}
	if tot.Stored || tot.Policy.HighWatermark != state.DefaultPolicy().HighWatermark {
		t.Errorf("policy %+v stored %v: the root stores none, want the defaults", tot.Policy, tot.Stored)
	}
	if tot.DiskSize <= 0 || tot.DiskFree < 0 || tot.DiskFree > tot.DiskSize {
		t.Errorf("disk: %d free of %d", tot.DiskFree, tot.DiskSize)
	}
}

// TestCheckDependent: a dependent's name is 1 to 256 bytes of valid UTF-8
// without control characters; anything else wraps ErrBadDependent, and
// Get refuses it the same way before touching the state.
func TestCheckDependent(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"job-42", true},
		{"étape 1", true},
		{strings.Repeat("x", 256), true},
		{"", false},
		{strings.Repeat("x", 257), false},
		{"tab\there", false},
		{"nl\n", false},
		{"bad\xffutf8", false},
	} {
		err := manager.CheckDependent(tc.name)
		if tc.ok != (err == nil) {
			t.Errorf("CheckDependent(%q) = %v, want ok %v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, manager.ErrBadDependent) {
			t.Errorf("CheckDependent(%q) = %v, want it to wrap ErrBadDependent", tc.name, err)
		}
	}
	root := t.TempDir()
	m, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "http://127.0.0.1:1/x", "")
	if _, err := m.Get(context.Background(), "bad\x00name", k); !errors.Is(err, manager.ErrBadDependent) {
		t.Errorf("Get with a bad name: %v, want ErrBadDependent", err)
	}
	if e := viewEntry(t, root, k); e != nil {
		t.Errorf("Get with a bad name registered it: %+v", e)
	}
}
