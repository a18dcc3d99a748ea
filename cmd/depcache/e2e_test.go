package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
)

// bin is the depcache binary the end-to-end tests run as real processes.
var bin string

func TestMain(m *testing.M) {
	// Every store of these tests, and of the depcache processes they start,
	// checks that no shared entry is modified in place (see state.State).
	os.Setenv("DEPCACHE_CHECK_SHARED", "1")
	if os.Getenv("DEPCACHE_TEST_ROLE") == "hold" {
		os.Exit(hold())
	}
	dir, err := os.MkdirTemp("", "depcache-bin-")
	if err != nil {
		panic(err)
	}
	bin = filepath.Join(dir, "depcache")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building depcache: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// blobServer serves one body and counts requests and complete downloads.
// stall, when set, decides per request number whether to send a part of
// the body and then hang until the client goes away.
type blobServer struct {
	*httptest.Server
	body      []byte
	requests  atomic.Int32
	complete  atomic.Int32
	stall     func(n int32) bool
	started   chan int32
	abandoned chan int32
}

func newBlobServer(t *testing.T, body []byte, stall func(n int32) bool) *blobServer {
	s := &blobServer{body: body, stall: stall, started: make(chan int32, 100), abandoned: make(chan int32, 100)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := s.requests.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(200)
		if s.stall != nil && s.stall(n) {
			w.Write(body[:len(body)/4])
			w.(http.Flusher).Flush()
			s.started <- n
			<-r.Context().Done()
			s.abandoned <- n
			return
		}
		s.started <- n
		if _, err := w.Write(body); err == nil {
			s.complete.Add(1)
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func randomBody(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{7}).Read(b)
	return b
}

func hexSum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func fileSum(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return hexSum(b)
}

// readState reads root's state file (through whatever mount root is on).
func readState(t *testing.T, root string) *state.State {
	t.Helper()
	for range 5 {
		st, err := state.DecodeFile(root, state.StateFile)
		if os.IsNotExist(err) {
			return state.New()
		}
		if err == nil {
			return st
		}
	}
	t.Fatal("state does not parse")
	return nil
}

// waitFor polls cond until it holds; a hang becomes the test's timeout.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func onlyEntry(t *testing.T, st *state.State) *state.Entry {
	t.Helper()
	if len(st.Entries) != 1 {
		t.Fatalf("%d entries, want 1", len(st.Entries))
	}
	for _, e := range st.Entries {
		return e
	}
	return nil
}

func noStaging(t *testing.T, root string) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(root, "staging"))
	if len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("staging litter: %s", strings.Join(names, ", "))
	}
}

// TestE2EDedupTwoHosts: 16 processes on 2 fake hosts, each host on its own
// sshfs mount of one export, get one cold 50 MB bundle: exactly one full
// download, and all 16 print the same path with the right content.
func TestE2EDedupTwoHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	body := randomBody(50 << 20)
	srv := newBlobServer(t, body, nil)
	sub := fmt.Sprintf("e2e-dedup-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	outDir := t.TempDir()
	script := `pids=""
for i in 1 2 3 4 5 6 7 8; do
  "$BIN" --root "$ROOT" get --sha256 "$SHA" "$URL" >"$OUT/$HOST-$i.out" 2>"$OUT/$HOST-$i.err" &
  pids="$pids $!"
done
rc=0
for p in $pids; do wait $p || rc=1; done
exit $rc`
	var hosts []*exec.Cmd
	for _, h := range []struct{ name, mnt string }{{"host-a", mnt1}, {"host-b", mnt2}} {
		cmd := rigtest.FakeHost(t, h.name, 0, "sh", "-c", script)
		cmd.Env = append(cmd.Env, "BIN="+bin, "ROOT="+filepath.Join(h.mnt, sub), "SHA="+hexSum(body),
			"URL="+srv.URL+"/bundle.bin", "OUT="+outDir, "HOST="+h.name)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, cmd)
	}
	failed := false
	for _, h := range hosts {
		if err := h.Wait(); err != nil {
			failed = true
			t.Errorf("a get failed: %v", err)
		}
	}
	var rel []string
	for _, h := range []struct{ name, mnt string }{{"host-a", mnt1}, {"host-b", mnt2}} {
		for i := 1; i <= 8; i++ {
			out, _ := os.ReadFile(filepath.Join(outDir, fmt.Sprintf("%s-%d.out", h.name, i)))
			if failed {
				errs, _ := os.ReadFile(filepath.Join(outDir, fmt.Sprintf("%s-%d.err", h.name, i)))
				t.Logf("%s-%d: %s %s", h.name, i, out, errs)
			}
			p := strings.TrimSpace(string(out))
			r, err := filepath.Rel(filepath.Join(h.mnt, sub), p)
			if err != nil || strings.HasPrefix(r, "..") {
				t.Fatalf("%s-%d printed %q, not a path in its root", h.name, i, p)
			}
			rel = append(rel, r)
		}
	}
	for _, r := range rel {
		if r != rel[0] {
			t.Fatalf("processes printed different paths: %v", rel)
		}
	}
	if got := fileSum(t, filepath.Join(mnt1, sub, rel[0])); got != hexSum(body) {
		t.Errorf("content sha256 %s, want %s", got, hexSum(body))
	}
	if n, c := srv.requests.Load(), srv.complete.Load(); n != 1 || c != 1 {
		t.Errorf("%d requests, %d complete downloads; want exactly 1", n, c)
	}
	// Through the export itself: a mount's directory cache may list a name
	// another mount renamed away for up to its cache time.
	noStaging(t, filepath.Join(rigtest.Env(t, "SHAREDFS_EXPORT"), sub))
}

// TestE2ETakeoverAfterKill: the downloading process is SIGKILLed in the
// middle of the transfer; a waiting process on the same host takes over at
// once (dead owner) and finishes, and no staging data is left. Both run
// with a download timeout of an hour, far past the test's deadline, so that
// only the dead-owner rule can let the waiter take over in time: the stall
// rule cannot.
func TestE2ETakeoverAfterKill(t *testing.T) {
	const downloadTimeout = "1h" // with the default --progress-interval (2s)
	const within = time.Minute   // from the SIGKILL to the waiter's result
	body := randomBody(4 << 20)
	srv := newBlobServer(t, body, func(n int32) bool { return n == 1 })
	root := t.TempDir()
	url := srv.URL + "/b.bin"
	args := []string{"--root", root, "get", "--download-timeout", downloadTimeout, "--sha256", hexSum(body), url}
	owner := exec.Command(bin, args...)
	owner.Stderr = os.Stderr
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killIfRunning(t, owner) })
	// await waits for a request number from ch until deadline.
	await := func(what string, ch <-chan int32, deadline time.Time) int32 {
		t.Helper()
		select {
		case n := <-ch:
			return n
		case <-time.After(time.Until(deadline)):
			t.Fatalf("%s did not happen by its deadline (download timeout %s: only the dead-owner rule takes over in time)", what, downloadTimeout)
			return 0
		}
	}
	if n := await("the owner's request", srv.started, time.Now().Add(within)); n != 1 { // the owner is mid-transfer
		t.Fatalf("the owner's request is number %d, want 1", n)
	}
	waiter := exec.Command(bin, args...)
	wout, err := waiter.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var werr strings.Builder
	waiter.Stderr = &werr
	if err := waiter.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killIfRunning(t, waiter) })
	waitFor(t, "the waiter to register", func() bool {
		e := readState(t, root).Entries
		for _, e := range e {
			return len(e.Dependents) == 2
		}
		return false
	})
	killed := time.Now()
	deadline := killed.Add(within)
	if err := owner.Process.Kill(); err != nil {
		t.Fatalf("SIGKILL of the owner: %v", err)
	}
	err = owner.Wait()
	if ws, ok := owner.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the owner ended with %v, not by the SIGKILL", err)
	}
	await("the end of the owner's request", srv.abandoned, deadline)
	if n := await("the takeover's request", srv.started, deadline); n != 2 {
		t.Fatalf("the takeover's request is number %d, want 2", n)
	}
	t.Logf("takeover %v after SIGKILL (download timeout %s)", time.Since(killed), downloadTimeout)
	type result struct {
		line string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		line, rerr := bufio.NewReader(wout).ReadString('\n')
		if rerr != nil {
			rerr = fmt.Errorf("reading its output: %w", rerr)
		}
		if err := waiter.Wait(); err != nil {
			rerr = err
		}
		done <- result{line, rerr}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(time.Until(deadline)):
		t.Fatalf("the waiter had no result %s after the SIGKILL (download timeout %s)", within, downloadTimeout)
	}
	if res.err != nil {
		t.Fatalf("waiter: %v\n%s", res.err, werr.String())
	}
	p := strings.TrimSpace(res.line)
	if got := fileSum(t, p); got != hexSum(body) {
		t.Errorf("content does not verify")
	}
	e := onlyEntry(t, readState(t, root))
	if e.Stage != state.Ready || e.Generation != 2 {
		t.Errorf("entry %s gen %d, want READY gen 2", e.Stage, e.Generation)
	}
	if n := srv.requests.Load(); n != 2 {
		t.Errorf("%d requests, want 2", n)
	}
	noStaging(t, root)
}

// killIfRunning SIGKILLs cmd unless it has ended (a test that failed
// before its end leaves no process behind).
func killIfRunning(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("killing %s: %v", cmd.Path, err)
	}
}

// findPID finds, from the real host, the pid of a process whose command
// line contains marker.
func findPID(t *testing.T, marker string) int {
	t.Helper()
	var pid int
	waitFor(t, "process "+marker, func() bool {
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			n, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			cl, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			if strings.Contains(string(cl), marker) && strings.HasPrefix(string(cl), bin) {
				pid = n
				return true
			}
		}
		return false
	})
	return pid
}

// TestE2EStalledOwnerAcrossHosts: the owner on fake host A is stopped
// (SIGSTOP) mid-download; a process on fake host B sees its progress
// unchanged for the download timeout, takes over and publishes. When A
// resumes it finds itself superseded: it publishes nothing, deletes nothing
// of B's, and returns B's result.
func TestE2EStalledOwnerAcrossHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	body := randomBody(2 << 20)
	srv := newBlobServer(t, body, func(n int32) bool { return n == 1 })
	sub := fmt.Sprintf("e2e-stall-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	url := srv.URL + "/b.bin"
	marker := fmt.Sprintf("stall-a-%d", time.Now().UnixNano())
	flags := []string{"get", "--download-timeout", "3s", "--progress-interval", "300ms", "--lock-lease", "2s", "--sha256", hexSum(body)}

	a := rigtest.FakeHost(t, "host-a", 0, append(append([]string{bin, "--root", filepath.Join(mnt1, sub)}, flags...), "--dependent", marker, url)...)
	aout, _ := a.StdoutPipe()
	a.Stderr = os.Stderr
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	<-srv.started
	waitFor(t, "A's first progress report", func() bool {
		for _, e := range readState(t, filepath.Join(mnt1, sub)).Entries {
			return e.Progress.Heartbeat > 0
		}
		return false
	})
	apid := findPID(t, marker)
	if err := syscall.Kill(apid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	b := rigtest.FakeHost(t, "host-b", 0, append(append([]string{bin, "--root", filepath.Join(mnt2, sub)}, flags...), "--dependent", "stall-b", url)...)
	bout, _ := b.StdoutPipe()
	b.Stderr = os.Stderr
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	bline, _ := bufio.NewReader(bout).ReadString('\n')
	if err := b.Wait(); err != nil {
		t.Fatalf("B: %v", err)
	}
	e := onlyEntry(t, readState(t, filepath.Join(mnt1, sub)))
	if e.Stage != state.Ready || e.Generation != 2 {
		t.Fatalf("after B: %s gen %d, want READY gen 2", e.Stage, e.Generation)
	}
	published := e.Path
	if err := syscall.Kill(apid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	aline, _ := bufio.NewReader(aout).ReadString('\n')
	if err := a.Wait(); err != nil {
		t.Fatalf("A after resuming: %v", err)
	}
	relA, _ := filepath.Rel(filepath.Join(mnt1, sub), strings.TrimSpace(aline))
	relB, _ := filepath.Rel(filepath.Join(mnt2, sub), strings.TrimSpace(bline))
	if relA != relB || relA != published {
		t.Errorf("A printed %q, B %q, the state has %q", relA, relB, published)
	}
	e = onlyEntry(t, readState(t, filepath.Join(mnt1, sub)))
	if e.Generation != 2 || e.Path != published || e.Stage != state.Ready {
		t.Errorf("A changed the entry: %s gen %d path %s", e.Stage, e.Generation, e.Path)
	}
	if got := fileSum(t, filepath.Join(mnt1, sub, published)); got != hexSum(body) {
		t.Error("content does not verify after A resumed")
	}
	// Through the export itself: a mount's directory cache may list a name
	// another mount renamed away for up to its cache time.
	noStaging(t, filepath.Join(rigtest.Env(t, "SHAREDFS_EXPORT"), sub))
}

// TestE2ELsJSON checks the fields of `ls --json` that scripts rely on.
func TestE2ELsJSON(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	if out, err := exec.Command(bin, "--root", root, "get", "--dependent", "job1", "file://"+abs).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	out, err := exec.Command(bin, "--root", root, "ls", "--json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var list []map[string]any
	if err := json.Unmarshal(out, &list); err != nil || len(list) != 1 {
		t.Fatalf("ls --json: %v: %s", err, out)
	}
	for _, f := range []string{"key", "kind", "source", "stage", "path", "image_id", "size_bytes", "dependents", "last_used", "owner", "generation", "message"} {
		if _, ok := list[0][f]; !ok {
			t.Errorf("ls --json lacks %q", f)
		}
	}
	if list[0]["stage"] != "READY" || list[0]["kind"] != "bundle" || fmt.Sprint(list[0]["dependents"]) != "[job1]" {
		t.Errorf("ls --json: %s", out)
	}
}
