package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// A FAILED get says when a get retries it and which flag sets that, in the
// human line and in --json (retry_at, permanent); get --retry retries at
// once, a plain get waits for the cool-down.
func TestGetRetryAndRetryAt(t *testing.T) {
	root := t.TempDir()
	p := filepath.Join(t.TempDir(), "later.txt")
	src := "file://" + p
	before := time.Now()
	code, _, errs := cli(t, root, "get", "--failure-cooldown", "1h", "--retries", "0", src)
	if code != 1 {
		t.Fatalf("get of a missing file: exit %d, %s", code, errs)
	}
	for _, want := range []string{"no such file", "permanent", "--failure-cooldown", "doubling per failure", "get --retry", "retries it after " + before.UTC().Add(time.Hour).Format("2006-01-02T15")} {
		if !strings.Contains(errs, want) {
			t.Errorf("the FAILED line does not say %q:\n%s", want, errs)
		}
	}
	code, out, _ := cli(t, root, "--json", "get", "--failure-cooldown", "1h", src)
	var got []struct {
		Stage     string `json:"stage"`
		RetryAt   string `json:"retry_at"`
		Permanent bool   `json:"permanent"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil || len(got) != 1 || code != 1 {
		t.Fatalf("get --json of a FAILED entry: exit %d, %v:\n%s", code, err, out)
	}
	at, err := time.Parse(time.RFC3339, got[0].RetryAt)
	if err != nil || got[0].Stage != "FAILED" || !got[0].Permanent {
		t.Fatalf("get --json: %+v (%v); want FAILED, permanent, an RFC 3339 retry_at", got[0], err)
	}
	if d := at.Sub(before); d < time.Hour-2*time.Second || d > time.Hour+time.Minute {
		t.Errorf("retry_at %s is %s after the failure, want the 1h cool-down", got[0].RetryAt, d)
	}

	if err := os.WriteFile(p, []byte("here now\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := cli(t, root, "get", "--failure-cooldown", "1h", src); code != 1 {
		t.Errorf("a get within the cool-down: exit %d, want 1 (still FAILED)", code)
	}
	code, out, errs = cli(t, root, "get", "--retry", "--failure-cooldown", "1h", src)
	if code != 0 {
		t.Fatalf("get --retry: exit %d, %s", code, errs)
	}
	if b, err := os.ReadFile(strings.TrimSpace(out)); err != nil || string(b) != "here now\n" {
		t.Errorf("get --retry printed %q: %q %v", out, b, err)
	}
}

// An empty --dependent is refused; --sha256 takes upper case and the sha256:
// prefix, for the one entry the lower-case digest names.
func TestDependentEmptyAndSHA256Spellings(t *testing.T) {
	root := t.TempDir()
	src := helloSource(t)
	if code, _, errs := cli(t, root, "get", "--dependent", "", src); code != 2 || !strings.Contains(errs, "--dependent") {
		t.Errorf("--dependent '': exit %d, %q; want 2", code, errs)
	}
	b, _ := os.ReadFile(strings.TrimPrefix(src, "file://"))
	sum := hexSum(b)
	for _, spelling := range []string{strings.ToUpper(sum), "sha256:" + sum, "SHA256:" + strings.ToUpper(sum)} {
		if code, _, errs := cli(t, root, "get", "--dependent", "job", "--sha256", spelling, src); code != 0 {
			t.Errorf("--sha256 %s: exit %d, %s", spelling, code, errs)
		}
	}
	st := readState(t, root)
	if e := onlyEntry(t, st); e.Key.SHA256 != sum {
		t.Errorf("key sha256 %q, want %q", e.Key.SHA256, sum)
	}
	if code, _, _ := cli(t, root, "get", "--sha256", "sha256:zz", src); code != 2 {
		t.Errorf("--sha256 sha256:zz: exit %d, want 2", code)
	}
}

// get --no-wait with nobody driving the entry says that it is queued and
// what it waits for (stderr, and queued in --json); a get that waits then
// downloads it.
func TestNoWaitSaysQueued(t *testing.T) {
	root := t.TempDir()
	src := helloSource(t)
	code, out, errs := cli(t, root, "get", "--no-wait", "--dependent", "job", src)
	if code != 0 || strings.TrimSpace(out) != "DOWNLOADING" || !strings.Contains(errs, "queued") || !strings.Contains(errs, "depcache serve") {
		t.Fatalf("get --no-wait: exit %d, stdout %q, stderr %q; want DOWNLOADING and why it waits", code, out, errs)
	}
	if e := onlyEntry(t, readState(t, root)); e.Owner != nil || e.Stage != state.Downloading {
		t.Fatalf("entry after --no-wait: %+v", e)
	}
	_, out, _ = cli(t, root, "--json", "get", "--no-wait", "--dependent", "job", src)
	if !strings.Contains(out, `"queued": true`) {
		t.Errorf("get --no-wait --json does not say queued:\n%s", out)
	}
	// ls, in text and --json, and the status page say it too.
	if _, out, _ := depcache(t, root, "ls"); !regexp.MustCompile(`DOWNLOADING .*queued`).MatchString(out) {
		t.Errorf("ls does not say the entry is queued:\n%s", out)
	}
	if _, out, _ := depcache(t, root, "--json", "ls"); !strings.Contains(out, `"queued": true`) {
		t.Errorf("ls --json does not say queued:\n%s", out)
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	m, err := manager.New(manager.Config{Root: root, Log: log}) // it never starts: nobody drives the entry
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(serveMux(m, prometheus.NewRegistry()))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !regexp.MustCompile(`<td class="DOWNLOADING">DOWNLOADING <span class="queued">\(queued\)</span></td>`).Match(page) {
		t.Errorf("the status page does not say the entry is queued:\n%s", page)
	}
	if code, out, errs := cli(t, root, "get", "--dependent", "job", src); code != 0 || !strings.HasPrefix(out, root) {
		t.Fatalf("a get that waits: exit %d, %q, %s", code, out, errs)
	}
	if _, out, _ := depcache(t, root, "--json", "ls"); !strings.Contains(out, `"queued": false`) {
		t.Errorf("ls --json of a READY entry does not say queued false:\n%s", out)
	}
}

// get --no-wait with a serve running on the root, on this host, names it
// as what takes the entry up: it does not say that one must be started.
func TestNoWaitWithServeRunning(t *testing.T) {
	root := t.TempDir()
	_, serve := startServe(t, root)
	code, out, errs := depcache(t, root, "get", "--no-wait", "--dependent", "job", smallFile(t, "served.txt", "served\n"))
	if code != 0 || !strings.Contains(errs, fmt.Sprintf("'depcache serve' (pid %d)", serve.Process.Pid)) || strings.Contains(errs, "once a") {
		t.Errorf("get --no-wait beside a serve: exit %d, %q, stderr %q; want the serve's pid, not 'once a serve runs'", code, out, errs)
	}
	stopServe(t, serve)
}
