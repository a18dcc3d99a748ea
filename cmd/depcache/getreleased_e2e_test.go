package main

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestE2EGetOfDependentReleasedWhileWaiting: get --dependent A waits for a
// download; another process releases A meanwhile while B, another
// dependent, keeps the entry. A's get fails (exit 1, not_registered), for
// A holds nothing; B's prints the path.
func TestE2EGetOfDependentReleasedWhileWaiting(t *testing.T) {
	body := randomBody(1 << 20)
	gate := make(chan struct{})
	started := make(chan struct{}, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(200)
		w.Write(body[:1000])
		w.(http.Flusher).Flush()
		started <- struct{}{}
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
		w.Write(body[1000:])
	}))
	t.Cleanup(srv.Close)
	root := t.TempDir()
	url := srv.URL + "/blob.bin"
	start := func(dep string, args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
		cmd := exec.Command(bin, append([]string{"--root", root, "get", "--dependent", dep}, append(args, url)...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { killIfRunning(t, cmd) })
		return cmd, &out, &errb
	}
	a, aOut, aErr := start("A", "--json")
	<-started
	b, bOut, bErr := start("B")
	waitFor(t, "B registered", func() bool {
		for _, e := range readState(t, root).Entries {
			_, ok := e.Dependents["B"]
			return ok
		}
		return false
	})
	if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "A", url).CombinedOutput(); err != nil {
		t.Fatalf("release of A: %v\n%s", err, out)
	}
	close(gate)
	var exit *exec.ExitError
	if err := a.Wait(); !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("A's get, A released while it waited: %v, want exit 1\nstdout: %s\nstderr: %s", err, aOut, aErr)
	}
	if s := aErr.String(); !strings.Contains(s, `"not_registered"`) || !strings.Contains(s, `dependent \"A\"`) {
		t.Errorf("A's get said %q, want a not_registered error naming dependent A", s)
	}
	if aOut.Len() != 0 {
		t.Errorf("A's get printed %q on stdout", aOut)
	}
	if err := b.Wait(); err != nil {
		t.Fatalf("B's get: %v\n%s", err, bErr)
	}
	p := strings.TrimSpace(bOut.String())
	if r, err := filepath.Rel(root, p); err != nil || strings.HasPrefix(r, "..") || fileSum(t, p) != hexSum(body) {
		t.Errorf("B's get printed %q: want the path of the content in the root", p)
	}
}

// TestE2EGetOfOnlyDependentReleasedWhileWaiting: as above with no other
// dependent, so the release cancels the download and removes the entry,
// or with a --ttl that ends while the get waits: the get still says
// not_registered (it said not_found, naming no dependent).
func TestE2EGetOfOnlyDependentReleasedWhileWaiting(t *testing.T) {
	srv := newBlobServer(t, randomBody(1<<20), func(int32) bool { return true })
	for _, how := range []string{"released", "ttl"} {
		root := t.TempDir()
		url := srv.URL + "/" + how + ".bin"
		args := []string{"--json", "get", "--dependent", "A", url}
		if how == "ttl" {
			args = []string{"--json", "get", "--dependent", "A", "--ttl", "1s", url}
		}
		a, aOut, aErr := startBin(t, root, nil, args...)
		<-srv.started
		if how == "released" {
			if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "A", url).CombinedOutput(); err != nil {
				t.Fatalf("release of A: %v\n%s", err, out)
			}
		}
		if code := exitStatus(t, a); code != 1 {
			t.Fatalf("%s: A's get exited %d, want 1\nstdout: %s\nstderr: %s", how, code, aOut, aErr)
		}
		e := decodeError(t, aErr.String())
		if e.Kind != "not_registered" || !strings.Contains(e.Error, `dependent "A"`) {
			t.Errorf("%s: A's get said %+v, want a not_registered error naming dependent A", how, e)
		}
		if aOut.Len() != 0 {
			t.Errorf("%s: A's get printed %q on stdout", how, aOut)
		}
	}
}
