package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// scrape returns the value of one sample of /metrics.
func scrape(t *testing.T, addr, sample string) float64 {
	t.Helper()
	resp, err := http.Get(addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// TestE2EServe: serve as a process; other processes register dependents;
// serve downloads once, its metrics say so, a budget change evicts, a second
// serve on the same root and host is refused naming the first one's pid,
// and SIGTERM stops it promptly with no staging litter.
func TestE2EServe(t *testing.T) {
	root := t.TempDir()
	body := randomBody(1 << 20)
	srv := newBlobServer(t, body, nil)
	serve := exec.Command(bin, "--root", root, "serve", "--listen", "127.0.0.1:0", "--cleanup-interval", "100ms")
	errPipe, _ := serve.StderrPipe()
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	defer serve.Process.Kill()
	sc := bufio.NewScanner(errPipe)
	var addr string
	for sc.Scan() {
		if m := regexp.MustCompile(`serving .* on (http://\S+)`).FindStringSubmatch(sc.Text()); m != nil {
			addr = m[1]
			break
		}
	}
	if addr == "" {
		t.Fatal("serve did not say where it listens")
	}
	go io.Copy(io.Discard, errPipe)

	second := exec.Command(bin, "--root", root, "serve", "--listen", "127.0.0.1:0")
	out, err := second.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "pid "+strconv.Itoa(serve.Process.Pid)) {
		t.Errorf("second serve: %v, %q; want a refusal naming pid %d", err, out, serve.Process.Pid)
	}
	// Through a symbolic link to the root: the same root, refused alike.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(root, link); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // one that starts serves until killed
	defer cancel()
	out, err = exec.CommandContext(ctx, bin, "--root", link, "serve", "--listen", "127.0.0.1:0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "pid "+strconv.Itoa(serve.Process.Pid)) {
		t.Errorf("second serve through a link to the root: %v, %q; want a refusal naming pid %d", err, out, serve.Process.Pid)
	}

	url := srv.URL + "/b.bin"
	const n = 4
	for i := range n {
		get := exec.Command(bin, "--root", root, "get", "--no-wait", "--dependent", "job"+strconv.Itoa(i), url)
		if out, err := get.CombinedOutput(); err != nil {
			t.Fatalf("get: %v: %s", err, out)
		}
	}
	waitFor(t, "serve to publish", func() bool { return scrape(t, addr, `depcache_downloads_total{event="finished"}`) == 1 })
	if got := scrape(t, addr, `depcache_entries{stage="READY"}`); got != 1 {
		t.Errorf("READY entries = %v, want 1", got)
	}
	if r := srv.requests.Load(); r != 1 {
		t.Errorf("%d requests, want 1", r)
	}
	for i := range n {
		if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "job"+strconv.Itoa(i), url).CombinedOutput(); err != nil {
			t.Fatalf("release: %v: %s", err, out)
		}
	}
	// The operator shrinks the budget; serve's next sweep evicts.
	if out, err := exec.Command(bin, "--root", root, "policy", "--max-size", "1", "--min-age", "0s").CombinedOutput(); err != nil {
		t.Fatalf("policy: %v: %s", err, out)
	}
	waitFor(t, "serve to evict", func() bool { return scrape(t, addr, `depcache_evictions_total{reason="budget"}`) == 1 })

	start := time.Now()
	serve.Process.Signal(syscall.SIGTERM)
	if err := serve.Wait(); err != nil {
		t.Errorf("serve after SIGTERM: %v", err)
	}
	t.Logf("serve stopped %v after SIGTERM", time.Since(start))
	noStaging(t, root)
	if _, err := os.Stat(filepath.Join(root, "state.json")); err != nil {
		t.Fatal(err)
	}
}

// resolveExisting names a root that does not exist yet as it will be once
// made: through a link to its parent, and without one, alike.
func TestResolveExisting(t *testing.T) {
	real := t.TempDir()
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	realResolved, err := filepath.EvalSymlinks(real)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ in, want string }{
		{filepath.Join(link, "a", "b"), filepath.Join(realResolved, "a", "b")},
		{filepath.Join(real, "a", "b"), filepath.Join(realResolved, "a", "b")},
		{link, realResolved},
	} {
		if got := resolveExisting(tc.in); got != tc.want {
			t.Errorf("resolveExisting(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
	if servePidPath(filepath.Join(link, "root")) != servePidPath(filepath.Join(real, "root")) {
		t.Error("a root not made yet, named through a link to its parent, has another pid file")
	}
}
