package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"github.com/depcache/depcache/state/rigtest"
)

// TestStateFlagErrors: bad --state input exits 2 naming what is wrong; an
// endpoint that does not answer exits 1 naming it.
func TestStateFlagErrors(t *testing.T) {
	root := t.TempDir()
	pem := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(pem, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A plain HTTP server where etcd was meant (a wrong port).
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("hello")) }))
	t.Cleanup(web.Close)
	webEP := strings.TrimPrefix(web.URL, "http://")
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--state", "etcd://127.0.0.1/x", "ls"}, 2, "missing port"},
		{[]string{"--state", "etcd://127.0.0.1:2379", "ls"}, 2, "no prefix"},
		{[]string{"--state", "consul://a:1/x", "ls"}, 2, "not an etcd:// URL"},
		{[]string{"--state", "etcd://127.0.0.1:1/x", "--etcd-cacert", pem, "ls"}, 2, "no PEM certificate"},
		{[]string{"--state", "etcd://127.0.0.1:1/x", "--etcd-cert", pem, "ls"}, 2, "--etcd-key"},
		{[]string{"--etcd-user", "u", "ls"}, 2, "need --state"},
		// A user without a password would run unauthenticated: the
		// client authenticates only with both.
		{[]string{"--state", "etcd://127.0.0.1:1/x", "--etcd-user", "u", "ls"}, 2, "no password"},
		{[]string{"--state", "etcd://127.0.0.1:1/x", "--etcd-user", "u:pw", "ls"}, 1, "127.0.0.1:1"},
		{[]string{"--state", "etcd://127.0.0.1:1/x", "ls"}, 1, "etcd://127.0.0.1:1/x: etcd cluster unavailable"},
		{[]string{"--state", "etcd://127.0.0.1:1/x", "get", "--no-wait", "file:///nonexistent"}, 1, "127.0.0.1:1"},
		{[]string{"--state", "etcd://" + webEP + "/x", "ls"}, 1, "etcd cluster unavailable: endpoint " + webEP + " does not answer as etcd"},
		{[]string{"--state", "etcd://" + webEP + "/x", "lock", "n", "--", "true"}, 1, "endpoint " + webEP + " does not answer as etcd"},
		// A bad flag is reported as one, before the root is looked at.
		{[]string{"--root", filepath.Join(root, "missing"), "--state", "etcd://127.0.0.1:99999/x", "ls"}, 2, "port 99999 out of range"},
		{[]string{"--root", filepath.Join(root, "missing"), "--state", "etcd://127.0.0.1:1/x", "--etcd-cacert", pem, "ls"}, 2, "no PEM certificate"},
		{[]string{"--state", "etcd://127.0.0.1:1/x?y=z", "ls"}, 2, "query or fragment"},
		// get --timeout bounds reaching the cluster too (exit 3, not the
		// dial timeout's exit 1).
		{[]string{"--state", "etcd://127.0.0.1:1/x", "get", "--timeout", "300ms", "file:///nonexistent"}, 3, "not ready after 300ms"},
	} {
		code, _, stderr := cli(t, root, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr, c.code, c.want)
		}
	}
	// A cluster that does not answer is its own kind of error, which a
	// script may retry; doctor still says, member by member, who did
	// not answer.
	code, _, stderr := cli(t, root, "--json", "--state", "etcd://127.0.0.1:1/x", "ls")
	var e errorJSON
	if err := json.Unmarshal([]byte(stderr), &e); err != nil || code != 1 || e.Kind != "unavailable" || e.ExitCode != 1 {
		t.Errorf("ls --json on an etcd that does not answer: exit %d, %q (%v); want kind unavailable, exit 1", code, stderr, err)
	}
	code, _, stderr = cli(t, root, "--json", "--state", "etcd://"+webEP+"/x", "get", "file:///nonexistent")
	e = errorJSON{}
	if err := json.Unmarshal([]byte(stderr), &e); err != nil || code != 1 || e.Kind != "unavailable" || e.ExitCode != 1 || !strings.Contains(e.Error, webEP+" does not answer as etcd") {
		t.Errorf("get --json on a plain HTTP server: exit %d, %q (%v); want kind unavailable, exit 1, naming the endpoint", code, stderr, err)
	}
	code, stdout, _ := cli(t, root, "--json", "--state", "etcd://127.0.0.1:1/x", "doctor")
	var checks []manager.Check
	if err := json.Unmarshal([]byte(stdout), &checks); err != nil || code != 1 {
		t.Fatalf("doctor --json: exit %d, %v: %s", code, err, stdout)
	}
	got := map[string]string{}
	for _, c := range checks {
		got[c.Name] = c.Status
	}
	if got["etcd 127.0.0.1:1"] != "fail" || got["etcd leader"] != "fail" || got["state"] != "fail" {
		t.Errorf("doctor on an etcd that does not answer: %+v; want the endpoint, the leader and the state failing", checks)
	}
}

// TestStateEtcdCLI: get, ls and release on an embedded etcd member; the
// root's ID binds the prefix, and another root is refused naming both.
func TestStateEtcdCLI(t *testing.T) {
	m := etcdtest.Start(t)
	url := "etcd://" + m.Endpoint + "/cli"
	src := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(src, []byte("content"), 0o644); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	code, stdout, stderr := cli(t, root, "--state", url, "get", "--dependent", "job", "file://"+src)
	if code != 0 {
		t.Fatalf("get: exit %d: %s", code, stderr)
	}
	if b, err := os.ReadFile(strings.TrimSpace(stdout)); err != nil || string(b) != "content" {
		t.Errorf("get printed %q: %v %q", stdout, err, b)
	}
	if _, err := os.Stat(filepath.Join(root, "state.json")); err == nil {
		t.Error("get with --state etcd wrote a state file in the root")
	}
	// The environment twin, in a process of its own (cli clears DEPCACHE_*).
	ls := exec.Command(bin, "--root", root, "ls", "--json")
	ls.Env = append(os.Environ(), "DEPCACHE_STATE="+url)
	if out, err := ls.CombinedOutput(); err != nil || !strings.Contains(string(out), `"job"`) {
		t.Errorf("DEPCACHE_STATE=%s ls: %v: %s", url, err, out)
	}
	if code, _, stderr := cli(t, root, "--state", url, "release", "--dependent", "job", "file://"+src); code != 0 {
		t.Errorf("release: exit %d: %s", code, stderr)
	}
	// doctor's repairs on etcd say what they did there: no lock to break,
	// and no file copy of the state a rebuild replaced.
	if code, stdout, stderr := cli(t, root, "--state", url, "doctor", "--break-lock"); code != 0 || !strings.Contains(stdout, "no state lock to break") {
		t.Errorf("doctor --break-lock on etcd: exit %d: %s %s", code, stdout, stderr)
	}
	if code, stdout, stderr := cli(t, root, "--state", url, "doctor", "--rebuild", "--force"); code != 0 || !strings.Contains(stdout, "dropped, as "+url) || strings.Contains(stdout, "kept at ") {
		t.Errorf("doctor --rebuild --force on etcd: exit %d: %s %s", code, stdout, stderr)
	}
	id, err := os.ReadFile(filepath.Join(root, etcdstore.RootIDFile))
	if err != nil {
		t.Fatal(err)
	}
	// A command that forgets --state on this root is refused, naming the
	// ID file and the flag: the file store would take the etcd store's
	// content, which its state does not name, for orphans and move it
	// aside under its holders.
	if code, _, _ := cli(t, root, "--state", url, "get", "--dependent", "held", "file://"+src); code != 0 {
		t.Fatal("get --dependent held failed")
	}
	published, _ := filepath.Glob(filepath.Join(root, "entries", "*"))
	for _, args := range [][]string{{"get", "file://" + src}, {"ls"}, {"gc", "--max-size", "1", "--min-age", "0s"}, {"doctor"}} {
		code, _, stderr := cli(t, root, args...)
		if code != 1 || !strings.Contains(stderr, etcdstore.RootIDFile) || !strings.Contains(stderr, "--state") {
			t.Errorf("%v without --state on a root bound to etcd: exit %d: %s", args, code, stderr)
		}
	}
	// lock and locks too: a file lock there excludes none of the hosts
	// that lock through the etcd store.
	for _, args := range [][]string{{"lock", "n1", "--", "true"}, {"locks"}} {
		code, _, stderr := cli(t, root, args...)
		if code != 1 || !strings.Contains(stderr, etcdstore.RootIDFile) {
			t.Errorf("%v without --state on a root bound to etcd: exit %d: %s", args, code, stderr)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "locks")); err == nil {
		t.Error("a refused lock made ROOT/locks")
	}
	// Another prefix for this root, which holds content: refused.
	if code, _, stderr := cli(t, root, "--state", url+"-second", "ls"); code != 1 || !strings.Contains(stderr, "records no root") {
		t.Errorf("ls with a second prefix for a bound root: exit %d: %s", code, stderr)
	}
	if still, _ := filepath.Glob(filepath.Join(root, "entries", "*")); len(still) != len(published) || len(published) == 0 {
		t.Errorf("published content %v, then %v after the refused commands", published, still)
	}
	other := t.TempDir()
	code, _, stderr = cli(t, other, "--state", url, "ls")
	if code != 1 || !strings.Contains(stderr, strings.TrimSpace(string(id))) || !strings.Contains(stderr, other) {
		t.Errorf("ls from another root: exit %d: %s", code, stderr)
	}
	// Emptied (rm of its entries), the root is still this prefix's: a
	// second prefix is refused, naming the first, and the first's
	// content stays. It took the second's content for orphans before.
	if code, _, stderr := cli(t, root, "--state", url, "release", "--dependent", "held", "file://"+src); code != 0 {
		t.Fatalf("release on etcd: exit %d: %s", code, stderr)
	}
	if code, _, stderr := cli(t, root, "--state", url, "rm", "-y", "file://"+src); code != 0 {
		t.Fatalf("rm on etcd: exit %d: %s", code, stderr)
	}
	if n, _ := filepath.Glob(filepath.Join(root, "entries", "*")); len(n) != 0 {
		t.Fatalf("the root still holds %v after rm", n)
	}
	if code, _, stderr := cli(t, root, "--state", url+"-third", "get", "--dependent", "x", "file://"+src); code != 1 || !strings.Contains(stderr, "is bound to the prefix") || !strings.Contains(stderr, prefixOf(url)) {
		t.Errorf("get with a second prefix on an emptied root: exit %d: %s", code, stderr)
	}
}

// prefixOf is the prefix of an etcd:// state URL.
func prefixOf(url string) string {
	rest := strings.TrimPrefix(url, "etcd://")
	if i := strings.Index(rest, "/"); i >= 0 {
		return rest[i:]
	}
	return ""
}

// TestEtcdGetOnce: 8 depcache processes on one root, with the state on
// the etcd rig's 3-member cluster, fetch one source: one download.
func TestEtcdGetOnce(t *testing.T) {
	eps := rigtest.Etcd(t)
	url := fmt.Sprintf("etcd://%s/depcache-test/getonce-%d", strings.Join(eps, ","), time.Now().UnixNano())
	body := randomBody(256 << 10)
	var downloads atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downloads.Add(1)
		w.Write(body)
	}))
	t.Cleanup(srv.Close)
	root := t.TempDir()
	const n = 8
	var wg sync.WaitGroup
	outs := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(bin, "--root", root, "--state", url, "get", "--dependent", fmt.Sprintf("job-%d", i),
				"--timeout", "60s", srv.URL+"/blob")
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			if err := cmd.Run(); err != nil {
				errs[i] = fmt.Errorf("%w: %s", err, errb.String())
			}
			outs[i] = strings.TrimSpace(out.String())
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("get %d: %v", i, errs[i])
		}
		if outs[i] != outs[0] {
			t.Errorf("get %d printed %q, get 0 %q", i, outs[i], outs[0])
		}
	}
	if got := downloads.Load(); got != 1 {
		t.Errorf("%d downloads by %d processes, want 1", got, n)
	}
	if fileSum(t, outs[0]) != hexSum(body) {
		t.Error("the content differs from the source's")
	}
	code, stdout, stderr := depcache(t, root, "--state", url, "ls", "--json")
	if got := strings.Count(stdout, `"name": "job-`); code != 0 || got != n {
		t.Errorf("ls: exit %d, %d dependents: %s %s", code, got, stdout, stderr)
	}
}

// TestMoveFileRootToEtcd: a root moves from the file store to etcd with
// `doctor --rebuild --state etcd://...`: its entries, its policy and each
// entry's last use come over, the dependents it drops are listed, and a
// command without --state is then refused instead of taking the etcd
// store's content for orphans.
func TestMoveFileRootToEtcd(t *testing.T) {
	m := etcdtest.Start(t)
	url := "etcd://" + m.Endpoint + "/moved"
	src := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(src, []byte("content"), 0o644); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if code, _, stderr := cli(t, root, "get", "--dependent", "job", "file://"+src); code != 0 {
		t.Fatalf("get on the file store: exit %d: %s", code, stderr)
	}
	if code, _, stderr := cli(t, root, "policy", "set", "--max-size", "7MiB"); code != 0 {
		t.Fatalf("policy set: exit %d: %s", code, stderr)
	}
	// Used long before it was published, as no publish could say.
	used := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	fs, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.Update(context.Background(), func(st *state.State) (bool, error) {
		for _, e := range st.Entries {
			c := e.Clone()
			c.LastUsed = used
			st.Put(c)
		}
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	before := lsEntries(t, root)
	if len(before) != 1 || before[0]["last_used"] != used.Format(time.RFC3339) {
		t.Fatalf("setup: %v", before)
	}
	code, stdout, stderr := cli(t, root, "--state", url, "doctor", "--rebuild")
	if code != 0 || !strings.Contains(stdout, "policy: carried over from "+filepath.Join(root, "state.json")) || !strings.Contains(stdout, "job") {
		t.Fatalf("doctor --rebuild --state %s: exit %d: %s %s", url, code, stdout, stderr)
	}
	code, stdout, stderr = cli(t, root, "--state", url, "policy")
	if code != 0 || !strings.Contains(stdout, "max-size 7.0 MiB") {
		t.Errorf("policy on etcd after the move: exit %d: %s %s", code, stdout, stderr)
	}
	after := lsEntries(t, root, "--state", url)
	if len(after) != 1 || len(before) != 1 || after[0]["last_used"] != before[0]["last_used"] || after[0]["path"] != before[0]["path"] {
		t.Errorf("entries before the move %v, after %v: want the same entry, path and last use", before, after)
	}
	if code, _, stderr := cli(t, root, "ls"); code != 1 || !strings.Contains(stderr, "--state") {
		t.Errorf("ls without --state after the move: exit %d: %s", code, stderr)
	}
	// The file store's state went aside, kept: the way back rebuilds from
	// the published metadata, not from the state of before the move.
	for _, f := range []string{"state.json"} {
		if _, err := os.Stat(filepath.Join(root, f)); !os.IsNotExist(err) {
			t.Errorf("%s still in place after the move: %v", f, err)
		}
		if _, err := os.Stat(filepath.Join(root, f+".moved-to-etcd")); err != nil {
			t.Errorf("%s not kept aside: %v", f, err)
		}
	}
	if code, _, stderr := cli(t, root, "--state", url, "policy", "set", "--max-size", "100MB"); code != 0 {
		t.Fatalf("policy set on etcd: exit %d: %s", code, stderr)
	}
	for _, f := range []string{etcdstore.RootIDFile, etcdstore.RootPrefixFile} {
		if err := os.Remove(filepath.Join(root, f)); err != nil {
			t.Fatal(err)
		}
	}
	code, stdout, stderr = cli(t, root, "doctor", "--rebuild", "--force")
	if code != 0 || strings.Contains(stdout, "7.0 MiB") {
		t.Errorf("the way back: exit %d: %s %s; want no policy of before the move", code, stdout, stderr)
	}

	// A move from a root whose state.json does not parse carries over what
	// its previous version holds, as the file store's own rebuild does.
	root2 := t.TempDir()
	for _, args := range [][]string{{"get", "--dependent", "job", "file://" + src}, {"policy", "set", "--max-size", "9MiB"}, {"policy", "set", "--min-age", "3m"}} {
		if code, _, stderr := cli(t, root2, args...); code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, stderr)
		}
	}
	if err := os.WriteFile(filepath.Join(root2, "state.json"), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr = cli(t, root2, "--state", url+"-2", "doctor", "--rebuild")
	if code != 0 || !strings.Contains(stdout, "policy: carried over from "+filepath.Join(root2, "state.json.prev")) {
		t.Errorf("a move beside a corrupt state.json: exit %d: %s %s; want the policy from state.json.prev", code, stdout, stderr)
	}
}

// lsEntries is `ls --json`'s entries, as maps.
func lsEntries(t *testing.T, root string, args ...string) []map[string]any {
	t.Helper()
	code, stdout, stderr := cli(t, root, append(args, "ls", "--json")...)
	if code != 0 {
		t.Fatalf("ls --json %v: exit %d: %s", args, code, stderr)
	}
	var out []map[string]any
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("ls --json: %v: %s", err, stdout)
	}
	return out
}
