package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state/rigtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestE2EEtcdFanInTwoHosts: 16 `depcache get` processes, 8 on each of 2
// fake hosts (their own PID and UTS namespaces: pids and hostnames alike
// on both), with the state on the etcd rig's 3-member cluster and the
// content in one root both hosts reach, get one cold bundle from one
// counting HTTP server: exactly one download, all 16 print the same path,
// and its content matches.
func TestE2EEtcdFanInTwoHosts(t *testing.T) {
	eps := rigtest.Etcd(t)
	prefix := fmt.Sprintf("/depcache-test/fanin-two-hosts-%d", time.Now().UnixNano())
	stateURL := "etcd://" + strings.Join(eps, ",") + prefix
	t.Cleanup(func() { deleteEtcdPrefix(t, eps, prefix) })
	body := randomBody(8 << 20)
	srv := newBlobServer(t, body, nil)
	root := t.TempDir()
	outDir := t.TempDir()
	script := `pids=""
for i in 1 2 3 4 5 6 7 8; do
  "$BIN" --root "$ROOT" --state "$STATE" get --timeout 120s --sha256 "$SHA" "$URL" >"$OUT/$HOST-$i.out" 2>"$OUT/$HOST-$i.err" &
  pids="$pids $!"
done
rc=0
for p in $pids; do wait $p || rc=1; done
exit $rc`
	hostNames := []string{"host-a", "host-b"}
	var hosts []*exec.Cmd
	for _, h := range hostNames {
		cmd := rigtest.FakeHost(t, h, 0, "sh", "-c", script)
		cmd.Env = append(cmd.Env, "BIN="+bin, "ROOT="+root, "STATE="+stateURL, "SHA="+hexSum(body),
			"URL="+srv.URL+"/bundle.bin", "OUT="+outDir, "HOST="+h)
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
	var paths []string
	for _, h := range hostNames {
		for i := 1; i <= 8; i++ {
			out, _ := os.ReadFile(filepath.Join(outDir, fmt.Sprintf("%s-%d.out", h, i)))
			if failed {
				errs, _ := os.ReadFile(filepath.Join(outDir, fmt.Sprintf("%s-%d.err", h, i)))
				t.Logf("%s-%d: %s %s", h, i, out, errs)
			}
			p := strings.TrimSpace(string(out))
			if r, err := filepath.Rel(root, p); err != nil || r == "." || strings.HasPrefix(r, "..") {
				t.Fatalf("%s-%d printed %q, not a path in the root %s", h, i, p, root)
			}
			paths = append(paths, p)
		}
	}
	for _, p := range paths {
		if p != paths[0] {
			t.Fatalf("processes printed different paths: %v", paths)
		}
	}
	if got := fileSum(t, paths[0]); got != hexSum(body) {
		t.Errorf("content sha256 %s, want %s", got, hexSum(body))
	}
	if n, c := srv.requests.Load(), srv.complete.Load(); n != 1 || c != 1 {
		t.Errorf("%d requests, %d complete downloads; want exactly 1", n, c)
	}
	// The state went to etcd: the root holds content and its ID, no
	// state file.
	names, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.HasPrefix(n.Name(), "state") {
			t.Errorf("the root holds %s: a get used the file store", n.Name())
		}
	}
}

// deleteEtcdPrefix deletes every key under p + "/" on the cluster at eps.
func deleteEtcdPrefix(t testing.TB, eps []string, p string) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Log(err)
		return
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, p+"/", clientv3.WithPrefix()); err != nil {
		t.Log(err)
	}
}
