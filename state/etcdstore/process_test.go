package etcdstore

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/transitions"
)

// The test binary is re-run as a child process to get real processes:
// DEPCACHE_TEST_ROLE says which part it plays, DT_* carry its parameters.
func TestMain(m *testing.M) {
	switch role := os.Getenv("DEPCACHE_TEST_ROLE"); role {
	case "":
		os.Exit(m.Run())
	case "holder":
		os.Exit(holder())
	default:
		fmt.Fprintf(os.Stderr, "unknown role %q\n", role)
		os.Exit(125)
	}
}

// holder runs a manager on DT_ENDPOINTS/DT_PREFIX with root DT_ROOT and a
// dependent lease of DT_LEASE, gets DT_SOURCE for a dependent bound to
// this process and prints what Wait says; then, for each line "wait" or
// "get" on stdin, waits (or gets again and waits) and prints the outcome:
// "READY <abs path>", "LOST", "GONE" or "ERR <error>".
func holder() int {
	lease, err := time.ParseDuration(os.Getenv("DT_LEASE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	s, err := Open(ctx, Options{Endpoints: strings.Split(os.Getenv("DT_ENDPOINTS"), ","), Prefix: os.Getenv("DT_PREFIX"), Root: os.Getenv("DT_ROOT")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer s.Close()
	timeout, _ := time.ParseDuration(os.Getenv("DT_TIMEOUT")) // 0: the default
	m, err := manager.New(manager.Config{Root: os.Getenv("DT_ROOT"), State: s, Log: quiet(), ProgressInterval: 200 * time.Millisecond,
		Policy: transitions.Policy{LeaseDuration: lease, DownloadTimeout: timeout, FailureCooldown: time.Hour}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	stop, err := m.Start(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer stop()
	key, err := manager.ParseKey(os.Getenv("DT_SOURCE"), "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	report := func(get bool) {
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if get {
			if _, err := m.Get(wctx, "job", key); err != nil {
				fmt.Println("ERR", err)
				return
			}
		}
		e, err := m.Wait(wctx, key)
		switch {
		case errors.Is(err, manager.ErrDependentLost):
			fmt.Println("LOST")
		case errors.Is(err, manager.ErrNotFound):
			fmt.Println("GONE")
		case err != nil:
			fmt.Println("ERR", err)
		default:
			p, err := m.Abs(e)
			if err != nil {
				fmt.Println("ERR", err)
				return
			}
			fmt.Println("READY", p)
		}
	}
	report(true)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		report(in.Text() == "get")
	}
	return 0
}

// holderProc is a running holder.
type holderProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startHolder(t *testing.T, eps []string, prefix, root, source string, lease time.Duration, env ...string) *holderProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DEPCACHE_TEST_ROLE=holder", "DT_ENDPOINTS="+strings.Join(eps, ","),
		"DT_PREFIX="+prefix, "DT_ROOT="+root, "DT_SOURCE="+source, "DT_LEASE="+lease.String())
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return &holderProc{cmd: cmd, in: in, out: bufio.NewScanner(out)}
}

// line returns the holder's next line of output.
func (h *holderProc) line(t *testing.T) string {
	t.Helper()
	if !h.out.Scan() {
		t.Fatalf("holder ended without answering: %v", h.out.Err())
	}
	return h.out.Text()
}

func (h *holderProc) ask(t *testing.T, what string) string {
	t.Helper()
	if _, err := fmt.Fprintln(h.in, what); err != nil {
		t.Fatal(err)
	}
	return h.line(t)
}

// leaseRig is where the process tests run: the rig's cluster when it is
// up (and under CI), else an embedded member.
func leaseRig(t *testing.T, name string) (eps []string, prefix string) {
	if os.Getenv("DEPCACHE_ETCD_ENDPOINTS") != "" || os.Getenv("CI") == "true" {
		eps = rigtest.Etcd(t)
		prefix = "/depcache-test/" + name + "-" + runID()
		t.Cleanup(func() { deletePrefix(t, eps, prefix) })
		return eps, prefix
	}
	return []string{etcdtest.Start(t).Endpoint}, "/" + name
}

func sourceFile(t *testing.T) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "dep.txt")
	if err := os.WriteFile(f, []byte("a dependency\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return "file://" + f
}

// TestKilledHolderReaped: a process SIGKILLed while it holds a dependent
// bound to it loses it when its session's lease runs out, timed by etcd:
// no other manager runs to reap it.
func TestKilledHolderReaped(t *testing.T) {
	eps, prefix := leaseRig(t, "killed")
	root := t.TempDir()
	src := sourceFile(t)
	h := startHolder(t, eps, prefix, root, src, 3*time.Second)
	if got := h.line(t); !strings.HasPrefix(got, "READY ") {
		t.Fatalf("holder: %q, want READY", got)
	}
	s := open(t, eps, prefix)
	key, err := manager.ParseKey(src, "")
	if err != nil {
		t.Fatal(err)
	}
	l, ok := depKeyLease(t, s, key, "job")
	if !ok || l == 0 {
		t.Fatalf("the holder's dependent: present %v, lease %x; want it on a lease", ok, l)
	}
	if err := h.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	awaitDepGone(t, s, key, "job")
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if e := st.Get(key); e == nil || e.Stage != state.Ready || len(e.Dependents) != 0 {
		t.Fatalf("entry after the lease ended: %+v, want READY without dependents", e)
	}
}

// TestCutOffHolderNeverHandsOutDeletedPath: a process stopped (SIGSTOP:
// it and its connection fall silent) past its dependent lease loses its
// dependent; the entry is evicted meanwhile. When it runs again, its
// manager notices: Wait says the dependent was lost, never the evicted
// path, and a new get fetches the content again under a new path.
func TestCutOffHolderNeverHandsOutDeletedPath(t *testing.T) {
	eps, prefix := leaseRig(t, "cutoff")
	root := t.TempDir()
	src := sourceFile(t)
	h := startHolder(t, eps, prefix, root, src, 3*time.Second)
	first := h.line(t)
	path, ok := strings.CutPrefix(first, "READY ")
	if !ok {
		t.Fatalf("holder: %q, want READY", first)
	}
	s := open(t, eps, prefix, func(o *Options) { o.Root = root })
	key, err := manager.ParseKey(src, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	awaitDepGone(t, s, key, "job")
	// Another manager evicts the entry, now that nothing holds it.
	sweeper, err := manager.New(manager.Config{Root: root, State: s, Log: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	one, zero := int64(1), time.Duration(0)
	rep, err := sweeper.SweepWith(context.Background(), false, manager.PolicyChange{MaxSizeBytes: &one, MinAge: &zero})
	if err != nil || len(rep.Victims) != 1 {
		t.Fatalf("sweep: %+v %v, want the entry evicted", rep, err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("evicted content %s: %v, want it gone", path, err)
	}
	if err := h.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if got := h.ask(t, "wait"); got != "LOST" {
		t.Fatalf("wait after the cut: %q, want LOST", got)
	}
	got := h.ask(t, "get")
	again, ok := strings.CutPrefix(got, "READY ")
	if !ok || again == path {
		t.Fatalf("get after the cut: %q, want READY at a new path (the old one was %s)", got, path)
	}
	if _, err := os.Stat(again); err != nil {
		t.Fatalf("content handed out after the cut: %v", err)
	}
	if l, ok := depKeyLease(t, s, key, "job"); !ok || l == 0 {
		t.Fatalf("the new dependent: present %v, lease %x; want it on the new session's lease", ok, l)
	}
}

func depKeyLease(t *testing.T, s *Store, key state.Key, name string) (int64, bool) {
	t.Helper()
	resp, err := s.Client().Get(context.Background(), s.l.dep(key.ID(), name))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return 0, false
	}
	return resp.Kvs[0].Lease, true
}

func awaitDepGone(t *testing.T, s *Store, key state.Key, name string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, ok := depKeyLease(t, s, key, name); !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("dependent %q still there 60 s after its process stopped", name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
