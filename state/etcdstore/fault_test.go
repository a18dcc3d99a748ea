package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/transitions"
	"github.com/sirupsen/logrus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Fault scenarios on the rig's 3-member cluster (etcd-ctl.sh). Each one
// restores the cluster to 3 healthy members with a leader before it ends.

// ctl runs etcd-ctl.sh with args and returns its output.
func ctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("bash", append([]string{filepath.Join(rigtest.Dir(t), "etcd-ctl.sh")}, args...)...).Output()
	if err != nil {
		t.Fatalf("etcd-ctl.sh %s: %v", strings.Join(args, " "), err)
	}
	return strings.TrimSpace(string(out))
}

// faultRig returns the rig's endpoints and a prefix of this test's own,
// and restores the cluster when the test ends.
func faultRig(t *testing.T, name string) ([]string, string) {
	eps := rigtest.EtcdFaults(t)
	prefix := "/depcache-test/" + name + "-" + runID()
	t.Cleanup(func() {
		for i := range eps {
			_ = exec.Command("bash", filepath.Join(rigtest.Dir(t), "etcd-ctl.sh"), "cont", fmt.Sprint(i+1)).Run()
		}
		if out, err := exec.Command("bash", filepath.Join(rigtest.Dir(t), "etcd-ctl.sh"), "start", "1").CombinedOutput(); err != nil {
			t.Errorf("restarting the rig's members: %v: %s", err, out)
		}
		awaitHealthy(t, eps)
		deletePrefix(t, eps, prefix)
	})
	awaitHealthy(t, eps)
	return eps, prefix
}

// awaitHealthy waits until every member answers and they agree on a
// leader.
func awaitHealthy(t *testing.T, eps []string) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	deadline := time.Now().Add(90 * time.Second)
	for {
		leaders := map[uint64]bool{}
		ok := 0
		for _, ep := range eps {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := cli.Status(ctx, ep)
			cancel()
			if err == nil && st.Leader != 0 {
				ok++
				leaders[st.Leader] = true
			}
		}
		if ok == len(eps) && len(leaders) == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rig's cluster is not healthy after 90 s: %d of %d members answer, leaders %v", ok, len(eps), leaders)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// countingSource serves every source after a short while, and counts
// fetches of one source that overlap (two downloads of one key at once).
type countingSource struct {
	mu       sync.Mutex
	inflight map[string]int
	fetches  atomic.Int64
	doubles  atomic.Int64
}

func (c *countingSource) Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) error {
	c.fetches.Add(1)
	c.mu.Lock()
	c.inflight[src]++
	if c.inflight[src] > 1 {
		c.doubles.Add(1)
	}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.inflight[src]--
		c.mu.Unlock()
	}()
	t := time.NewTimer(20 * time.Millisecond) // a download takes a moment
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	b := []byte("content of " + src)
	total(int64(len(b)))
	_, err := w.Write(b)
	return err
}

// takeoverHook counts the managers' "took over download" logs.
type takeoverHook struct{ n atomic.Int64 }

func (h *takeoverHook) Levels() []logrus.Level { return logrus.AllLevels }
func (h *takeoverHook) Fire(e *logrus.Entry) error {
	if e.Message == "took over download" {
		h.n.Add(1)
	}
	return nil
}

// storm is managers getting, waiting for and releasing a few keys, each
// step retried until it succeeds (a fault makes steps fail for a while).
type storm struct {
	cycles    atomic.Int64
	failures  atomic.Int64
	cli       *clientv3.Client
	prefix    string
	from      int64 // the revision before the storm began
	src       *countingSource
	takeovers *takeoverHook
	stop      func()
	lastErr   atomic.Value
}

func startStorm(t *testing.T, eps []string, prefix string, managers int) *storm {
	t.Helper()
	root := t.TempDir()
	st := &storm{src: &countingSource{inflight: map[string]int{}}, takeovers: &takeoverHook{}, prefix: prefix}
	st.cli = open(t, eps, prefix).Client()
	st.from = revisionNow(t, st.cli) + 1
	log := logrus.New()
	log.SetOutput(io.Discard)
	log.AddHook(st.takeovers)
	ms, stopAll := startManagers(t, managers, root, eps, prefix, st.src, true, func(c *manager.Config) {
		c.Log = log
		c.Policy = transitions.Policy{FailureCooldown: time.Millisecond, LeaseDuration: time.Minute}
	})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for w, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				// Workers go through the same keys at about the same
				// pace: each key is downloaded once, while others wait.
				key := state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://example.com/storm/%d", i)}
				dep := fmt.Sprintf("w%d-%d", w, i)
				retry := func(f func(context.Context) error) bool {
					for ctx.Err() == nil {
						sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
						err := f(sctx)
						scancel()
						if err == nil {
							return true
						}
						st.failures.Add(1)
						st.lastErr.Store(err.Error())
						pause(ctx, 100*time.Millisecond)
					}
					return false
				}
				if !retry(func(c context.Context) error { _, err := m.Get(c, dep, key); return err }) {
					return
				}
				if !retry(func(c context.Context) error { _, err := m.Wait(c, key); return err }) {
					return
				}
				if !retry(func(c context.Context) error {
					err := m.Release(c, dep, key)
					if errors.Is(err, manager.ErrNotRegistered) {
						return nil // an earlier attempt applied, its answer lost
					}
					return err
				}) {
					return
				}
				st.cycles.Add(1)
			}
		}()
	}
	st.stop = func() {
		cancel()
		wg.Wait()
		stopAll()
	}
	t.Cleanup(st.stop)
	return st
}

func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// awaitCycles waits until the storm completed n more cycles than from.
func (s *storm) awaitCycles(t *testing.T, from, n int64, what string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for s.cycles.Load() < from+n {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d cycles in 2 minutes, want %d; last error: %v", what, s.cycles.Load()-from, n, s.lastErr.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *storm) check(t *testing.T) {
	t.Helper()
	if d, k := s.src.doubles.Load(), s.takeovers.n.Load(); d > k {
		t.Errorf("%d overlapping downloads of one key, but %d takeovers logged", d, k)
	}
	revs, broken := checkHistory(t, s.cli, s.prefix, s.from)
	for _, b := range broken {
		t.Error(b)
	}
	t.Logf("%d cycles, %d fetches, %d failed steps retried (last: %v), %d takeovers; %d revisions of history checked", s.cycles.Load(), s.src.fetches.Load(), s.failures.Load(), s.lastErr.Load(), s.takeovers.n.Load(), revs)
}

// TestRigLeaderKilledDuringStorm: the leader is killed while managers
// get and release; work goes on under the new leader, and no key is
// downloaded twice at once without a logged takeover.
func TestRigLeaderKilledDuringStorm(t *testing.T) {
	eps, prefix := faultRig(t, "kill")
	s := startStorm(t, eps, prefix, 4)
	s.awaitCycles(t, 0, 20, "before the fault")
	killed := ctl(t, "kill", "leader")
	at := s.cycles.Load()
	s.awaitCycles(t, at, 20, "after member "+killed+" (the leader) was killed")
	ctl(t, "start", killed)
	awaitHealthy(t, eps)
	s.awaitCycles(t, s.cycles.Load(), 10, "after the member came back")
	s.stop()
	s.check(t)
}

// TestRigPausedLeader: the leader paused (SIGSTOP, like a partition):
// work goes on under a new leader while it is stopped, and after.
func TestRigPausedLeader(t *testing.T) {
	eps, prefix := faultRig(t, "pause")
	s := startStorm(t, eps, prefix, 4)
	s.awaitCycles(t, 0, 20, "before the fault")
	paused := ctl(t, "stop", "leader")
	s.awaitCycles(t, s.cycles.Load(), 20, "while member "+paused+" (the leader) is paused")
	ctl(t, "cont", paused)
	awaitHealthy(t, eps)
	s.awaitCycles(t, s.cycles.Load(), 10, "after it resumed")
	s.stop()
	s.check(t)
}

// TestRigQuorumLost: with two of three members paused, a get fails with
// ErrUnavailable naming the endpoints and writes nothing; when they
// resume, the same get works.
func TestRigQuorumLost(t *testing.T) {
	eps, prefix := faultRig(t, "quorum")
	root := t.TempDir()
	src := &countingSource{inflight: map[string]int{}}
	ms, _ := startManagers(t, 1, root, eps, prefix, src, true, nil)
	m := ms[0]
	key := state.Key{Kind: state.Bundle, Source: "https://example.com/quorum"}
	leader := ctl(t, "leader")
	for i := range eps {
		if n := fmt.Sprint(i + 1); n != leader {
			ctl(t, "stop", n)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := m.Get(ctx, "job", key)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), eps[0]) {
		t.Fatalf("get without quorum: %v; want ErrUnavailable naming the endpoints", err)
	}
	t.Logf("get without quorum: %v", err)
	for i := range eps {
		ctl(t, "cont", fmt.Sprint(i+1))
	}
	awaitHealthy(t, eps)
	s := open(t, eps, prefix)
	st, err := s.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if e := st.Get(key); e != nil {
		t.Fatalf("after quorum returned: %+v, want nothing written by the failed get", e)
	}
	if _, err := m.Get(ctx, "job", key); err != nil {
		t.Fatalf("get after quorum returned: %v", err)
	}
	if e, err := m.Wait(ctx, key); err != nil || e.Stage != state.Ready {
		t.Fatalf("wait after quorum returned: %+v %v", e, err)
	}
}

// TestRigQuorumLostAtOpen: with two of three members killed, the one left
// knows it has no leader and says so at once ("etcdserver: no leader", an
// etcd error the client does not hand over as a gRPC status). Open then
// fails with ErrUnavailable, as a cluster that does not answer does (it
// failed with the bare "no leader"), and ClusterChecks still reports each
// member and the missing leader.
func TestRigQuorumLostAtOpen(t *testing.T) {
	eps, prefix := faultRig(t, "quorum-open")
	open(t, eps, prefix) // the prefix exists
	killed := map[string]bool{}
	for i := range eps {
		if n := fmt.Sprint(i + 1); len(killed) < len(eps)-1 {
			ctl(t, "kill", n)
			killed[eps[i]] = true
		}
	}
	var left string
	for _, ep := range eps {
		if !killed[ep] {
			left = ep
		}
	}
	// Wait until the member left has stepped down (etcd's check quorum):
	// the answer this test is about.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{left}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := cli.Status(ctx, left)
		cancel()
		if err == nil && st.Leader == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("member %s still has a leader a minute after two of three were killed: %+v %v", left, st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, err = Open(context.Background(), Options{Endpoints: eps, Prefix: prefix, DialTimeout: 3 * time.Second})
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Open without a leader: %v; want ErrUnavailable", err)
	}
	t.Logf("Open without a leader: %v", err)
	checks := ClusterChecks(context.Background(), Options{Endpoints: eps, Prefix: prefix, RequestTimeout: 2 * time.Second})
	got := map[string]state.Check{}
	for _, c := range checks {
		got[c.Name] = c
	}
	for _, ep := range eps {
		c, ok := got["etcd "+ep]
		switch {
		case !ok:
			t.Errorf("no check of %s in %+v", ep, checks)
		case c.Status != "fail":
			t.Errorf("%s: %+v, want fail", ep, c)
		case !killed[ep] && (!strings.Contains(c.Detail, "member ") || !strings.Contains(c.Detail, "no leader")):
			t.Errorf("%s (alive): %q, want its status and no leader", ep, c.Detail)
		}
	}
	if c := got["etcd leader"]; c.Status != "fail" || !strings.Contains(c.Detail, "no quorum") {
		t.Errorf("leader check %+v, want fail: no quorum", c)
	}
}

// TestRigReadsOutliveLeaderKill: reads, and the other requests that may
// be repeated (a lease grant, a put-if-absent of the sweeper's key, the
// listing behind a watch), go on across the leader's death. One that
// meets the election ("no leader", "leader changed") or the dead member's
// closed connection tries again within the request timeout, so none fails
// while a new leader is elected in time. (Before, the first such answer
// failed the read, and every manager logged a failed pass.)
func TestRigReadsOutliveLeaderKill(t *testing.T) {
	eps, prefix := faultRig(t, "reads")
	// A request timeout that a loaded machine's election fits in: what
	// is tested is that reads try again, not how fast etcd elects.
	s := open(t, eps, prefix, func(o *Options) { o.RequestTimeout = 30 * time.Second })
	ctx := context.Background()
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: state.Key{Kind: state.Bundle, Source: "https://example.com/reads"}, Stage: state.Ready, Path: "entries/reads", SizeBytes: 1})
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	id := state.Key{Kind: state.Bundle, Source: "https://example.com/reads"}.ID()
	requests := []func() error{
		func() error { _, err := s.View(ctx); return err },
		func() error { _, err := s.Exists(ctx); return err },
		func() error { _, err := s.grant(ctx, 5); return err },
		func() error { _, err := s.MaySweep(ctx); return err },
		func() error { _, _, err := s.relist(ctx, []string{id}, 1); return err },
		func() error {
			return s.UpdateEntries(ctx, []string{id}, func(*state.Txn) (bool, error) { return false, nil })
		},
	}
	var reads, fails atomic.Int64
	var lastErr atomic.Value
	done := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				if err := requests[i%len(requests)](); err != nil {
					fails.Add(1)
					lastErr.Store(err.Error())
				} else {
					reads.Add(1)
				}
			}
		}()
	}
	awaitReads := func(n int64, what string) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Minute)
		for reads.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d reads, want %d; last error: %v", what, reads.Load(), n, lastErr.Load())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	awaitReads(20, "before the fault")
	killed := ctl(t, "kill", "leader")
	awaitReads(reads.Load()+50, "after member "+killed+" (the leader) was killed")
	ctl(t, "start", killed)
	awaitHealthy(t, eps)
	close(done)
	wg.Wait()
	if n := fails.Load(); n != 0 {
		t.Errorf("%d of %d reads failed across the leader's death; last: %v", n, n+reads.Load(), lastErr.Load())
	}
}
