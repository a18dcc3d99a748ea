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

// etcdLockURL is a --state URL of a fresh prefix on the etcd rig.
func etcdLockURL(t *testing.T, name string) string {
	eps := rigtest.Etcd(t)
	return fmt.Sprintf("etcd://%s/depcache-test/%s-%d", strings.Join(eps, ","), name, time.Now().UnixNano())
}

// TestLockEtcdTwoHostsNoSharedFS: with --state etcd, lockers on two fake
// hosts whose roots share no filesystem exclude each other (a lock in the
// root could not), and their tokens increase in the order they held the
// lock.
func TestLockEtcdTwoHostsNoSharedFS(t *testing.T) {
	url := etcdLockURL(t, "lock-two-hosts")
	work := t.TempDir() // outside both roots: the resource the lock guards
	held, history := filepath.Join(work, "held"), filepath.Join(work, "history")
	if err := os.WriteFile(history, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	const perHost = 5
	script := `for i in $(seq ` + strconv.Itoa(perHost) + `); do
  ( "$BIN" --root "$ROOT" --state "$URL" lock shared --lease 5s -- sh -c '
      if ! (set -C; echo "$0" >"$HELD") 2>/dev/null; then
        echo "$0 holds the lock while $(cat "$HELD") does" >&2; exit 99
      fi
      sleep 0.05; echo "$DEPCACHE_LOCK_TOKEN $0" >>"$HIST"; rm "$HELD"' "$HOST-$i"
    echo $? >"$OUT/$HOST-$i.rc" ) &
done
wait`
	var hosts []*exec.Cmd
	for _, h := range []string{"host-a", "host-b"} {
		cmd := rigtest.FakeHost(t, h, 0, "sh", "-c", script)
		cmd.Env = append(cmd.Env, "BIN="+bin, "ROOT="+filepath.Join(t.TempDir(), "root"), "URL="+url,
			"HELD="+held, "HIST="+history, "OUT="+work, "HOST="+h)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, cmd)
	}
	for _, cmd := range hosts {
		if err := cmd.Wait(); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range []string{"host-a", "host-b"} {
		for i := 1; i <= perHost; i++ {
			rc, err := os.ReadFile(filepath.Join(work, fmt.Sprintf("%s-%d.rc", h, i)))
			if err != nil || strings.TrimSpace(string(rc)) != "0" {
				t.Errorf("%s-%d: exit %q %v", h, i, rc, err)
			}
		}
	}
	b, err := os.ReadFile(history)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 2*perHost {
		t.Fatalf("%d holds recorded, want %d:\n%s", len(lines), 2*perHost, b)
	}
	last := uint64(0)
	for _, l := range lines {
		tok, err := strconv.ParseUint(strings.Fields(l)[0], 10, 64)
		if err != nil || tok <= last {
			t.Errorf("token %q after %d: want a greater one with each hold\n%s", l, last, b)
		}
		last = tok
	}
}

// TestLockEtcdStoppedHolderLosesLease: a holder SIGSTOPped past --lease
// 3s loses the lock when etcd ends its lease: a locker on another fake
// host, with a root of its own, gets it with a greater token, and the
// stopped one, resumed, ends its CMD and exits 75.
func TestLockEtcdStoppedHolderLosesLease(t *testing.T) {
	url := etcdLockURL(t, "lock-stop")
	dir := t.TempDir()
	tokA, tokB, ended := filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "ended")
	name := fmt.Sprintf("stop-%d", time.Now().UnixNano())
	a := rigtest.FakeHost(t, "host-a", 0, bin, "--root", filepath.Join(t.TempDir(), "root"), "--state", url, "lock", name, "--lease", "3s", "--",
		"sh", "-c", fmt.Sprintf(`trap 'touch %q; exit 0' TERM; echo $DEPCACHE_LOCK_TOKEN >%q.tmp; mv %q.tmp %q; while :; do sleep 0.01; done`, ended, tokA, tokA, tokA))
	var aErr bytes.Buffer
	a.Stderr = &aErr
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killIfRunning(t, a) })
	waitFor(t, "A's CMD", func() bool { return exists(tokA) })
	pidA := findPID(t, "\x00lock\x00"+name+"\x00")
	syscall.Kill(pidA, syscall.SIGSTOP)
	stopped := time.Now()
	b := rigtest.FakeHost(t, "host-b", 0, bin, "--root", filepath.Join(t.TempDir(), "root"), "--state", url, "lock", name, "--lease", "3s", "--",
		"sh", "-c", fmt.Sprintf(`echo $DEPCACHE_LOCK_TOKEN >%q`, tokB))
	out, err := b.CombinedOutput()
	if err != nil {
		syscall.Kill(pidA, syscall.SIGCONT)
		t.Fatalf("B: %v: %s", err, out)
	}
	if d := time.Since(stopped); d < 3*time.Second {
		t.Errorf("B got the lock %s after A stopped, within A's lease", d)
	}
	ta, _ := os.ReadFile(tokA)
	tb, _ := os.ReadFile(tokB)
	na, _ := strconv.ParseUint(strings.TrimSpace(string(ta)), 10, 64)
	nb, _ := strconv.ParseUint(strings.TrimSpace(string(tb)), 10, 64)
	if na == 0 || nb <= na {
		t.Errorf("tokens A %d, B %d; want B's greater", na, nb)
	}
	syscall.Kill(pidA, syscall.SIGCONT)
	err = a.Wait()
	ee, _ := err.(*exec.ExitError)
	if ee == nil || ee.ExitCode() != exitLost {
		t.Fatalf("A after resuming: %v, want exit %d; stderr %s", err, exitLost, aErr.String())
	}
	if !strings.Contains(aErr.String(), "lost the lease") || !exists(ended) {
		t.Errorf("A's stderr %q, CMD ended by SIGTERM: %v", aErr.String(), exists(ended))
	}
}

// TestLockEtcdNested: as TestLockNested, with the lock on etcd: the
// nested lock of the same name is told at once, and one of another name
// is not.
func TestLockEtcdNested(t *testing.T) {
	url := etcdLockURL(t, "lock-nested")
	root := t.TempDir()
	inner := fmt.Sprintf("%s --root %s --state %s lock %%s --timeout 2s -- true", bin, root, url)
	code, _, stderr := depcache(t, root, "--state", url, "lock", "N", "--", "sh", "-c", fmt.Sprintf(inner, "N"))
	if code != exitTimeout || !strings.Contains(stderr, `"N" is held by pid`) || !strings.Contains(stderr, "runs under") {
		t.Errorf("nested lock N on etcd: exit %d, stderr %q; want 3, told it waits for its enclosing holder", code, stderr)
	}
	code, _, stderr = depcache(t, root, "--state", url, "lock", "N", "--", "sh", "-c", fmt.Sprintf(inner, "M"))
	if code != 0 || strings.Contains(stderr, "runs under") {
		t.Errorf("lock M inside lock N on etcd: exit %d, stderr %q; want 0 and nothing told", code, stderr)
	}
}
