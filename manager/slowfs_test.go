package manager_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest/slowfs"
)

// Two hosts, each with its own mount of a shared root on a filesystem where
// every operation takes 2 ms and every fsync 30 ms more, get one bundle: one
// download, the same verified content for both, and the slow but live owner
// is never taken over although the download timeout is short.
func TestSlowFilesystemGet(t *testing.T) {
	shared := t.TempDir()
	mounts := []*slowfs.FS{slowfs.Mount(t, shared), slowfs.Mount(t, shared)}
	for _, m := range mounts {
		m.SetDelay(2*time.Millisecond, 30*time.Millisecond)
	}
	body := randomBytes(3 << 20)
	srv := newServer(t, body)
	k := mustKey(t, srv.URL+"/b", sum(body))
	machine := &fakeMachine{dead: map[int]bool{}}
	entries := make([]state.Entry, len(mounts))
	paths := make([]string, len(mounts))
	var wg sync.WaitGroup
	for i, mnt := range mounts {
		host := []string{"a", "b"}[i]
		m := newManager(t, mnt.Mnt, func(c *manager.Config) {
			c.Processes = fakeProc{m: machine, self: state.Process{Host: host, BootID: "boot-" + host, PIDNS: "ns", PID: 10 + i, StartTime: 1}}
			// Short against a healthy download, long against a loaded CI machine:
			// the owner's reports must never look stalled for it.
			c.Policy.DownloadTimeout = 10 * time.Second
			c.LockLease = 5 * time.Second
		})
		wg.Add(1)
		go func() {
			defer wg.Done()
			e, err := getWait(t, m, "run-"+host, k)
			if err != nil {
				t.Errorf("host %s: %v", host, err)
				return
			}
			entries[i] = e
			paths[i], _ = m.Abs(e)
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d downloads, want 1: a slow owner was taken over", n)
	}
	if entries[0].Generation != entries[1].Generation || entries[0].Path != entries[1].Path {
		t.Errorf("the hosts see different entries: %+v / %+v", entries[0], entries[1])
	}
	for _, p := range paths {
		got, err := os.ReadFile(p)
		if err != nil || sum(got) != sum(body) {
			t.Errorf("%s does not verify: %v", p, err)
		}
	}
	t.Logf("fsyncs delayed: %d + %d", mounts[0].Count(slowfs.Fsync), mounts[1].Count(slowfs.Fsync))
}

// Leases are renewed on their own ticker: a sweep stuck deleting evicted
// content (here an unlink held by the filesystem) must not stop them, or
// another host would reap this process's live dependents and evict what its
// runs use.
func TestLeasesRenewedDuringASlowSweep(t *testing.T) {
	shared := t.TempDir()
	mnt := slowfs.Mount(t, shared)
	abs, err := filepath.Abs("../testdata/bundles/hello.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	victim := mustKey(t, "file://"+abs, "")
	blob := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(blob, []byte("in use"), 0o644); err != nil {
		t.Fatal(err)
	}
	used := mustKey(t, "file://"+blob, "")
	m := newManager(t, mnt.Mnt, func(c *manager.Config) {
		c.Policy.LeaseDuration = 600 * time.Millisecond // renewed every 200 ms
		c.CleanupInterval = 20 * time.Millisecond
		c.SetPolicy = true
		c.Cleanup = manager.PolicyChange{MinAge: ptr(time.Duration(0)), MaxAge: ptr(time.Millisecond)}
	})
	ctx := context.Background()
	for _, k := range []state.Key{victim, used} {
		if _, err := getWait(t, m, "run", k); err != nil {
			t.Fatal(err)
		}
	}
	hold := mnt.HoldNext(slowfs.Unlink, "README.txt")
	defer hold.Release()
	if err := m.Release(ctx, "run", victim); err != nil {
		t.Fatal(err)
	}
	select {
	case <-hold.Hit():
	case <-time.After(30 * time.Second):
		t.Fatal("the victim was not evicted and deleted")
	}

	// The loop is stuck in the sweep's delete. The lease must still move.
	lease := func() uint64 {
		e := viewEntry(t, shared, used)
		if e == nil {
			t.Fatal("the entry in use is gone")
		}
		return e.Dependents["run"].Lease
	}
	first := lease()
	waitFor(t, 20*time.Second, func() bool { return lease() >= first+2 },
		func() string {
			return fmt.Sprintf("lease still %d while the sweep was stuck (renewed every 200 ms)", lease())
		})
}
