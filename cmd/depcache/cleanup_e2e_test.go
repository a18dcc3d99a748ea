package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/transitions"
	"github.com/sirupsen/logrus"
)

// hold is a run: it gets DT_SRC through the Go API (a dependent bound to
// this process, with its lease renewed by the running manager), says
// "held", and stays until killed.
func hold() int {
	lease, _ := time.ParseDuration(os.Getenv("DT_LEASE"))
	log := logrus.New()
	log.SetOutput(io.Discard)
	m, err := manager.New(manager.Config{Root: os.Getenv("DT_ROOT"), Log: log, PollInterval: 50 * time.Millisecond,
		Policy: transitions.Policy{LeaseDuration: lease}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	stop, err := m.Start(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer stop()
	key, err := manager.ParseKey(os.Getenv("DT_SRC"), "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if _, err := m.Get(context.Background(), fmt.Sprintf("run-%d", os.Getpid()), key); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if _, err := m.Wait(context.Background(), key); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println("held")
	select {}
}

func startHolder(t *testing.T, cmd *exec.Cmd, root, src string, lease time.Duration) {
	t.Helper()
	cmd.Env = append(cmd.Env, "DEPCACHE_TEST_ROLE=hold", "DT_ROOT="+root, "DT_SRC="+src, "DT_LEASE="+lease.String())
	cmd.Stderr = os.Stderr
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "held" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("holder said %q", line)
	}
}

// sweeper is a manager that sweeps root with a budget that fits nothing.
func sweeper(t *testing.T, root string, lease time.Duration) *manager.Manager {
	t.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	oneByte, noMinAge := int64(1), time.Duration(0)
	// The lock lease too: a host that crashes while it holds the state lock
	// (its loop takes it every pass) blocks everyone else for that long.
	m, err := manager.New(manager.Config{Root: root, Log: log, SetPolicy: true, LockLease: lease,
		Policy:  transitions.Policy{LeaseDuration: lease},
		Cleanup: manager.PolicyChange{MaxSizeBytes: &oneByte, MinAge: &noMinAge}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Settle(context.Background()); err != nil {
		t.Fatal(err)
	}
	return m
}

func testSource(t *testing.T) string {
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	return "file://" + abs
}

// TestE2ECrashedRunSameHost: a run SIGKILLed while it held an entry stops
// pinning it at the next sweep on the same host.
func TestE2ECrashedRunSameHost(t *testing.T) {
	root := t.TempDir()
	holder := exec.Command(os.Args[0])
	holder.Env = os.Environ()
	startHolder(t, holder, root, testSource(t), time.Hour)
	m := sweeper(t, root, time.Hour)
	rep, err := m.Sweep(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Victims) != 0 {
		t.Fatalf("evicted an entry held by a live run: %+v", rep.Victims)
	}
	holder.Process.Kill()
	holder.Wait()
	rep, err = m.Sweep(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Victims) != 1 || len(rep.Reaped) != 1 {
		t.Fatalf("after the crash: reaped %v, evicted %+v; want the dependent reaped and the entry evicted in one sweep", rep.Reaped, rep.Victims)
	}
}

// TestE2ECrashedRunOtherHost: a run on fake host A holds an entry; a
// sweeper on the real host keeps it while A renews its lease, and reaps it
// within the lease after host A crashes.
func TestE2ECrashedRunOtherHost(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	sub := fmt.Sprintf("e2e-lease-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	const lease = 2 * time.Second
	holder := rigtest.FakeHost(t, "host-a", 0, os.Args[0])
	startHolder(t, holder, filepath.Join(mnt1, sub), testSource(t), lease)
	m := sweeper(t, filepath.Join(mnt2, sub), lease)
	// Sweep for longer than the lease while A is alive: it renews, so the
	// entry stays.
	for start := time.Now(); time.Since(start) < 2*lease; time.Sleep(200 * time.Millisecond) {
		rep, err := m.Sweep(context.Background(), false)
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Victims) != 0 {
			t.Fatalf("evicted an entry whose remote run renews its lease: %+v", rep.Victims)
		}
	}
	holder.Process.Kill() // the whole fake host crashes
	holder.Wait()
	crashed := time.Now()
	for {
		rep, err := m.Sweep(context.Background(), false)
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Victims) == 1 {
			t.Logf("reaped and evicted %v after the crash (lease %v)", time.Since(crashed).Round(10*time.Millisecond), lease)
			break
		}
		if time.Since(crashed) > 10*lease {
			_, d, _ := m.Describe(context.Background())
			t.Logf("reaped %v; descriptions %+v", rep.Reaped, d)
			t.Fatal("the crashed run still pins its entry")
		}
		time.Sleep(100 * time.Millisecond) // polling a condition that depends on the lease running out
	}
}

// TestE2EPolicyMismatchTwoHosts: two workers on two fake hosts share one
// root. The budget host-a stores with policy set is the one host-b's loop
// applies, and host-b says so in one line when its flags differ; a one-shot
// gc on host-b sweeps with its own flags and stores nothing.
func TestE2EPolicyMismatchTwoHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	sub := fmt.Sprintf("e2e-policy-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	run := func(host, mnt string, args ...string) (string, string) {
		cmd := rigtest.FakeHost(t, host, 0, append([]string{bin, "--root", filepath.Join(mnt, sub)}, args...)...)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("%s %v: %v: %s", host, args, err, errb.String())
		}
		return out.String(), errb.String()
	}
	src := t.TempDir() + "/dep.bin"
	if err := os.WriteFile(src, []byte("dependency"), 0o644); err != nil {
		t.Fatal(err)
	}
	run("host-a", mnt1, "policy", "set", "--max-size", "100MB")
	_, errs := run("host-b", mnt2, "get", "--dependent", "job", "--max-size", "50MB", "file://"+src)
	// One line says it; a slow download may add progress lines ("waiting
	// for ..."), which are not about the policy.
	var said []string
	for _, l := range strings.Split(strings.TrimSpace(errs), "\n") {
		if !strings.HasPrefix(l, "waiting for ") {
			said = append(said, l)
		}
	}
	if len(said) != 1 || !strings.Contains(said[0], "max-size: stored 100000000, given 50000000") {
		t.Errorf("host-b's get did not report the mismatch in one line: %q", errs)
	}
	if out, _ := run("host-b", mnt2, "gc"); !strings.Contains(out, "budget 95 MiB") {
		t.Errorf("host-b's gc did not apply the stored budget: %q", out)
	}
	if out, _ := run("host-b", mnt2, "gc", "--max-size", "50MB"); !strings.Contains(out, "budget 48 MiB") {
		t.Errorf("host-b's one-shot gc did not apply its own --max-size: %q", out)
	}
	st := readState(t, filepath.Join(mnt1, sub))
	if st.Policy == nil || st.Policy.MaxSizeBytes != 100_000_000 {
		t.Errorf("stored policy %+v, want max-size 100000000", st.Policy)
	}
}
