// Command depcache-bench measures depcache where workers feel it, each
// figure beside the physical limit measured in the same run:
//
//   - get+release ops/s and p50/p99 latency with N READY entries, from P
//     processes × G goroutines, against one durable commit of the same
//     bytes and a bare lock round trip;
//   - lock hold p50/p99 during those runs;
//   - cold fan-in: P processes get one cold bundle of S MB served on
//     loopback, wall time until all are READY and downloads counted at the
//     server, against one `curl -s URL | tar -xz`;
//   - fetch throughput of one large bundle against `curl | tar`;
//   - the soak (--run soak, not run by default; see soak.go): a serve and
//     --workers worker processes under churn for --duration, which fails
//     on a content mismatch, a failed get not caused by --faults, a false
//     warning or growth of serve's RSS, open files or goroutines.
//
// It prints a table and, with --json, one JSON object per line. Workers are
// this binary re-run with --worker.
package main

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/depcache/depcache/cmd/internal/gctune"
	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/google/renameio/v2"
	"github.com/sirupsen/logrus"
)

type options struct {
	root       string
	procs      int
	goroutines int
	entries    []int
	duration   time.Duration
	// warmup: each get+release worker runs this long before a window
	// that all of them share, and only operations that end within it
	// count (0: each worker counts from its own start, as before).
	warmup     time.Duration
	faninProcs int
	faninMB    int
	fetchMB    int
	jsonOut    bool
	run        map[string]bool
	soak       soakOptions
}

func main() {
	var o options
	var entries string
	var short bool
	worker := flag.String("worker", "", "internal: run as a worker (getrelease, get)")
	flag.StringVar(&o.root, "root", "", "directory to benchmark in (default: a temporary directory on local disk)")
	flag.IntVar(&o.procs, "procs", 8, "processes for get+release")
	flag.IntVar(&o.goroutines, "goroutines", 1, "goroutines per process for get+release")
	flag.StringVar(&entries, "entries", "100,1000,10000,100000", "numbers of READY entries to measure with")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "how long each get+release point runs")
	flag.DurationVar(&o.warmup, "warmup", 0, "get+release: how long the workers run before the measured --duration, which then is one window all of them share (0: each counts from its own start)")
	flag.IntVar(&o.faninProcs, "fanin-procs", 16, "processes in the cold fan-in")
	flag.IntVar(&o.faninMB, "fanin-mb", 200, "bundle size of the cold fan-in, MB")
	flag.IntVar(&o.fetchMB, "fetch-mb", 500, "bundle size of the fetch-throughput run, MB")
	flag.BoolVar(&o.jsonOut, "json", false, "also print one JSON line per result")
	run := flag.String("run", "getrelease,rss,fanin,fetch", "measurements to run, separated by commas")
	flag.BoolVar(&short, "short", false, "a few seconds in all, for CI: small sizes, short runs")
	flag.IntVar(&o.soak.workers, "workers", 4, "soak: worker processes")
	flag.BoolVar(&o.soak.faults, "faults", false, "soak: the source server sometimes stalls, resets the connection or answers 500")
	flag.StringVar(&o.soak.bin, "depcache", "", "soak: the depcache binary to run (default: built from this module)")
	flag.IntVar(&o.soak.sources, "sources", 40, "soak: number of sources (25-220 KB, a third tar.gz)")
	hostRoots := flag.String("host-roots", "", "soak, getrelease and fanin: the cache root as each host reaches it, separated by commas (e.g. one sshfs mount each); serve runs on, and getrelease seeds through, the first")
	flag.StringVar(&o.soak.state, "state", "", "soak, getrelease and fanin: the state store of serve and every command (soak) or of the seeding and every worker (getrelease, fanin), etcd://HOST:PORT[,HOST:PORT...]/PREFIX (each run adds a component of its own to PREFIX, and getrelease and fanin delete their own at the end); empty: the file store in the root")
	flag.StringVar(&o.soak.fakehost, "fakehost", "", "soak, getrelease and fanin: ../shared/rigs/fakehost.sh, to run worker i as fake host i modulo the number of --host-roots (as root)")
	flag.Parse()
	if *hostRoots != "" {
		o.soak.hostRoots = strings.Split(*hostRoots, ",")
	}
	durationGiven := false
	flag.Visit(func(f *flag.Flag) { durationGiven = durationGiven || f.Name == "duration" })
	if *worker != "" {
		os.Exit(runWorker(*worker, flag.Args()))
	}
	// The soak's duration: --duration when given, else 30 s with --short
	// and 10 minutes without.
	o.soak.duration = o.duration
	if !durationGiven {
		o.soak.duration = 10 * time.Minute
		if short {
			o.soak.duration = 30 * time.Second
		}
	}
	if short {
		entries, o.duration, o.procs, o.faninProcs, o.faninMB, o.fetchMB = "100,1000", 500*time.Millisecond, 4, 4, 8, 16
	}
	for _, s := range strings.Split(entries, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			fatalf("--entries %q: want positive numbers separated by commas", entries)
		}
		o.entries = append(o.entries, n)
	}
	if o.soak.workers < 1 || o.soak.sources < 1 {
		fatalf("--workers and --sources must be positive")
	}
	if o.procs < 1 || o.goroutines < 1 || o.faninProcs < 1 || o.faninMB < 1 || o.fetchMB < 1 || o.duration <= 0 || o.warmup < 0 {
		fatalf("--procs, --goroutines, --fanin-procs, --fanin-mb, --fetch-mb and --duration must be positive")
	}
	if o.root == "" {
		d, err := os.MkdirTemp("", "depcache-bench-")
		if err != nil {
			fatalf("%v", err)
		}
		defer os.RemoveAll(d)
		o.root, tmpRoot = d, d
	}
	o.run = map[string]bool{}
	for _, s := range strings.Split(*run, ",") {
		switch s = strings.TrimSpace(s); s {
		case "getrelease", "rss", "fanin", "fetch", "soak":
			o.run[s] = true
		default:
			fatalf("--run %q: unknown measurement %q (want getrelease, rss, fanin, fetch, soak)", *run, s)
		}
	}
	r := &report{json: o.jsonOut}
	if o.run["getrelease"] {
		for _, n := range o.entries {
			benchGetRelease(r, o, n)
		}
	}
	if o.run["rss"] && o.soak.state != "" {
		// The serve worker drives the file store of a root that
		// getrelease seeded; on etcd that root holds no state.
		fmt.Fprintln(os.Stderr, "depcache-bench: rss: skipped with --state (it measures the file store)")
	} else if o.run["rss"] {
		benchServeRSS(r, o, o.entries[len(o.entries)-1])
	}
	if o.run["fanin"] {
		benchFanIn(r, o)
	}
	if o.run["fetch"] {
		benchFetch(r, o)
	}
	var problems []string
	if o.run["soak"] {
		problems = runSoak(r, o, o.soak)
	}
	r.flush()
	if len(problems) > 0 {
		fmt.Fprintln(os.Stderr)
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "depcache-bench: soak:", p)
		}
		os.RemoveAll(tmpRoot)
		os.Exit(1)
	}
}

// tmpRoot is the temporary --root this run made, removed at the end.
var tmpRoot string

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "depcache-bench: "+format+"\n", args...)
	fatalMu.Lock()
	hooks := fatalHooks
	fatalHooks = nil
	fatalMu.Unlock()
	for i := len(hooks) - 1; i >= 0; i-- {
		hooks[i].run()
	}
	os.Exit(2)
}

// A cleanup that must run however a measurement ends: os.Exit in fatalf
// skips deferred calls (an etcd run would leave its prefix behind).
type fatalHook struct {
	once sync.Once
	f    func()
}

func (h *fatalHook) run() { h.once.Do(h.f) }

var (
	fatalMu    sync.Mutex
	fatalHooks []*fatalHook
)

// cleanupOnFatal registers f to run if fatalf ends the program, and
// returns the function that runs it otherwise (defer it): f runs once.
func cleanupOnFatal(f func()) func() {
	h := &fatalHook{f: f}
	fatalMu.Lock()
	fatalHooks = append(fatalHooks, h)
	fatalMu.Unlock()
	return func() {
		fatalMu.Lock()
		for i, x := range fatalHooks {
			if x == h {
				fatalHooks = append(fatalHooks[:i], fatalHooks[i+1:]...)
				break
			}
		}
		fatalMu.Unlock()
		h.run()
	}
}

// report collects results and prints them as a table (and JSON lines).
type report struct {
	json bool
	rows [][2]string
}

func (r *report) add(name string, fields map[string]any, human string) {
	r.rows = append(r.rows, [2]string{name, human})
	if r.json {
		fields["name"] = name
		b, _ := json.Marshal(fields)
		fmt.Println(string(b))
	}
	fmt.Fprintf(os.Stderr, "%-44s %s\n", name, human)
}

func (r *report) flush() {
	fmt.Println()
	for _, row := range r.rows {
		fmt.Printf("%-44s %s\n", row[0], row[1])
	}
}

func quietLog() *logrus.Logger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[min(len(d)-1, int(float64(len(d))*p))]
}

func benchKey(i int) state.Key {
	return state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://bench.invalid/bundle/%d.tar.gz", i)}
}

// seedRoot writes n READY entries.
func seedRoot(root string, n int) (*state.Store, error) {
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		return nil, err
	}
	now := time.Now()
	return s, s.Update(context.Background(), func(st *state.State) (bool, error) {
		for i := range n {
			k := benchKey(i)
			st.Put(&state.Entry{Key: k, Stage: state.Ready, Path: filepath.Join("entries", k.ID()+"-g1", "content"),
				SizeBytes: 1 << 20, Generation: 1, Created: now, LastUsed: now})
		}
		return true, nil
	})
}

// floorBytes is the size of the file whose durable commit is the floor of
// any design that makes each operation durable by itself (issue 14).
const floorBytes = 4096

func benchGetRelease(r *report, o options, n int) {
	// Through other mounts of the same share (--host-roots), the workers
	// take turns over the hosts; the root is seeded through the first.
	roots := []string{o.root}
	if len(o.soak.hostRoots) > 0 {
		roots = o.soak.hostRoots
	}
	sub := fmt.Sprintf("getrelease-%d", n)
	if o.soak.state != "" {
		benchGetReleaseEtcd(r, o, roots, sub, n)
		return
	}
	root := filepath.Join(roots[0], sub)
	s, err := seedRoot(root, n)
	if err != nil {
		fatalf("seeding %d entries: %v", n, err)
	}
	data, _ := os.ReadFile(s.Path())
	// The floor: one durable commit (write, fsync, rename, fsync of the
	// directory) of a 4 KiB file, and a bare lock round trip, in the same
	// run.
	floor := make([]byte, floorBytes)
	for i := range floor {
		floor[i] = 'x'
	}
	commit := timeIt(o.duration/2, func() {
		target := filepath.Join(root, "limit.json")
		if err := renameio.WriteFile(target, floor, 0o644, renameio.WithTempDir(root)); err != nil {
			fatalf("%v", err)
		}
		d, _ := os.Open(root)
		d.Sync()
		d.Close()
	})
	lk, _ := state.NewLock(filepath.Join(root, "bench.lock"), state.LockOptions{Log: quietLog()})
	lock := timeIt(o.duration/4, func() {
		unlock, err := lk.Lock(context.Background())
		if err != nil {
			fatalf("%v", err)
		}
		unlock()
	})

	ops, lat, holds, err := runGetReleaseWorkers(o, roots, sub, n, "")
	if err != nil {
		fatalf("%v", err)
	}
	opsPerSec := float64(ops) / o.duration.Seconds()
	commitsPerSec := 1 / commit.Seconds()
	// A get+release is two commits: the limit is half the commit rate.
	limit := commitsPerSec / 2
	name := fmt.Sprintf("get+release, %d entries, %dx%d", n, o.procs, o.goroutines)
	if len(roots) > 1 {
		name += fmt.Sprintf(" on %d hosts", len(roots))
	}
	r.add(name, map[string]any{
		"entries": n, "procs": o.procs, "goroutines": o.goroutines, "hosts": len(roots), "ops_per_sec": opsPerSec,
		"p50_ms": ms(percentile(lat, 0.5)), "p99_ms": ms(percentile(lat, 0.99)),
		"limit_ops_per_sec": limit, "ratio_to_limit": opsPerSec / limit,
		"commit_ms": ms(commit), "commit_bytes": floorBytes, "lock_roundtrip_ms": ms(lock), "state_bytes": len(data),
		"lock_hold_p50_ms": ms(percentile(holds, 0.5)), "lock_hold_p99_ms": ms(percentile(holds, 0.99)),
		"state": "file",
	}, fmt.Sprintf("%8.0f ops/s  p50 %6.2f ms  p99 %7.2f ms | limit %6.0f ops/s (commit %.2f ms of %d KB; lock %.3f ms)  ratio %.2f | hold p50 %.2f ms p99 %.2f ms",
		opsPerSec, ms(percentile(lat, 0.5)), ms(percentile(lat, 0.99)), limit, ms(commit), floorBytes>>10, ms(lock), opsPerSec/limit,
		ms(percentile(holds, 0.5)), ms(percentile(holds, 0.99))))
}

// runGetReleaseWorkers runs o.procs getrelease workers on sub of roots
// (taking turns over the hosts), with the state at stateURL ("" for the
// file store in the root), and sums their results. A worker that fails
// fails the run, with its error.
func runGetReleaseWorkers(o options, roots []string, sub string, n int, stateURL string) (ops int, lat, holds []time.Duration, err error) {
	var cmds []*exec.Cmd
	var outs []io.ReadCloser
	defer func() {
		for _, cmd := range cmds {
			if cmd.ProcessState == nil {
				cmd.Process.Kill()
				cmd.Wait()
			}
		}
	}()
	var results []int // workers whose results each command prints
	// The shared window starts once every worker has had the warm-up
	// after its start (which a fake host delays by its set-up).
	window := time.Now().Add(o.warmup + 500*time.Millisecond)
	for i := range o.procs {
		if o.soak.fakehost != "" && i >= len(roots) {
			break // a fake host runs all of its workers (below)
		}
		argv := []string{os.Args[0], "--worker", "getrelease", filepath.Join(roots[i%len(roots)], sub), strconv.Itoa(n), strconv.Itoa(o.goroutines), o.duration.String()}
		if stateURL != "" || o.warmup > 0 {
			argv = append(argv, stateURL)
		}
		if o.warmup > 0 {
			argv = append(argv, strconv.FormatInt(window.UnixNano(), 10))
		}
		count := 1
		if o.soak.fakehost != "" {
			// One fake host (one pid namespace) per root, running its
			// share of the workers: processes of one host see each other,
			// as they do on a real one.
			count = (o.procs - i + len(roots) - 1) / len(roots)
			argv = append([]string{o.soak.fakehost, fmt.Sprintf("bench-host%d", i), os.Args[0], "--worker", "group", strconv.Itoa(count)}, argv[2:]...)
		}
		results = append(results, count)
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stderr = os.Stderr
		out, perr := cmd.StdoutPipe()
		if perr != nil {
			return 0, nil, nil, fmt.Errorf("worker %d: %w", i, perr)
		}
		if serr := cmd.Start(); serr != nil {
			return 0, nil, nil, fmt.Errorf("worker %d: %w", i, serr)
		}
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	for i, cmd := range cmds {
		dec := json.NewDecoder(outs[i])
		var derr error
		for range results[i] {
			var res workerResult
			if derr = dec.Decode(&res); derr != nil {
				break
			}
			ops += res.Ops
			lat = append(lat, res.Latencies...)
			holds = append(holds, res.Holds...)
		}
		werr := cmd.Wait()
		switch {
		case werr != nil:
			return 0, nil, nil, fmt.Errorf("worker %d: %w", i, werr)
		case derr != nil:
			return 0, nil, nil, fmt.Errorf("worker %d: %w", i, derr)
		}
	}
	return ops, lat, holds, nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// timeIt runs f repeatedly for about d and returns its mean duration.
func timeIt(d time.Duration, f func()) time.Duration {
	start := time.Now()
	n := 0
	for time.Since(start) < d || n < 3 {
		f()
		n++
	}
	return time.Since(start) / time.Duration(n)
}

type workerResult struct {
	Ops       int             `json:"ops"`
	Latencies []time.Duration `json:"latencies"`
	Holds     []time.Duration `json:"holds"`
	Wall      time.Duration   `json:"wall"`
	Path      string          `json:"path"`
	// ReadyUnixNano is when a get worker's Wait returned READY, on the
	// wall clock that every process of this machine (fake hosts too)
	// shares.
	ReadyUnixNano int64 `json:"ready_unix_nano,omitempty"`
}

func runWorker(mode string, args []string) int {
	switch mode {
	case "getrelease":
		return workerGetRelease(args)
	case "group":
		return workerGroup(args)
	case "get":
		return workerGet(args)
	case "serve":
		return workerServe(args)
	case "soak":
		return workerSoak(args)
	}
	fmt.Fprintln(os.Stderr, "unknown worker mode", mode)
	return 2
}

// cpuProfile starts a CPU profile of this worker when
// DEPCACHE_BENCH_CPUPROFILE names a directory (one file per worker, for
// go tool pprof to merge), and returns what stops it; nil when unset.
func cpuProfile() func() {
	dir := os.Getenv("DEPCACHE_BENCH_CPUPROFILE")
	if dir == "" {
		return nil
	}
	f, err := os.CreateTemp(dir, "worker-*.prof")
	if err != nil {
		fmt.Fprintln(os.Stderr, "cpu profile:", err)
		return nil
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintln(os.Stderr, "cpu profile:", err)
		f.Close()
		return nil
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// workerGroup runs COUNT workers of MODE ARGS side by side (a fake host's
// share) and prints their results one after another.
func workerGroup(args []string) int {
	count, err := strconv.Atoi(args[0])
	if err != nil || len(args) < 2 {
		fmt.Fprintln(os.Stderr, "group: want COUNT MODE ARGS")
		return 2
	}
	var cmds []*exec.Cmd
	var outs []io.ReadCloser
	for range count {
		cmd := exec.Command(os.Args[0], append([]string{"--worker"}, args[1:]...)...)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err == nil {
			err = cmd.Start()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	rc := 0
	for i, cmd := range cmds {
		var res json.RawMessage
		if err := json.NewDecoder(outs[i]).Decode(&res); err != nil {
			fmt.Fprintln(os.Stderr, "group worker:", err)
			rc = 1
		} else {
			os.Stdout.Write(append(res, '\n'))
		}
		if err := cmd.Wait(); err != nil {
			fmt.Fprintln(os.Stderr, "group worker:", err)
			rc = 1
		}
	}
	return rc
}

func workerGetRelease(args []string) int {
	root := args[0]
	n, _ := strconv.Atoi(args[1])
	g, _ := strconv.Atoi(args[2])
	dur, _ := time.ParseDuration(args[3])
	stateURL := ""
	if len(args) > 4 {
		stateURL = args[4]
	}
	// from: the start of the window shared with the other workers (zero:
	// this worker's start); only what ends within it counts.
	var from time.Time
	if len(args) > 5 {
		ns, err := strconv.ParseInt(args[5], 10, 64)
		if err != nil {
			fmt.Fprintln(os.Stderr, "getrelease worker: window:", err)
			return 2
		}
		from = time.Unix(0, ns)
	}
	ctx := context.Background()
	st, closeStore, err := workerStore(ctx, stateURL, root)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer closeStore()
	if stop := cpuProfile(); stop != nil {
		defer stop()
	}
	var mu sync.Mutex
	var res workerResult
	m, err := manager.New(manager.Config{Root: root, State: st, Log: quietLog(), OnLockHold: func(d time.Duration) {
		if time.Now().Before(from) {
			return
		}
		mu.Lock()
		res.Holds = append(res.Holds, d)
		mu.Unlock()
	}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var wg sync.WaitGroup
	var ops atomic.Int64
	var failed atomic.Bool // a get or release failed: the worker fails, after closing its store
	if from.IsZero() {
		from = time.Now()
	}
	deadline := from.Add(dur)
	// Fake hosts number their processes alike: a pid alone does not tell
	// two workers apart.
	seed := rand.Uint64()
	self := fmt.Sprintf("%d-%08x", os.Getpid(), uint32(seed))
	for w := range g {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Seeded at random too: workers on fake hosts share their pids,
			// and would all pick the same keys in the same order.
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			var lat []time.Duration
			for i := 0; time.Now().Before(deadline) && !failed.Load(); i++ {
				k := benchKey(rng.IntN(n))
				dep := fmt.Sprintf("bench-%s-%d-%d", self, w, i)
				start := time.Now()
				if _, err := m.Get(ctx, dep, k, manager.Detached()); err != nil {
					fmt.Fprintln(os.Stderr, err)
					failed.Store(true)
					break
				}
				if err := m.Release(ctx, dep, k); err != nil {
					fmt.Fprintln(os.Stderr, err)
					failed.Store(true)
					break
				}
				if end := time.Now(); !end.Before(from) && !end.After(deadline) {
					lat = append(lat, end.Sub(start))
					ops.Add(1)
				}
			}
			mu.Lock()
			res.Latencies = append(res.Latencies, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if failed.Load() {
		return 1
	}
	res.Ops = int(ops.Load())
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

func workerGet(args []string) int {
	root, url := args[0], args[1]
	stateURL := ""
	if len(args) > 2 {
		stateURL = args[2]
	}
	start := time.Now()
	ctx := context.Background()
	st, closeStore, err := workerStore(ctx, stateURL, root)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer closeStore()
	m, err := manager.New(manager.Config{Root: root, State: st, Log: quietLog(), PollInterval: 20 * time.Millisecond})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	stop, err := m.Start(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer stop()
	key, err := manager.ParseKey(url, "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if _, err := m.Get(ctx, fmt.Sprintf("bench-%d", os.Getpid()), key); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	e, err := m.Wait(ctx, key)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ready := time.Now()
	p, _ := m.Abs(e)
	json.NewEncoder(os.Stdout).Encode(workerResult{Wall: ready.Sub(start), Path: p, ReadyUnixNano: ready.UnixNano()})
	return 0
}

// bundle writes a tar.gz of one file of random (incompressible) bytes.
func bundle(path string, mb int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	zw, _ := gzip.NewWriterLevel(bw, gzip.BestSpeed)
	tw := tar.NewWriter(zw)
	size := int64(mb) << 20
	tw.WriteHeader(&tar.Header{Name: "data/blob.bin", Mode: 0o644, Size: size})
	r := rand.NewChaCha8([32]byte{42})
	if _, err := io.CopyN(tw, r, size); err != nil {
		return err
	}
	tw.Close()
	zw.Close()
	return bw.Flush()
}

// serve serves path on loopback and counts complete downloads.
func serve(path string) (url string, downloads *atomic.Int32, stop func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatalf("%v", err)
	}
	downloads = new(atomic.Int32)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downloads.Add(1)
		http.ServeFile(w, r, path)
	})}
	go srv.Serve(ln)
	return "http://" + ln.Addr().String() + "/bundle.tar.gz", downloads, func() { srv.Close() }
}

// curlTar times `curl -s URL | tar -xz -C dir`, the baseline.
func curlTar(url, dir string) (time.Duration, error) {
	os.MkdirAll(dir, 0o755)
	start := time.Now()
	cmd := exec.Command("sh", "-c", `curl -sf "$1" | tar -xz -C "$2" && sync -f "$2"`, "sh", url, dir)
	cmd.Stderr = os.Stderr
	err := cmd.Run()
	return time.Since(start), err
}

// benchFetch measures one cold get of a large tar.gz with checkpoints on:
// the server gives a strong ETag, so the owner spools the raw bytes and
// checkpoints them (fsync, then the checkpoint) as it goes; the largest
// checkpoint seen in staging during the run is reported.
func benchFetch(r *report, o options) {
	dir := filepath.Join(o.root, "fetch")
	os.MkdirAll(dir, 0o755)
	src := filepath.Join(dir, "bundle.tar.gz")
	if err := bundle(src, o.fetchMB); err != nil {
		fatalf("%v", err)
	}
	url, stop := serveETag(src, `"bench-fetch"`)
	defer stop()
	base, err := curlTar(url, filepath.Join(dir, "curl"))
	if err != nil {
		fatalf("curl | tar: %v", err)
	}
	root := filepath.Join(dir, "root")
	done := make(chan struct{})
	seen := make(chan int64, 1)
	go func() { seen <- watchCheckpoints(root, done) }()
	start := time.Now()
	if out, err := exec.Command(os.Args[0], "--worker", "get", root, url).Output(); err != nil {
		fatalf("worker: %v: %s", err, out)
	}
	wall := time.Since(start)
	close(done)
	ckpt := <-seen
	mbps := float64(o.fetchMB) / wall.Seconds()
	basembps := float64(o.fetchMB) / base.Seconds()
	r.add(fmt.Sprintf("fetch throughput, %d MB, checkpoints on", o.fetchMB), map[string]any{
		"mb": o.fetchMB, "mb_per_s": mbps, "curl_tar_mb_per_s": basembps, "ratio_to_curl_tar": mbps / basembps,
		"largest_checkpoint_bytes": ckpt,
	}, fmt.Sprintf("%6.1f MB/s | curl|tar %.1f MB/s | ratio %.2f | checkpoint seen at %d MB", mbps, basembps, mbps/basembps, ckpt>>20))
}

// serveETag serves path on loopback with a strong ETag, so that a download
// of it may resume (and checkpoints).
func serveETag(path, etag string) (url string, stop func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatalf("%v", err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", etag)
		http.ServeFile(w, r, path)
	})}
	go srv.Serve(ln)
	return "http://" + ln.Addr().String() + "/bundle.tar.gz", func() { srv.Close() }
}

// watchCheckpoints returns the largest checkpoint offset it saw under
// root's staging until done is closed.
func watchCheckpoints(root string, done <-chan struct{}) int64 {
	var largest int64
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		ps, _ := filepath.Glob(filepath.Join(root, "staging", "*", "checkpoint.json"))
		for _, p := range ps {
			var c struct {
				Offset int64 `json:"offset"`
			}
			if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &c) == nil {
				largest = max(largest, c.Offset)
			}
		}
		select {
		case <-done:
			return largest
		case <-t.C:
		}
	}
}

// benchServeRSS measures the peak RSS of a manager driving every entry (as
// serve does) over n entries for a few passes. Its root is seeded as
// getrelease's is, but with every entry's content on disk (and no stored
// policy: no budget): the manager drives them, where getrelease's root
// (no content) would measure one pass that drops every entry as lost.
// It fails if the passes removed any.
func benchServeRSS(r *report, o options, n int) {
	root := filepath.Join(o.root, fmt.Sprintf("rss-%d", n))
	s, err := seedRoot(root, n)
	if err != nil {
		fatalf("seeding %d entries: %v", n, err)
	}
	for i := range n {
		k := benchKey(i)
		if err := os.MkdirAll(filepath.Join(root, "entries", k.ID()+"-g1", "content"), 0o755); err != nil {
			fatalf("seeding %d entries: %v", n, err)
		}
	}
	out, err := exec.Command(os.Args[0], "--worker", "serve", root, o.duration.String()).Output()
	if err != nil {
		fatalf("serve worker: %v", err)
	}
	var res struct {
		Passes int   `json:"passes"`
		PeakKB int64 `json:"peak_kb"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		fatalf("serve worker: %v: %s", err, out)
	}
	after, err := s.View(context.Background())
	if err != nil {
		fatalf("serve worker: %v", err)
	}
	if len(after.Entries) != n {
		fatalf("serve worker: %d of the %d entries left after its passes: it measured their removal, not driving them", len(after.Entries), n)
	}
	r.add(fmt.Sprintf("serve peak RSS, %d entries", n), map[string]any{"entries": n, "peak_rss_mb": float64(res.PeakKB) / 1024, "passes": res.Passes},
		fmt.Sprintf("%6.1f MB peak RSS over %d passes", float64(res.PeakKB)/1024, res.Passes))
}

func workerServe(args []string) int {
	gctune.Serve() // as depcache serve runs
	root := args[0]
	dur, _ := time.ParseDuration(args[1])
	var passes atomic.Int64
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(), DriveAll: true, OnLockHold: func(time.Duration) { passes.Add(1) }})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	stop, err := m.Start(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	time.Sleep(max(dur, 2*time.Second)) // let the loop make its passes
	stop()
	var peak int64
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				peak, _ = strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			}
		}
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"passes": passes.Load(), "peak_kb": peak})
	return 0
}
