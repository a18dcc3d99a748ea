package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state/etcdstore"
	"github.com/depcache/depcache/state/rigtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func TestGetReleaseStateURL(t *testing.T) {
	base := "etcd://127.0.0.1:1,127.0.0.1:2/team/bench"
	now := time.Date(2026, 12, 1, 11, 20, 0, 5, time.UTC)
	a, err := getReleaseStateURL(base, now, 10, 1000)
	if err != nil {
		t.Fatal(err)
	}
	eps, prefix, err := etcdstore.ParseURL(a)
	if err != nil || len(eps) != 2 || !strings.HasPrefix(prefix, "/team/bench/getrelease-") || !strings.HasSuffix(prefix, "/1000") {
		t.Errorf("%s: endpoints %v, prefix %q, %v; want both endpoints and a prefix under /team/bench ending in /1000", a, eps, prefix, err)
	}
	for _, other := range []struct {
		now    time.Time
		pid, n int
	}{{now, 11, 1000}, {now.Add(time.Nanosecond), 10, 1000}, {now, 10, 100}} {
		if b, _ := getReleaseStateURL(base, other.now, other.pid, other.n); b == a {
			t.Errorf("two points (%+v and pid 10 at %s with 1000) share the prefix %s", other, now, a)
		}
	}
	if b, err := getReleaseStateURL(base+"/", now, 10, 1000); err != nil || b != a {
		t.Errorf("a trailing slash: %q %v, want %q", b, err, a)
	}
	for _, bad := range []string{"etcd://127.0.0.1:1", "/tmp/state", "file"} {
		if u, err := getReleaseStateURL(bad, now, 10, 1000); err == nil || !strings.Contains(err.Error(), "--state") {
			t.Errorf("%q: %q, %v; want an error naming --state", bad, u, err)
		}
	}
}

// TestGetReleaseEtcd runs the getrelease measurement briefly (--short)
// with --state on the etcd rig's cluster: every point reports on its own
// prefix, with a bare etcd transaction as its limit, no state reaches the
// root, and nothing is left under the prefix afterwards.
func TestGetReleaseEtcd(t *testing.T) {
	eps := rigtest.Etcd(t)
	dir := t.TempDir()
	bench := filepath.Join(dir, "depcache-bench")
	if b, err := exec.Command("go", "build", "-o", bench, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	id := make([]byte, 6)
	rand.Read(id)
	base := "/depcache-test/bench-getrelease-" + hex.EncodeToString(id)
	t.Cleanup(func() { deleteEtcdPrefix(t, eps, base) })
	root := filepath.Join(dir, "root")

	cmd := exec.Command(bench, "--run", "getrelease", "--short", "--json", "--root", root,
		"--state", "etcd://"+strings.Join(eps, ",")+base)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("getrelease with --state: %v\n%s", err, stderr.String())
	}
	var points []map[string]any
	for _, l := range strings.Split(stdout.String(), "\n") {
		if !strings.HasPrefix(l, "{") {
			continue
		}
		var p map[string]any
		if err := json.Unmarshal([]byte(l), &p); err != nil {
			t.Fatalf("JSON line %q: %v", l, err)
		}
		points = append(points, p)
	}
	if len(points) != 2 {
		t.Fatalf("%d JSON lines, want 2 (100 and 1000 entries):\n%s\n%s", len(points), stdout.String(), stderr.String())
	}
	for _, p := range points {
		u, _ := p["state"].(string)
		_, prefix, err := etcdstore.ParseURL(u)
		if err != nil || !strings.HasPrefix(prefix, base+"/getrelease-") {
			t.Errorf("%v: state %q (%v): want the point's own prefix under %s", p["name"], u, err, base)
		}
		for _, f := range []string{"ops_per_sec", "p50_ms", "etcd_txn_ms", "limit_ops_per_sec", "ratio_to_limit"} {
			if v, _ := p[f].(float64); v <= 0 {
				t.Errorf("%v: %s = %v, want > 0", p["name"], f, p[f])
			}
		}
		if name, _ := p["name"].(string); !strings.HasSuffix(name, ", etcd") {
			t.Errorf("name %q does not say etcd", name)
		}
		if _, ok := p["commit_ms"]; ok {
			t.Errorf("%v: a file store's commit_ms on etcd: %v", p["name"], p["commit_ms"])
		}
	}
	for _, sub := range []string{"getrelease-100", "getrelease-1000"} {
		names, err := os.ReadDir(filepath.Join(root, sub))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			if strings.HasPrefix(n.Name(), "state") {
				t.Errorf("%s holds %s: the file store was used", sub, n.Name())
			}
		}
		if _, err := os.Stat(filepath.Join(root, sub, etcdstore.RootIDFile)); err != nil {
			t.Errorf("%s is not bound to an etcd prefix: %v", sub, err)
		}
	}

	// Every point deleted its prefix after its workers ended.
	checkPrefixEmpty(t, eps, base)
}

// checkPrefixEmpty fails t if any key is left under base.
func checkPrefixEmpty(t *testing.T, eps []string, base string) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, base+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		keys, _ := cli.Get(ctx, base+"/", clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(5))
		var some []string
		for _, kv := range keys.Kvs {
			some = append(some, string(kv.Key))
		}
		t.Errorf("%d keys left under %s after the run, e.g. %v", resp.Count, base, some)
	}
}

// TestFanInEtcd runs the cold fan-in briefly (--short: 4 workers, 8 MB)
// with --state on the etcd rig's cluster: one download, one path, each
// worker's READY timed from the publish, and nothing left under the
// prefix.
func TestFanInEtcd(t *testing.T) {
	eps := rigtest.Etcd(t)
	dir := t.TempDir()
	bench := filepath.Join(dir, "depcache-bench")
	if b, err := exec.Command("go", "build", "-o", bench, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	id := make([]byte, 6)
	rand.Read(id)
	base := "/depcache-test/bench-fanin-" + hex.EncodeToString(id)
	t.Cleanup(func() { deleteEtcdPrefix(t, eps, base) })
	cmd := exec.Command(bench, "--run", "fanin", "--short", "--json", "--root", filepath.Join(dir, "root"),
		"--state", "etcd://"+strings.Join(eps, ",")+base)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("fanin with --state: %v\n%s", err, stderr.String())
	}
	var p map[string]any
	for _, l := range strings.Split(stdout.String(), "\n") {
		if strings.HasPrefix(l, "{") {
			if err := json.Unmarshal([]byte(l), &p); err != nil {
				t.Fatalf("JSON line %q: %v", l, err)
			}
		}
	}
	if p == nil {
		t.Fatalf("no JSON line:\n%s\n%s", stdout.String(), stderr.String())
	}
	if p["downloads"] != 1.0 || p["paths"] != 1.0 || p["procs"] != 4.0 {
		t.Errorf("downloads %v, paths %v, procs %v: want 1 download and 1 path for 4 workers", p["downloads"], p["paths"], p["procs"])
	}
	for _, f := range []string{"ready_after_publish_p50_ms", "ready_after_publish_max_ms"} {
		if _, ok := p[f].(float64); !ok {
			t.Errorf("%s missing: %v", f, p)
		}
	}
	if u, _ := p["state"].(string); !strings.Contains(u, base+"/fanin-") {
		t.Errorf("state %q: want the run's own prefix under %s", u, base)
	}
	checkPrefixEmpty(t, eps, base)
}
