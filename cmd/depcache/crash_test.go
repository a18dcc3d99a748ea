package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/state/rigtest/slowfs"
	"golang.org/x/sys/unix"
)

// TestCrashTrials runs random workloads (get, release, gc) from several
// processes on one root and SIGKILLs one of them at a random moment, trial
// after trial; after each trial it checks the invariants:
//   - the state parses;
//   - every READY bundle's content verifies against its recorded digest;
//   - no named dependent that was registered and not released lost its entry;
//   - after start-up reconciliation, no content exists without an entry and
//     every READY entry's content is in place.
//
// 25 trials by default; DEPCACHE_CRASH_TRIALS=1000 for the full run. The
// random choices of every crash test come from one seed, printed when the
// test fails; DEPCACHE_SEED=N replays them (the moment a SIGKILL lands in
// the victim's work still depends on the scheduler).
func TestCrashTrials(t *testing.T) {
	seed := trialSeed(t)
	trials := 25
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = n
	}
	root := t.TempDir()
	runTrials(t, seed, trials, []string{root}, func(_ int, argv ...string) *exec.Cmd { return exec.Command(argv[0], argv[1:]...) })
}

// trialSeed returns the seed of t's random choices: $DEPCACHE_SEED when
// set, else a new one. When t fails, it says how to replay them.
func trialSeed(t *testing.T) uint64 {
	t.Helper()
	var seed uint64
	if v := os.Getenv("DEPCACHE_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("DEPCACHE_SEED=%q: %v; want an unsigned integer, as a failed test prints it", v, err)
		}
		seed = n
	} else {
		seed = rand.Uint64()
	}
	t.Logf("seed %d", seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s failed with seed %d: DEPCACHE_SEED=%d go test -run '^%s$' replays its random choices", t.Name(), seed, seed, t.Name())
		}
	})
	return seed
}

// TestCrashTrialsTwoHosts: the same workload from 2 fake hosts, each on its
// own sshfs mount of one export with the default (20 s) attribute cache;
// every operation and its result are recorded, and the checker also reads
// the history of publishes from the processes' logs: at most one publish
// per entry and generation, across both hosts.
func TestCrashTrialsTwoHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	seed := trialSeed(t)
	trials := 6 // each can wait out a lock lease or download timeout
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = max(1, n/10)
	}
	sub := fmt.Sprintf("e2e-history-%d", time.Now().UnixNano())
	// Removed through the export itself: a mount's directory cache may list
	// names another mount removed, and RemoveAll then finds them gone.
	export := rigtest.Env(t, "SHAREDFS_EXPORT")
	t.Cleanup(func() {
		if err := os.RemoveAll(filepath.Join(export, sub)); err != nil {
			t.Errorf("removing the test's root: %v", err)
		}
	})
	if err := os.MkdirAll(filepath.Join(mnt1, sub), 0o755); err != nil {
		t.Fatal(err)
	}
	runTrials(t, seed, trials, []string{filepath.Join(mnt1, sub), filepath.Join(mnt2, sub)}, func(host int, argv ...string) *exec.Cmd {
		return rigtest.FakeHost(t, fmt.Sprintf("host-%c", 'a'+host), 0, argv...)
	})
}

// TestCrashTrialsSlowFS: the same workload from 2 fake hosts, each on its
// own mount of the slow filesystem rig (a FUSE loopback over one directory),
// with new delays before each trial: up to 4 ms per operation and 40 ms per
// fsync. SIGKILLs land inside slow commits, publishes and deletes, and an
// operation a killed process had sent still completes in the server after
// its death, as it does on NFS.
func TestCrashTrialsSlowFS(t *testing.T) {
	shared := t.TempDir()
	mounts := []*slowfs.FS{slowfs.Mount(t, shared), slowfs.Mount(t, shared)}
	seed := trialSeed(t)
	trials := 8
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = max(1, n/10)
	}
	rng := rand.New(rand.NewPCG(seed, 4))
	runTrialsWith(t, seed, trials, []string{mounts[0].Mnt, mounts[1].Mnt}, func(host int, argv ...string) *exec.Cmd {
		return rigtest.FakeHost(t, fmt.Sprintf("host-%c", 'a'+host), 0, argv...)
	}, func() {
		for _, m := range mounts {
			m.SetDelay(time.Duration(rng.IntN(4000))*time.Microsecond, time.Duration(rng.IntN(40))*time.Millisecond)
		}
	})
	t.Logf("operations through the slow mounts: %d renames, %d fsyncs",
		mounts[0].Count(slowfs.Rename)+mounts[1].Count(slowfs.Rename), mounts[0].Count(slowfs.Fsync)+mounts[1].Count(slowfs.Fsync))
}

// runTrials runs the trials, with the random choices of seed: each process
// runs on one of roots (one per host) through start.
func runTrials(t *testing.T, seed uint64, trials int, roots []string, start func(host int, argv ...string) *exec.Cmd) {
	t.Helper()
	runTrialsWith(t, seed, trials, roots, start, nil)
}

// The phases of a process that a SIGKILL can land in, told apart by what
// the victim had logged; the trials log how many kills landed in each (a
// get killed before it claimed may still have been inside its
// registration's commit, or not yet running depcache at all).
const (
	phaseGetUnclaimed = "get before claiming a download"
	phaseGetOwning    = "get owning a download"
	phaseGetPublished = "get after publishing"
	phaseRelease      = "release"
	phaseGC           = "gc"
)

// killPhase says in which phase a process running op, which logged logs,
// was killed.
func killPhase(op, logs string) string {
	switch {
	case op == "release":
		return phaseRelease
	case op == "gc":
		return phaseGC
	case strings.Contains(logs, `"msg":"published"`):
		return phaseGetPublished
	case strings.Contains(logs, `"msg":"claimed download"`):
		return phaseGetOwning
	default:
		return phaseGetUnclaimed
	}
}

// runTrialsWith is runTrials with a hook run before each trial.
func runTrialsWith(t *testing.T, seed uint64, trials int, roots []string, start func(host int, argv ...string) *exec.Cmd, before func(), beforeCheck ...func()) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 2))
	srcDir := t.TempDir()
	var sources []string
	for i := range 4 {
		p := filepath.Join(srcDir, fmt.Sprintf("b%d.tar.gz", i))
		writeBundle(t, p, i, 20<<10*(i+1))
		sources = append(sources, "file://"+p)
	}
	slow := randomBody(2 << 20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(slow)))
		for off := 0; off < len(slow); off += 256 << 10 {
			if _, err := w.Write(slow[off:min(off+256<<10, len(slow))]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			time.Sleep(15 * time.Millisecond) // a slow server, so that kills land mid-transfer
		}
	}))
	defer srv.Close()
	sources = append(sources, srv.URL+"/slow.bin")

	root := roots[0]
	held := map[string]map[string]bool{} // source -> named dependents surely registered, not released
	published := map[string]int{}        // "key gen" -> publishes seen in the logs
	var history []string                 // every operation, its result and its log
	kills, ops, gotten := 0, 0, 0
	phases := map[string]int{} // phase -> SIGKILLs that landed in it
	// Until a kill lands too, up to three times the trials: on a fast
	// machine a full disk can end every victim before its kill, and
	// trials that killed nothing checked only runs that ended normally.
	trial := 0
	for ; trial < trials || (kills == 0 && trial < 3*trials); trial++ {
		if before != nil {
			before()
		}
		type job struct {
			cmd           *exec.Cmd
			op, src, name string
			logs          *bytes.Buffer
		}
		var jobs []job
		for range 3 {
			src := sources[rng.IntN(len(sources))]
			name := fmt.Sprintf("d%d", rng.IntN(6))
			var args []string
			op := []string{"get", "get", "release", "gc"}[rng.IntN(4)]
			switch op {
			case "get":
				args = []string{"get", "--dependent", name, "--retries", "0", "--download-timeout", "3s", "--progress-interval", "500ms", src}
			case "release":
				args = []string{"release", "--dependent", name, src}
			case "gc":
				args = []string{"gc", "--max-size", strconv.Itoa(rng.IntN(4 << 20)), "--min-age", "0s", "--set-policy"}
			}
			host := rng.IntN(len(roots))
			cmd := start(host, append([]string{bin, "--root", roots[host], "--lock-lease", "3s", "--log-level", "info", "--log-format", "json"}, args...)...)
			var logs bytes.Buffer
			cmd.Stderr = &logs
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			jobs = append(jobs, job{cmd, op, src, name, &logs})
			ops++
		}
		victim := rng.IntN(len(jobs))
		for i, j := range jobs { // prefer a get: it runs longest, through claims and publishes
			if j.op == "get" && rng.IntN(2) == 0 {
				victim = i
			}
		}
		killErr := make(chan error, 1)
		timer := time.AfterFunc(time.Duration(2+rng.IntN(40))*time.Millisecond, func() { killErr <- jobs[victim].cmd.Process.Kill() })
		var wg sync.WaitGroup
		results := make([]error, len(jobs))
		for i, j := range jobs {
			wg.Add(1)
			go func() { defer wg.Done(); results[i] = j.cmd.Wait() }()
		}
		wg.Wait()
		if !timer.Stop() {
			// It fired: the victim was killed, or had already exited.
			if err := <-killErr; err != nil && !errors.Is(err, os.ErrProcessDone) {
				t.Fatalf("trial %d: SIGKILL of the %s: %v", trial, jobs[victim].op, err)
			}
		}
		for _, j := range jobs {
			for _, line := range strings.Split(j.logs.String(), "\n") {
				var rec struct {
					Msg string `json:"msg"`
					Key string `json:"key"`
					Gen uint64 `json:"gen"`
				}
				if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "published" {
					k := fmt.Sprintf("%s gen %d", rec.Key, rec.Gen)
					if published[k]++; published[k] > 1 {
						t.Fatalf("trial %d: %s published twice", trial, k)
					}
				}
			}
		}
		// Two jobs of one trial on the same dependent ran in an unknown
		// order: what they leave is unknown to the model.
		touched := map[string]int{}
		for _, j := range jobs {
			if j.op != "gc" {
				touched[j.src+" "+j.name]++
			}
		}
		for i, j := range jobs {
			ambiguous := touched[j.src+" "+j.name] > 1
			history = append(history, fmt.Sprintf("trial %d: %s %s %s: %v %s", trial, j.op, j.name, j.src, results[i], strings.ReplaceAll(strings.TrimSpace(j.logs.String()), "\n", "\n\t")))
			if os.Getenv("DT_VERBOSE") != "" {
				t.Logf("trial %d: %s %s %s: %v\n%s", trial, j.op, j.name, j.src, results[i], j.logs.String())
			}
			ws, _ := j.cmd.ProcessState.Sys().(syscall.WaitStatus)
			killed := ws.Signaled() && ws.Signal() == syscall.SIGKILL
			if killed {
				if i != victim {
					t.Fatalf("trial %d: the %s %s %s, not the victim, died of SIGKILL:\n%s", trial, j.op, j.name, j.src, j.logs.String())
				}
				kills++
				phases[killPhase(j.op, j.logs.String())]++
			} else if results[i] != nil && !strings.Contains(j.logs.String(), "depcache: ") {
				t.Fatalf("trial %d: %s failed (%v) without saying why:\n%s", trial, j.op, results[i], j.logs.String())
			}
			if held[j.src] == nil {
				held[j.src] = map[string]bool{}
			}
			switch {
			case ambiguous:
				delete(held[j.src], j.name)
			case j.op == "get" && results[i] == nil:
				held[j.src][j.name] = true
				gotten++
			case j.op == "release" && (results[i] == nil || killed):
				delete(held[j.src], j.name) // released, or maybe released
			case j.op == "get" && killed:
				// maybe registered: no claim either way
			}
		}
		for _, f := range beforeCheck {
			f() // room for the checks' own commands (gc, doctor) to write
		}
		if !checkCrashInvariants(t, trial, root, held) {
			// Say what happened to the source in the last trials.
			for _, h := range history[max(0, len(history)-60):] {
				t.Log(h)
			}
			t.FailNow()
		}
	}
	t.Logf("%d trials, %d operations, %d SIGKILLs (%v), %d publishes, 0 invariant violations", trial, ops, kills, phases, len(published))
	// Trials whose kills all missed checked only runs that ended normally,
	// and a history with no publish checked no "at most one publish".
	if kills == 0 {
		t.Errorf("no SIGKILL landed in %d trials: every victim had exited before it", trial)
	}
	if gotten > 0 && len(published) == 0 {
		t.Errorf("%d gets succeeded but no process logged a publish: the history check read nothing", gotten)
	}
}

// checkCrashInvariants checks the invariants after a trial; when one does
// not hold it reports it and returns false.
func checkCrashInvariants(t *testing.T, trial int, root string, held map[string]map[string]bool) bool {
	t.Helper()
	st := readState(t, root) // fails the test if it does not parse
	for src, names := range held {
		for name := range names {
			found := false
			for _, e := range st.Entries {
				if e.Key.Source == src {
					if _, ok := e.Dependents[name]; ok {
						found = true
					}
				}
			}
			if !found {
				t.Errorf("trial %d: dependent %s of %s was registered and never released, but is gone", trial, name, src)
				return false
			}
		}
	}
	ready := 0
	for _, e := range st.Entries {
		if e.Stage == state.Ready && e.Key.Kind == state.Bundle {
			ready++
		}
	}
	out, err := exec.Command(bin, "--root", root, "verify", "--json").Output()
	if err != nil {
		t.Errorf("trial %d: verify: %v: %s", trial, err, out)
		return false
	}
	var res []struct {
		OK     bool   `json:"ok"`
		Detail string `json:"detail"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Errorf("trial %d: verify --json does not parse: %v: %s", trial, err, out)
		return false
	}
	if len(res) != ready {
		t.Errorf("trial %d: verify checked %d entries, the state has %d READY bundles: %s", trial, len(res), ready, out)
		return false
	}
	for _, r := range res {
		if !r.OK {
			t.Errorf("trial %d: READY content does not verify: %s", trial, r.Detail)
			return false
		}
	}
	// Start-up reconciliation (a gc runs it; policy, which only looks, no
	// longer does; the gc's min-age keeps it from evicting anything), then
	// doctor must find no orphans and no missing content.
	if out, err := exec.Command(bin, "--root", root, "gc", "--min-age", "1000h").CombinedOutput(); err != nil {
		t.Errorf("trial %d: gc: %v: %s", trial, err, out)
		return false
	}
	// doctor exits 1 when a check failed (not with --json today); only the
	// checks below matter here, so only another end is an error.
	out, err = exec.Command(bin, "--root", root, "doctor", "--json").Output()
	if ee := (*exec.ExitError)(nil); err != nil && (!errors.As(err, &ee) || ee.ExitCode() != 1) {
		t.Errorf("trial %d: doctor --json: %v: %s", trial, err, out)
		return false
	}
	var checks []struct{ Name, Status, Detail string }
	if err := json.Unmarshal(out, &checks); err != nil {
		t.Errorf("trial %d: doctor --json does not parse: %v: %s", trial, err, out)
		return false
	}
	seen := map[string]bool{}
	for _, c := range checks {
		seen[c.Name] = true
		if (c.Name == "orphans" || c.Name == "content" || c.Name == "state" || c.Name == "state shards") && c.Status != "ok" {
			t.Errorf("trial %d: doctor %s: %s: %s", trial, c.Name, c.Status, c.Detail)
			return false
		}
		// A trial that committed anything left format 2, every shard its
		// manifest names there and parsing.
		_, serr := os.Stat(filepath.Join(root, state.StateFile))
		if c.Name == "state format" && !strings.HasPrefix(c.Detail, fmt.Sprintf("version %d:", state.FormatVersion)) && !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("trial %d: doctor state format: %s", trial, c.Detail)
			return false
		}
	}
	need := []string{"orphans", "content", "state", "state format"}
	if _, err := os.Stat(filepath.Join(root, state.StateFile)); err == nil {
		need = append(need, "state shards")
	}
	for _, name := range need {
		if !seen[name] {
			t.Errorf("trial %d: doctor --json has no %q check: %s", trial, name, out)
			return false
		}
	}
	return true
}

func writeBundle(t *testing.T, path string, i, size int) {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	data := randomBody(size)
	data[0] = byte(i)
	if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("b%d/data", i), Mode: 0o644, Size: int64(len(data))}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestCrashTrialsDiskFull: the same trials with the root on the disk-full
// rig, filled before each trial so that only 0–256 KiB are left: the disk
// fills at random points (download, unpack, state write, metadata). A
// trial starts only once statfs shows that little free: less than the slow
// download's 2 MiB, and at most a few pages above the chosen amount.
// Besides the crash invariants, every failure must say why.
func TestCrashTrialsDiskFull(t *testing.T) {
	dir := rigtest.DiskFull(t)
	seed := trialSeed(t)
	root, err := os.MkdirTemp(dir, "trials-")
	if err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler-"+filepath.Base(root))
	t.Cleanup(func() {
		if err := os.RemoveAll(root); err != nil {
			t.Errorf("removing the test's root: %v", err)
		}
		if err := os.Remove(filler); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("removing the filler: %v", err)
		}
	})
	trials := 12
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = max(1, n/10)
	}
	const maxKeep = 256 << 10 // the most a trial leaves free
	// slack: statfs counts whole blocks (a tmpfs page), and the filler's
	// last block may be partly empty.
	const slack = 64 << 10
	rng := rand.New(rand.NewPCG(seed, 3))
	runTrialsWith(t, seed, trials, []string{root}, func(_ int, argv ...string) *exec.Cmd { return exec.Command(argv[0], argv[1:]...) },
		func() {
			if err := os.Remove(filler); err != nil && !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("removing the filler: %v", err)
			}
			keep := int64(rng.IntN(maxKeep))
			if free := rigtest.FreeBytes(t, dir); free > keep {
				fill(t, filler, free-keep)
			}
			if free := rigtest.FreeBytes(t, dir); free > keep+slack || free >= 2<<20 {
				t.Fatalf("the disk is not full before the trial: %d bytes free after the filler, want at most %d (+%d slack) and below the 2 MiB of the slow download", free, keep, slack)
			}
		},
		// The invariants are checked with room on the disk: gc and doctor
		// write (a lock, a commit), and on a full disk they fail, as they
		// should, with a clear ENOSPC error.
		func() {
			if err := os.Remove(filler); err != nil && !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("removing the filler: %v", err)
			}
		})
}

// fill writes n bytes into a new file at path. A write that finds the
// disk already full (another user of the rig took space meanwhile) is what
// the filler is for: it stops there.
func fill(t *testing.T, path string, n int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("creating the filler: %v", err)
	}
	_, err = f.Write(make([]byte, n))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil && !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("writing %d bytes of filler: %v", n, err)
	}
}
