package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"golang.org/x/sys/unix"
)

// TestLockBadInput: bad usage exits 2 naming what is wrong.
func TestLockBadInput(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"lock", "", "--", "true"}, "empty lock NAME"},
		{[]string{"lock", "--", "true"}, "missing NAME"},
		{[]string{"lock"}, "missing NAME"},
		{[]string{"lock", "L", "--"}, "missing CMD"},
		{[]string{"lock", "L"}, "missing CMD"},
		{[]string{"lock", "a\nb", "--", "true"}, "printable"},
		{[]string{"lock", "L", "--lease", "10ms", "--", "true"}, "--lease"},
		{[]string{"lock", "L", "--timeout", "-1s", "--", "true"}, "--timeout"},
		{[]string{"lock", "L", "--lease", "25h", "--", "true"}, "--lease"},
		{[]string{"locks", "--break", "L", "--lease", "9223372036854775807ns"}, "--lease"},
		{[]string{"locks", "--lease", "48h"}, "go with --break"},
		{[]string{"locks", "--yes"}, "go with --break"},
		{[]string{"--lock-lease", "1ns", "locks"}, "--lock-lease"},
		{[]string{"locks", "--break", ""}, ""},
	} {
		root := t.TempDir()
		code, _, stderr := cli(t, root, c.args...)
		if c.want == "" { // --break "" is no --break: a listing
			if code != 0 {
				t.Errorf("%q: exit %d: %s", c.args, code, stderr)
			}
			continue
		}
		if code != exitUsage || !strings.Contains(stderr, c.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 naming %q", c.args, code, stderr, c.want)
		}
	}
}

// TestLockStatusTokensTimeout: CMD's status passes through, tokens go 1, 2,
// 3 over three holds, a --timeout while another holds the lock exits 3
// without running CMD, a SIGTERM sent to lock reaches CMD, and `locks`
// lists the holder while it holds.
func TestLockStatusTokensTimeout(t *testing.T) {
	root := t.TempDir()
	dir := t.TempDir()
	code, out, stderr := depcache(t, root, "lock", "L", "--", "sh", "-c", `echo $DEPCACHE_LOCK_TOKEN $DEPCACHE_LOCK_NAME; exit 7`)
	if code != 7 || out != "1 L\n" {
		t.Fatalf("exit %d, output %q; want 7 and token 1; stderr %s", code, out, stderr)
	}
	ready := filepath.Join(dir, "ready")
	script := fmt.Sprintf(`trap 'exit 42' TERM; echo $DEPCACHE_LOCK_TOKEN >%q.tmp; mv %q.tmp %q; while :; do sleep 0.01; done`, ready, ready, ready)
	holder, _, herr := startBin(t, root, nil, "lock", "L", "--lease", "1s", "--", "sh", "-c", script)
	waitFor(t, "the holder's CMD", func() bool { return exists(ready) })
	if b, _ := os.ReadFile(ready); string(b) != "2\n" {
		t.Errorf("second token %q, want 2", b)
	}
	marker := filepath.Join(dir, "ran")
	code, _, stderr = depcache(t, root, "lock", "L", "--timeout", "300ms", "--", "touch", marker)
	if code != exitTimeout || !strings.Contains(stderr, "--timeout") || exists(marker) {
		t.Errorf("--timeout while held: exit %d, stderr %q, CMD ran %v; want 3 and no CMD", code, stderr, exists(marker))
	}
	if strings.Contains(stderr, "runs under") {
		t.Errorf("a waiter that the holder does not run was told it is nested: %s", stderr)
	}
	code, out, _ = depcache(t, root, "locks")
	if code != 0 || !strings.Contains(out, "L ") || !strings.Contains(out, strconv.Itoa(holder.Process.Pid)) {
		t.Errorf("locks: exit %d:\n%s\nwant L held by pid %d", code, out, holder.Process.Pid)
	}
	holder.Process.Signal(syscall.SIGTERM)
	if code := exitStatus(t, holder); code != 42 {
		t.Errorf("SIGTERM to lock: exit %d, want CMD's 42; stderr %s", code, herr)
	}
	code, out, _ = depcache(t, root, "lock", "L", "--", "sh", "-c", `echo $DEPCACHE_LOCK_TOKEN`)
	if code != 0 || out != "3\n" {
		t.Errorf("third hold: exit %d, token %q; want 3", code, out)
	}
	if code, out, _ := depcache(t, root, "locks"); code != 0 || !strings.Contains(out, "no lock is held") {
		t.Errorf("locks after the releases: exit %d: %s", code, out)
	}
}

// TestLockNested: a lock nested in a lock of the same name (its holder
// runs it, through a shell) is told at once that it waits for its own
// enclosing holder, naming its pid; with --timeout it then exits 3, which
// the outer lock passes on as CMD's status. A nested lock of another name
// is not told anything.
func TestLockNested(t *testing.T) {
	root := t.TempDir()
	inner := fmt.Sprintf("%s --root %s lock %%s --timeout 300ms -- true", bin, root)
	code, _, stderr := depcache(t, root, "lock", "N", "--", "sh", "-c", fmt.Sprintf(inner, "N"))
	if code != exitTimeout || !strings.Contains(stderr, `"N" is held by pid`) || !strings.Contains(stderr, "runs under") {
		t.Errorf("nested lock N: exit %d, stderr %q; want 3, told it waits for its enclosing holder", code, stderr)
	}
	code, _, stderr = depcache(t, root, "lock", "N", "--", "sh", "-c", fmt.Sprintf(inner, "M"))
	if code != 0 || strings.Contains(stderr, "runs under") {
		t.Errorf("lock M inside lock N: exit %d, stderr %q; want 0 and nothing told", code, stderr)
	}
}

// TestLockBreakCommand: `locks --break` refuses a live holder of this
// machine that renews, breaks one that was stopped past the lease (as a
// waiter does), and breaks a dead one at once.
func TestLockBreakCommand(t *testing.T) {
	root := t.TempDir()
	ready := filepath.Join(t.TempDir(), "ready")
	holder, _, _ := startBin(t, root, nil, "lock", "L", "--lease", "3s", "--", "sh", "-c", fmt.Sprintf(`touch %q; exec sleep 600`, ready))
	waitFor(t, "the holder's CMD", func() bool { return exists(ready) })
	if code, out, stderr := depcache(t, root, "locks", "--break", "L", "--yes", "--lease", "3s"); code != exitFailed || !strings.Contains(stderr, "renewed") {
		t.Errorf("--break of a live holder: exit %d: %s %s; want 1, renewed", code, out, stderr)
	}
	// With --json, stderr is the one error object, of kind in_use.
	code, out, stderr := depcache(t, root, "--json", "locks", "--break", "L", "--yes", "--lease", "3s")
	var e struct {
		Error string `json:"error"`
		Kind  string `json:"kind"`
	}
	if err := json.Unmarshal([]byte(stderr), &e); code != exitFailed || err != nil || e.Kind != "in_use" || !strings.Contains(e.Error, "renewed") || out != "" {
		t.Errorf("--json --break of a live holder: exit %d, stdout %q, stderr %q (%v); want 1 and one error object of kind in_use", code, out, stderr, err)
	}
	// Stopped, it renews no more: broken once it stayed unchanged for the
	// lease.
	if err := holder.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	if code, out, stderr := depcache(t, root, "locks", "--break", "L", "--yes", "--lease", "3s"); code != 0 || !strings.Contains(out, "unchanged for") {
		t.Errorf("--break of a stopped holder: exit %d: %s %s; want it broken after the lease", code, out, stderr)
	}
	holder.Process.Kill()
	holder.Wait()
	// A second holder, killed: broken at once.
	holder, _, _ = startBin(t, root, nil, "lock", "L", "--", "sh", "-c", fmt.Sprintf(`touch %q.2; exec sleep 600`, ready))
	waitFor(t, "the second holder's CMD", func() bool { return exists(ready + ".2") })
	holder.Process.Kill()
	holder.Wait()
	var res struct {
		Name   string `json:"name"`
		Held   bool   `json:"held"`
		Broken bool   `json:"broken"`
	}
	code, out, stderr = depcache(t, root, "--json", "locks", "--break", "L", "--yes")
	if err := json.Unmarshal([]byte(out), &res); code != 0 || err != nil || !res.Held || !res.Broken || res.Name != "L" || stderr != "" {
		t.Errorf("--json --break of a dead holder: exit %d, %+v %v: %s %s", code, res, err, out, stderr)
	}
	res.Held = true
	code, out, stderr = depcache(t, root, "--json", "locks", "--break", "L", "--yes")
	if err := json.Unmarshal([]byte(out), &res); code != 0 || err != nil || res.Held || res.Broken {
		t.Errorf("--json --break of a free lock: exit %d, %+v %v: %s %s", code, res, err, out, stderr)
	}
	lock := filepath.Join(root, "locks")
	if left, _ := filepath.Glob(filepath.Join(lock, "*.lock")); len(left) != 0 {
		t.Errorf("lock files left: %v", left)
	}
}

// procStatFields returns the fields of /proc/PID/stat after the command.
func procStatFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:])) // [0] state, [1] ppid
}

func ppid(pid int) int {
	f := procStatFields(pid)
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(f[1])
	return n
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return string(b)
}

// holder is a `depcache lock` of the counter test caught in its CMD's
// sleep: the three processes, by pidfd, so that no pid can be
// reused under the test, and the CMD's name ($0, HOST-I) and --root.
type holder struct {
	sleep, sh, lock int // pidfds
	sleepPID        int
	cmdName, root   string
}

func (h holder) close() {
	for _, fd := range []int{h.sleep, h.sh, h.lock} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

func (h holder) kill(fd int, sig unix.Signal) error { return unix.PidfdSendSignal(fd, sig, nil, 0) }

// lockArgs returns the arguments of a `depcache lock` process of name: its
// --root and its CMD's $0; ok false if pid is not one.
func lockArgs(pid int, name string) (root, cmdName string, ok bool) {
	args := strings.Split(strings.TrimSuffix(cmdline(pid), "\x00"), "\x00")
	// BIN --root ROOT lock NAME --lease 3s -- sh -c SCRIPT HOST-I
	if len(args) != 12 || args[0] != bin || args[1] != "--root" || args[3] != "lock" || args[4] != name {
		return "", "", false
	}
	return args[2], args[11], true
}

// findHolderInSleep finds a holder of name whose CMD is in its `sleep
// 600` and opens pidfds of its processes, checked after the open.
func findHolderInSleep(name string) (holder, bool) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || cmdline(pid) != "sleep\x00600\x00" {
			continue
		}
		sh := ppid(pid)
		lock := ppid(sh)
		if sh == 0 || lock == 0 {
			continue
		}
		h := holder{sleep: -1, sh: -1, lock: -1, sleepPID: pid}
		h.sleep, _ = unix.PidfdOpen(pid, 0)
		h.sh, _ = unix.PidfdOpen(sh, 0)
		h.lock, _ = unix.PidfdOpen(lock, 0)
		var ok bool
		h.root, h.cmdName, ok = lockArgs(lock, name)
		// With the pidfds open and the processes alive, the pids are theirs.
		if ok && h.sleep >= 0 && h.sh >= 0 && h.lock >= 0 && ppid(pid) == sh && ppid(sh) == lock &&
			h.kill(h.sleep, 0) == nil && h.kill(h.sh, 0) == nil && h.kill(h.lock, 0) == nil {
			return h, true
		}
		h.close()
	}
	return holder{}, false
}

// pollUntil polls cond until it holds or a deadline that no load reaches
// passes (false).
func pollUntil(cond func() bool) bool {
	for start := time.Now(); !cond(); time.Sleep(time.Millisecond) {
		if time.Since(start) > time.Minute {
			return false
		}
	}
	return true
}

// TestLockCounterTwoHosts: 16 `depcache lock L -- CMD` (8 on each of 2
// fake hosts, each host on its own sshfs mount of the root) while random
// holders are SIGKILLed. CMD holds a marker on the shared filesystem,
// created with O_EXCL (noclobber) through its host's mount and removed at
// its end, so that two CMDs holding the lock at once, from any hosts, fail
// the test; inside it, it reads a counter (on local disk, which both fake
// hosts share coherently), sleeps 0.05 s, writes the counter plus one and
// appends the value, its token and its name to a history.
//
// 2 to 4 of the 16, chosen by the seed (DEPCACHE_SEED replays the
// choice), sleep 600 s instead, so that the test always finds them holding
// the lock, and are killed in that sleep: the sleep is stopped, and then, while it is stopped (so its CMD
// waits for it and can neither write nor end), the marker is removed
// through the holder's mount, and the lock, the CMD and the sleep get
// SIGKILL in that order: the CMD dies before the sleep can end, so a
// killed holder never writes. (Killing only the lock and the sleep let
// the CMD run on between the sleep's death and the parent-death signal of
// the dying lock: it wrote its increment, or died between the truncation
// of the counter and its write.) The killed lock's lock is then broken by
// the others, at once on its host and after the 3 s lease on the other.
//
// Then: exactly the killed ones exit 137 and the others 0, the counter is
// the number that exited 0, and the history holds the values 1..counter,
// in order, from exactly those, with strictly increasing tokens.
func TestLockCounterTwoHosts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	seed := trialSeed(t)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	var victims []string
	for _, i := range rng.Perm(16)[:2+rng.IntN(3)] {
		victims = append(victims, fmt.Sprintf("host-%c-%d", 'a'+i/8, 1+i%8))
	}
	t.Logf("victims %v", victims)
	sub := fmt.Sprintf("e2e-lock-%d", time.Now().UnixNano())
	if err := os.Mkdir(filepath.Join(mnt1, sub), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	name := "counter-" + sub
	work := t.TempDir() // the counter: a resource outside the root, local
	counter, history := filepath.Join(work, "counter"), filepath.Join(work, "history")
	os.WriteFile(counter, []byte("0\n"), 0o644)
	os.WriteFile(history, nil, 0o644)
	script := `for i in 1 2 3 4 5 6 7 8; do
  ( "$BIN" --root "$ROOT" lock "$LOCKNAME" --lease 3s -- sh -c '
      if ! (set -C; echo "$0 $DEPCACHE_LOCK_TOKEN" >"$HELD") 2>/dev/null; then
        echo "$0 (token $DEPCACHE_LOCK_TOKEN) holds the lock while $(cat "$HELD") does" >&2; exit 99
      fi
      case " $VICTIMS " in *" $0 "*) s=600;; *) s=0.05;; esac
      read n <"$CTR"; sleep $s; echo $((n+1)) >"$CTR"; echo "$((n+1)) $DEPCACHE_LOCK_TOKEN $0" >>"$HIST"
      rm "$HELD"' "$HOST-$i" \
      2>"$OUT/$HOST-$i.err"
    echo $? >"$OUT/$HOST-$i.rc" ) &
done
wait`
	var hosts []*exec.Cmd
	for _, h := range []struct{ name, mnt string }{{"host-a", mnt1}, {"host-b", mnt2}} {
		cmd := rigtest.FakeHost(t, h.name, 0, "sh", "-c", script)
		cmd.Env = append(cmd.Env, "BIN="+bin, "ROOT="+filepath.Join(h.mnt, sub, "root"), "LOCKNAME="+name, // not NAME: fakehost.sh sets its own NAME, and it is exported
			"HELD="+filepath.Join(h.mnt, sub, "held"), "CTR="+counter, "HIST="+history, "OUT="+work, "HOST="+h.name, "VICTIMS="+strings.Join(victims, " "))
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, cmd)
	}
	done := make(chan struct{})
	killerDone := make(chan struct{})
	killed := map[string]bool{}
	var killerErrs []string
	go func() {
		defer close(killerDone)
		for len(killed) < len(victims) {
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond): // polling for a victim in its sleep
			}
			h, ok := findHolderInSleep(name)
			if !ok {
				continue
			}
			h.kill(h.sleep, unix.SIGSTOP)
			if !pollUntil(func() bool {
				f := procStatFields(h.sleepPID)
				return f == nil || f[0] == "T" || f[0] == "Z" || f[0] == "X"
			}) {
				killerErrs = append(killerErrs, "the sleep of "+h.cmdName+" did not stop")
			}
			// Stopped and alive: its CMD waits for it and has not written.
			f := procStatFields(h.sleepPID)
			if f == nil || f[0] != "T" || h.kill(h.sleep, 0) != nil || h.kill(h.sh, 0) != nil {
				h.kill(h.sleep, unix.SIGCONT)
				h.close()
				continue
			}
			held := filepath.Join(filepath.Dir(h.root), "held") // through the holder's mount
			if b, err := os.ReadFile(held); err != nil || !strings.HasPrefix(string(b), h.cmdName+" ") {
				killerErrs = append(killerErrs, fmt.Sprintf("%s is in its sleep but the marker says %q (%v)", h.cmdName, b, err))
			}
			if err := os.Remove(held); err != nil {
				killerErrs = append(killerErrs, fmt.Sprintf("removing the marker of %s: %v", h.cmdName, err))
			}
			h.kill(h.lock, unix.SIGKILL)
			h.kill(h.sh, unix.SIGKILL)
			h.kill(h.sleep, unix.SIGKILL)
			killed[h.cmdName] = true
			h.close()
		}
	}()
	for _, h := range hosts {
		if err := h.Wait(); err != nil {
			t.Errorf("a fake host: %v", err)
		}
	}
	close(done)
	<-killerDone
	for _, e := range killerErrs {
		t.Error(e)
	}
	exited0 := map[string]bool{}
	for _, h := range []string{"host-a", "host-b"} {
		for i := 1; i <= 8; i++ {
			cmdName := fmt.Sprintf("%s-%d", h, i)
			b, _ := os.ReadFile(filepath.Join(work, cmdName+".rc"))
			errs, _ := os.ReadFile(filepath.Join(work, cmdName+".err"))
			switch rc := strings.TrimSpace(string(b)); {
			case rc == "0" && !killed[cmdName]:
				exited0[cmdName] = true
			case rc == "137" && killed[cmdName]:
			default:
				t.Errorf("%s: exit %q, killed %v: %s", cmdName, rc, killed[cmdName], errs)
			}
		}
	}
	b, _ := os.ReadFile(counter)
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	t.Logf("killed %d, exited 0: %d, counter %d", len(killed), len(exited0), n)
	if n != len(exited0) {
		t.Errorf("counter %d, %d exited 0; want them equal", n, len(exited0))
	}
	h, _ := os.ReadFile(history)
	lines := strings.Split(strings.TrimSpace(string(h)), "\n")
	if len(lines) != len(exited0) {
		t.Errorf("history has %d lines, want %d:\n%s", len(lines), len(exited0), h)
	}
	var lastTok uint64
	for i, l := range lines {
		f := strings.Fields(l)
		if len(f) != 3 {
			t.Fatalf("history line %q", l)
		}
		v, _ := strconv.Atoi(f[0])
		tok, _ := strconv.ParseUint(f[1], 10, 64)
		if v != i+1 {
			t.Errorf("history line %d has value %d: increments out of order or lost\n%s", i+1, v, h)
		}
		if tok <= lastTok {
			t.Errorf("token %d after %d at value %d: tokens must increase strictly in the order of the increments\n%s", tok, lastTok, v, h)
		}
		if !exited0[f[2]] {
			t.Errorf("history line %d is from %s, which did not exit 0 (killed %v)\n%s", i+1, f[2], killed[f[2]], h)
		}
		lastTok = tok
	}
}

// TestLockStoppedHolderLosesLease: a holder on fake host A is SIGSTOPped
// past --lease 3s; a locker on fake host B (another sshfs mount) gets the
// lock, with a greater token. When A resumes, it ends its CMD (SIGTERM)
// and exits 75, saying it lost the lease.
func TestLockStoppedHolderLosesLease(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	sub := fmt.Sprintf("e2e-lockstop-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	name := "stop-" + sub
	dir := t.TempDir()
	tokA, tokB, ended := filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "ended")
	a := rigtest.FakeHost(t, "host-a", 0, bin, "--root", filepath.Join(mnt1, sub), "lock", name, "--lease", "3s", "--",
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
	b := rigtest.FakeHost(t, "host-b", 0, bin, "--root", filepath.Join(mnt2, sub), "lock", name, "--lease", "3s", "--",
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
	na, _ := strconv.Atoi(strings.TrimSpace(string(ta)))
	nb, _ := strconv.Atoi(strings.TrimSpace(string(tb)))
	if na != 1 || nb != 2 {
		t.Errorf("tokens A %d, B %d; want 1 then 2", na, nb)
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

// TestLockNameFileTwoMounts: lockers of one NAME on two sshfs mounts,
// with the name file held open on both (as `locks` or a locker reading it
// has it), record NAME at once without an error, and the file says NAME.
// (A rename over the name file failed here with ENOENT: libfuse first
// renames an open target to a hidden name on the server.)
func TestLockNameFileTwoMounts(t *testing.T) {
	mnt1, mnt2 := rigtest.SharedFS(t)
	sub := fmt.Sprintf("e2e-lockname-%d", time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(mnt1, sub)) })
	if err := os.Mkdir(filepath.Join(mnt1, sub), 0o755); err != nil {
		t.Fatal(err)
	}
	for round := range 20 {
		name := fmt.Sprintf("name-%d", round)
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := range 16 {
			nameFile := filepath.Join([]string{mnt1, mnt2}[i%2], sub, fmt.Sprintf("%d.name", round))
			wg.Add(1)
			go func() {
				defer wg.Done()
				if f, err := os.Open(nameFile); err == nil {
					defer f.Close()
				}
				errs <- recordLockName(nameFile, name, state.DefaultPerms())
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Errorf("round %d: %v", round, err)
			}
		}
		if b, err := os.ReadFile(filepath.Join(mnt2, sub, fmt.Sprintf("%d.name", round))); err != nil || string(b) != name {
			t.Errorf("round %d: name file %q, %v; want %q", round, b, err, name)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(mnt1, sub, "*.tmp-*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// TestCMDThatCannotStart: a CMD that is not found exits 127, one that is
// found but cannot be executed 126, as env, timeout and shells say: status
// 1 would read as CMD's own. A --root that is a file is bad usage for lock
// and locks, as for every command.
func TestCMDThatCannotStart(t *testing.T) {
	root := t.TempDir()
	src := testSource(t)
	notExec := filepath.Join(t.TempDir(), "depcache-test-script")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", filepath.Dir(notExec)+string(filepath.ListSeparator)+os.Getenv("PATH"))
	for _, c := range []struct {
		args []string
		want int
	}{
		{[]string{"lock", "L", "--", "/nonexistent/cmd"}, 127},
		{[]string{"lock", "L", "--", "no-such-command-anywhere"}, 127},
		{[]string{"lock", "L", "--", notExec}, 126},
		{[]string{"run", "--dep", "A=" + src, "--", "no-such-command-anywhere"}, 127},
		{[]string{"run", "--dep", "A=" + src, "--", notExec}, 126},
		{[]string{"lock", "L", "--", filepath.Base(notExec)}, 126}, // on PATH, not executable
	} {
		code, _, stderr := cli(t, root, c.args...)
		if code != c.want || !strings.Contains(stderr, "cannot start the command") {
			t.Errorf("%q: exit %d, stderr %q; want %d", c.args, code, stderr, c.want)
		}
		code, _, stderr = cli(t, root, append([]string{"--json"}, c.args...)...)
		var e struct {
			Kind     string `json:"kind"`
			ExitCode int    `json:"exit_code"`
		}
		if err := json.Unmarshal([]byte(stderr), &e); err != nil || e.Kind != "cannot_run" || e.ExitCode != c.want || code != c.want {
			t.Errorf("--json %q: exit %d, %q (%v); want kind cannot_run, %d", c.args, code, stderr, err, c.want)
		}
	}
	for _, args := range [][]string{{"lock", "L", "--", ""}, {"run", "--dep", "A=" + src, "--", ""}} {
		if code, _, stderr := cli(t, root, args...); code != exitUsage || !strings.Contains(stderr, "missing CMD") {
			t.Errorf("%q: exit %d, %q; want 2, missing CMD", args, code, stderr)
		}
	}
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"lock", "L", "--", "true"}, {"locks"}, {"locks", "--break", "L"}} {
		if code, _, stderr := cli(t, file, args...); code != exitUsage || !strings.Contains(stderr, "not a directory") {
			t.Errorf("--root FILE %q: exit %d, %q; want 2, not a directory", args, code, stderr)
		}
	}
}

// TestLockForwardsSignals: SIGINT, SIGTERM and SIGHUP sent to lock reach
// CMD, which traps each and exits 40+N: lock exits with CMD's status, and
// the lock is released.
func TestLockForwardsSignals(t *testing.T) {
	root := t.TempDir()
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP} {
		ready := filepath.Join(t.TempDir(), "ready")
		n := int(sig)
		script := fmt.Sprintf(`trap 'exit %d' %d; touch %q; while :; do sleep 0.01; done`, 40+n, n, ready)
		cmd, _, stderr := startBin(t, root, nil, "lock", "L", "--", "sh", "-c", script)
		waitFor(t, "CMD to set its trap", func() bool { return exists(ready) })
		cmd.Process.Signal(sig)
		if code := exitStatus(t, cmd); code != 40+n {
			t.Errorf("%v sent to lock: exit %d, want CMD's %d; stderr %s", sig, code, 40+n, stderr)
		}
		if left, _ := filepath.Glob(filepath.Join(root, "locks", "*.lock")); len(left) != 0 {
			t.Errorf("after %v: the lock is still held: %v", sig, left)
		}
	}
}

// TestLockParsesCMDAsRunDoes: lock and run split their command line the
// same way. Their own flags (and the global ones) come before CMD, and for
// lock before or after NAME; without "--", CMD starts at its first word
// and everything after it is CMD's, flags and "--" included.
func TestLockParsesCMDAsRunDoes(t *testing.T) {
	src := testSource(t)
	for _, c := range []struct {
		args  []string
		wcode int
		wout  string
	}{
		// CMD's own flags: lock refused sh's -c ("unknown shorthand
		// flag"), and took a --timeout after CMD as its own.
		{[]string{"lock", "L", "sh", "-c", "echo ran; exit 7"}, 7, "ran\n"},
		{[]string{"run", "--dep", "A=" + src, "sh", "-c", "echo ran; exit 7"}, 7, "ran\n"},
		{[]string{"lock", "L", "echo", "--timeout", "-1s"}, 0, "--timeout -1s\n"},
		{[]string{"run", "--dep", "A=" + src, "echo", "--timeout", "-1s"}, 0, "--timeout -1s\n"},
		{[]string{"lock", "L", "echo", "--", "x"}, 0, "-- x\n"},
		{[]string{"run", "--dep", "A=" + src, "echo", "--", "x"}, 0, "-- x\n"},
		// The command's own flags, before CMD, with or without "--".
		{[]string{"lock", "L", "--timeout", "1m", "--", "echo", "x"}, 0, "x\n"},
		{[]string{"lock", "L", "--timeout", "1m", "echo", "x"}, 0, "x\n"},
		{[]string{"lock", "--timeout", "1m", "L", "echo", "x"}, 0, "x\n"},
		{[]string{"run", "--timeout", "1m", "--dep", "A=" + src, "echo", "x"}, 0, "x\n"},
		{[]string{"lock", "L", "--timeout", "-1s", "echo", "x"}, exitUsage, ""},
		{[]string{"lock", "L", "--nope", "echo", "x"}, exitUsage, ""},
		{[]string{"lock", "L", "--lease", "25h", "--", "echo", "x"}, exitUsage, ""},
	} {
		code, out, stderr := cli(t, t.TempDir(), c.args...)
		if code != c.wcode || out != c.wout {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit %d and %q", c.args, code, out, stderr, c.wcode, c.wout)
		}
	}
	// --help after NAME is lock's, as before CMD.
	if code, out, stderr := cli(t, t.TempDir(), "lock", "L", "--help"); code != 0 || !strings.Contains(out, "lock NAME") {
		t.Errorf("lock L --help: exit %d, %q, %q; want the help", code, out, stderr)
	}
}
