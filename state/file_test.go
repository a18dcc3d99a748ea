package state_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
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
	before, _ := os.ReadFile(s.Path())
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
		put(1, 1)(st)
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
			os.MkdirAll(filepath.Dir(content), 0o755)
			os.WriteFile(content, []byte("precious"), 0o644)
			s := openStore(t, dir)
			os.WriteFile(s.Path(), bad, 0o644)

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
			asides, _ := filepath.Glob(s.Path() + state.BadSuffix + "*")
			if len(asides) != 1 {
				t.Fatalf("copies kept aside: %v, want one", asides)
			}
			if b, _ := os.ReadFile(asides[0]); !bytes.Equal(b, bad) {
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
	b, _ := os.ReadFile(s.Path())
	got, err := state.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if e := got.Get(bundleKey(3)); e == nil || e.SizeBytes != 5 || e.Stage != state.Ready {
		t.Fatalf("round trip lost the entry: %+v", e)
	}
}

// TestUpdateCrashSafety SIGKILLs a child at random points of a loop of
// Updates 300 times (30 in -short). After each kill the state file must
// parse and hold either the last acknowledged state or the one after it.
func TestUpdateCrashSafety(t *testing.T) {
	trials := 300
	if testing.Short() {
		trials = 30
	}
	dir := t.TempDir()
	s := openStore(t, dir)
	ctx := context.Background()
	// Some bulk, so that a write takes long enough to be interrupted.
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		for i := 1; i <= 2000; i++ {
			put(i, 0)(st)
		}
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	var acked uint64
	for trial := range trials {
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
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond) // a random kill point, not synchronisation
		cmd.Process.Kill()
		for l := range ch {
			if v, ok := strings.CutPrefix(l, "ack "); ok {
				acked, _ = strconv.ParseUint(v, 10, 64)
			}
		}
		cmd.Wait()
		b, err := os.ReadFile(s.Path())
		if err != nil {
			t.Fatalf("trial %d: %v", trial, err)
		}
		st, err := state.Decode(b)
		if err != nil {
			t.Fatalf("trial %d: state does not parse after SIGKILL: %v", trial, err)
		}
		var g uint64
		if e := st.Get(bundleKey(0)); e != nil {
			g = e.Generation
		}
		if g != acked && g != acked+1 {
			t.Fatalf("trial %d: generation %d, last acknowledged %d", trial, g, acked)
		}
		acked = g
	}
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
