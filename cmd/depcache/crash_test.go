package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

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
// 25 trials by default; DEPCACHE_CRASH_TRIALS=1000 for the full run.
func TestCrashTrials(t *testing.T) {
	trials := 25
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = n
	}
	root := t.TempDir()
	runTrials(t, trials, []string{root}, func(_ int, argv ...string) *exec.Cmd { return exec.Command(argv[0], argv[1:]...) })
}

// TestCrashTrialsTwoHosts: the same workload from 2 fake hosts, each on its
// own sshfs mount of one export with the default (20 s) attribute cache;
// every operation and its result are recorded, and the checker also reads
// the history of publishes from the processes' logs: at most one publish
// per entry and generation, across both hosts.
func TestCrashTrialsTwoHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	trials := 6 // each can wait out a lock lease or download timeout
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = max(1, n/10)
	}
	sub := fmt.Sprintf("e2e-history-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	os.MkdirAll(filepath.Join(mnt1, sub), 0o755)
	runTrials(t, trials, []string{filepath.Join(mnt1, sub), filepath.Join(mnt2, sub)}, func(host int, argv ...string) *exec.Cmd {
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
	trials := 8
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = max(1, n/10)
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 4))
	runTrialsWith(t, trials, []string{mounts[0].Mnt, mounts[1].Mnt}, func(host int, argv ...string) *exec.Cmd {
		return rigtest.FakeHost(t, fmt.Sprintf("host-%c", 'a'+host), 0, argv...)
	}, func() {
		for _, m := range mounts {
			m.SetDelay(time.Duration(rng.IntN(4000))*time.Microsecond, time.Duration(rng.IntN(40))*time.Millisecond)
		}
	})
	t.Logf("operations through the slow mounts: %d renames, %d fsyncs",
		mounts[0].Count(slowfs.Rename)+mounts[1].Count(slowfs.Rename), mounts[0].Count(slowfs.Fsync)+mounts[1].Count(slowfs.Fsync))
}

// runTrials runs the trials: each process runs on one of roots (one per
// host) through start.
func runTrials(t *testing.T, trials int, roots []string, start func(host int, argv ...string) *exec.Cmd) {
	t.Helper()
	runTrialsWith(t, trials, roots, start, nil)
}

// runTrialsWith is runTrials with a hook run before each trial.
func runTrialsWith(t *testing.T, trials int, roots []string, start func(host int, argv ...string) *exec.Cmd, before func()) {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
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
	kills, ops := 0, 0
	for trial := range trials {
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
		timer := time.AfterFunc(time.Duration(2+rng.IntN(40))*time.Millisecond, func() { jobs[victim].cmd.Process.Kill() })
		var wg sync.WaitGroup
		results := make([]error, len(jobs))
		for i, j := range jobs {
			wg.Add(1)
			go func() { defer wg.Done(); results[i] = j.cmd.Wait() }()
		}
		wg.Wait()
		timer.Stop()
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
			killed := j.cmd.ProcessState.String() == "signal: killed"
			if killed {
				kills++
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
			case j.op == "release" && (results[i] == nil || killed):
				delete(held[j.src], j.name) // released, or maybe released
			case j.op == "get" && killed:
				// maybe registered: no claim either way
			}
		}
		if !checkCrashInvariants(t, trial, root, held) {
			// Say what happened to the source in the last trials.
			for _, h := range history[max(0, len(history)-60):] {
				t.Log(h)
			}
			t.FailNow()
		}
	}
	t.Logf("%d trials, %d operations, %d SIGKILLs, %d publishes, 0 invariant violations", trials, ops, kills, len(published))
}

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
	out, err := exec.Command(bin, "--root", root, "verify", "--json").Output()
	if err != nil {
		t.Fatalf("trial %d: verify: %v: %s", trial, err, out)
	}
	var res []struct {
		OK     bool   `json:"ok"`
		Detail string `json:"detail"`
	}
	json.Unmarshal(out, &res)
	for _, r := range res {
		if !r.OK {
			t.Fatalf("trial %d: READY content does not verify: %s", trial, r.Detail)
		}
	}
	// Start-up reconciliation (policy runs it), then doctor must find no
	// orphans and no missing content.
	if out, err := exec.Command(bin, "--root", root, "policy").CombinedOutput(); err != nil {
		t.Fatalf("trial %d: policy: %v: %s", trial, err, out)
	}
	out, _ = exec.Command(bin, "--root", root, "doctor", "--json").Output()
	var checks []struct{ Name, Status, Detail string }
	if err := json.Unmarshal(out, &checks); err != nil {
		t.Fatalf("trial %d: doctor --json: %v: %s", trial, err, out)
	}
	for _, c := range checks {
		if (c.Name == "orphans" || c.Name == "content" || c.Name == "state") && c.Status != "ok" {
			t.Fatalf("trial %d: doctor %s: %s: %s", trial, c.Name, c.Status, c.Detail)
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
	tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("b%d/data", i), Mode: 0o644, Size: int64(len(data))})
	tw.Write(data)
	tw.Close()
	zw.Close()
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestCrashTrialsDiskFull: the same trials with the root on the disk-full
// rig, filled before each trial so that only 0–256 KiB are left: the disk
// fills at random points (download, unpack, state write, metadata).
// Besides the crash invariants, every failure must say why.
func TestCrashTrialsDiskFull(t *testing.T) {
	dir := rigtest.DiskFull(t)
	root, err := os.MkdirTemp(dir, "trials-")
	if err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler-"+filepath.Base(root))
	t.Cleanup(func() { os.RemoveAll(root); os.Remove(filler) })
	trials := 12
	if n, err := strconv.Atoi(os.Getenv("DEPCACHE_CRASH_TRIALS")); err == nil && n > 0 {
		trials = max(1, n/10)
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 3))
	runTrialsWith(t, trials, []string{root}, func(_ int, argv ...string) *exec.Cmd { return exec.Command(argv[0], argv[1:]...) },
		func() {
			os.Remove(filler)
			var st unix.Statfs_t
			if unix.Statfs(dir, &st) != nil {
				return
			}
			free := int64(st.Bavail) * int64(st.Bsize)
			keep := int64(rng.IntN(256 << 10))
			if free > keep {
				f, err := os.Create(filler)
				if err == nil {
					f.Write(make([]byte, free-keep))
					f.Close()
				}
			}
		})
}
