package manager_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/transitions"
	"golang.org/x/sys/unix"
)

// onFullDisk publishes a 1 MiB bundle into a root on the disk-full rig,
// with a disk reserve of reserve bytes, releases its dependent "job"
// unless keep, stops the manager's loop, and fills the filesystem to its
// last byte with a file of another program.
func onFullDisk(t *testing.T, reserve int64, keep bool) (m *manager.Manager, root string, k state.Key, body []byte, log *logRecorder) {
	t.Helper()
	dir := rigtest.DiskFull(t)
	return onFullDiskAt(t, dir, dir, reserve, keep)
}

// onFullDiskAt is onFullDisk with the root made in parent and the filler
// written in fill, both on the filesystem to fill (through two paths on
// the sshfs rig: a mount, and the server's own).
func onFullDiskAt(t *testing.T, parent, fill string, reserve int64, keep bool) (m *manager.Manager, root string, k state.Key, body []byte, log *logRecorder) {
	t.Helper()
	root, filler := rigtest.FullRoot(t, parent, fill)
	body = randomBytes(1 << 20)
	srv := newServer(t, body)
	log = &logRecorder{}
	m, stop := startManager(t, root, func(c *manager.Config) {
		c.DiskReserve = reserve
		c.Log = log.logger()
	})
	k = mustKey(t, srv.URL+"/b", "")
	if _, err := getWait(t, m, "job", k); err != nil {
		t.Fatal(err)
	}
	if !keep {
		if err := m.Release(context.Background(), "job", k); err != nil {
			t.Fatal(err)
		}
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	held := reserveHeld(t, root)
	switch {
	case reserve > 0 && held < reserve:
		t.Fatalf("after the first get, the reserve holds %d bytes, want %d", held, reserve)
	case reserve < 0 && held != 0:
		t.Fatalf("a reserve of %d bytes with none asked for", held)
	}
	rigtest.FillUp(t, filler)
	return m, root, k, body, log
}

// reserveHeld returns the bytes the disk reserve of root takes, 0 if there
// is none.
func reserveHeld(t *testing.T, root string) int64 {
	t.Helper()
	fi, err := os.Lstat(filepath.Join(root, state.ReserveFile))
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// On a disk filled to its last byte by something else, a removal and a
// sweep that evicts still commit: they give up the disk reserve first, and
// the space they free makes it again. A sweep that would evict nothing
// leaves the reserve alone.
func TestFullDiskFreedThroughTheReserve(t *testing.T) {
	for _, op := range []string{"rm", "gc"} {
		t.Run(op, func(t *testing.T) {
			const reserve = 256 << 10
			m, root, k, _, log := onFullDisk(t, reserve, false)
			ctx := context.Background()
			// Nothing to evict (min-age keeps the entry): not worth the
			// reserve.
			_, err := m.Sweep(ctx, false)
			if !errors.Is(err, manager.ErrDiskFull) || !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("a sweep with nothing to evict on a full disk: %v, want ErrDiskFull wrapping ENOSPC", err)
			}
			if held := reserveHeld(t, root); held < reserve {
				t.Fatalf("a sweep that frees nothing gave up the reserve (%d bytes left)", held)
			}
			var freed []string
			switch op {
			case "rm":
				rep, err := m.Remove(ctx, []state.Key{k}, false)
				if err != nil {
					t.Fatalf("rm on a full disk with a reserve: %v", err)
				}
				for _, r := range rep.Removed {
					freed = append(freed, r.Key.ID())
				}
			case "gc":
				one, zero := int64(1), time.Duration(0)
				rep, err := m.SweepWith(ctx, false, manager.PolicyChange{MaxSizeBytes: &one, MinAge: &zero})
				if err != nil {
					t.Fatalf("gc on a full disk with a reserve: %v", err)
				}
				for _, v := range rep.Victims {
					freed = append(freed, v.Key.ID())
				}
			}
			if !slices.Equal(freed, []string{k.ID()}) {
				t.Errorf("%s freed %v, want %s", op, freed, k.ID())
			}
			if exists(t, root, filepath.Join("entries", gen(k, 1))) {
				t.Errorf("the entry's content is still there after %s", op)
			}
			st, err := state.DecodeFile(root, state.StateFile)
			if err != nil {
				t.Fatal(err)
			}
			if e := st.Get(k); e != nil {
				t.Errorf("the entry is still in the state: %+v", e)
			}
			if got := log.find("gave up the disk reserve"); len(got) != 1 {
				t.Errorf("%d warnings of the reserve given up, want 1", len(got))
			}
			if held := reserveHeld(t, root); held < reserve {
				t.Errorf("the reserve was not made again once 1 MiB was freed (%d bytes)", held)
			}
		})
	}
}

// Without a reserve, the same removal fails, names the full disk and loses
// nothing; it succeeds once there is room.
func TestFullDiskWithoutReserve(t *testing.T) {
	m, root, k, body, _ := onFullDisk(t, -1, false)
	ctx := context.Background()
	_, err := m.Remove(ctx, []state.Key{k}, false)
	if !errors.Is(err, manager.ErrDiskFull) || !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "no disk reserve") {
		t.Fatalf("rm on a full disk without a reserve: %v, want ErrDiskFull wrapping ENOSPC, saying there was no reserve", err)
	}
	st, err := state.DecodeFile(root, state.StateFile)
	if err != nil {
		t.Fatalf("the state after the failed removal: %v", err)
	}
	e := st.Get(k)
	if e == nil || e.Stage != state.Ready {
		t.Fatalf("the entry after the failed removal: %+v", e)
	}
	abs, err := m.Abs(*e)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(abs); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("the content after the failed removal: %d bytes, %v", len(got), err)
	}
	if err := os.Remove(rigtest.Filler(root, filepath.Dir(root))); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Remove(ctx, []state.Key{k}, false); err != nil {
		t.Fatalf("rm once there is room: %v", err)
	}
	if exists(t, root, filepath.Join("entries", gen(k, 1))) {
		t.Error("the entry's content is still there")
	}
}

// A get of a READY entry on a full disk frees nothing, so it leaves the
// reserve alone and fails wrapping ErrDiskFull, saying what to do; once
// there is room, the same get goes through.
func TestFullDiskGetOfAReadyEntry(t *testing.T) {
	const reserve = 256 << 10
	m, root, k, body, _ := onFullDisk(t, reserve, false)
	ctx := context.Background()
	_, err := m.Get(ctx, "job2", k)
	if !errors.Is(err, manager.ErrDiskFull) || !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "free space") || !strings.Contains(err.Error(), "job2") {
		t.Fatalf("get on a full disk: %v; want ErrDiskFull wrapping ENOSPC, naming the dependent and saying to free space", err)
	}
	if held := reserveHeld(t, root); held < reserve {
		t.Fatalf("a get spent the reserve: %d bytes left of %d", held, reserve)
	}
	st, err := state.DecodeFile(root, state.StateFile)
	if err != nil {
		t.Fatalf("the state after the failed get: %v", err)
	}
	e := st.Get(k)
	if e == nil || e.Stage != state.Ready || len(e.Dependents) != 0 {
		t.Fatalf("the entry after the failed get: %+v", e)
	}
	abs, err := m.Abs(*e)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(abs); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("the content after the failed get: %d bytes, %v", len(got), err)
	}
	if err := os.Remove(rigtest.Filler(root, filepath.Dir(root))); err != nil {
		t.Fatal(err)
	}
	if got, err := m.Get(ctx, "job2", k); err != nil || got.Stage != state.Ready {
		t.Fatalf("get once there is room: %+v, %v", got.Stage, err)
	}
}

// A dependent that must be released before its entry can go: on a full
// disk, the release and then the removal each give up a part of the
// reserve, and the removal's freed space makes it whole again.
func TestFullDiskReleaseThenRemove(t *testing.T) {
	const reserve = 256 << 10
	m, root, k, _, log := onFullDisk(t, reserve, true)
	ctx := context.Background()
	if _, err := m.Remove(ctx, []state.Key{k}, false); !errors.As(err, new(*manager.InUseError)) {
		t.Fatalf("rm of an entry in use: %v, want an InUseError", err)
	}
	if err := m.Release(ctx, "nobody", k); !errors.Is(err, transitions.ErrNotRegistered) {
		t.Fatalf("release of a dependent the entry does not have: %v, want ErrNotRegistered", err)
	}
	if held := reserveHeld(t, root); held < reserve {
		t.Fatalf("refused commits spent the reserve: %d bytes left of %d", held, reserve)
	}
	if err := m.Release(ctx, "job", k); err != nil {
		t.Fatalf("release on a full disk with a reserve: %v", err)
	}
	after := reserveHeld(t, root)
	if after <= 0 || after >= reserve {
		t.Errorf("after the release the reserve holds %d bytes, want part of %d", after, reserve)
	}
	// What the release's commit left of the part it gave up, taken too:
	// the removal must give up a part of its own.
	rigtest.FillUp(t, rigtest.Filler(root, filepath.Dir(root)))
	if _, err := m.Remove(ctx, []state.Key{k}, false); err != nil {
		t.Fatalf("rm on a full disk after the release: %v", err)
	}
	if exists(t, root, filepath.Join("entries", gen(k, 1))) {
		t.Error("the entry's content is still there")
	}
	if got := log.find("gave up the disk reserve"); len(got) != 2 {
		t.Errorf("%d warnings of the reserve given up, want 2 (release, removal)", len(got))
	}
	if held := reserveHeld(t, root); held < reserve {
		t.Errorf("the reserve is not whole again once 1 MiB was freed (%d bytes)", held)
	}
}

// On the sshfs rig, over a filesystem of the server's that fills up:
// sftp-server answers ENOSPC with a failure that sshfs passes on as EIO,
// which counts as a full disk when statfs shows no room. rm frees the
// entry through the reserve there too.
func TestFullDiskOnSharedFS(t *testing.T) {
	mnt1, _ := rigtest.SharedFS(t)
	export := rigtest.Env(t, "SHAREDFS_EXPORT")
	if os.Geteuid() != 0 {
		rigtest.Missing(t, "mounting a small tmpfs in the sshfs rig's export needs root")
	}
	sub := fmt.Sprintf("full-%d", time.Now().UnixNano())
	server := filepath.Join(export, sub)
	if err := os.Mkdir(server, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", server, "tmpfs", 0, "size=4m"); err != nil {
		rigtest.Missing(t, fmt.Sprintf("a tmpfs at %s: %v", server, err))
	}
	t.Cleanup(func() {
		if err := unix.Unmount(server, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", server, err)
		}
		os.Remove(server)
	})
	const reserve = 256 << 10
	m, root, k, _, log := onFullDiskAt(t, filepath.Join(mnt1, sub), server, reserve, false)
	if _, err := m.Remove(context.Background(), []state.Key{k}, false); err != nil {
		t.Fatalf("rm on a full disk over sshfs with a reserve: %v", err)
	}
	if exists(t, root, filepath.Join("entries", gen(k, 1))) {
		t.Error("the entry's content is still there")
	}
	if got := log.find("gave up the disk reserve"); len(got) != 1 {
		t.Errorf("%d warnings of the reserve given up, want 1", len(got))
	}
}

// A download whose writer and dependent both died left staging data that
// fills the disk: a sweep on the full disk cancels it (that frees its
// staging, so the sweep may spend the reserve), and the staging goes.
func TestFullDiskFreedByCancellingADeadDownload(t *testing.T) {
	dir := rigtest.DiskFull(t)
	root, filler := rigtest.FullRoot(t, dir, dir)
	const reserve = 256 << 10
	machine := &fakeMachine{dead: map[int]bool{}}
	log := &logRecorder{}
	m, stop := startManager(t, root, func(c *manager.Config) {
		c.Processes = fakeProc{m: machine, self: fakeProcess("h", 11)}
		c.DiskReserve = reserve
		c.Log = log.logger()
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	s, err := state.Open(root, state.Options{Reserve: reserve, Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.KeepReserve(ctx); err != nil || reserveHeld(t, root) < reserve {
		t.Fatalf("making the reserve: %v, %d bytes", err, reserveHeld(t, root))
	}
	k := mustKey(t, "https://example.invalid/dead.tar", "")
	deadProc := fakeProcess("h", 10)
	machine.kill(deadProc.PID)
	dead := state.Owner{Process: deadProc, ManagerID: "dead"}
	now := time.Now()
	behind(t, root, func(st *state.State) {
		st.Put(&state.Entry{Key: k, Stage: state.Downloading, Owner: &dead, Generation: 1, Created: now, LastUsed: now,
			Dependents: map[string]state.Dependent{"job": {Since: now, Process: &deadProc}}})
	})
	staging := filepath.Join(root, "staging", gen(k, 1))
	if err := os.MkdirAll(staging, 0o755); err != nil {
		t.Fatal(err)
	}
	rec, err := json.Marshal(map[string]any{"owner": dead, "generation": 1})
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"owner.json": rec, "content": make([]byte, 1<<20)} {
		if err := os.WriteFile(filepath.Join(staging, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rigtest.FillUp(t, filler)
	rep, err := m.Sweep(ctx, false)
	if err != nil {
		t.Fatalf("a sweep on a full disk that cancels a dead download: %v", err)
	}
	if len(rep.Cancelled) != 1 || rep.Cancelled[0].ID() != k.ID() {
		t.Errorf("cancelled %v, want %s", rep.Cancelled, k.Source)
	}
	if _, err := os.Lstat(staging); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the dead download's staging after the sweep: %v, want it gone", err)
	}
	if got := log.find("gave up the disk reserve"); len(got) != 1 {
		t.Errorf("%d warnings of the reserve given up, want 1", len(got))
	}
}
