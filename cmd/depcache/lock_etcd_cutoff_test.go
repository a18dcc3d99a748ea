package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/state/rigtest"
)

// stallProxy forwards TCP connections to target until stall, after which
// it forwards nothing more either way and holds every connection open: a
// client cut off from its server without a reset, as a partition is.
type stallProxy struct {
	ln      net.Listener
	mu      sync.Mutex
	stalled bool
}

func newStallProxy(t *testing.T, target string) *stallProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			go p.pipe(c, s)
			go p.pipe(s, c)
		}
	}()
	return p
}

func (p *stallProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		p.mu.Lock()
		stalled := p.stalled
		p.mu.Unlock()
		if stalled {
			io.Copy(io.Discard, src) // swallow, answer nothing
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (p *stallProxy) stall() {
	p.mu.Lock()
	p.stalled = true
	p.mu.Unlock()
}

// TestLockEtcdCutOffHolderEndsCMDInTime: a holder cut off from etcd (no
// answer, no reset) ends its CMD within two thirds of --lease after its
// last renewal, before etcd ends the lease and another locker's CMD
// starts, although each check of its hold waits up to 5 s for etcd. CMD
// A writes its heartbeat every 50 ms; no heartbeat of A may follow the
// start of B's CMD.
func TestLockEtcdCutOffHolderEndsCMDInTime(t *testing.T) {
	eps := rigtest.Etcd(t)
	prefix := fmt.Sprintf("depcache-test/lock-cutoff-%d", time.Now().UnixNano())
	proxy := newStallProxy(t, eps[0])
	urlA := "etcd://" + proxy.ln.Addr().String() + "/" + prefix
	urlB := "etcd://" + strings.Join(eps, ",") + "/" + prefix
	dir := t.TempDir()
	beats, startB := filepath.Join(dir, "beats"), filepath.Join(dir, "b")
	name := fmt.Sprintf("cutoff-%d", time.Now().UnixNano())
	a := exec.Command(bin, "--root", filepath.Join(t.TempDir(), "root"), "--state", urlA, "lock", name, "--lease", "3s", "--",
		"sh", "-c", fmt.Sprintf(`while :; do date +%%s%%N >>%q; sleep 0.05; done`, beats))
	var aErr bytes.Buffer
	a.Stderr = &aErr
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killIfRunning(t, a) })
	waitFor(t, "A's CMD", func() bool { return exists(beats) })
	proxy.stall()
	b := exec.Command(bin, "--root", filepath.Join(t.TempDir(), "root"), "--state", urlB, "lock", name, "--lease", "3s", "--timeout", "1m", "--",
		"sh", "-c", fmt.Sprintf(`date +%%s%%N >%q`, startB))
	if out, err := b.CombinedOutput(); err != nil {
		t.Fatalf("B: %v: %s", err, out)
	}
	err := a.Wait()
	ee, _ := err.(*exec.ExitError)
	if ee == nil || ee.ExitCode() != exitLost || !strings.Contains(aErr.String(), "could not renew") {
		t.Errorf("A cut off: %v, want exit %d saying it could not renew; stderr %s", err, exitLost, aErr.String())
	}
	tb, _ := os.ReadFile(startB)
	bStart, _ := strconv.ParseInt(strings.TrimSpace(string(tb)), 10, 64)
	raw, _ := os.ReadFile(beats)
	lines := strings.Fields(string(raw))
	last, _ := strconv.ParseInt(lines[len(lines)-1], 10, 64)
	if bStart == 0 || last == 0 {
		t.Fatalf("B's start %q, A's last beat %q", tb, lines[len(lines)-1])
	}
	if last >= bStart {
		t.Errorf("A's CMD beat %s after B's CMD started: both ran under the lock", time.Duration(last-bStart))
	}
}
