package manager_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/manager/docker"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/state/rigtest/slowfs"
)

// A build heartbeats like a pull: while it runs (here stuck reading its
// context from a filesystem that holds the open), the entry's heartbeat
// moves, so that other processes never take a long build over.
func TestBuildHeartbeats(t *testing.T) {
	rigtest.Env(t, "DOCKER_HOST")
	eng, err := docker.New()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := eng.DaemonID(ctx); err != nil {
		rigtest.Missing(t, "the Docker engine at $DOCKER_HOST: "+err.Error())
	}
	mnt := slowfs.Mount(t, t.TempDir())
	dir := filepath.Join(mnt.Mnt, "ctx")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM scratch\nCOPY f /f\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "f"), []byte(fmt.Sprint("heartbeat ", time.Now().UnixNano())), 0o644)
	k := mustKey(t, "docker-build://"+dir+"?tag=depcache-test/heartbeat:1", "")

	root := t.TempDir()
	m := newManager(t, root, func(c *manager.Config) { c.Docker = eng; c.ProgressInterval = 50 * time.Millisecond })
	hold := mnt.HoldNext(slowfs.Open, "f")
	defer hold.Release()
	e, err := m.Get(ctx, "run", k)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-hold.Hit():
	case <-time.After(30 * time.Second):
		t.Fatal("the build never read its context")
	}
	heartbeat := func() uint64 { return viewEntry(t, root, e.Key).Progress.Heartbeat }
	first := heartbeat()
	waitFor(t, 10*time.Second, func() bool { return heartbeat() >= first+3 },
		func() string {
			return fmt.Sprintf("heartbeat still %d during a stuck build (reported every 50 ms)", heartbeat())
		})
	hold.Release()
	ready, err := m.Wait(ctx, e.Key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Remove(context.Background(), ready.ImageID) })
	if ready.Stage != state.Ready || ready.ImageID == "" {
		t.Errorf("after the build: %+v", ready)
	}
}

// An engine asked before its daemon is up finds it once it is: the first
// error is not kept (serve started before dockerd refused images for life).
func TestDockerEngineFindsALateDaemon(t *testing.T) {
	real := rigtest.Env(t, "DOCKER_HOST")
	sock := filepath.Join(t.TempDir(), "late.sock")
	t.Setenv("DOCKER_HOST", "unix://"+sock)
	eng, err := docker.New()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := eng.DaemonID(ctx); err == nil {
		t.Fatal("DaemonID succeeded with no daemon behind the socket")
	}
	// The daemon "starts": a proxy on the socket to the rig's engine.
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				d, err := net.Dial("unix", strings.TrimPrefix(real, "unix://"))
				if err != nil {
					return
				}
				defer d.Close()
				go io.Copy(d, c)
				io.Copy(c, d)
			}()
		}
	}()
	id, err := eng.DaemonID(ctx)
	if err != nil || id == "" {
		t.Fatalf("after the daemon came up: %q, %v", id, err)
	}
}

// TestGetByBuildFingerprint: docker-build://sha256:FP, the source ls
// prints for a built image, holds the entry when it exists (which keeps
// its build spec), and is refused, writing nothing, when it does not: it
// carries no context to build from.
func TestGetByBuildFingerprint(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	fp := strings.Repeat("ab", 32)
	built := state.Key{Kind: state.Image, Source: "docker-build://sha256:" + fp, Daemon: "d1",
		Build: &state.BuildSpec{Context: "/ctx", Dockerfile: "Dockerfile"}}
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(ctx, func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: built, Stage: state.Ready, ImageID: "sha256:" + strings.Repeat("cd", 32), Created: time.Now(), LastUsed: time.Now()})
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	m, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	ref := mustKey(t, built.Source, "")
	ref.Daemon = "d1"
	if ref.ID() != built.ID() {
		t.Fatalf("the fingerprint's key ID %s, want the built entry's %s", ref.ID(), built.ID())
	}
	e, err := m.Get(ctx, "job", ref)
	if err != nil || e.Stage != state.Ready || e.Key.Build == nil || e.Key.Build.Context != "/ctx" {
		t.Fatalf("get by fingerprint: %+v, %v; want the READY entry, its build spec kept", e, err)
	}
	if got := viewEntry(t, root, built); got == nil || got.Key.Build == nil || len(got.Dependents) != 1 {
		t.Fatalf("stored entry after the get: %+v", got)
	}
	other := mustKey(t, "docker-build://sha256:"+strings.Repeat("0", 64), "")
	other.Daemon = "d1"
	if _, err := m.Get(ctx, "job", other); !errors.Is(err, manager.ErrBadSource) || !strings.Contains(err.Error(), "by its context") {
		t.Fatalf("get of an unknown fingerprint: %v, want ErrBadSource saying to give the context", err)
	}
	if got := viewEntry(t, root, other); got != nil {
		t.Fatalf("an entry was made for an unknown fingerprint: %+v", got)
	}
}
