package manager_test

import (
	"os"
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
			c.Policy.DownloadTimeout = 2 * time.Second
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
