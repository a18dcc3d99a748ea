package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state/rigtest"
)

// startBin starts the built binary on root, with the environment cleared
// of DEPCACHE_* settings and env added; its output goes to the buffers.
func startBin(t *testing.T, root string, env []string, args ...string) (cmd *exec.Cmd, stdout, stderr *bytes.Buffer) {
	t.Helper()
	cmd = exec.Command(bin, append([]string{"--root", root}, args...)...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DEPCACHE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	stdout, stderr = &bytes.Buffer{}, &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killIfRunning(t, cmd) })
	return cmd, stdout, stderr
}

// exitStatus waits for cmd and returns its exit status.
func exitStatus(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	err := cmd.Wait()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// TestRunBadInput: each kind of bad input exits 2 naming what is wrong,
// before anything is fetched or run.
func TestRunBadInput(t *testing.T) {
	src := testSource(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--dep", "=" + src, "--", "true"}, "empty NAME"},
		{[]string{"run", "--dep", src, "--", "true"}, "want NAME=SOURCE"},
		{[]string{"run", "--dep", "A=" + src}, "missing CMD"},
		{[]string{"run", "--dep", "A=" + src, "--"}, "missing CMD"},
		{[]string{"run", "--dep", "1A=" + src, "--", "true"}, `NAME "1A" is not a valid environment variable name`},
		{[]string{"run", "--dep", "A-B=" + src, "--", "true"}, `NAME "A-B" is not a valid environment variable name`},
		{[]string{"run", "--dep", "A=", "--", "true"}, "empty SOURCE"},
		{[]string{"run", "--dep", "PATH=" + src, "--", "true"}, `NAME "PATH" would replace`},
		{[]string{"run", "--dep", "DEPCACHE_ROOT=" + src, "--", "true"}, `NAME "DEPCACHE_ROOT" would replace`},
		{[]string{"run", "--dep", "LD_PRELOAD=" + src, "--", "true"}, `NAME "LD_PRELOAD" would replace`},
		{[]string{"run", "--dep", "A=" + src, "--dep", "A=" + src, "--", "true"}, "A is given twice"},
		{[]string{"run", "--dep", "A=" + src, "--sha256", "B=" + strings.Repeat("0", 64), "--", "true"}, "no --dep B=SOURCE"},
		{[]string{"run", "--dep", "A=" + src, "--sha256", "A=zz", "--", "true"}, "--sha256"},
		{[]string{"run", "--dep", "A=" + src, "--sha256", "A=" + strings.Repeat("0", 64), "--sha256", "A=" + strings.Repeat("1", 64), "--", "true"}, "A is given another sha256 already"},
		{[]string{"run", "--dep", "A=gopher://x", "--", "true"}, "--dep A"},
		{[]string{"run", "--timeout", "-1s", "--dep", "A=" + src, "--", "true"}, "--timeout"},
		{[]string{"run", "--progress-interval", "1ns", "--dep", "A=" + src, "--", "true"}, "--progress-interval 1ns: bad flag value: must be at least 100ms"},
	} {
		root := t.TempDir()
		code, _, stderr := cli(t, root, c.args...)
		if code != exitUsage || !strings.Contains(stderr, c.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 naming %q", c.args, code, stderr, c.want)
		}
		if ents, _ := os.ReadDir(filepath.Join(root, "entries")); len(ents) != 0 {
			t.Errorf("%q fetched something", c.args)
		}
	}
}

// TestRunExitStatusAndSignals: CMD sees $A and exits 7: run exits 7; CMD
// killed by SIGKILL: 137; SIGINT, SIGTERM and SIGHUP sent to run reach CMD,
// which traps each and exits 40+N; and the dependency is released after
// each run.
func TestRunExitStatusAndSignals(t *testing.T) {
	root := t.TempDir()
	src := testSource(t)
	code, _, stderr := depcache(t, root, "run", "--dep", "A="+src, "--", "sh", "-c", `test -e "$A/hello" || exit 99; exit 7`)
	if code != 7 {
		t.Fatalf("exit %d, want CMD's 7; stderr %s", code, stderr)
	}
	if code, _, stderr := depcache(t, root, "run", "--dep", "A="+src, "--", "sh", "-c", `kill -KILL $$`); code != 128+9 {
		t.Fatalf("CMD killed by SIGKILL: exit %d, want 137; stderr %s", code, stderr)
	}
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP} {
		ready := filepath.Join(t.TempDir(), "ready")
		n := int(sig)
		script := fmt.Sprintf(`trap 'exit %d' %d; touch %q; while :; do sleep 0.01; done`, 40+n, n, ready)
		cmd, _, stderr := startBin(t, root, nil, "run", "--dep", "A="+src, "--", "sh", "-c", script)
		waitFor(t, "CMD to set its trap", func() bool { return exists(ready) })
		cmd.Process.Signal(sig)
		if code := exitStatus(t, cmd); code != 40+n {
			t.Errorf("%v sent to run: exit %d, want CMD's %d; stderr %s", sig, code, 40+n, stderr)
		}
	}
	e := onlyEntry(t, readState(t, root))
	if len(e.Dependents) != 0 {
		t.Errorf("dependents left after the runs: %v", e.Dependents)
	}
}

// TestRunHoldsAgainstGC: a `gc --max-size 1 --min-age 0s` while CMD runs
// leaves both dependencies; once CMD exited, the next gc evicts them.
func TestRunHoldsAgainstGC(t *testing.T) {
	root := t.TempDir()
	body := randomBody(1 << 20)
	srv := newBlobServer(t, body, nil)
	dir := t.TempDir()
	ready, release := filepath.Join(dir, "ready"), filepath.Join(dir, "release")
	script := fmt.Sprintf(`echo "$A $B" >%q; while ! test -f %q; do sleep 0.01; done; cmp "$B" - <"$B"`, ready, release)
	cmd, _, stderr := startBin(t, root, nil, "run", "--dep", "A="+testSource(t), "--dep", "B="+srv.URL+"/b.bin",
		"--sha256", "B="+hexSum(body), "--", "sh", "-c", script)
	waitFor(t, "CMD to start", func() bool { return exists(ready) })
	code, out, errs := depcache(t, root, "gc", "--max-size", "1", "--min-age", "0s")
	if code != 0 {
		t.Fatalf("gc: exit %d: %s %s", code, out, errs)
	}
	if n := len(readState(t, root).Entries); n != 2 {
		t.Fatalf("%d entries after a gc while CMD runs; want both kept\n%s", n, out)
	}
	paths, _ := os.ReadFile(ready)
	for _, p := range strings.Fields(string(paths)) {
		if !exists(p) {
			t.Errorf("%s gone while CMD runs", p)
		}
	}
	os.WriteFile(release, nil, 0o644)
	if code := exitStatus(t, cmd); code != 0 {
		t.Fatalf("run: exit %d; stderr %s", code, stderr)
	}
	if code, out, errs := depcache(t, root, "gc", "--max-size", "1", "--min-age", "0s"); code != 0 {
		t.Fatalf("gc: exit %d: %s %s", code, out, errs)
	}
	if n := len(readState(t, root).Entries); n != 0 {
		t.Fatalf("%d entries after CMD exited and gc ran; want 0", n)
	}
}

// TestRunKilled: run SIGKILLed while CMD runs: CMD dies with it (SIGKILL),
// and a later sweep reaps its dependent and evicts the entry.
func TestRunKilled(t *testing.T) {
	root := t.TempDir()
	pidFile := filepath.Join(t.TempDir(), "pid")
	cmd, _, _ := startBin(t, root, nil, "run", "--dep", "A="+testSource(t), "--",
		"sh", "-c", fmt.Sprintf(`echo $$ >%q.tmp && mv %q.tmp %q; while :; do sleep 0.01; done`, pidFile, pidFile, pidFile))
	waitFor(t, "CMD to start", func() bool { return exists(pidFile) })
	b, _ := os.ReadFile(pidFile)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if n := len(onlyEntry(t, readState(t, root)).Dependents); n != 1 {
		t.Fatalf("%d dependents while run runs, want 1", n)
	}
	cmd.Process.Kill()
	cmd.Wait()
	waitFor(t, "CMD to die with run", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return err != nil || strings.Contains(string(b), ") Z ")
	})
	code, out, errs := depcache(t, root, "gc", "--max-size", "1", "--min-age", "0s")
	if code != 0 || !strings.Contains(out+errs, "reap") {
		t.Fatalf("gc after the kill: exit %d: %s %s; want the dependent reaped", code, out, errs)
	}
	if n := len(readState(t, root).Entries); n != 0 {
		t.Fatalf("%d entries after the sweep; want the dead run's entry evicted", n)
	}
}

// TestRunFailedAndTimeout: a FAILED source exits 1 and a --timeout 3,
// both before CMD starts.
func TestRunFailedAndTimeout(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "ran")
	touch := []string{"--", "touch", marker}
	root := t.TempDir()
	code, _, stderr := depcache(t, root, append([]string{"run", "--dep", "A=" + testSource(t), "--dep", "B=file:///nonexistent/x", "--retries", "0"}, touch...)...)
	if code != exitFailed || !strings.Contains(stderr, "--dep B") {
		t.Errorf("a FAILED source: exit %d, stderr %q; want 1 naming B", code, stderr)
	}
	srv := newBlobServer(t, randomBody(1<<20), func(int32) bool { return true })
	code, _, stderr = depcache(t, root, append([]string{"run", "--timeout", "500ms", "--dep", "S=" + srv.URL + "/s"}, touch...)...)
	if code != exitTimeout || !strings.Contains(stderr, "--timeout") {
		t.Errorf("a stalled source under --timeout: exit %d, stderr %q; want 3", code, stderr)
	}
	if exists(marker) {
		t.Error("CMD ran")
	}
	for _, e := range readState(t, root).Entries {
		if len(e.Dependents) != 0 {
			t.Errorf("%s keeps dependents %v after the run gave up", e.Key.Source, e.Dependents)
		}
	}
}

// TestRunLostDependency: while CMD runs, run's dependent is released by
// another process (as a reap after a stop past the lease would remove it):
// run names the dependency, ends CMD and exits 75.
func TestRunLostDependency(t *testing.T) {
	for _, jsonOut := range []bool{false, true} {
		root := t.TempDir()
		src := testSource(t)
		dir := t.TempDir()
		ready, ended := filepath.Join(dir, "ready"), filepath.Join(dir, "ended")
		script := fmt.Sprintf(`trap 'touch %q; exit 0' TERM; touch %q; while :; do sleep 0.01; done`, ended, ready)
		args := []string{"run", "--dep", "LIB=" + src, "--", "sh", "-c", script}
		if jsonOut {
			args = append([]string{"--json"}, args...)
		}
		cmd, _, stderr := startBin(t, root, nil, args...)
		waitFor(t, "CMD to start", func() bool { return exists(ready) })
		e := onlyEntry(t, readState(t, root))
		if len(e.Dependents) != 1 {
			t.Fatalf("dependents %v, want run's one", e.Dependents)
		}
		for name := range e.Dependents {
			if code, out, errs := depcache(t, root, "release", "--dependent", name, src); code != 0 {
				t.Fatalf("release: exit %d: %s %s", code, out, errs)
			}
		}
		if code := exitStatus(t, cmd); code != exitLost {
			t.Fatalf("json=%v: run: exit %d, want %d; stderr %s", jsonOut, code, exitLost, stderr)
		}
		if !strings.Contains(stderr.String(), "dependency LIB") || !exists(ended) {
			t.Errorf("json=%v: stderr %q, CMD ended: %v; want LIB named and CMD sent SIGTERM", jsonOut, stderr, exists(ended))
		}
		if jsonOut {
			// The error object, of kind lost (it was a line of text),
			// after the manager's error-level record of the loss.
			out := "\n" + stderr.String()
			i := strings.Index(out, "\n{\n")
			if i < 0 {
				t.Fatalf("run --json, a dependency lost: no error object in %q", out)
			}
			if e := decodeError(t, out[i+1:]); e.Kind != "lost" || e.ExitCode != exitLost {
				t.Errorf("run --json, a dependency lost: %+v", e)
			}
			checkSchema(t, "error", out[i+1:])
		} else if n := strings.Count(stderr.String(), "dependency LIB"); n != 1 {
			t.Errorf("stderr says it %d times, want once: %q", n, stderr)
		}
	}
}

// TestRunTwoHosts: 8 runs on 2 fake hosts (4 each, each host on its own
// sshfs mount of one export) with the same two sources: one download of
// each, and both variables set, to the right content, in every CMD.
func TestRunTwoHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	bodyA, bodyB := randomBody(2<<20), randomBody(3<<20)
	srvA, srvB := newBlobServer(t, bodyA, nil), newBlobServer(t, bodyB, nil)
	sub := fmt.Sprintf("e2e-run-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	out := t.TempDir()
	script := `pids=""
for i in 1 2 3 4; do
  "$BIN" --root "$ROOT" run --dep A="$URLA" --dep B="$URLB" -- \
    sh -c 'test -n "$A" && test -n "$B" && sha256sum "$A" "$B" | cut -d" " -f1 >"$OUT/$HOST-'$i'.sums"' \
    2>"$OUT/$HOST-$i.err" &
  pids="$pids $!"
done
rc=0
for p in $pids; do wait $p || rc=1; done
exit $rc`
	var hosts []*exec.Cmd
	for _, h := range []struct{ name, mnt string }{{"host-a", mnt1}, {"host-b", mnt2}} {
		cmd := rigtest.FakeHost(t, h.name, 0, "sh", "-c", script)
		cmd.Env = append(cmd.Env, "BIN="+bin, "ROOT="+filepath.Join(h.mnt, sub), "URLA="+srvA.URL+"/a.bin",
			"URLB="+srvB.URL+"/b.bin", "OUT="+out, "HOST="+h.name)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, cmd)
	}
	for _, h := range hosts {
		if err := h.Wait(); err != nil {
			t.Errorf("a run failed: %v", err)
		}
	}
	want := hexSum(bodyA) + "\n" + hexSum(bodyB) + "\n"
	for _, h := range []string{"host-a", "host-b"} {
		for i := 1; i <= 4; i++ {
			got, _ := os.ReadFile(filepath.Join(out, fmt.Sprintf("%s-%d.sums", h, i)))
			if string(got) != want {
				errs, _ := os.ReadFile(filepath.Join(out, fmt.Sprintf("%s-%d.err", h, i)))
				t.Errorf("%s-%d: CMD saw sums %q, want %q; stderr %s", h, i, got, want, errs)
			}
		}
	}
	for name, s := range map[string]*blobServer{"A": srvA, "B": srvB} {
		if n, c := s.requests.Load(), s.complete.Load(); n != 1 || c != 1 {
			t.Errorf("source %s: %d requests, %d complete downloads; want exactly 1", name, n, c)
		}
	}
}
