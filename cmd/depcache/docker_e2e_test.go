package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker/docker/api/types/build"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/client"
	"github.com/docker/docker/pkg/jsonmessage"
	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
)

// testRegistry is an OCI registry in this process that counts blob GETs.
type testRegistry struct {
	*httptest.Server
	host      string
	mu        sync.Mutex
	blobGets  map[string]int
	manifests atomic.Int32
	// stallFirst, when set, holds the first blob GET of a large blob until
	// its client goes away or 3 s pass; stalled is told when it starts.
	stallFirst atomic.Bool
	stalled    chan struct{}
}

func newRegistry(t *testing.T) *testRegistry {
	r := &testRegistry{blobGets: map[string]int{}}
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/sha256:") {
			r.mu.Lock()
			r.blobGets[req.URL.Path]++
			r.mu.Unlock()
			if r.stallFirst.Load() && r.stalled != nil {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				if rec.Body.Len() > 1<<20 && r.stallFirst.CompareAndSwap(true, false) {
					close(r.stalled)
					select {
					case <-req.Context().Done():
						return
					case <-time.After(3 * time.Second):
					}
				}
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				w.Write(rec.Body.Bytes())
				return
			}
		}
		if strings.Contains(req.URL.Path, "/manifests/") {
			r.manifests.Add(1)
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(r.Close)
	r.host = strings.TrimPrefix(r.URL, "http://")
	return r
}

func (r *testRegistry) blobs() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for k, v := range r.blobGets {
		out[k] = v
	}
	return out
}

func dockerClient(t *testing.T) *client.Client {
	t.Helper()
	rigtest.Env(t, "DOCKER_HOST")
	c, err := client.NewClientWithOpts(client.FromEnv, client.WithAPIVersionNegotiation())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ping(context.Background()); err != nil {
		rigtest.Missing(t, "the Docker engine at $DOCKER_HOST: "+err.Error())
	}
	return c
}

// drain reads an engine JSON stream and returns its error, if any.
func drain(rc io.ReadCloser) error {
	defer rc.Close()
	dec := json.NewDecoder(rc)
	for {
		var m jsonmessage.JSONMessage
		if err := dec.Decode(&m); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		if m.Error != nil {
			return fmt.Errorf("%s", m.Error.Message)
		}
	}
}

// pushImage builds an image FROM scratch holding size random bytes, pushes
// it to ref and removes it from the daemon, so that getting it needs a pull.
func pushImage(t *testing.T, c *client.Client, ref string, size int) {
	t.Helper()
	ctx := context.Background()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	payload := randomBody(size)
	payload[0] = byte(len(ref)) // distinct content per reference
	copy(payload[1:], ref)
	for _, f := range []struct {
		name string
		data []byte
	}{{"Dockerfile", []byte("FROM scratch\nCOPY payload /payload\n")}, {"payload", payload}} {
		tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.data))})
		tw.Write(f.data)
	}
	tw.Close()
	resp, err := c.ImageBuild(ctx, &buf, build.ImageBuildOptions{Tags: []string{ref}, Remove: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := drain(resp.Body); err != nil {
		t.Fatalf("build %s: %v", ref, err)
	}
	rc, err := c.ImagePush(ctx, ref, image.PushOptions{RegistryAuth: "e30="})
	if err != nil {
		t.Fatal(err)
	}
	if err := drain(rc); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	if _, err := c.ImageRemove(ctx, ref, image.RemoveOptions{PruneChildren: true}); err != nil {
		t.Fatal(err)
	}
}

func imageID(t *testing.T, c *client.Client, ref string) (string, bool) {
	t.Helper()
	r, err := c.ImageInspect(context.Background(), ref)
	if err != nil {
		return "", false
	}
	return r.ID, true
}

// TestE2EImageDedup: 8 processes get one image that is only in the local
// registry: every blob is fetched once, all print the same full image ID.
func TestE2EImageDedup(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	ref := reg.host + "/team/app:1"
	pushImage(t, c, ref, 3<<20)
	pushed := reg.blobs()
	root := t.TempDir()
	var wg sync.WaitGroup
	outs := make([]string, 8)
	for i := range outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := exec.Command(bin, "--root", root, "get", "docker://"+ref).Output()
			if err != nil {
				t.Errorf("get %d: %v", i, err)
			}
			outs[i] = strings.TrimSpace(string(out))
		}()
	}
	wg.Wait()
	id, ok := imageID(t, c, ref)
	if !ok {
		t.Fatal("the image is not in the daemon")
	}
	t.Cleanup(func() { c.ImageRemove(context.Background(), id, image.RemoveOptions{Force: true}) })
	for i, o := range outs {
		if o != id {
			t.Errorf("get %d printed %q, want %s", i, o, id)
		}
	}
	fetched := 0
	for blob, n := range reg.blobs() {
		if got := n - pushed[blob]; got > 1 {
			t.Errorf("blob %s fetched %d times", blob, got)
		}
		fetched += n - pushed[blob]
	}
	if fetched == 0 {
		t.Error("no blob was fetched: the image was not pulled from the registry")
	}
	st := readState(t, root)
	e := onlyEntry(t, st)
	if e.Stage != "READY" || e.ImageID != id || e.Key.Daemon == "" {
		t.Errorf("entry %+v", e)
	}
}

// TestE2EImageTooLarge: an image over --max-image-size fails before any
// blob is fetched.
func TestE2EImageTooLarge(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	ref := reg.host + "/team/big:1"
	pushImage(t, c, ref, 2<<20)
	before := reg.blobs()
	cmd := exec.Command(bin, "--root", t.TempDir(), "get", "--max-image-size", "1MiB", "docker://"+ref)
	out, err := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); err == nil || code != 1 || !strings.Contains(string(out), "exceeds the image size limit") {
		t.Errorf("get: exit %d, %s; want 1 and the size limit named", code, out)
	}
	for blob, n := range reg.blobs() {
		if n != before[blob] {
			t.Errorf("blob %s fetched although the image was too large", blob)
		}
	}
	if _, ok := imageID(t, c, ref); ok {
		t.Error("the image was pulled")
	}
}

// TestE2EImageEviction: with a stopped container using image A and a
// dependent holding image B, a sweep under a tiny budget removes only C;
// once the container is gone and B released, A and B go too.
func TestE2EImageEviction(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	root := t.TempDir()
	ctx := context.Background()
	refs := map[string]string{}
	for _, n := range []string{"a", "b", "c"} {
		refs[n] = reg.host + "/team/" + n + ":1"
		pushImage(t, c, refs[n], 64<<10)
		if out, err := exec.Command(bin, "--root", root, "get", "--dependent", "job-"+n, "docker://"+refs[n]).CombinedOutput(); err != nil {
			t.Fatalf("get %s: %v: %s", n, err, out)
		}
	}
	idA, _ := imageID(t, c, refs["a"])
	ctr, err := c.ContainerCreate(ctx, &container.Config{Image: idA, Cmd: []string{"/payload"}}, nil, nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	removeCtr := func() { c.ContainerRemove(ctx, ctr.ID, container.RemoveOptions{Force: true}) }
	t.Cleanup(removeCtr)
	for _, n := range []string{"a", "c"} {
		if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "job-"+n, "docker://"+refs[n]).CombinedOutput(); err != nil {
			t.Fatalf("release: %v: %s", err, out)
		}
	}
	gc := func() string {
		out, err := exec.Command(bin, "--root", root, "gc", "--max-size", "1", "--min-age", "0s", "--set-policy").CombinedOutput()
		if err != nil {
			t.Fatalf("gc: %v: %s", err, out)
		}
		return string(out)
	}
	out := gc()
	_, hasA := imageID(t, c, refs["a"])
	_, hasB := imageID(t, c, refs["b"])
	_, hasC := imageID(t, c, refs["c"])
	if !hasA || !hasB || hasC {
		t.Fatalf("after the first sweep: a %v, b %v, c %v; want only c removed\n%s", hasA, hasB, hasC, out)
	}
	removeCtr()
	if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "job-b", "docker://"+refs["b"]).CombinedOutput(); err != nil {
		t.Fatalf("release: %v: %s", err, out)
	}
	out = gc()
	_, hasA = imageID(t, c, refs["a"])
	_, hasB = imageID(t, c, refs["b"])
	if hasA || hasB {
		t.Errorf("after the second sweep: a %v, b %v; want both removed\n%s", hasA, hasB, out)
	}
	if st := readState(t, root); len(st.Entries) != 0 {
		t.Errorf("%d entries left", len(st.Entries))
	}
}

// TestE2EImageTakeoverAfterKill: the process pulling an image is SIGKILLed
// mid-pull; a waiting process takes over and the image ends READY.
func TestE2EImageTakeoverAfterKill(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	ref := reg.host + "/team/slow:1"
	pushImage(t, c, ref, 3<<20)
	reg.stalled = make(chan struct{})
	reg.stallFirst.Store(true)
	root := t.TempDir()
	owner := exec.Command(bin, "--root", root, "get", "docker://"+ref)
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	<-reg.stalled // the owner's pull is fetching the big layer
	waiter := exec.Command(bin, "--root", root, "get", "docker://"+ref)
	var out bytes.Buffer
	waiter.Stdout = &out
	if err := waiter.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the waiter to register", func() bool {
		for _, e := range readState(t, root).Entries {
			return len(e.Dependents) == 2
		}
		return false
	})
	owner.Process.Kill()
	owner.Wait()
	if err := waiter.Wait(); err != nil {
		t.Fatalf("waiter: %v", err)
	}
	id, ok := imageID(t, c, ref)
	if !ok {
		t.Fatal("the image is not in the daemon")
	}
	t.Cleanup(func() { c.ImageRemove(context.Background(), id, image.RemoveOptions{Force: true}) })
	if got := strings.TrimSpace(out.String()); got != id {
		t.Errorf("waiter printed %q, want %s", got, id)
	}
	e := onlyEntry(t, readState(t, root))
	if e.Stage != "READY" || e.Generation != 2 || e.ImageID != id {
		t.Errorf("entry %s gen %d image %s; want READY gen 2 %s", e.Stage, e.Generation, e.ImageID, id)
	}
}

// TestE2EImageBuild: 4 processes ask for a build of one context: one build
// runs; a changed file in the context gives a new entry and a second build.
func TestE2EImageBuild(t *testing.T) {
	c := dockerClient(t)
	ctxDir := t.TempDir()
	writeCtx := func(content string) {
		os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte("FROM scratch\nCOPY f /f\n"), 0o644)
		os.WriteFile(filepath.Join(ctxDir, "f"), []byte(content), 0o644)
	}
	writeCtx(fmt.Sprintf("first %d", time.Now().UnixNano()))
	root := t.TempDir()
	src := "docker-build://" + ctxDir + "?tag=depcache-test/build:1"
	var wg sync.WaitGroup
	outs, errs := make([]string, 4), make([]string, 4)
	for i := range outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(bin, "--root", root, "--log-level", "info", "get", src)
			var o, e bytes.Buffer
			cmd.Stdout, cmd.Stderr = &o, &e
			if err := cmd.Run(); err != nil {
				t.Errorf("get %d: %v: %s", i, err, e.String())
			}
			outs[i], errs[i] = strings.TrimSpace(o.String()), e.String()
		}()
	}
	wg.Wait()
	claims := strings.Count(strings.Join(errs, ""), "claimed download")
	if claims != 1 {
		t.Errorf("%d builds claimed, want 1", claims)
	}
	for _, o := range outs {
		if o != outs[0] || !strings.HasPrefix(o, "sha256:") {
			t.Fatalf("gets printed %v, want one image ID", outs)
		}
	}
	t.Cleanup(func() { c.ImageRemove(context.Background(), outs[0], image.RemoveOptions{Force: true}) })
	writeCtx("changed")
	out, err := exec.Command(bin, "--root", root, "get", src).Output()
	if err != nil {
		t.Fatal(err)
	}
	second := strings.TrimSpace(string(out))
	t.Cleanup(func() { c.ImageRemove(context.Background(), second, image.RemoveOptions{Force: true}) })
	if second == outs[0] {
		t.Error("a changed context gave the same image")
	}
	if st := readState(t, root); len(st.Entries) != 2 {
		t.Errorf("%d entries, want 2 (one per fingerprint)", len(st.Entries))
	}
}

// TestE2EImageEvictionKeepsASharedImage: a tag pulled by depcache and a
// digest of the same image cached as a second entry. Evicting the tag's
// entry leaves the image: the digest's entry is READY with a dependent.
func TestE2EImageEvictionKeepsASharedImage(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	root := t.TempDir()
	ref := reg.host + "/team/shared:1"
	pushImage(t, c, ref, 64<<10)
	digest, id, _ := tagAndDigest(t, c, root, ref)
	if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "job-tag", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("release: %v: %s", err, out)
	}
	out, err := exec.Command(bin, "--root", root, "gc", "--max-size", "1", "--min-age", "0s", "--set-policy").CombinedOutput()
	if err != nil {
		t.Fatalf("gc: %v: %s", err, out)
	}
	if _, ok := imageID(t, c, id); !ok {
		t.Fatalf("the shared image was removed although the digest's entry holds it\n%s", out)
	}
	st := readState(t, root)
	e := onlyEntry(t, st)
	if e.Key.Source != "docker://"+digest || e.Stage != "READY" || e.ImageID != id {
		t.Errorf("left: %s %s %s; want the digest's entry READY with %s\n%s", e.Key.Source, e.Stage, e.ImageID, id, out)
	}
}

// TestE2EImageRemovedByHand: an image removed from the daemon behind
// depcache's back (docker rmi) is pulled again by the next get, not handed
// out as READY with an ID the daemon no longer has.
func TestE2EImageRemovedByHand(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	root := t.TempDir()
	ref := reg.host + "/team/rmi:1"
	pushImage(t, c, ref, 64<<10)
	get := func() string {
		t.Helper()
		out, err := exec.Command(bin, "--root", root, "get", "--dependent", "job", "docker://"+ref).Output()
		if err != nil {
			t.Fatalf("get: %v", err)
		}
		return strings.TrimSpace(string(out))
	}
	first := get()
	t.Cleanup(func() { c.ImageRemove(context.Background(), first, image.RemoveOptions{Force: true}) })
	if _, err := c.ImageRemove(context.Background(), first, image.RemoveOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if second := get(); second != first {
		t.Errorf("second get printed %s, want %s", second, first)
	}
	if _, ok := imageID(t, c, ref); !ok {
		t.Fatal("the image was not pulled again")
	}
	if e := onlyEntry(t, readState(t, root)); e.Stage != "READY" || e.Generation < 2 {
		t.Errorf("entry %s gen %d; want READY, fetched again under a new generation", e.Stage, e.Generation)
	}
}

// TestE2EReleaseImageInThisDaemon: a named dependent holding one image in
// this host's daemon and another's is released in this host's only.
func TestE2EReleaseImageInThisDaemon(t *testing.T) {
	c := dockerClient(t)
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	s, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src := "docker://registry.invalid/team/x:1"
	for _, daemon := range []string{info.ID, "another-hosts-daemon"} {
		k, err := manager.ParseKey(src, "")
		if err != nil {
			t.Fatal(err)
		}
		k.Daemon = daemon
		if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
			st.Put(&state.Entry{Key: k, Stage: state.Ready, ImageID: "sha256:" + strings.Repeat("b", 64), Generation: 1,
				Dependents: map[string]state.Dependent{"job": {Since: time.Now()}}})
			return true, nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "job", src).CombinedOutput(); err != nil {
		t.Fatalf("release: %v: %s", err, out)
	}
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range st.Entries {
		if want := map[bool]int{true: 0, false: 1}[e.Key.Daemon == info.ID]; len(e.Dependents) != want {
			t.Errorf("entry of daemon %s: %d dependents, want %d", e.Key.Daemon, len(e.Dependents), want)
		}
	}
}

// TestE2ERmImage: rm removes an image entry nobody uses, with its image,
// through this host's engine (it refused every image as another daemon's).
func TestE2ERmImage(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	root := t.TempDir()
	ref := reg.host + "/team/rm:1"
	pushImage(t, c, ref, 64<<10)
	if out, err := exec.Command(bin, "--root", root, "get", "--dependent", "job", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("get: %v: %s", err, out)
	}
	if out, err := exec.Command(bin, "--root", root, "rm", "-y", "docker://"+ref).CombinedOutput(); err == nil || !strings.Contains(string(out), "job") {
		t.Errorf("rm of an image in use: %v: %s; want it refused naming job", err, out)
	}
	if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "job", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("release: %v: %s", err, out)
	}
	if out, err := exec.Command(bin, "--root", root, "rm", "-y", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("rm of an unused image entry: %v: %s", err, out)
	}
	if _, has := imageID(t, c, ref); has {
		t.Error("rm left the image in the engine")
	}
	if st := readState(t, root); len(st.Entries) != 0 {
		t.Errorf("%d entries left after rm", len(st.Entries))
	}
}

// envWith is the test's environment with DOCKER_HOST set to host, or
// unset when host is "".
func envWith(host string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DOCKER_HOST=") {
			env = append(env, kv)
		}
	}
	if host != "" {
		env = append(env, "DOCKER_HOST="+host)
	}
	return env
}

// TestE2ERmImageEngineDown: rm of an image entry nobody uses, with the
// engine unreachable, exits 1 with kind unavailable (not in_use), names the
// engine, and keeps the entry; with the engine back, rm removes it.
func TestE2ERmImageEngineDown(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	root := t.TempDir()
	ref := reg.host + "/team/rmdown:1"
	pushImage(t, c, ref, 64<<10)
	if out, err := exec.Command(bin, "--root", root, "get", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("get: %v: %s", err, out)
	}
	id, _ := imageID(t, c, ref)
	t.Cleanup(func() { c.ImageRemove(context.Background(), id, image.RemoveOptions{Force: true}) })
	dead := "unix://" + filepath.Join(t.TempDir(), "no-docker.sock")
	cases := []struct {
		name, host, engine string // engine: what the message must name
	}{
		{"dead socket", dead, dead},
		{"no engine configured", "", "no Docker engine here"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.host == "" && fileExists("/var/run/docker.sock") {
				t.Skip("/var/run/docker.sock exists: an engine is configured")
			}
			cmd := exec.Command(bin, "--root", root, "--json", "rm", "-y", "docker://"+ref)
			cmd.Env = envWith(tc.host)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			cmd.Run()
			e := decodeError(t, stderr.String())
			if code := cmd.ProcessState.ExitCode(); code != 1 || e.Kind != "unavailable" || !strings.Contains(e.Error, tc.engine) {
				t.Errorf("rm with the engine down: exit %d, %+v; want 1, kind unavailable, naming %q", code, e, tc.engine)
			}
			if st := readState(t, root); len(st.Entries) != 1 {
				t.Errorf("%d entries after the refused rm, want the image's kept", len(st.Entries))
			}
			if _, ok := imageID(t, c, ref); !ok {
				t.Error("the image is gone from the daemon")
			}
		})
	}
	if out, err := exec.Command(bin, "--root", root, "rm", "-y", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("rm with the engine back: %v: %s", err, out)
	}
	if st := readState(t, root); len(st.Entries) != 0 {
		t.Errorf("%d entries left after rm", len(st.Entries))
	}
}

// tagAndDigest gets ref and its digest as two entries of one image, held
// by job-tag and job-digest; it returns the digest reference, the image's
// ID and its size as the entries record it.
func tagAndDigest(t *testing.T, c *client.Client, root, ref string) (digest, id string, size int64) {
	t.Helper()
	get := func(dep, src string) {
		t.Helper()
		if out, err := exec.Command(bin, "--root", root, "get", "--dependent", dep, src).CombinedOutput(); err != nil {
			t.Fatalf("get %s: %v: %s", src, err, out)
		}
	}
	get("job-tag", "docker://"+ref)
	insp, err := c.ImageInspect(context.Background(), ref)
	if err != nil || len(insp.RepoDigests) == 0 {
		t.Fatalf("inspect %s: %v, digests %v", ref, err, insp.RepoDigests)
	}
	t.Cleanup(func() { c.ImageRemove(context.Background(), insp.ID, image.RemoveOptions{Force: true}) })
	get("job-digest", "docker://"+insp.RepoDigests[0])
	st := readState(t, root)
	if len(st.Entries) != 2 {
		t.Fatalf("%d entries, want a tag's and a digest's", len(st.Entries))
	}
	for _, e := range st.Entries {
		if e.ImageID != insp.ID || e.SizeBytes <= 0 || size != 0 && e.SizeBytes != size {
			t.Fatalf("entry %s: image %s, %d bytes; want %s, one size", e.Key.Source, e.ImageID, e.SizeBytes, insp.ID)
		}
		size = e.SizeBytes
	}
	return insp.RepoDigests[0], insp.ID, size
}

// gcJSONOf runs gc --json with args and decodes it.
func gcJSONOf(t *testing.T, root string, args ...string) gcJSON {
	t.Helper()
	out, err := exec.Command(bin, append([]string{"--root", root, "--json", "gc", "--max-size", "1", "--min-age", "0s"}, args...)...).Output()
	var rep gcJSON
	if err != nil || json.Unmarshal(out, &rep) != nil {
		t.Fatalf("gc --json %v: %v: %s", args, err, out)
	}
	return rep
}

func release(t *testing.T, root, dep, src string) {
	t.Helper()
	if out, err := exec.Command(bin, "--root", root, "release", "--dependent", dep, src).CombinedOutput(); err != nil {
		t.Fatalf("release %s %s: %v: %s", dep, src, err, out)
	}
}

// TestE2EImageTagAndDigestCountedOnce: a tag's and a digest's entry of one
// image take its size once in the budget; evicting the tag's while the
// digest's holds the image frees nothing; evicting both frees it once; rm
// counts the same way.
func TestE2EImageTagAndDigestCountedOnce(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	t.Run("gc", func(t *testing.T) {
		root := t.TempDir()
		ref := reg.host + "/team/twice:1"
		pushImage(t, c, ref, 64<<10)
		digest, id, size := tagAndDigest(t, c, root, ref)
		if rep := gcJSONOf(t, root, "--dry-run"); rep.UsageBytes != size || len(rep.Victims) != 0 {
			t.Errorf("usage %d bytes, %d victims; want the image's %d once, none (both held)", rep.UsageBytes, len(rep.Victims), size)
		}
		release(t, root, "job-tag", "docker://"+ref)
		for _, dry := range []bool{true, false} {
			args := []string{}
			if dry {
				args = append(args, "--dry-run")
			}
			rep := gcJSONOf(t, root, args...)
			if len(rep.Victims) != 1 || rep.Victims[0].Source != "docker://"+ref || rep.FreedBytes != 0 || rep.UsageAfterBytes != size {
				t.Errorf("gc (dry %v) of the tag's entry while the digest's holds the image: %+v; want the tag evicted, 0 freed, %d left", dry, rep, size)
			}
		}
		if _, ok := imageID(t, c, id); !ok {
			t.Fatal("the image went although the digest's entry holds it")
		}
		// Both evictable: the image goes, and frees its size once.
		if out, err := exec.Command(bin, "--root", root, "get", "--dependent", "job-tag", "docker://"+ref).CombinedOutput(); err != nil {
			t.Fatalf("get again: %v: %s", err, out)
		}
		release(t, root, "job-tag", "docker://"+ref)
		release(t, root, "job-digest", "docker://"+digest)
		for _, dry := range []bool{true, false} {
			args := []string{}
			if dry {
				args = append(args, "--dry-run")
			}
			rep := gcJSONOf(t, root, args...)
			if len(rep.Victims) != 2 || rep.FreedBytes != size || rep.UsageBytes != size || rep.UsageAfterBytes != 0 {
				t.Errorf("gc (dry %v) of both entries: %+v; want 2 victims, %d freed once, usage %d", dry, rep, size, size)
			}
		}
		if _, ok := imageID(t, c, id); ok {
			t.Error("the image stayed after both its entries were evicted")
		}
	})
	t.Run("rm", func(t *testing.T) {
		root := t.TempDir()
		ref := reg.host + "/team/twice-rm:1"
		pushImage(t, c, ref, 64<<10)
		digest, id, size := tagAndDigest(t, c, root, ref)
		release(t, root, "job-tag", "docker://"+ref)
		rm := func(srcs ...string) rmJSON {
			t.Helper()
			out, err := exec.Command(bin, append([]string{"--root", root, "--json", "rm", "-y"}, srcs...)...).Output()
			var rep rmJSON
			if err != nil || json.Unmarshal(out, &rep) != nil {
				t.Fatalf("rm %v: %v: %s", srcs, err, out)
			}
			return rep
		}
		if rep := rm("docker://" + ref); len(rep.Removed) != 1 || rep.FreedBytes != 0 {
			t.Errorf("rm of the tag's entry while the digest's holds the image: %+v; want it removed, 0 freed", rep)
		}
		if _, ok := imageID(t, c, id); !ok {
			t.Fatal("rm removed the image that the digest's entry holds")
		}
		if out, err := exec.Command(bin, "--root", root, "get", "--dependent", "job-tag", "docker://"+ref).CombinedOutput(); err != nil {
			t.Fatalf("get again: %v: %s", err, out)
		}
		release(t, root, "job-tag", "docker://"+ref)
		release(t, root, "job-digest", "docker://"+digest)
		if rep := rm("docker://"+ref, "docker://"+digest); len(rep.Removed) != 2 || rep.FreedBytes != size {
			t.Errorf("rm of both entries: %+v; want both removed, %d freed once", rep, size)
		}
		if _, ok := imageID(t, c, id); ok {
			t.Error("the image stayed after rm of both its entries")
		}
	})
}

// TestE2ELsKeptByContainer: ls says that an image a container uses is kept
// for that container, naming it (it said "younger than min-age", which a
// sweep past min-age would not have been stopped by either).
func TestE2ELsKeptByContainer(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	root := t.TempDir()
	ref := reg.host + "/team/ls-ctr:1"
	pushImage(t, c, ref, 64<<10)
	if out, err := exec.Command(bin, "--root", root, "get", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("get: %v: %s", err, out)
	}
	id, _ := imageID(t, c, ref)
	t.Cleanup(func() { c.ImageRemove(context.Background(), id, image.RemoveOptions{Force: true}) })
	name := fmt.Sprintf("depcache-ls-%d", time.Now().UnixNano())
	ctr, err := c.ContainerCreate(context.Background(), &container.Config{Image: id, Cmd: []string{"/payload"}}, nil, nil, nil, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.ContainerRemove(context.Background(), ctr.ID, container.RemoveOptions{Force: true}) })
	want := "used by container " + name
	out, err := exec.Command(bin, "--root", root, "--json", "ls").Output()
	var list []entryJSON
	if err != nil || json.Unmarshal(out, &list) != nil || len(list) != 1 {
		t.Fatalf("ls --json: %v: %s", err, out)
	}
	if list[0].Kept != want {
		t.Errorf("ls --json kept %q, want %q", list[0].Kept, want)
	}
	out, err = exec.Command(bin, "--root", root, "ls").Output()
	if err != nil || !strings.Contains(string(out), want) {
		t.Errorf("ls: %v:\n%s\nwant KEPT %q", err, out, want)
	}
	// Past min-age too: the container keeps it, as it keeps it from gc.
	if out, err := exec.Command(bin, "--root", root, "--json", "gc", "--max-size", "1", "--min-age", "0s").CombinedOutput(); err != nil {
		t.Fatalf("gc: %v: %s", err, out)
	}
	out, _ = exec.Command(bin, "--root", root, "--json", "ls").Output()
	if json.Unmarshal(out, &list) != nil || len(list) != 1 || list[0].Kept != want {
		t.Errorf("after gc: ls --json %s; want the entry, kept %q", out, want)
	}
}

// doctorChecks runs doctor --json with DOCKER_HOST host and returns its
// checks by name (each name's last) and its exit code.
func doctorChecks(t *testing.T, root, host string) (map[string]manager.Check, int) {
	t.Helper()
	cmd := exec.Command(bin, "--root", root, "--json", "doctor")
	cmd.Env = envWith(host)
	out, _ := cmd.Output()
	var checks []manager.Check
	if err := json.Unmarshal(out, &checks); err != nil {
		t.Fatalf("doctor --json: %v: %s", err, out)
	}
	byName := map[string]manager.Check{}
	for _, c := range checks {
		byName[c.Name] = c
	}
	return byName, cmd.ProcessState.ExitCode()
}

// TestE2EDoctorChecksTheEngine: on a root with image entries, doctor checks
// that the engine answers and that each READY image entry's image is in
// it; on a root without images it does not contact the engine, even one
// that would hang.
func TestE2EDoctorChecksTheEngine(t *testing.T) {
	c := dockerClient(t)
	reg := newRegistry(t)
	real := os.Getenv("DOCKER_HOST")
	// An engine that accepts and never answers, counting its connections.
	sock := filepath.Join(t.TempDir(), "hung.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var dialed atomic.Int32
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			dialed.Add(1)
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
	})
	hung := "unix://" + sock

	bundles := t.TempDir()
	if out, err := exec.Command(bin, "--root", bundles, "get", hello(t)).CombinedOutput(); err != nil {
		t.Fatalf("get a bundle: %v: %s", err, out)
	}
	checks, code := doctorChecks(t, bundles, hung)
	if _, ok := checks["docker engine"]; ok || code != 0 || dialed.Load() != 0 {
		t.Errorf("doctor of a root without images: exit %d, engine check %+v, %d connections to the engine; want 0, none, none",
			code, checks["docker engine"], dialed.Load())
	}

	root := t.TempDir()
	ref := reg.host + "/team/doctor:1"
	pushImage(t, c, ref, 64<<10)
	if out, err := exec.Command(bin, "--root", root, "get", "docker://"+ref).CombinedOutput(); err != nil {
		t.Fatalf("get: %v: %s", err, out)
	}
	id, _ := imageID(t, c, ref)
	t.Cleanup(func() { c.ImageRemove(context.Background(), id, image.RemoveOptions{Force: true}) })
	checks, code = doctorChecks(t, root, real)
	if e, i := checks["docker engine"], checks["images"]; code != 0 || e.Status != "ok" || !strings.Contains(e.Detail, real) || i.Status != "ok" {
		t.Errorf("doctor with the engine up: exit %d, %+v, %+v; want 0 and both ok, naming %s", code, e, i, real)
	}

	dead := "unix://" + filepath.Join(t.TempDir(), "no-docker.sock")
	checks, code = doctorChecks(t, root, dead)
	if e := checks["docker engine"]; code != 1 || e.Status != "fail" || !strings.Contains(e.Detail, dead) {
		t.Errorf("doctor with the engine down: exit %d, %+v; want 1 and a failing check naming %s", code, e, dead)
	}
	start := time.Now()
	checks, code = doctorChecks(t, root, hung)
	if e := checks["docker engine"]; code != 1 || e.Status != "fail" || !strings.Contains(e.Detail, "did not answer within") {
		t.Errorf("doctor with a hung engine: exit %d, %+v; want 1 and a failing check that says it did not answer in time", code, e)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("doctor with a hung engine took %s; want about the 10 s bound", took)
	}
	// A get past the engine's bound is the engine's outage (exit 1), not
	// the caller's --timeout (exit 3).
	get := exec.Command(bin, "--root", root, "--json", "get", "docker://"+ref)
	get.Env = envWith(hung)
	var stderr bytes.Buffer
	get.Stderr = &stderr
	get.Run()
	if e, code := decodeError(t, stderr.String()), get.ProcessState.ExitCode(); code != 1 || e.Kind != "unavailable" || !strings.Contains(e.Error, "did not answer within") {
		t.Errorf("get with a hung engine: exit %d, %+v; want 1, kind unavailable, saying it did not answer in time", code, e)
	}

	if _, err := c.ImageRemove(context.Background(), id, image.RemoveOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	checks, code = doctorChecks(t, root, real)
	if i := checks["images"]; code != 0 || i.Status != "warn" || !strings.Contains(i.Detail, "docker://"+ref) || !strings.Contains(i.Detail, id) {
		t.Errorf("doctor with the image removed by hand: exit %d, %+v; want 0 and a warning naming the entry and its image", code, i)
	}
}
