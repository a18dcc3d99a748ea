package state_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

func bundleKey(i int) state.Key {
	return state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://example.com/b/%d.tar.gz", i)}
}

func openStore(t testing.TB, dir string) *state.Store {
	t.Helper()
	s, err := state.Open(dir, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func put(i int, gen uint64) func(*state.State) (bool, error) {
	return func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: bundleKey(i), Stage: state.Downloading, Generation: gen})
		return true, nil
	}
}

func TestUpdateWritesOnlyOnChange(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	if err := s.Update(ctx, put(1, 1)); err != nil {
		t.Fatal(err)
	}
	fi1, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.Path() + state.PrevSuffix); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("first write left a previous version: %v", err)
	}
	// fn says changed, but the content is the same: no write.
	if err := s.Update(ctx, put(1, 1)); err != nil {
		t.Fatal(err)
	}
	// fn says unchanged: no write, even though it modified the state.
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		e := st.Get(bundleKey(1)).Clone()
		e.Generation = 99
		st.Put(e)
		return false, nil
	}); err != nil {
		t.Fatal(err)
	}
	fi2, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(fi1, fi2) {
		t.Fatal("the state file was rewritten although nothing changed")
	}
	// A real change replaces the file and keeps the previous version.
	before, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(ctx, put(1, 2)); err != nil {
		t.Fatal(err)
	}
	prev, err := os.ReadFile(s.Path() + state.PrevSuffix)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(prev, before) {
		t.Fatalf("previous version = %s, want %s", prev, before)
	}
	st, err := s.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if g := st.Get(bundleKey(1)).Generation; g != 2 {
		t.Fatalf("generation = %d, want 2", g)
	}
}

func TestUpdateErrorWritesNothing(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	boom := errors.New("boom")
	err := s.Update(ctx, func(st *state.State) (bool, error) {
		if _, err := put(1, 1)(st); err != nil {
			return false, err
		}
		return true, boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want boom", err)
	}
	if _, err := os.Stat(s.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state written despite the error: %v", err)
	}
}

func TestUpdateRefusesPathOutsideRoot(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	for _, p := range []string{"../escape", "/etc/passwd", "entries/../../x", "a/./b"} {
		err := s.Update(ctx, func(st *state.State) (bool, error) {
			st.Put(&state.Entry{Key: bundleKey(1), Stage: state.Ready, Path: p})
			return true, nil
		})
		if !errors.Is(err, state.ErrOutsideRoot) {
			t.Errorf("path %q: err = %v, want ErrOutsideRoot", p, err)
		}
		if _, err := s.Abs(p); !errors.Is(err, state.ErrOutsideRoot) {
			t.Errorf("Abs(%q): err = %v, want ErrOutsideRoot", p, err)
		}
	}
	if _, err := s.Abs("entries/abc/content"); err != nil {
		t.Errorf("Abs of a local path: %v", err)
	}
}

// Goroutines of one process, through two stores on the same root, never
// lose an update.
func TestUpdateConcurrent(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	stores := []*state.Store{openStore(t, dir), openStore(t, dir)}
	const workers, rounds = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range rounds {
				err := stores[w%2].Update(ctx, func(st *state.State) (bool, error) {
					e := st.Get(bundleKey(0))
					if e == nil {
						e = &state.Entry{Key: bundleKey(0), Stage: state.Downloading}
					} else {
						e = e.Clone() // shared with the store's cache: never modified in place
					}
					st.Put(e)
					e.Generation++
					return true, nil
				})
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st, err := stores[0].View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if g := st.Get(bundleKey(0)).Generation; g != workers*rounds {
		t.Fatalf("generation = %d, want %d: updates were lost", g, workers*rounds)
	}
}

// TestCorruptStateFiles: every fixture in testdata/state gives an error that
// names the file and the reason, keeps the bad file in place with a copy
// aside, never calls fn, and deletes nothing.
func TestCorruptStateFiles(t *testing.T) {
	fixtures, err := filepath.Glob("../testdata/state/*.json")
	if err != nil || len(fixtures) < 5 {
		t.Fatalf("fixtures: %v %v", fixtures, err)
	}
	ctx := context.Background()
	for _, fx := range fixtures {
		t.Run(filepath.Base(fx), func(t *testing.T) {
			bad, err := os.ReadFile(fx)
			if err != nil {
				t.Fatal(err)
			}
			want := state.ErrCorrupt
			if strings.Contains(fx, "future") {
				want = state.ErrUnsupportedVersion
			}
			dir := t.TempDir()
			content := filepath.Join(dir, "entries", "e1", "content")
			if err := os.MkdirAll(filepath.Dir(content), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(content, []byte("precious"), 0o644); err != nil {
				t.Fatal(err)
			}
			s := openStore(t, dir)
			if err := os.WriteFile(s.Path(), bad, 0o644); err != nil {
				t.Fatal(err)
			}

			_, verr := s.View(ctx)
			called := false
			uerr := s.Update(ctx, func(*state.State) (bool, error) { called = true; return true, nil })
			for _, err := range []error{verr, uerr} {
				if !errors.Is(err, want) {
					t.Fatalf("err = %v, want %v", err, want)
				}
				if !strings.Contains(err.Error(), s.Path()) {
					t.Errorf("error %q does not name the file", err)
				}
			}
			if called {
				t.Error("Update called fn on an unreadable state")
			}
			now, err := os.ReadFile(s.Path())
			if err != nil || !bytes.Equal(now, bad) {
				t.Errorf("the bad state file was changed or removed: %v", err)
			}
			asides, err := filepath.Glob(s.Path() + state.BadSuffix + "*")
			if err != nil {
				t.Fatal(err)
			}
			if len(asides) != 1 {
				t.Fatalf("copies kept aside: %v, want one", asides)
			}
			if b := readBytes(t, asides[0]); !bytes.Equal(b, bad) {
				t.Error("the copy kept aside differs from the bad file")
			}
			if b, err := os.ReadFile(content); err != nil || string(b) != "precious" {
				t.Errorf("cache content was touched: %v", err)
			}
		})
	}
}

func TestDecodeGood(t *testing.T) {
	st := state.New()
	st.Put(&state.Entry{Key: bundleKey(3), Stage: state.Ready, Path: "entries/x/content", SizeBytes: 5})
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	if err := s.Update(ctx, func(cur *state.State) (bool, error) { *cur = *st; return true, nil }); err != nil {
		t.Fatal(err)
	}
	got, err := state.DecodeFile(s.Root(), state.StateFile)
	if err != nil {
		t.Fatal(err)
	}
	if e := got.Get(bundleKey(3)); e == nil || e.SizeBytes != 5 || e.Stage != state.Ready {
		t.Fatalf("round trip lost the entry: %+v", e)
	}
}

// Where a SIGKILL landed in the child's loop of commits, told afterwards
// from what it left on disk rather than from the child's last words: the
// kill arrives some time after anything the child printed.
type killPhase int

const (
	killBefore  killPhase = iota // no temporary file, the state is the last acknowledged one
	killWriting                  // a temporary file, not yet the whole next state
	killInside                   // the whole next state in a temporary file, not yet renamed
	killAfter                    // the next state committed, not yet acknowledged
	killPhases
)

var killPhaseNames = [killPhases]string{"before a commit", "writing the shards or the temporary manifest",
	"after the temporary write, before the rename", "after the commit point, before the ack"}

// crashSeed returns the seed of the test's random choices: DEPCACHE_SEED
// to replay a failure, else a new one, which a failure prints.
func crashSeed(t *testing.T) uint64 {
	t.Helper()
	seed := rand.Uint64()
	if v := os.Getenv("DEPCACHE_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("DEPCACHE_SEED=%q: %v", v, err)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("random choices from DEPCACHE_SEED=%d (the kill points depend on timing too)", seed)
		}
	})
	return seed
}

// TestUpdateCrashSafety SIGKILLs a child in the middle of a loop of
// Updates, at a random delay after a random acknowledgement, spread over a
// whole commit cycle as measured between the child's acknowledgements.
// After every kill the state file must parse and hold either the last
// acknowledged state or the one after it, and the previous version must
// parse too. The trials as a whole must have seen acknowledged updates and
// kills before, inside (after the temporary write, before the rename) and
// after a commit; they go on, up to a bound, until each phase was hit.
func TestUpdateCrashSafety(t *testing.T) {
	trials, maxTrials, perPhase := 150, 600, 3
	if testing.Short() {
		trials, maxTrials, perPhase = 30, 300, 1
	}
	rng := rand.New(rand.NewPCG(crashSeed(t), 0))
	dir := t.TempDir()
	s := openStore(t, dir)
	ctx := context.Background()
	// Some bulk, so that writing the temporary file takes long enough to be
	// interrupted; more makes every child's first read slower (2000 entries:
	// half a second a trial under -race) and adds no phase.
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		for i := 1; i <= 200; i++ {
			if _, err := put(i, 0)(st); err != nil {
				return false, err
			}
		}
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	var (
		acked, ackedTotal uint64
		hits              [killPhases]int
		cycles            []time.Duration // between acknowledgements, as the parent sees them
	)
	cycle := func() time.Duration {
		if len(cycles) == 0 {
			return 20 * time.Millisecond // until measured
		}
		c := slices.Clone(cycles)
		slices.Sort(c)
		return c[len(c)/2]
	}
	enough := func() bool {
		for _, n := range hits {
			if n < perPhase {
				return false
			}
		}
		return true
	}
	trial := 0
	for ; trial < trials || (!enough() && trial < maxTrials); trial++ {
		cmd := child("update-loop", "DT_DIR="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		ch := lines(t, out)
		expectLine(t, ch, "ready")
		// Kill after the k-th acknowledgement of this child (k >= 1, so
		// that the kill does not land in its start-up), at a random point
		// of the next cycle or a little past it.
		k := 1 + rng.IntN(3)
		var last time.Time
		for range k {
			l := expectLine(t, ch, "ack ")
			now := time.Now()
			if !last.IsZero() {
				cycles = append(cycles, now.Sub(last))
			}
			last = now
			if acked, err = strconv.ParseUint(strings.TrimPrefix(l, "ack "), 10, 64); err != nil {
				t.Fatalf("trial %d: child said %q: %v", trial, l, err)
			}
			ackedTotal++
		}
		// A random kill point, not synchronisation.
		time.Sleep(time.Duration(rng.Int64N(int64(cycle() * 3 / 2))))
		if err := cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		for l := range ch {
			if v, ok := strings.CutPrefix(l, "ack "); ok {
				if acked, err = strconv.ParseUint(v, 10, 64); err != nil {
					t.Fatalf("trial %d: child said %q: %v", trial, l, err)
				}
				ackedTotal++
			}
		}
		if err := cmd.Wait(); !killed(err) {
			t.Fatalf("trial %d: child ended with %v, not by the SIGKILL", trial, err)
		}
		g := generationOf(t, s.Path(), fmt.Sprintf("trial %d: state", trial))
		if g != acked && g != acked+1 {
			t.Fatalf("trial %d: generation %d, last acknowledged %d", trial, g, acked)
		}
		if _, err := os.Stat(s.Path() + state.PrevSuffix); err == nil {
			if p := generationOf(t, s.Path()+state.PrevSuffix, fmt.Sprintf("trial %d: previous version", trial)); p > g {
				t.Fatalf("trial %d: previous version has generation %d, the state %d", trial, p, g)
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		hits[crashPhase(t, dir, g, acked)]++
		acked = g
	}
	t.Logf("%d trials, %d acknowledged updates, kills: %v, commit cycle %s", trial, ackedTotal, hits, cycle())
	if ackedTotal == 0 || acked == 0 {
		t.Errorf("no update was acknowledged in %d trials: the invariant was never tested", trial)
	}
	for p, n := range hits {
		if n < perPhase {
			t.Errorf("%d kills %s in %d trials, want at least %d", n, killPhaseNames[p], trial, perPhase)
		}
	}
}

// killed reports whether err from Wait says that the process died of
// SIGKILL.
func killed(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// generationOf returns entry 0's generation in the state file at path,
// failing t if that does not parse.
func generationOf(t *testing.T, path, what string) uint64 {
	t.Helper()
	st, err := state.DecodeFile(filepath.Dir(path), filepath.Base(path))
	if err != nil {
		t.Fatalf("%s does not parse after SIGKILL: %v", what, err)
	}
	if e := st.Get(bundleKey(0)); e != nil {
		return e.Generation
	}
	return 0
}

// crashPhase tells where the kill landed from what the child left: the
// state's generation g against the last acknowledged one, and the commit's
// temporary file, which it removes (a crashed commit leaves it behind) so
// that the next trial starts clean.
func crashPhase(t *testing.T, dir string, g, acked uint64) killPhase {
	t.Helper()
	matches, err := filepath.Glob(filepath.Join(dir, "."+state.StateFile+"*"))
	if err != nil {
		t.Fatal(err)
	}
	// A commit killed between keeping the previous version's link and its
	// rename leaves that link, to the state file as it still is. The
	// commit after it finds state.json.prev a link to the state file, and
	// its rename of its own link over it does nothing (rename(2) of two
	// links to one file): that link stays too, litter of an older
	// manifest once later commits rotate state.json.prev, which a holder
	// deletes after the grace.
	var temps []string
	for _, m := range matches {
		if !strings.HasPrefix(filepath.Base(m), "."+state.StateFile+state.PrevSuffix) {
			temps = append(temps, m)
			continue
		}
		a, errA := os.Stat(m)
		cur, errC := os.Stat(filepath.Join(dir, state.StateFile))
		if errA != nil || errC != nil {
			t.Fatalf("%s: %v, %v", m, errA, errC)
		}
		if os.SameFile(a, cur) && g != acked {
			t.Fatalf("generation %d committed (last acknowledged %d), yet the link %s to it kept for state.json.prev is still there", g, acked, m)
		}
		if err := os.Remove(m); err != nil {
			t.Fatal(err)
		}
	}
	if len(temps) > 1 {
		t.Fatalf("temporary files %v: more than one commit in flight", temps)
	}
	var tempSt *state.State
	var tempErr error
	if len(temps) == 1 {
		if g != acked {
			t.Fatalf("generation %d committed (last acknowledged %d), yet its temporary file %s is still there", g, acked, temps[0])
		}
		// The temporary manifest, with the shards it names.
		tempSt, tempErr = state.DecodeFile(dir, filepath.Base(temps[0]))
		if err := os.Remove(temps[0]); err != nil {
			t.Fatal(err)
		}
	}
	// Shard files that no manifest names: those of a commit killed before
	// its rename.
	litter, err := state.UnnamedShards(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range litter {
		if err := os.Remove(filepath.Join(dir, state.ShardDir, n)); err != nil {
			t.Fatal(err)
		}
	}
	switch {
	case len(temps) == 0 && g == acked+1:
		return killAfter
	case len(temps) == 0 && len(litter) == 0:
		return killBefore
	case len(temps) == 0 || tempErr != nil:
		return killWriting
	}
	if e := tempSt.Get(bundleKey(0)); e == nil || e.Generation != acked+1 {
		t.Fatalf("temporary file %s holds %+v, want generation %d", temps[0], e, acked+1)
	}
	return killInside
}

// updateLoop bumps the generation of entry 0 forever, acknowledging each.
func updateLoop() int {
	s, err := state.Open(os.Getenv("DT_DIR"), state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println("ready")
	ctx := context.Background()
	for {
		var g uint64
		err := s.Update(ctx, func(st *state.State) (bool, error) {
			e := st.Get(bundleKey(0))
			if e == nil {
				e = &state.Entry{Key: bundleKey(0), Stage: state.Downloading}
			} else {
				e = e.Clone() // shared with the store's cache: never modified in place
			}
			st.Put(e)
			e.Generation++
			g = e.Generation
			return true, nil
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		fmt.Println("ack", g)
	}
}

// Reset (doctor --rebuild) replaces an unreadable state without reading
// it, and still keeps it: a copy aside. It never becomes the previous
// version (that holds the last state that parses). A callback that fails
// writes nothing.
func TestResetKeepsUnreadableState(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	bad := []byte(`{"version":1,"entries":{`)
	if err := os.WriteFile(s.Path(), bad, 0o644); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	if _, err := s.Reset(ctx, func(_, _ *state.State) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("Reset = %v, want boom", err)
	}
	if got := readBytes(t, s.Path()); !bytes.Equal(got, bad) {
		t.Fatalf("a failed Reset changed the state file to %s", got)
	}
	if _, err := s.Reset(ctx, func(st, _ *state.State) error {
		_, err := put(5, 3)(st)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	st, err := s.View(ctx)
	if err != nil {
		t.Fatalf("state after Reset: %v", err)
	}
	if e := st.Get(bundleKey(5)); e == nil || e.Generation != 3 {
		t.Fatalf("entry after Reset: %+v", e)
	}
	if got, err := os.ReadFile(s.Path() + state.PrevSuffix); err == nil && bytes.Equal(got, bad) {
		t.Errorf("the unreadable state became the previous version")
	}
	asides, err := filepath.Glob(s.Path() + state.BadSuffix + "*")
	if err != nil {
		t.Fatal(err)
	}
	if len(asides) != 1 || !bytes.Equal(readBytes(t, asides[0]), bad) {
		t.Errorf("copies kept aside: %v, want one of the unreadable state", asides)
	}
}
