package state_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
)

// The lock torture: workers do critical sections that each add one section
// ID to a counter file and detect overlap with a marker file; a killer
// SIGKILLs random lock holders and restarts them. Killed holders leave their
// marker behind; the killer records every kill in killed/ before it kills,
// so a marker is an overlap only if its writer was not killed.

const tortureSections = 200

// TestLockTortureLocal: 8 processes on local disk, one killer.
func TestLockTortureLocal(t *testing.T) {
	dir := t.TempDir()
	res, err := runTortureHost(dir, "l", 8, tortureSections, 10, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d sections, %d kills", 8*tortureSections, res.kills)
	if res.kills == 0 {
		t.Error("the killer never caught a holder: the test proved nothing about stale locks")
	}
	checkTorture(t, dir, []string{"l"}, 8)
}

// TestLockTortureHosts: 2 fake hosts, each on its own sshfs mount of one
// export, 4 processes each, a killer on each host.
func TestLockTortureHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	sub := fmt.Sprintf("torture-%d", time.Now().UnixNano())
	for _, m := range []string{mnt1} {
		if err := os.MkdirAll(filepath.Join(m, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	type host struct {
		name, prefix, dir string
		out               <-chan string
		done              chan error
	}
	hosts := []*host{{name: "host-a", prefix: "a", dir: filepath.Join(mnt1, sub)}, {name: "host-b", prefix: "b", dir: filepath.Join(mnt2, sub)}}
	for _, h := range hosts {
		cmd := rigtest.FakeHost(t, h.name, 0, os.Args[0])
		cmd.Env = append(cmd.Env, "DEPCACHE_TEST_ROLE=torture-host", "DT_DIR="+h.dir, "DT_ID="+h.prefix,
			"DT_WORKERS=4", "DT_N="+strconv.Itoa(tortureSections), "DT_KILLS=6", "DT_LEASE=2s")
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		h.out = lines(t, out)
		h.done = make(chan error, 1)
		go func() { h.done <- cmd.Wait() }()
	}
	for _, h := range hosts {
		kills := expectLine(t, h.out, "kills=")
		if err := <-h.done; err != nil {
			t.Fatalf("%s: %v", h.name, err)
		}
		t.Logf("%s: %s", h.name, kills)
		if kills == "kills=0" {
			t.Errorf("%s: the killer never caught a holder", h.name)
		}
	}
	checkTorture(t, filepath.Join(mnt1, sub), []string{"a", "b"}, 4)
}

func checkTorture(t *testing.T, dir string, prefixes []string, workers int) {
	t.Helper()
	ids, err := readCounter(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := len(prefixes) * workers * tortureSections; len(ids) != want {
		t.Errorf("counter holds %d sections, want %d", len(ids), want)
	}
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			t.Errorf("section %s counted twice", id)
		}
		seen[id] = true
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		switch n := e.Name(); {
		case strings.HasPrefix(n, "overlap-"):
			b, _ := os.ReadFile(filepath.Join(dir, n))
			t.Errorf("overlap: %s", b)
		case n == "lock" || strings.HasPrefix(n, "lock.break-") || strings.HasPrefix(n, "lock.stale-"):
			t.Errorf("lock litter left: %s", n)
		}
	}
}

type tortureResult struct{ kills int }

func tortureHostMain() int {
	res, err := runTortureHost(os.Getenv("DT_DIR"), os.Getenv("DT_ID"), envInt("DT_WORKERS", 4),
		envInt("DT_N", tortureSections), envInt("DT_KILLS", 5), envDur("DT_LEASE", 2*time.Second))
	if err != nil {
		fmt.Fprintln(os.Stderr, "torture host:", err)
		return 1
	}
	fmt.Printf("kills=%d\n", res.kills)
	return 0
}

type tortureChild struct {
	id   string
	inc  int
	pid  int
	kill func() error
}

// runTortureHost runs workers until each has done n sections, killing up to
// maxKills lock holders among them and restarting them.
func runTortureHost(dir, prefix string, workers, n, maxKills int, lease time.Duration) (tortureResult, error) {
	var res tortureResult
	if err := os.MkdirAll(filepath.Join(dir, "killed"), 0o755); err != nil {
		return res, err
	}
	host, _ := os.Hostname()
	type exit struct {
		c   *tortureChild
		err error
	}
	exits := make(chan exit)
	running := map[int]*tortureChild{}
	start := func(id string, inc int) error {
		cmd := child("torture-worker", "DT_DIR="+dir, "DT_ID="+id, "DT_INC="+strconv.Itoa(inc),
			"DT_N="+strconv.Itoa(n), "DT_LEASE="+lease.String())
		if err := cmd.Start(); err != nil {
			return err
		}
		c := &tortureChild{id: id, inc: inc, pid: cmd.Process.Pid, kill: cmd.Process.Kill}
		running[c.pid] = c
		go func() { exits <- exit{c, cmd.Wait()} }()
		return nil
	}
	for i := range workers {
		if err := start(fmt.Sprintf("%s%d", prefix, i), 0); err != nil {
			return res, err
		}
	}
	killed := map[*tortureChild]bool{}
	tick := time.NewTicker(3 * time.Millisecond)
	defer tick.Stop()
	for len(running) > 0 {
		select {
		case e := <-exits:
			delete(running, e.c.pid)
			if e.err == nil {
				continue
			}
			if !killed[e.c] {
				for _, c := range running {
					c.kill()
				}
				return res, fmt.Errorf("worker %s-%d: %w", e.c.id, e.c.inc, e.err)
			}
			if err := start(e.c.id, e.c.inc+1); err != nil {
				return res, err
			}
		case <-tick.C:
			if res.kills >= maxKills || rand.IntN(10) != 0 {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, "lock"))
			if err != nil {
				continue
			}
			var h struct {
				Host string `json:"host"`
				PID  int    `json:"pid"`
			}
			if json.Unmarshal(b, &h) != nil || h.Host != host {
				continue
			}
			c, ok := running[h.PID]
			if !ok || killed[c] {
				continue
			}
			// Record the kill before it happens, so that whoever finds the
			// victim's marker knows it was not an overlap.
			if err := os.WriteFile(filepath.Join(dir, "killed", fmt.Sprintf("%s-%d", c.id, c.inc)), nil, 0o644); err != nil {
				return res, err
			}
			killed[c] = true
			res.kills++
			c.kill()
		}
	}
	return res, nil
}

func tortureWorker() int {
	dir, id := os.Getenv("DT_DIR"), os.Getenv("DT_ID")
	me := id + "-" + os.Getenv("DT_INC")
	n := envInt("DT_N", tortureSections)
	l, err := state.NewLock(filepath.Join(dir, "lock"), state.LockOptions{Lease: envDur("DT_LEASE", 2*time.Second), Log: quietLog()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	progress := filepath.Join(dir, "progress-"+id)
	s := 0
	if b, err := os.ReadFile(progress); err == nil {
		s, _ = strconv.Atoi(string(b))
	}
	fail := func(code int, format string, args ...any) int {
		msg := fmt.Sprintf("%s: ", me) + fmt.Sprintf(format, args...)
		fmt.Fprintln(os.Stderr, msg)
		if code == 3 {
			os.WriteFile(filepath.Join(dir, "overlap-"+me), []byte(msg), 0o644)
		}
		return code
	}
	for s < n {
		unlock, err := l.Lock(ctx)
		if err != nil {
			return fail(2, "lock: %v", err)
		}
		if err := enterMarker(dir, me); err != nil {
			return fail(3, "%v", err)
		}
		if err := addToCounter(dir, me, fmt.Sprintf("%s/%d", id, s)); err != nil {
			return fail(2, "counter: %v", err)
		}
		if err := os.Remove(filepath.Join(dir, "marker")); err != nil {
			cur, _ := os.ReadFile(filepath.Join(dir, "marker"))
			rec, _ := os.ReadFile(filepath.Join(dir, "recovered"))
			lk, _ := os.ReadFile(filepath.Join(dir, "lock"))
			return fail(3, "marker: %v (now %q; recoveries: %s; lock: %s)", err, cur, rec, lk)
		}
		if err := unlock(); err != nil {
			return fail(4, "unlock: %v", err)
		}
		s++
		if err := writeAtomic(dir, progress, me, []byte(strconv.Itoa(s))); err != nil {
			return fail(2, "progress: %v", err)
		}
	}
	return 0
}

// enterMarker creates dir/marker naming me. A marker already there is an
// overlap unless its writer was killed.
func enterMarker(dir, me string) error {
	marker := filepath.Join(dir, "marker")
	tmp := marker + ".tmp-" + me
	if err := os.WriteFile(tmp, []byte(me), 0o644); err != nil {
		return err
	}
	defer os.Remove(tmp)
	for range 100 {
		err := os.Link(tmp, marker)
		if err == nil {
			return nil
		}
		if !state.LinkExists(err) {
			return err
		}
		who, err := os.ReadFile(marker)
		if errors.Is(err, fs.ErrNotExist) {
			continue // a name another mount deleted; the read refreshed it
		}
		if err != nil {
			return err
		}
		if _, err := os.Stat(filepath.Join(dir, "killed", string(who))); err != nil {
			return fmt.Errorf("overlap: marker held by %q, which was not killed", who)
		}
		if err := os.Remove(marker); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if f, err := os.OpenFile(filepath.Join(dir, "recovered"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			fmt.Fprintf(f, "%s removed the marker of killed %s at %s\n", me, who, time.Now().Format(time.StampMicro))
			f.Close()
		}
	}
	return fmt.Errorf("marker: gave up")
}

func addToCounter(dir, me, sid string) error {
	ids, err := readCounter(dir)
	if err != nil {
		return err
	}
	if slices.Contains(ids, sid) {
		return nil // this section was counted before its worker was killed
	}
	b, err := json.Marshal(append(ids, sid))
	if err != nil {
		return err
	}
	return writeAtomic(dir, filepath.Join(dir, "counter"), me, b)
}

// readCounter retries a parse failure: the first read of a file that grew
// through another sshfs mount may be cut to its old size.
func readCounter(dir string) ([]string, error) {
	var err error
	for range 20 {
		var b []byte
		b, err = os.ReadFile(filepath.Join(dir, "counter"))
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		var ids []string
		if err = json.Unmarshal(b, &ids); err == nil {
			return ids, nil
		}
	}
	return nil, fmt.Errorf("counter unreadable: %w", err)
}

func writeAtomic(dir, name, me string, b []byte) error {
	tmp := filepath.Join(dir, ".tmp-"+me)
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, name)
}
