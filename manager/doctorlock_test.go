package manager_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// holdLock takes root's state lock as process p of machine and returns its
// release.
func holdLock(t testing.TB, root string, machine *fakeMachine, p state.Process) func() error {
	t.Helper()
	l, err := state.NewLock(filepath.Join(root, state.LockFile), state.LockOptions{Log: quietLog(), Processes: fakeProc{m: machine, self: p}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	unlock, err := l.Lock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return unlock
}

// TestBreakLock: doctor --break-lock breaks the lock of a live process of
// this machine only once it stayed unchanged for the lease, as a waiter
// would (a stopped holder); never a lock that changed hands since it was
// shown; it breaks a dead holder's at once, and that holder's release then
// says that it lost the lock.
func TestBreakLock(t *testing.T) {
	root := t.TempDir()
	machine := &fakeMachine{dead: map[int]bool{}}
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(), Processes: fakeProc{m: machine, self: fakeProcess("h", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	if h := m.LockHolder(); h != "" {
		t.Fatalf("a free lock shows holder %q", h)
	}
	unlock := holdLock(t, root, machine, fakeProcess("h", 30))
	shown := m.LockHolder()
	if !strings.Contains(shown, `"pid":30`) {
		t.Fatalf("holder %q does not name pid 30", shown)
	}
	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond) // far less than the 30 s lease
	defer cancel()
	if err := m.BreakLock(short, shown); err == nil || !strings.Contains(err.Error(), "unchanged for less than the lease") {
		t.Fatalf("breaking a live holder's lock within its lease: %v, want a refusal", err)
	}
	if m.LockHolder() != shown {
		t.Fatal("the live holder's lock was touched")
	}
	// It is released and taken again (a new nonce) before the operator
	// confirms what was shown.
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	machine.kill(30)
	unlock = holdLock(t, root, machine, fakeProcess("h", 31))
	machine.kill(31)
	if err := m.BreakLock(context.Background(), shown); err == nil || !strings.Contains(err.Error(), "changed hands") {
		t.Fatalf("breaking a lock that changed hands: %v, want a refusal", err)
	}
	now := m.LockHolder()
	if now == shown || now == "" {
		t.Fatalf("holder after the refusal: %q", now)
	}
	if err := m.BreakLock(context.Background(), now); err != nil {
		t.Fatalf("breaking a dead holder's lock: %v", err)
	}
	if h := m.LockHolder(); h != "" {
		t.Fatalf("after breaking it the lock shows %q", h)
	}
	if err := unlock(); !errors.Is(err, state.ErrLockLost) {
		t.Errorf("the broken holder's release: %v, want ErrLockLost", err)
	}

	// A live holder that keeps the lock unchanged past the lease (stopped)
	// is broken, as a waiter would break it.
	quick, err := manager.New(manager.Config{Root: root, Log: quietLog(), LockLease: time.Second, Processes: fakeProc{m: machine, self: fakeProcess("h", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	unlock = holdLock(t, root, machine, fakeProcess("h", 32))
	if err := quick.BreakLock(context.Background(), quick.LockHolder()); err != nil {
		t.Fatalf("breaking a live holder's lock unchanged past the lease: %v", err)
	}
	if err := unlock(); !errors.Is(err, state.ErrLockLost) {
		t.Errorf("the stopped holder's release: %v, want ErrLockLost", err)
	}
}

// TestDoctorTellsStagingWriters: doctor reports each staging directory
// with its writer: a download in progress, a superseded one whose writer
// is alive, a dead writer's (which start-up removes) and an unknown one;
// it removes none of them.
func TestDoctorTellsStagingWriters(t *testing.T) {
	root := t.TempDir()
	machine := &fakeMachine{dead: map[int]bool{}}
	k := mustKey(t, "http://gate.test/doctor", "")
	live := state.Owner{Process: fakeProcess("h", 40), ManagerID: "live"}
	dead := state.Owner{Process: fakeProcess("h", 41), ManagerID: "dead"}
	machine.kill(dead.PID)
	staged := map[string]*state.Owner{gen(k, 3): &live, gen(k, 2): &live, gen(k, 1): &dead, "unknown-g1": nil}
	for name, o := range staged {
		dir := filepath.Join(root, "staging", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if o == nil {
			continue
		}
		var g uint64 = 1
		if name == gen(k, 2) {
			g = 2
		} else if name == gen(k, 3) {
			g = 3
		}
		b, err := json.Marshal(map[string]any{"owner": o, "generation": g})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "owner.json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	behind(t, root, func(st *state.State) {
		st.Put(&state.Entry{Key: k, Stage: state.Downloading, Owner: &live, Generation: 3, Created: now, LastUsed: now,
			Dependents: map[string]state.Dependent{"job": {Since: now}}})
	})
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(), Processes: fakeProc{m: machine, self: fakeProcess("h", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	var detail string
	for _, c := range m.Doctor(context.Background()) {
		if c.Name == "staging" {
			detail = c.Detail
			if c.Status != "warn" {
				t.Errorf("staging check %s, want warn", c.Status)
			}
		}
	}
	for name, want := range map[string]string{
		gen(k, 3):    "download in progress by",
		gen(k, 2):    "superseded",
		gen(k, 1):    "which is gone: start-up removes it",
		"unknown-g1": "writer unknown",
	} {
		said := false
		for _, seg := range strings.Split(detail, "; ") {
			said = said || strings.HasPrefix(seg, name+" (") && strings.Contains(seg, want)
		}
		if !said {
			t.Errorf("doctor does not say of %s %q: %s", name, want, detail)
		}
	}
	for name := range staged {
		if !exists(t, root, filepath.Join("staging", name)) {
			t.Errorf("doctor removed staging/%s", name)
		}
	}
}
