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

// TestE2ELostMount: the sshfs client of a host's mount dies while a get on
// it waits (the share is lost: ENOTCONN). That get fails with a clear
// error instead of hanging; the state seen through another mount is intact;
// after the mount comes back the entry is published and verifies.
// It uses the rig's third mount, so that the other tests' mounts stay up.
func TestE2ELostMount(t *testing.T) {
	mnt1, _ := rigtest.SharedFS(t)
	mnt3 := rigtest.Env(t, "SHAREDFS_MNT3")
	body := randomBody(1 << 20)
	srv := newBlobServer(t, body, func(n int32) bool { return n == 1 })
	sub := fmt.Sprintf("e2e-lost-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	url := srv.URL + "/b.bin"
	sha := hexSum(body)

	owner := exec.Command(bin, "--root", filepath.Join(mnt1, sub), "get", "--sha256", sha, "--progress-interval", "200ms", url)
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	defer owner.Process.Kill()
	<-srv.started // the owner (on mnt1) is mid-transfer, stalled by the server
	var errb bytes.Buffer
	waiter := exec.Command(bin, "--root", filepath.Join(mnt3, sub), "get", "--sha256", sha, url)
	waiter.Stderr = &errb
	if err := waiter.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the waiter to register", func() bool {
		for _, e := range readState(t, filepath.Join(mnt1, sub)).Entries {
			return len(e.Dependents) == 2
		}
		return false
	})
	killSSHFS(t, mnt3)
	err := waiter.Wait()
	if code := waiter.ProcessState.ExitCode(); err == nil || code != 1 || !strings.Contains(errb.String(), "not connected") {
		t.Errorf("get on the lost mount: exit %d, %q; want 1 and ENOTCONN named", code, errb.String())
	}
	remount(t)
	// The state through the surviving mount is intact; let the owner finish.
	readState(t, filepath.Join(mnt1, sub))
	owner.Process.Kill() // a new request is served in full; a new get takes over
	owner.Wait()
	out, err := exec.Command(bin, "--root", filepath.Join(mnt3, sub), "get", "--sha256", sha, url).Output()
	if err != nil {
		t.Fatalf("get after the remount: %v", err)
	}
	if got := fileSum(t, strings.TrimSpace(string(out))); got != sha {
		t.Error("content does not verify after the remount")
	}
}

// killSSHFS kills the sshfs client serving mnt, as a host losing the share.
func killSSHFS(t *testing.T, mnt string) {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cl, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		args := strings.Split(string(cl), "\x00")
		if len(args) > 0 && filepath.Base(args[0]) == "sshfs" && strings.Contains(string(cl), "\x00"+mnt+"\x00") {
			syscall.Kill(pid, syscall.SIGKILL)
			waitFor(t, "the mount to fail", func() bool {
				_, err := os.Stat(mnt + "/.")
				return err != nil
			})
			return
		}
	}
	t.Fatalf("no sshfs client found for %s", mnt)
}

// remount brings the rig's mounts back (sharedfs-up.sh remounts dead ones).
func remount(t *testing.T) {
	t.Helper()
	cmd := exec.Command("bash", filepath.Join(rigtest.Dir(t), "sharedfs-up.sh"))
	cmd.Env = append(os.Environ(), "SHAREDFS_MOUNTS=3")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("remounting: %v: %s", err, out)
	}
}
