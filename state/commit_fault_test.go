package state_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// committed is a store whose state file went through two commits, so that
// the previous version exists too, with the bytes of both.
type committed struct {
	s          *state.Store
	dir        string
	cur, prev  []byte
	wantBefore int // entries in the state
}

func newCommitted(t *testing.T) *committed {
	t.Helper()
	dir := t.TempDir()
	s := openStore(t, dir)
	ctx := context.Background()
	for i := range 2 {
		if err := s.Update(ctx, put(i, 1)); err != nil {
			t.Fatal(err)
		}
	}
	c := &committed{s: s, dir: dir, wantBefore: 2}
	c.cur = readBytes(t, s.Path())
	c.prev = readBytes(t, s.Path()+state.PrevSuffix)
	return c
}

func readBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// bulk adds n entries after the first two, enough to make the state file
// far larger than it was.
func bulk(n int) func(*state.State) (bool, error) {
	return func(st *state.State) (bool, error) {
		for i := 2; i < 2+n; i++ {
			if _, err := put(i, 1)(st); err != nil {
				return false, err
			}
		}
		return true, nil
	}
}

// checkFailed checks what a failed commit must leave: an error that names
// the state file and what failed and wraps the cause, the state and (when
// c.prev is set) its previous version byte for byte as they were, the state
// readable, no temporary file, and, once clear has removed the fault, an
// update that keeps every entry.
func (c *committed) checkFailed(t *testing.T, err error, what string, cause error, clear func()) {
	t.Helper()
	if err == nil {
		t.Fatal("the commit succeeded despite the fault")
	}
	if !errors.Is(err, cause) {
		t.Errorf("err = %v, want it to wrap %v", err, cause)
	}
	if !strings.Contains(err.Error(), c.s.Path()) || !strings.Contains(err.Error(), what) {
		t.Errorf("error %q does not name the state file and %q", err, what)
	}
	if got := readBytes(t, c.s.Path()); !bytes.Equal(got, c.cur) {
		t.Errorf("the state file changed in a failed commit:\n%s\nwant\n%s", got, c.cur)
	}
	if c.prev != nil {
		if got := readBytes(t, c.s.Path()+state.PrevSuffix); !bytes.Equal(got, c.prev) {
			t.Errorf("the previous version changed in a failed commit:\n%s\nwant\n%s", got, c.prev)
		}
	}
	matches, gerr := filepath.Glob(filepath.Join(c.dir, "."+state.StateFile+"*"))
	if gerr != nil {
		t.Fatal(gerr)
	}
	var temps []string // files: a directory squatting a name is the fault
	for _, m := range matches {
		if fi, err := os.Lstat(m); err == nil && fi.Mode().IsRegular() {
			temps = append(temps, m)
		}
	}
	if len(temps) != 0 {
		t.Errorf("temporary files left by the failed commit: %v", temps)
	}
	ctx := context.Background()
	st, verr := c.s.View(ctx)
	if verr != nil {
		t.Fatalf("state after a failed commit: %v", verr)
	}
	if n := len(st.Sorted()); n != c.wantBefore {
		t.Errorf("%d entries after a failed commit, want the %d before it", n, c.wantBefore)
	}
	clear()
	if err := c.s.Update(ctx, bulk(10)); err != nil {
		t.Fatalf("update once the fault is gone: %v", err)
	}
	st, verr = c.s.View(ctx)
	if verr != nil {
		t.Fatal(verr)
	}
	for i := range 12 {
		if st.Get(bundleKey(i)) == nil {
			t.Errorf("entry %d lost", i)
		}
	}
}

// A write of the temporary file that fails (here past the file size limit,
// EFBIG, as a full disk fails with ENOSPC) fails the commit before the
// commit point. The limit is a whole process's, and the test binary's own
// log (testlog.txt) is written meanwhile, so the commit runs in a child
// process (role "write-past-limit") and only that child has the limit.
func TestCommitWriteError(t *testing.T) {
	c := newCommitted(t)
	limit := len(c.cur) + 512
	cmd := child("write-past-limit", "DT_DIR="+c.dir, "DT_LIMIT="+strconv.Itoa(limit))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v (output %q)", err, out)
	}
	var res struct {
		Err   string
		EFBIG bool
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("child output %q: %v", out, err)
	}
	var got error
	switch {
	case res.Err == "":
	case res.EFBIG:
		got = &childError{res.Err, syscall.EFBIG}
	default:
		got = errors.New(res.Err)
	}
	c.checkFailed(t, got, "writing", syscall.EFBIG, func() {})
}

// A write of the manifest that fails after every shard file of the commit
// was written (the shard files fit under the file size limit, the manifest
// that names them all does not) fails the commit before the commit point:
// the state and its previous version stay as they were, readable, and the
// shard files the failed commit wrote are removed. The entries added are
// spread over many shards of a few entries each, so that the manifest,
// one line per shard, is far larger than any shard file; the sizes are
// measured on a copy that commits the same update without a limit.
func TestCommitManifestWriteError(t *testing.T) {
	const n = 400
	scratch := newCommitted(t)
	if err := scratch.s.Update(context.Background(), bulk(n)); err != nil {
		t.Fatal(err)
	}
	manifest := len(readBytes(t, scratch.s.Path()))
	shards, err := os.ReadDir(filepath.Join(scratch.dir, state.ShardDir))
	if err != nil {
		t.Fatal(err)
	}
	largest := 0
	for _, d := range shards {
		largest = max(largest, len(readBytes(t, filepath.Join(scratch.dir, state.ShardDir, d.Name()))))
	}
	if len(shards) < 100 || 2*largest >= manifest {
		t.Fatalf("setup: %d shard files, the largest %d bytes, a manifest of %d: no limit lets the shards through and stops the manifest", len(shards), largest, manifest)
	}
	limit := (largest + manifest) / 2

	c := newCommitted(t)
	cmd := child("write-past-limit", "DT_DIR="+c.dir, "DT_LIMIT="+strconv.Itoa(limit), "DT_BULK="+strconv.Itoa(n))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v (output %q)", err, out)
	}
	var res struct {
		Err   string
		EFBIG bool
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("child output %q: %v", out, err)
	}
	var got error
	switch {
	case res.Err == "":
	case res.EFBIG:
		got = &childError{res.Err, syscall.EFBIG}
	default:
		got = errors.New(res.Err)
	}
	if got != nil && strings.Contains(got.Error(), "shard") {
		t.Fatalf("the commit failed at a shard file, not at the manifest: %v", got)
	}
	if unnamed, err := state.UnnamedShards(c.dir); err != nil || len(unnamed) != 0 {
		t.Errorf("shard files of the failed commit left behind: %v (%v)", unnamed, err)
	}
	c.checkFailed(t, got, ": writing: ", syscall.EFBIG, func() {})
}

// childError is an error reported by a child process, with the cause the
// child found it to wrap.
type childError struct {
	msg   string
	cause error
}

func (e *childError) Error() string { return e.msg }
func (e *childError) Unwrap() error { return e.cause }

// writePastLimit opens the store in DT_DIR, limits the size of the files
// it may write to DT_LIMIT bytes, makes an update far larger than that, and
// prints its error as JSON. Go ignores the SIGXFSZ that comes with EFBIG.
func writePastLimit() int {
	s, err := state.Open(os.Getenv("DT_DIR"), state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	lim := syscall.Rlimit{Cur: uint64(envInt("DT_LIMIT", 0)), Max: old.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	res := struct {
		Err   string
		EFBIG bool
	}{}
	if err := s.Update(context.Background(), bulk(envInt("DT_BULK", 200))); err != nil {
		res.Err, res.EFBIG = err.Error(), errors.Is(err, syscall.EFBIG)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	return 0
}

// Keeping the previous version fails at its link (a directory squats its
// temporary name, on the retry too) or at its rename (a directory squats
// its name): the commit fails before the commit point.
func TestCommitKeepPrevError(t *testing.T) {
	for _, tc := range []struct {
		name string
		link bool  // squat the temporary names, else state.json.prev
		want error // what the failure wraps
	}{
		{"link", true, fs.ErrExist},
		{"rename", false, syscall.EISDIR}, // rename(2) of a file over a directory
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCommitted(t)
			var squats []string
			squat := func(p string) {
				// Not empty, so that neither a remove nor a rename over
				// it clears it.
				if err := os.MkdirAll(filepath.Join(p, "x"), 0o755); err != nil {
					t.Error(err)
				}
				squats = append(squats, p)
			}
			if tc.link {
				state.SetPrevTempHook(t, squat)
			} else {
				// The squatter takes the previous version's place: only
				// the state itself can be compared.
				if err := os.Remove(c.s.Path() + state.PrevSuffix); err != nil {
					t.Fatal(err)
				}
				c.prev = nil
				squat(c.s.Path() + state.PrevSuffix)
			}
			err := c.s.Update(context.Background(), bulk(1))
			if tc.link && len(squats) != 2 {
				t.Errorf("%d temporary names tried, want 2: %q", len(squats), squats)
			}
			c.checkFailed(t, err, "keeping the previous version", tc.want, func() {
				state.SetPrevTempHook(t, nil)
				for _, p := range squats {
					if err := os.RemoveAll(p); err != nil {
						t.Fatal(err)
					}
				}
			})
		})
	}
}

// A temporary name already taken (litter of a killed commit under the same
// random number) costs one more try, not the commit.
func TestCommitKeepPrevNameTaken(t *testing.T) {
	c := newCommitted(t)
	var tried []string
	state.SetPrevTempHook(t, func(p string) {
		if len(tried) == 0 {
			if err := os.WriteFile(p, []byte("litter"), 0o644); err != nil {
				t.Error(err)
			}
		}
		tried = append(tried, p)
	})
	if err := c.s.Update(context.Background(), bulk(1)); err != nil {
		t.Fatalf("commit with its first temporary name taken: %v", err)
	}
	if len(tried) != 2 || tried[0] == tried[1] {
		t.Fatalf("temporary names tried: %q, want two different ones", tried)
	}
	if got := readBytes(t, c.s.Path()+state.PrevSuffix); !bytes.Equal(got, c.cur) {
		t.Errorf("state.json.prev after the commit:\n%s\nwant the state before it:\n%s", got, c.cur)
	}
	if got := readBytes(t, tried[0]); string(got) != "litter" {
		t.Errorf("the file under the taken name was changed: %q", got)
	}
}

// After a commit that failed past keeping the previous version,
// state.json.prev is a link to the state file itself, and the next
// commit's rename of its link over it does nothing (rename(2) of two links
// to one file): the previous version is still right, and the link left
// behind is litter that a later holder deletes.
func TestCommitKeepPrevOverItself(t *testing.T) {
	c := newCommitted(t)
	prev := c.s.Path() + state.PrevSuffix
	if err := os.Remove(prev); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(c.s.Path(), prev); err != nil {
		t.Fatal(err)
	}
	if err := c.s.Update(context.Background(), bulk(1)); err != nil {
		t.Fatal(err)
	}
	if got := readBytes(t, prev); !bytes.Equal(got, c.cur) {
		t.Errorf("state.json.prev is not the state before the commit:\n%s\nwant\n%s", got, c.cur)
	}
	left, err := filepath.Glob(filepath.Join(c.dir, "."+state.StateFile+state.PrevSuffix+"*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range left {
		a, errA := os.Stat(l)
		b, errB := os.Stat(prev)
		if errA != nil || errB != nil || !os.SameFile(a, b) {
			t.Fatalf("%s is not a link to state.json.prev (%v, %v)", l, errA, errB)
		}
		old := time.Now().Add(-time.Hour)
		if err := os.Chtimes(l, old, old); err != nil {
			t.Fatal(err)
		}
	}
	// A later process's first whole update collects it.
	nothing := func(*state.State) (bool, error) { return false, nil }
	if err := openStore(t, c.dir).Update(context.Background(), nothing); err != nil {
		t.Fatal(err)
	}
	for _, l := range left {
		if _, err := os.Lstat(l); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s after a later holder's update: %v, want it deleted", filepath.Base(l), err)
		}
	}
}

// leaseHost opens dir's store as host name would, with a lease of 300 ms.
// No combining: another store in this process would hand its commit to
// the holder, which the tests stall.
func leaseHost(t *testing.T, dir, name string) *state.Store {
	t.Helper()
	procs := &fakeProcs{self: state.Process{Host: name, BootID: "boot-" + name, PIDNS: "ns-" + name, PID: 1, StartTime: 1}}
	s, err := state.Open(dir, state.Options{NoCombine: true, Lock: state.LockOptions{Lease: 300 * time.Millisecond, Processes: procs, Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A holder that stalls past its lease at a step of its commit before the
// last lock check, while the holder that breaks its lock commits twice,
// must find its lock lost before it replaces the state: after flushing
// its manifest (a flush on a slow file server can take longer than the
// lease), after linking the state file for state.json.prev, or after
// renaming that link. It must leave state.json.prev as the new holder's
// previous version (one that parses, with its shards), not roll it back to
// the manifest it linked.
func TestCommitStalledPastLease(t *testing.T) {
	for _, tc := range []struct {
		name string
		at   state.CommitStep
		// first: a's stalled commit is the root's first, with no
		// state.json to keep as .prev, so only the last check fences it.
		first bool
	}{
		{"flushed", state.StepFlushed, false},
		{"prev-linked", state.StepPrevLinked, false},
		{"prev-renamed", state.StepPrevRenamed, false},
		{"first-flushed", state.StepFlushed, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			a, b := leaseHost(t, dir, "a"), leaseHost(t, dir, "b")
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if !tc.first {
				if err := a.Update(ctx, put(0, 1)); err != nil {
					t.Fatal(err)
				}
			}
			var fired atomic.Bool
			var errB error
			state.SetCommitStepHook(t, func(step state.CommitStep) {
				if step != tc.at || fired.Swap(true) {
					return // other steps, and b's own commits below
				}
				// a is in its commit; b waits out a's lease, breaks its
				// lock and commits twice.
				if errB = b.Update(ctx, put(1, 1)); errB == nil {
					errB = b.Update(ctx, put(2, 1))
				}
			})
			err := a.Update(ctx, put(3, 1))
			if !fired.Load() {
				t.Fatal("the commit never reached the step")
			}
			if errB != nil {
				t.Fatalf("host b: %v", errB)
			}
			if !errors.Is(err, state.ErrLockLost) {
				t.Fatalf("host a after its stall: %v, want ErrLockLost", err)
			}
			has := func(st *state.State) string {
				return fmt.Sprint([]bool{st.Get(bundleKey(0)) != nil, st.Get(bundleKey(1)) != nil, st.Get(bundleKey(2)) != nil, st.Get(bundleKey(3)) != nil})
			}
			cur, err := state.DecodeFile(dir, state.StateFile)
			if err != nil {
				t.Fatalf("state.json after the stalled holder: %v", err)
			}
			had0 := fmt.Sprint(!tc.first)
			if got, want := has(cur), "["+had0+" true true false]"; got != want {
				t.Errorf("entries 0-3 in state.json: %s; want b's last commit, %s", got, want)
			}
			prev, err := state.DecodeFile(dir, state.StateFile+state.PrevSuffix)
			if err != nil {
				t.Fatalf("state.json.prev after the stalled holder: %v", err)
			}
			if got, want := has(prev), "["+had0+" true false false]"; got != want {
				t.Errorf("entries 0-3 in state.json.prev: %s; want b's previous version, %s", got, want)
			}
			// The stalled holder leaves none of its temporary files. Once
			// its link was renamed to state.json.prev, b's first commit
			// renames its own link over another to the same file, which
			// does nothing and leaves litter for a later holder.
			links, _ := filepath.Glob(filepath.Join(dir, "."+state.StateFile+state.PrevSuffix+"*"))
			temps, _ := filepath.Glob(filepath.Join(dir, "."+state.StateFile+"[0-9]*"))
			if want := map[bool]int{true: 1}[tc.at == state.StepPrevRenamed]; len(links) != want || len(temps) != 0 {
				t.Errorf("temporary files left: %v %v; want %d links and no manifest", links, temps, want)
			}
		})
	}
}

// TestLockLostByAHoldThatWroteNothing: a hold that stalled past the lease
// (SIGSTOP, a paused VM) while another host broke its lock and committed,
// and that then changes nothing, returns what it read without an error:
// it wrote nothing, and its read was of a committed state (a gc with
// nothing to evict exited 1, "lock lost"). One that changes something is
// still fenced (TestCommitStalledPastLease).
func TestLockLostByAHoldThatWroteNothing(t *testing.T) {
	dir := t.TempDir()
	a, b := leaseHost(t, dir, "a"), leaseHost(t, dir, "b")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.Update(ctx, put(0, 1)); err != nil {
		t.Fatal(err)
	}
	var errB error
	err := a.Update(ctx, func(st *state.State) (bool, error) {
		// a stalls here, holding the lock; b waits out its lease, breaks
		// it and commits.
		errB = b.Update(ctx, put(1, 1))
		return false, nil
	})
	if errB != nil {
		t.Fatalf("host b: %v", errB)
	}
	if err != nil {
		t.Fatalf("a hold that wrote nothing, its lock broken meanwhile: %v, want nil", err)
	}
	st, err := a.View(ctx)
	if err != nil || st.Get(bundleKey(1)) == nil {
		t.Fatalf("b's commit: %v", err)
	}
}
