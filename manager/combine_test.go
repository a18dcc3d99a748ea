package manager_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// Two managers of one root wait behind the lock: whichever takes it next
// applies the other's get in its own commit, and both count it.
func TestGetsCombinedAcrossManagers(t *testing.T) {
	root := t.TempDir()
	t.Setenv("TMPDIR", t.TempDir())
	regs := []*prometheus.Registry{prometheus.NewRegistry(), prometheus.NewRegistry()}
	var ms []*manager.Manager
	for _, reg := range regs {
		ms = append(ms, newManager(t, root, func(c *manager.Config) { c.Metrics = reg }))
	}
	hold, err := state.NewLock(filepath.Join(root, state.LockFile), state.LockOptions{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := hold.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, "https://example.com/combined.tar.gz", "")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, m := range ms {
		wg.Go(func() { _, errs[i] = m.Get(context.Background(), "dep", k, manager.Detached()) })
	}
	// Both are waiting, their gets in the spool.
	deadline := time.Now().Add(10 * time.Second)
	for counter(t, regs[0], "depcache_combined_operations_total", "event", "proposed") < 1 ||
		counter(t, regs[1], "depcache_combined_operations_total", "event", "proposed") < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the gets were not proposed")
		}
		time.Sleep(time.Millisecond)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	sum := func(event string) float64 {
		return counter(t, regs[0], "depcache_combined_operations_total", "event", event) +
			counter(t, regs[1], "depcache_combined_operations_total", "event", event)
	}
	if sum("served") != 1 || sum("answered") != 1 {
		t.Fatalf("served %v, answered %v: want the lock's next holder to serve the other's get", sum("served"), sum("answered"))
	}
	st, err := ms[0].Entries(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if e := st.Get(k); e == nil || len(e.Dependents) != 1 {
		t.Fatalf("entry %+v: want one dependent, registered twice", e)
	}
}
