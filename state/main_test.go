package state_test

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/sirupsen/logrus"
)

// The test binary is re-run as a child process (like Go's own lockedfile
// tests) to get real processes; DEPCACHE_TEST_ROLE says which part it plays
// and DT_* variables carry its parameters.
func TestMain(m *testing.M) {
	role := os.Getenv("DEPCACHE_TEST_ROLE")
	if role == "" {
		checkSharedUnlessBenchmarking()
		os.Exit(m.Run())
	}
	roles := map[string]func() int{
		"torture-worker":   tortureWorker,
		"torture-host":     tortureHostMain,
		"lock-holder":      lockHolder,
		"lock-waiter":      lockWaiter,
		"update-loop":      updateLoop,
		"write-past-limit": writePastLimit,
	}
	f, ok := roles[role]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown role %q\n", role)
		os.Exit(125)
	}
	os.Exit(f())
}

// child returns a command that re-runs this test binary in role.
func child(role string, env ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "DEPCACHE_TEST_ROLE="+role)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	return cmd
}

func envInt(name string, def int) int {
	v, err := strconv.Atoi(os.Getenv(name))
	if err != nil {
		return def
	}
	return v
}

func envDur(name string, def time.Duration) time.Duration {
	v, err := time.ParseDuration(os.Getenv(name))
	if err != nil {
		return def
	}
	return v
}

func quietLog() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	if os.Getenv("DT_VERBOSE") != "" {
		l.SetOutput(os.Stderr)
	}
	return l
}

// lines delivers the lines a child prints.
func lines(t testing.TB, r io.Reader) <-chan string {
	t.Helper()
	ch := make(chan string, 100)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			ch <- sc.Text()
		}
	}()
	return ch
}

// expectLine waits for a line with the prefix, failing if the child's
// output ends first. It has no deadline of its own: a hang shows up as the
// test's timeout with every goroutine's stack.
func expectLine(t testing.TB, ch <-chan string, prefix string) string {
	t.Helper()
	for l := range ch {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	t.Fatalf("child ended without printing %q", prefix)
	return ""
}

// lockHolder takes the lock at DT_DIR/lock, says "locked", and releases it
// once DT_DIR/release exists, then writes DT_DIR/released.
func lockHolder() int {
	dir := os.Getenv("DT_DIR")
	name := os.Getenv("DT_LOCK")
	if name == "" {
		name = "lock"
	}
	l, err := state.NewLock(filepath.Join(dir, name), state.LockOptions{Lease: envDur("DT_LEASE", time.Hour), Log: quietLog()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	unlock, err := l.Lock(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println("locked", os.Getpid())
	for {
		if _, err := os.Stat(filepath.Join(dir, "release")); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.WriteFile(filepath.Join(dir, "released"), nil, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if err := unlock(); err != nil {
		fmt.Fprintln(os.Stderr, "unlock:", err)
		return 4
	}
	return 0
}

// lockWaiter takes the lock at DT_DIR/lock and exits 0 only if the holder
// had released it first (DT_DIR/released exists).
func lockWaiter() int {
	dir := os.Getenv("DT_DIR")
	name := os.Getenv("DT_LOCK")
	if name == "" {
		name = "lock"
	}
	l, err := state.NewLock(filepath.Join(dir, name), state.LockOptions{Lease: envDur("DT_LEASE", time.Hour), Log: quietLog()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println("waiting", os.Getpid())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	unlock, err := l.Lock(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(dir, "released")); err != nil {
		fmt.Fprintln(os.Stderr, "took the lock of a live holder")
		return 5
	}
	fmt.Println("acquired")
	return 0
}

// checkSharedUnlessBenchmarking makes every store of this test binary, and
// the processes it starts, check that no shared entry is modified in place
// (see state.State); benchmarks run without the check's cost.
func checkSharedUnlessBenchmarking() {
	flag.Parse()
	if f := flag.Lookup("test.bench"); f == nil || f.Value.String() == "" {
		os.Setenv("DEPCACHE_CHECK_SHARED", "1")
	}
}
