package manager_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
)

// fakeClock is a clock the test moves by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// fakeMachine is one machine whose processes the test kills by hand.
type fakeMachine struct {
	mu   sync.Mutex
	dead map[int]bool
}

type fakeProc struct {
	m    *fakeMachine
	self state.Process
}

func (p fakeProc) Self() state.Process { return p.self }
func (p fakeProc) Alive(q state.Process) (bool, error) {
	p.m.mu.Lock()
	defer p.m.mu.Unlock()
	return !p.m.dead[q.PID], nil
}

func (fm *fakeMachine) kill(pid int) {
	fm.mu.Lock()
	fm.dead[pid] = true
	fm.mu.Unlock()
}

// fakeDisk is a filesystem whose free space the test sets.
type fakeDisk struct {
	mu         sync.Mutex
	free, size int64
}

// roomyDisk is 100 GiB with 90 GiB free, whatever TMPDIR has.
func roomyDisk() *fakeDisk { return &fakeDisk{free: 90 << 30, size: 100 << 30} }

func (d *fakeDisk) Space(string) (free, size int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.free, d.size
}

func (d *fakeDisk) setFree(free int64) {
	d.mu.Lock()
	d.free = free
	d.mu.Unlock()
}

// modelWorker is one simulated process running a manager.
type modelWorker struct {
	pid  int
	m    *manager.Manager
	stop func() error
}

// TestCleanupModel drives several managers on one root with random gets,
// releases, process deaths, clock advances and sweeps, and checks after
// every sweep, against a model of who holds what:
//   - no entry with a live dependent, or younger than min-age, was evicted;
//   - usage is within the budget whenever enough was evictable;
//   - no content exists without an entry, and the trash is empty.
func TestCleanupModel(t *testing.T) {
	const steps = 400
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))

	root := t.TempDir()
	srcDir := t.TempDir()
	const nSources = 8
	sources := make([]state.Key, nSources)
	for i := range sources {
		p := filepath.Join(srcDir, fmt.Sprintf("blob%d", i))
		if err := os.WriteFile(p, randomBytes(10<<10+i*3<<10), 0o644); err != nil {
			t.Fatal(err)
		}
		sources[i] = mustKey(t, "file://"+p, "")
	}
	const budget = 60 << 10
	const minAge = 2 * time.Minute
	pol := state.Policy{MaxSizeBytes: budget, HighWatermark: 90, LowWatermark: 50, MinAge: state.Duration(minAge)}
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	machine := &fakeMachine{dead: map[int]bool{}}
	nextPID := 100
	newWorker := func() *modelWorker {
		nextPID++
		pid := nextPID
		procs := fakeProc{m: machine, self: state.Process{Host: "h", BootID: "b", PIDNS: "ns", PID: pid, StartTime: 1}}
		m, err := manager.New(manager.Config{Root: root, Log: quietLog(), Clock: clock, Processes: procs,
			PollInterval: 5 * time.Millisecond, CleanupInterval: time.Hour * 24 * 365, SetPolicy: true,
			Cleanup: manager.PolicyChange{MaxSizeBytes: &pol.MaxSizeBytes, HighWatermark: &pol.HighWatermark,
				LowWatermark: &pol.LowWatermark, MinAge: ptr(minAge)},
			Policy: transitions.Policy{FailureCooldown: time.Hour}})
		if err != nil {
			t.Fatal(err)
		}
		stop, err := m.Start(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return &modelWorker{pid: pid, m: m, stop: stop}
	}
	workers := []*modelWorker{newWorker(), newWorker(), newWorker()}
	defer func() {
		for _, w := range workers {
			w.stop()
		}
	}()
	// The model: for each key, its dependents and the pid each is bound to.
	holders := map[string]map[string]int{}
	ctx := context.Background()
	depN, evictions, sweeps, deaths := 0, 0, 0, 0
	present := map[string]bool{}
	removed := 0
	for step := range steps {
		// Invariant after every step, whatever swept (our sweeps or the
		// managers' own after each publish): an entry with a live
		// dependent is never gone.
		st, err := workers[0].m.Entries(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for id, deps := range holders {
			if len(deps) > 0 && st.Entries[id] == nil {
				t.Fatalf("step %d: %s is gone while held by %v", step, keyByID(sources, id).Source, deps)
			}
		}
		for id := range present {
			if st.Entries[id] == nil {
				removed++
			}
		}
		present = map[string]bool{}
		for id := range st.Entries {
			present[id] = true
		}
		w := workers[rng.IntN(len(workers))]
		switch op := rng.IntN(10); {
		case op < 3: // get
			k := sources[rng.IntN(nSources)]
			depN++
			dep := fmt.Sprintf("run%d", depN)
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			if _, err := w.m.Get(wctx, dep, k); err != nil {
				t.Fatalf("step %d: get: %v", step, err)
			}
			_, err := w.m.Wait(wctx, k)
			cancel()
			// Too large: beside what is held, or what the sweep may
			// not evict yet (young by its own watch).
			if err != nil && !errors.Is(err, manager.ErrTooLarge) {
				t.Fatalf("step %d: wait: %v", step, err)
			}
			if holders[k.ID()] == nil {
				holders[k.ID()] = map[string]int{}
			}
			holders[k.ID()][dep] = w.pid
		case op < 6: // release a dependent (through any manager: the state is shared)
			var ids []string
			for id, deps := range holders {
				if len(deps) > 0 {
					ids = append(ids, id)
				}
			}
			if len(ids) == 0 {
				continue
			}
			slices.Sort(ids)
			id := ids[rng.IntN(len(ids))]
			var deps []string
			for dep := range holders[id] {
				deps = append(deps, dep)
			}
			slices.Sort(deps)
			dep := deps[rng.IntN(len(deps))]
			if err := w.m.Release(ctx, dep, keyByID(sources, id)); err != nil {
				t.Fatalf("step %d: release: %v", step, err)
			}
			delete(holders[id], dep)
		case op < 7: // the worker's process dies; a new one takes its place
			deaths++
			machine.kill(w.pid)
			w.stop()
			for id := range holders {
				for dep, pid := range holders[id] {
					if pid == w.pid {
						delete(holders[id], dep)
					}
				}
			}
			for i := range workers {
				if workers[i] == w {
					workers[i] = newWorker()
				}
			}
		case op < 8:
			clock.advance(time.Duration(rng.IntN(90)) * time.Second)
		default: // sweep, and check
			before, err := w.m.Entries(ctx)
			if err != nil {
				t.Fatal(err)
			}
			rep, err := w.m.Sweep(ctx, false)
			if err != nil {
				t.Fatalf("step %d: sweep: %v", step, err)
			}
			sweeps++
			evictions += len(rep.Victims)
			now := clock.Now()
			for _, v := range rep.Victims {
				if n := len(holders[v.Key.ID()]); n > 0 {
					t.Fatalf("step %d: evicted %s, held by %d live dependents %v", step, v.Key.Source, n, holders[v.Key.ID()])
				}
				if e := before.Get(v.Key); e != nil && now.Sub(e.Created) < minAge {
					t.Fatalf("step %d: evicted %s at age %s < min-age", step, v.Key.Source, now.Sub(e.Created))
				}
			}
			after, err := w.m.Entries(ctx)
			if err != nil {
				t.Fatal(err)
			}
			checkBudget(t, step, pol, after, holders, now)
			checkDisk(t, step, root, after)
		}
	}
	// A last phase that must churn whatever the seed did: everything
	// released, then each source fetched and released in turn, old enough
	// to go, through more than the budget.
	w := workers[0]
	for id, deps := range holders {
		for dep := range deps {
			if err := w.m.Release(ctx, dep, keyByID(sources, id)); err != nil {
				t.Fatalf("final release: %v", err)
			}
		}
		delete(holders, id)
	}
	clock.advance(3 * minAge)
	before, err := w.m.Entries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for id := range before.Entries {
		seen[id] = true
	}
	for i, k := range sources {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		dep := fmt.Sprintf("final-%d", i)
		if _, err := w.m.Get(wctx, dep, k); err != nil {
			t.Fatal(err)
		}
		w.m.Wait(wctx, k)
		cancel()
		if err := w.m.Release(ctx, dep, k); err != nil {
			t.Fatal(err)
		}
		seen[k.ID()] = true
		clock.advance(3 * minAge)
		rep, err := w.m.Sweep(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		evictions += len(rep.Victims)
		after, _ := w.m.Entries(ctx)
		checkBudget(t, steps+i, pol, after, holders, clock.Now())
		checkDisk(t, steps+i, root, after)
	}
	final, _ := w.m.Entries(ctx)
	for id := range seen {
		if final.Entries[id] == nil {
			removed++
		}
	}
	for _, w := range workers {
		w.stop()
	}
	checkNoOrphans(t, root, final)
	if c := trashContent(root); len(c) != 0 {
		t.Errorf("trash not emptied once every manager stopped: %v", c)
	}
	t.Logf("%d steps: %d test sweeps evicted %d entries; %d entries removed in all; %d process deaths", steps, sweeps, evictions, removed, deaths)
	if removed == 0 {
		t.Error("no sweep evicted anything: the run proved nothing")
	}
}

func keyByID(keys []state.Key, id string) state.Key {
	for _, k := range keys {
		if k.ID() == id {
			return k
		}
	}
	panic("unknown key " + id)
}

// checkBudget: above the high watermark after a sweep only if what is left
// cannot be evicted. Ages are the sweeper's to judge from what it watched
// (a manager that started since may not have watched an entry for
// min-age); an entry past min-age by the skew tolerance is evictable by
// any sweeper.
func checkBudget(t *testing.T, step int, pol state.Policy, st *state.State, holders map[string]map[string]int, now time.Time) {
	t.Helper()
	usage := transitions.Measure(st.Entries)
	if usage*100 <= pol.MaxSizeBytes*int64(pol.HighWatermark) {
		return
	}
	for id, e := range st.Entries {
		if e.Stage == state.Ready && len(holders[id]) == 0 && now.Sub(e.Created) >= time.Duration(pol.MinAge)+transitions.ClockSkewTolerance {
			t.Fatalf("step %d: usage %d over the budget after a sweep, but %s was evictable", step, usage, e.Key.Source)
		}
	}
}

// checkDisk: every READY entry's content is in place. (Orphans in
// entries/ and trash are checked at the end: another manager's sweep may be
// between its commit and its move into trash, or its delete, at any step.)
func checkDisk(t *testing.T, step int, root string, st *state.State) {
	t.Helper()
	for _, e := range st.Entries {
		if e.Path != "" {
			if _, err := os.Stat(filepath.Join(root, e.Path)); err != nil && e.Stage == state.Ready {
				t.Fatalf("step %d: READY entry %s has no content: %v", step, e.Key.Source, err)
			}
		}
	}
}

// checkNoOrphans: once every manager has stopped, every published
// directory is named by an entry.
func checkNoOrphans(t *testing.T, root string, st *state.State) {
	t.Helper()
	named := namedDirs(st)
	ents, err := os.ReadDir(filepath.Join(root, "entries"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for _, d := range ents {
		if !named[d.Name()] {
			t.Errorf("content %s without an entry once every manager stopped", d.Name())
		}
	}
}

func namedDirs(st *state.State) map[string]bool {
	named := map[string]bool{}
	for _, e := range st.Entries {
		if e.Path != "" {
			named[filepath.Base(filepath.Dir(e.Path))] = true
		}
	}
	return named
}
