package main

// The soak (--run soak): a serve, N worker processes and a loopback source
// server with many sources, on a budget small enough that most gets evict
// something, for --duration. Every path handed out is compared with its
// source while its dependent is held; warnings and errors of serve and of
// every command are collected and judged; serve's RSS, open files and
// goroutines are sampled and their growth checked. It exits non-zero on a
// content mismatch, a failed get that the fault injection does not
// explain, a false warning, or growth past the targets.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/depcache/depcache/state/etcdstore"
)

// soakOptions are the soak's flags.
type soakOptions struct {
	duration time.Duration
	workers  int
	faults   bool
	bin      string // the depcache binary; built when empty
	sources  int
	// hostRoots are the cache root as each host reaches it (one sshfs
	// mount each); serve runs on the first. fakehost, when set, is
	// ../shared/rigs/fakehost.sh: worker i runs in fake host i%len.
	hostRoots []string
	fakehost  string
	// state is --state: the etcd store's URL (etcd://HOST:PORT,.../PREFIX)
	// for serve and every command, empty for the file store in the root.
	// Each run adds a component of its own to the prefix (soakStateURL),
	// so that it starts from an empty state bound to its fresh root.
	state string
}

// soakFlags are the loop flags of every get, run and serve of the soak: a
// FAILED entry is retried after 2 s rather than a minute, so that the
// churn goes on over every source.
var soakFlags = []string{"--failure-cooldown", "2s"}

// soakFaultFlags are added with --faults: a stall past 8 s fails the
// attempt (the idle timeout is the download timeout, at most a minute).
var soakFaultFlags = []string{"--download-timeout", "8s"}

const (
	soakMinSize   = 25 << 10
	soakMaxSize   = 220 << 10
	soakLongStall = 9 * time.Second // past the 8 s idle timeout
)

func runSoak(r *report, o options, so soakOptions) (problems []string) {
	dir := filepath.Join(o.root, "soak")
	root := filepath.Join(dir, "root")
	if len(so.hostRoots) > 0 {
		root = so.hostRoots[0]
	}
	for _, d := range []string{dir, filepath.Join(dir, "src"), filepath.Join(dir, "want")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			fatalf("%v", err)
		}
	}
	bin := so.bin
	if bin == "" {
		bin = filepath.Join(dir, "depcache")
		out, err := exec.Command("go", "build", "-o", bin, "github.com/depcache/depcache/cmd/depcache").CombinedOutput()
		if err != nil {
			fatalf("building depcache (run from the module, or give --depcache PATH): %v\n%s", err, out)
		}
	}

	if so.state != "" {
		u, err := soakStateURL(so.state, time.Now(), os.Getpid())
		if err != nil {
			fatalf("%v", err)
		}
		so.state = u
	}

	srv := newSoakServer(so.faults, filepath.Join(dir, "src"))
	defer srv.close()
	sources, total := makeSoakSources(dir, srv.url, so.sources)
	// Each worker holds at most one entry at a time: the budget leaves
	// room for that and little more, so most gets evict something.
	budget := int64(so.workers+3) * soakMaxSize
	loopFlags := append([]string(nil), soakFlags...)
	if so.faults {
		loopFlags = append(loopFlags, soakFaultFlags...)
	}
	fmt.Fprintf(os.Stderr, "soak: %d sources (%d KB in all), budget %d KB, %d workers, %s, faults %v, root %s\n",
		len(sources), total>>10, budget>>10, so.workers, so.duration, so.faults, root)
	if so.state != "" {
		fmt.Fprintf(os.Stderr, "soak: state %s\n", so.state)
	}

	if out, err := exec.Command(bin, depcacheArgs(root, so.state, "policy", "set", "--max-size", strconv.FormatInt(budget, 10), "--min-age", "0s")...).CombinedOutput(); err != nil {
		fatalf("policy set: %v: %s", err, out)
	}

	serve, err := startSoakServe(bin, root, so.state, loopFlags)
	if err != nil {
		fatalf("%v", err)
	}

	// The workers.
	start := time.Now()
	deadline := start.Add(so.duration)
	type worker struct {
		cmd    *exec.Cmd
		out    bytes.Buffer
		stderr *stderrLog
	}
	ws := make([]*worker, so.workers)
	for i := range ws {
		wroot, argv := root, []string{os.Args[0], "--worker", "soak"}
		if n := len(so.hostRoots); n > 0 {
			wroot = so.hostRoots[i%n]
			if so.fakehost != "" {
				argv = append([]string{so.fakehost, fmt.Sprintf("soak-host%d", i%n)}, argv...)
			}
		}
		cfg := soakWorkerConfig{ID: i, Bin: bin, Root: wroot, State: so.state, Deadline: deadline, Sources: sources, LoopFlags: loopFlags, Seed: uint64(start.UnixNano())}
		b, _ := json.Marshal(cfg)
		w := &worker{cmd: exec.Command(argv[0], append(argv[1:], string(b))...), stderr: newStderrLog(fmt.Sprintf("worker %d", i))}
		w.cmd.Stdout, w.cmd.Stderr = &w.out, w.stderr
		if err := w.cmd.Start(); err != nil {
			fatalf("starting worker: %v", err)
		}
		ws[i] = w
	}

	// Sample serve on a ticker until the deadline.
	var samples []sample
	take := func() {
		s, err := serve.sample(time.Since(start))
		if err != nil {
			problems = append(problems, fmt.Sprintf("sampling serve: %v", err))
			return
		}
		samples = append(samples, s)
	}
	take()
	every := min(max(so.duration/120, time.Second), 10*time.Second)
	tick := time.NewTicker(every)
	end := time.NewTimer(time.Until(deadline))
	for sampling := true; sampling; {
		select {
		case <-tick.C:
			take()
		case <-end.C:
			sampling = false
		case <-serve.exited:
			problems = append(problems, fmt.Sprintf("serve exited during the soak: %v", serve.waitErr))
			sampling = false
		}
	}
	tick.Stop()
	take() // the end, still under load: the workers finish their cycle
	wall := time.Since(start)

	// Collect the workers.
	var res soakWorkerResult
	res.Ops, res.Other = map[string]int{}, tally{}
	for i, w := range ws {
		err := w.cmd.Wait()
		var wr soakWorkerResult
		if derr := json.Unmarshal(w.out.Bytes(), &wr); err != nil || derr != nil {
			problems = append(problems, fmt.Sprintf("worker %d: %v %v: %s", i, err, derr, shorten(w.stderr.text())))
			continue
		}
		res.Cycles += wr.Cycles
		for k, v := range wr.Ops {
			res.Ops[k] += v
		}
		for k, v := range wr.Other {
			res.Other[k] += v
		}
		res.Mismatches = append(res.Mismatches, wr.Mismatches...)
		res.FailedGets = append(res.FailedGets, wr.FailedGets...)
		res.Problems = append(res.Problems, wr.Problems...)
		res.Records = append(res.Records, wr.Records...)
		if t := w.stderr.text(); strings.TrimSpace(t) != "" {
			problems = append(problems, fmt.Sprintf("worker %d wrote on stderr: %s", i, shorten(t)))
		}
	}

	// The whole cache, at rest: every READY entry still matches its digest.
	if out, err := exec.Command(bin, depcacheArgs(root, so.state, "--json", "verify")...).Output(); err != nil {
		problems = append(problems, fmt.Sprintf("verify of the whole root at the end: %v: %s", err, shorten(string(out))))
	}
	res.Records = append(res.Records, serve.stop(&problems)...)

	return judgeSoak(r, so, res, srv, samples, wall, problems)
}

// depcacheArgs is the command line of one depcache command on root, with
// --state stateURL when it is not empty.
func depcacheArgs(root, stateURL string, args ...string) []string {
	out := []string{"--root", root}
	if stateURL != "" {
		out = append(out, "--state", stateURL)
	}
	return append(out, args...)
}

// soakStateURL is the --state URL of one run: u's prefix with a component
// unique to the run (its start and pid) added, so that every run starts on
// an empty prefix, which binds to its root on the first commit.
func soakStateURL(u string, now time.Time, pid int) (string, error) {
	if _, _, err := etcdstore.ParseURL(u); err != nil {
		return "", fmt.Errorf("--state: %w", err)
	}
	out := fmt.Sprintf("%s/soak-%s-%d", strings.TrimSuffix(u, "/"), now.UTC().Format("20060102T150405.000000000Z"), pid)
	if _, _, err := etcdstore.ParseURL(out); err != nil {
		return "", fmt.Errorf("--state: %w", err)
	}
	return out, nil
}

// judgeSoak reports the soak's figures and returns its failures.
func judgeSoak(r *report, so soakOptions, res soakWorkerResult, srv *soakServer, samples []sample, wall time.Duration, problems []string) []string {
	log := srv.faultLog()
	ops := 0
	for _, v := range res.Ops {
		ops += v
	}
	byFault, other := 0, 0
	otherMsgs, faultMsgs := tally{}, tally{}
	otherSpans := map[string][2]time.Time{} // when the first of each began and the last ended
	for _, g := range res.FailedGets {
		if causedByFault(g, so.faults, log) {
			byFault++
			faultMsgs[g.Op+": "+lastLine(g.Msg)]++
			continue
		}
		other++
		k := fmt.Sprintf("%s exit %d: %s", g.Op, g.Code, lastLine(g.Msg))
		otherMsgs[k]++
		sp, ok := otherSpans[k]
		if !ok || g.Start.Before(sp[0]) {
			sp[0] = g.Start
		}
		if g.End.After(sp[1]) {
			sp[1] = g.End
		}
		otherSpans[k] = sp
	}
	for _, m := range otherMsgs.top() {
		problems = append(problems, "failed get not caused by a fault: "+m)
	}
	expected, false_ := tally{}, tally{}
	examples := map[string]string{} // a false warning's first record as written
	for _, rec := range res.Records {
		k := fmt.Sprintf("%s level=%s msg=%q error=%q", rec.Proc, rec.Level, rec.Msg, shorten(rec.Err))
		if ok, why := classifyWarning(rec, so.faults, log); ok {
			expected[fmt.Sprintf("%s level=%s msg=%q", rec.Proc, rec.Level, rec.Msg)]++
		} else {
			k += " (" + why + ")"
			false_[k]++
			if _, ok := examples[k]; !ok {
				examples[k] = rec.Line
			}
		}
	}
	for _, m := range false_.top() {
		problems = append(problems, "warning that does not describe a real problem: "+m)
	}
	for _, m := range res.Mismatches {
		problems = append(problems, "content mismatch: "+m)
	}
	problems = append(problems, res.Problems...)
	g, gp := checkGrowth(samples, wall, defaultGrowthLimits)
	problems = append(problems, gp...)

	name := fmt.Sprintf("soak, %d workers, %s", so.workers, so.duration)
	if so.faults {
		name += ", faults"
	}
	first, mid, last := samples[0], samples[len(samples)/2], samples[len(samples)-1]
	reqs, injected := srv.counts()
	fields := map[string]any{
		"workers": so.workers, "duration_s": wall.Seconds(), "cycles": res.Cycles, "ops": ops, "ops_by_command": res.Ops,
		"ops_per_sec": float64(ops) / wall.Seconds(), "cycles_per_sec": float64(res.Cycles) / wall.Seconds(),
		"failed_gets_fault": byFault, "failed_gets_other": other, "mismatches": len(res.Mismatches),
		"warnings_expected": sum(expected), "warnings_false": sum(false_), "source_requests": reqs, "faults_injected": injected,
		"rss_kb": []int64{first.RSSKB, mid.RSSKB, last.RSSKB}, "fds": []int{first.FDs, mid.FDs, last.FDs},
		"goroutines": []int{first.Goroutines, mid.Goroutines, last.Goroutines}, "threads": []int{first.Threads, mid.Threads, last.Threads},
		"growth_from_s": g.From.Seconds(), "rss_growth_percent": g.RSSPercent, "fds_early_late": []int{g.EarlyFDs, g.LateFDs},
		"goroutines_early_late": []int{g.EarlyGor, g.LateGor}, "problems": len(problems), "samples": samples,
	}
	if so.state != "" {
		fields["state"] = so.state
	}
	r.add(name, fields, fmt.Sprintf("%d cycles, %.1f cycles/s, %.1f ops/s | failed gets: %d by faults, %d other | %d mismatches | warnings: %d expected, %d false",
		res.Cycles, float64(res.Cycles)/wall.Seconds(), float64(ops)/wall.Seconds(), byFault, other, len(res.Mismatches), sum(expected), sum(false_)))
	fmt.Fprintf(os.Stderr, "  commands: %v; source requests %d, faults injected %v\n", res.Ops, reqs, injected)
	fmt.Fprintf(os.Stderr, "  serve at start/middle/end: RSS %.1f / %.1f / %.1f MB, open files %d / %d / %d, goroutines %d / %d / %d, threads %d / %d / %d\n",
		mb(first.RSSKB), mb(mid.RSSKB), mb(last.RSSKB), first.FDs, mid.FDs, last.FDs, first.Goroutines, mid.Goroutines, last.Goroutines, first.Threads, mid.Threads, last.Threads)
	fmt.Fprintf(os.Stderr, "  growth from %s to the end (first window's highest RSS and median counts, last window's medians): RSS %.1f → %.1f MB (%+.1f %%), open files %d → %d, goroutines %d → %d\n",
		g.From.Round(time.Second), mb(g.EarlyRSSKB), mb(g.LateRSSKB), g.RSSPercent, g.EarlyFDs, g.LateFDs, g.EarlyGor, g.LateGor)
	printTally("failed gets caused by faults", faultMsgs)
	printTally("expected warnings (injected fetch failures)", expected)
	printTally("false warnings and errors", false_)
	printExamples("the first record of each false warning or error, as written", false_, examples)
	printSpans("failed gets not caused by a fault: when the first began and the last ended", otherMsgs, otherSpans)
	printTally("other stderr lines of commands that succeeded (not judged)", res.Other)
	if len(problems) > 0 {
		fmt.Fprintf(os.Stderr, "soak: FAILED (%d problems)\n", len(problems))
	} else {
		fmt.Fprintln(os.Stderr, "soak: ok")
	}
	return problems
}

func printTally(title string, t tally) {
	if len(t) == 0 {
		return
	}
	fmt.Fprintf(os.Stderr, "  %s:\n", title)
	for i, l := range t.top() {
		if i == 15 {
			fmt.Fprintf(os.Stderr, "    ... %d more distinct\n", len(t)-i)
			break
		}
		fmt.Fprintf(os.Stderr, "    %s\n", l)
	}
}

// printExamples prints, for the most frequent keys of t, the line that
// examples holds for each.
func printExamples(title string, t tally, examples map[string]string) {
	keys := t.keys()
	if len(keys) == 0 {
		return
	}
	fmt.Fprintf(os.Stderr, "  %s:\n", title)
	for i, k := range keys {
		if i == 15 {
			break
		}
		if l := examples[k]; l != "" {
			fmt.Fprintf(os.Stderr, "    %s\n", l)
		}
	}
}

// printSpans prints the keys of t, most frequent first, each with the
// span of time it covers.
func printSpans(title string, t tally, spans map[string][2]time.Time) {
	keys := t.keys()
	if len(keys) == 0 {
		return
	}
	fmt.Fprintf(os.Stderr, "  %s:\n", title)
	for i, k := range keys {
		if i == 15 {
			fmt.Fprintf(os.Stderr, "    ... %d more distinct\n", len(keys)-i)
			break
		}
		sp := spans[k]
		fmt.Fprintf(os.Stderr, "    %6d × %s – %s: %s\n", t[k], sp[0].UTC().Format("15:04:05"), sp[1].UTC().Format("15:04:05"), k)
	}
}

func sum(t tally) int {
	n := 0
	for _, v := range t {
		n += v
	}
	return n
}

func mb(kb int64) float64 { return float64(kb) / 1024 }

// lastLine is the last line of a failed command's stderr: the error it
// exited with, after any progress lines.
func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return shorten(s[strings.LastIndexByte(s, '\n')+1:])
}

// makeSoakSources writes n sources of 25-220 KB of random bytes into
// dir/src, a third of them tar.gz archives of a few files (whose tree goes
// into dir/want), the others plain files.
func makeSoakSources(dir, base string, n int) ([]soakSource, int64) {
	rng := rand.New(rand.NewPCG(19, 19))
	var out []soakSource
	var total int64
	for i := range n {
		size := soakMinSize + rng.IntN(soakMaxSize-soakMinSize+1)
		if i%3 == 0 {
			name := fmt.Sprintf("s%02d.tar.gz", i)
			want := filepath.Join(dir, "want", fmt.Sprintf("s%02d", i))
			if err := writeSoakTar(filepath.Join(dir, "src", name), want, i, size, rng); err != nil {
				fatalf("%v", err)
			}
			out = append(out, soakSource{URL: base + "/src/" + name, Want: want, Tar: true})
		} else {
			name := fmt.Sprintf("s%02d.bin", i)
			b := make([]byte, size)
			fillRandom(rng, b)
			p := filepath.Join(dir, "src", name)
			if err := os.WriteFile(p, b, 0o644); err != nil {
				fatalf("%v", err)
			}
			out = append(out, soakSource{URL: base + "/src/" + name, Want: p})
		}
		total += int64(size)
	}
	return out, total
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
}

// writeSoakTar writes a tar.gz of 1-3 files of random bytes, size in all,
// and the same tree under want.
func writeSoakTar(path, want string, i, size int, rng *rand.Rand) error {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	files := 1 + i%3
	for f := range files {
		name := fmt.Sprintf("pkg%02d/part%d.bin", i, f)
		if f == 2 {
			name = fmt.Sprintf("pkg%02d/sub/part%d.bin", i, f)
		}
		b := make([]byte, size/files)
		fillRandom(rng, b)
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		tw.Write(b)
		p := filepath.Join(want, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// soakServer serves dir/src on loopback and, with faults, sometimes stalls,
// resets the connection after part of the body, or answers 500; and now
// and then a source goes bad for a spell, failing every request, long
// enough for a download's retries to fail too.
type soakServer struct {
	url    string
	srv    *http.Server
	faults bool
	dir    string

	mu       sync.Mutex
	rng      *rand.Rand
	log      faultLog
	injected map[string]int
	badUntil map[string]time.Time
	nextBad  time.Time
	requests atomic.Int64
}

func newSoakServer(faults bool, dir string) *soakServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatalf("%v", err)
	}
	s := &soakServer{url: "http://" + ln.Addr().String(), faults: faults, dir: dir, rng: rand.New(rand.NewPCG(7, 7)),
		log: faultLog{}, injected: map[string]int{}, badUntil: map[string]time.Time{}, nextBad: time.Now().Add(10 * time.Second)}
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go s.srv.Serve(ln)
	return s
}

func (s *soakServer) close() { s.srv.Close() }

// fault draws what to do with one request of url.
func (s *soakServer) fault(url string) string {
	if !s.faults {
		return ""
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if now.After(s.nextBad) {
		// A bad spell of 12 s: attempts at 0, 1, 3 and 7 s all fail.
		s.badUntil[url] = now.Add(12 * time.Second)
		s.nextBad = now.Add(time.Duration(10+s.rng.IntN(20)) * time.Second)
	}
	kind := ""
	switch n := s.rng.IntN(100); {
	case now.Before(s.badUntil[url]):
		kind = []string{"500", "reset"}[s.rng.IntN(2)]
	case n < 4:
		kind = "500"
	case n < 8:
		kind = "reset"
	case n < 10:
		kind = "stall"
	case n < 11:
		kind = "long-stall"
	}
	if kind != "" {
		s.injected[kind]++
	}
	if kind != "" && kind != "stall" { // a short stall only slows the fetch
		s.log[url] = append(s.log[url], now)
	}
	return kind
}

func (s *soakServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	name, ok := strings.CutPrefix(r.URL.Path, "/src/")
	if !ok || strings.Contains(name, "/") {
		http.NotFound(w, r)
		return
	}
	b, err := os.ReadFile(filepath.Join(s.dir, name))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	kind := s.fault(s.url + r.URL.Path)
	if kind == "500" {
		http.Error(w, "injected fault", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	half := len(b) / 2
	w.Write(b[:half])
	w.(http.Flusher).Flush()
	switch kind {
	case "reset":
		// An RST after part of the body.
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			conn.Close()
		}
		return
	case "stall":
		stall(r.Context(), 1500*time.Millisecond)
	case "long-stall":
		stall(r.Context(), soakLongStall+5*time.Second) // the client gives up first
	}
	w.Write(b[half:])
}

// stall waits for d or until the client goes away.
func stall(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

func (s *soakServer) faultLog() faultLog {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := faultLog{}
	for k, v := range s.log {
		out[k] = append([]time.Time(nil), v...)
	}
	return out
}

func (s *soakServer) counts() (int64, map[string]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[string]int{}
	for k, v := range s.injected {
		m[k] = v
	}
	return s.requests.Load(), m
}

// soakServe is the serve process of the soak.
type soakServe struct {
	cmd     *exec.Cmd
	addr    string
	stderr  *stderrLog
	exited  chan struct{}
	waitErr error
	client  *http.Client
}

func startSoakServe(bin, root, stateURL string, loopFlags []string) (*soakServe, error) {
	args := depcacheArgs(root, stateURL, append([]string{"serve", "--listen", "127.0.0.1:0", "--cleanup-interval", "2s"}, loopFlags...)...)
	s := &soakServe{cmd: exec.Command(bin, args...), stderr: newStderrLog("serve"), exited: make(chan struct{}), client: &http.Client{Timeout: 10 * time.Second}}
	s.cmd.Stderr = s.stderr
	addr := make(chan string, 1)
	s.stderr.onLine = func(line string) {
		if rest, ok := strings.CutPrefix(line, "depcache: serving "); ok {
			if i := strings.LastIndex(rest, " on http://"); i >= 0 {
				select {
				case addr <- rest[i+len(" on http://"):]:
				default:
				}
			}
		}
	}
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	select {
	case s.addr = <-addr:
	case <-s.exited:
		return nil, fmt.Errorf("serve exited: %v: %s", s.waitErr, s.stderr.text())
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		return nil, fmt.Errorf("serve did not say where it listens within 30 s: %s", s.stderr.text())
	}
	// It prints its address once it listens: /healthz answers now.
	resp, err := s.client.Get("http://" + s.addr + "/healthz")
	if err != nil {
		s.cmd.Process.Kill()
		return nil, fmt.Errorf("serve's /healthz: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.cmd.Process.Kill()
		return nil, fmt.Errorf("serve's /healthz: %s", resp.Status)
	}
	return s, nil
}

// sample reads serve's RSS, threads and open files from /proc and its
// goroutines from /metrics.
func (s *soakServe) sample(at time.Duration) (sample, error) {
	pid := s.cmd.Process.Pid
	out := sample{At: at}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			out.RSSKB, _ = strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		}
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			out.Threads, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return out, err
	}
	out.FDs = len(fds)
	resp, err := s.client.Get("http://" + s.addr + "/metrics")
	if err != nil {
		return out, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	found := false
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			out.Goroutines, found = int(f), true
		}
	}
	if !found {
		return out, fmt.Errorf("/metrics has no go_goroutines")
	}
	return out, nil
}

// stop ends serve with SIGTERM (it exits 0) and returns the warnings and
// errors it logged.
func (s *soakServe) stop(problems *[]string) []logRecord {
	select {
	case <-s.exited:
	default:
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(30 * time.Second):
			*problems = append(*problems, "serve did not exit within 30 s of SIGTERM")
			s.cmd.Process.Kill()
			<-s.exited
		}
	}
	if s.waitErr != nil {
		*problems = append(*problems, fmt.Sprintf("serve: %v", s.waitErr))
	}
	var recs []logRecord
	for _, line := range strings.Split(s.stderr.text(), "\n") {
		if r, ok := parseRecord("serve", line); ok && isWarning(r.Level) {
			recs = append(recs, r)
		}
	}
	return recs
}

// stderrLog collects a process's stderr and calls onLine for each line.
type stderrLog struct {
	name   string
	mu     sync.Mutex
	buf    bytes.Buffer
	part   []byte
	onLine func(string)
}

func newStderrLog(name string) *stderrLog { return &stderrLog{name: name} }

func (l *stderrLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	if l.onLine != nil {
		l.part = append(l.part, p...)
		for {
			i := bytes.IndexByte(l.part, '\n')
			if i < 0 {
				break
			}
			l.onLine(string(l.part[:i]))
			l.part = l.part[i+1:]
		}
	}
	return len(p), nil
}

func (l *stderrLog) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

var _ io.Writer = (*stderrLog)(nil)
