package manager_test

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// Image entries against an engine the test plays (the Docker rig's tests
// run the same paths against a real daemon): one pull per image, never
// removing what a container uses or what depcache did not fetch, giving an
// entry back when the engine refuses a removal, fetching again what
// vanished from the daemon.

// fakeEngine is a Docker daemon held in memory.
type fakeEngine struct {
	id string

	mu       sync.Mutex
	images   map[string]manager.ImageInfo // by full ID
	refs     map[string]string            // reference -> full ID
	labels   map[string]string            // label=value -> full ID
	inUse    map[string]bool              // full IDs used by a container
	sizes    map[string]int64             // registry sizes by reference
	pulls    []string
	builds   []map[string]string // the files of each build context, by name
	removed  []string
	pullErrs []error // returned by the next pulls, in order
	// onRemove, when set, runs before a removal (outside the engine's
	// mutex); an error refuses it.
	onRemove func(id string) error
	inUseErr error
	// stalls: the next pulls that send nothing until they are cancelled,
	// as a registry that stalls does; hung: the daemon accepts and never
	// answers (DaemonID blocks until cancelled).
	stalls int
	hung   bool
}

func newFakeEngine() *fakeEngine {
	return &fakeEngine{id: "daemon-1", images: map[string]manager.ImageInfo{}, refs: map[string]string{},
		labels: map[string]string{}, inUse: map[string]bool{}, sizes: map[string]int64{}}
}

func imageID(s string) string {
	h := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(h[:])
}

// setOnRemove sets onRemove.
func (f *fakeEngine) setOnRemove(fn func(id string) error) {
	f.mu.Lock()
	f.onRemove = fn
	f.mu.Unlock()
}

// add makes the daemon have ref, as if pulled by hand.
func (f *fakeEngine) add(ref string, size int64) manager.ImageInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	info := manager.ImageInfo{ID: imageID(ref), RepoDigests: []string{strings.Split(ref, ":")[0] + "@" + imageID("digest "+ref)}, Size: size}
	f.images[info.ID] = info
	f.refs[ref] = info.ID
	return info
}

func (f *fakeEngine) DaemonID(ctx context.Context) (string, error) {
	f.mu.Lock()
	hung := f.hung
	f.mu.Unlock()
	if hung {
		<-ctx.Done()
		return "", ctx.Err()
	}
	return f.id, nil
}

func (f *fakeEngine) Inspect(_ context.Context, ref string) (manager.ImageInfo, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id, ok := f.refs[ref]
	if !ok {
		id = ref
	}
	info, ok := f.images[id]
	return info, ok, nil
}

func (f *fakeEngine) Pull(ctx context.Context, ref string, progress func(done, total int64)) error {
	f.mu.Lock()
	f.pulls = append(f.pulls, ref)
	var err error
	if len(f.pullErrs) > 0 {
		err, f.pullErrs = f.pullErrs[0], f.pullErrs[1:]
	}
	stall := f.stalls > 0
	if stall {
		f.stalls--
	}
	f.mu.Unlock()
	if stall {
		progress(0, 100)
		<-ctx.Done()
		return ctx.Err()
	}
	if err != nil {
		return err
	}
	progress(50, 100)
	progress(100, 100)
	f.add(ref, 100)
	return nil
}

func (f *fakeEngine) RegistrySize(_ context.Context, ref string) (int64, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.sizes[ref]
	return n, ok, nil
}

func (f *fakeEngine) ImagesInUse(context.Context) (map[string]bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.inUseErr != nil {
		return nil, f.inUseErr
	}
	out := map[string]bool{}
	for id := range f.inUse {
		out[id] = true
	}
	return out, nil
}

func (f *fakeEngine) Remove(_ context.Context, id string) error {
	f.mu.Lock()
	hook := f.onRemove
	f.mu.Unlock()
	if hook != nil {
		if err := hook(id); err != nil {
			return err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.inUse[id] {
		return fmt.Errorf("image %s: %w", id, manager.ErrImageInUse)
	}
	if _, ok := f.images[id]; !ok {
		return fmt.Errorf("no such image %s", id)
	}
	delete(f.images, id)
	for ref, rid := range f.refs {
		if rid == id {
			delete(f.refs, ref)
		}
	}
	f.removed = append(f.removed, id)
	return nil
}

func (f *fakeEngine) FindLabeled(_ context.Context, label, value string) (manager.ImageInfo, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id, ok := f.labels[label+"="+value]
	if !ok {
		return manager.ImageInfo{}, false, nil
	}
	info, ok := f.images[id]
	return info, ok, nil
}

func (f *fakeEngine) Build(_ context.Context, r io.Reader, spec state.BuildSpec, labels map[string]string) (string, error) {
	files := map[string]string{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", err
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return "", err
		}
		files[h.Name] = string(b)
	}
	if _, ok := files[spec.Dockerfile]; !ok {
		return "", fmt.Errorf("no %s in the context", spec.Dockerfile)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.builds = append(f.builds, files)
	id := imageID(fmt.Sprint("build ", len(f.builds), files))
	f.images[id] = manager.ImageInfo{ID: id, Size: 42}
	for k, v := range labels {
		f.labels[k+"="+v] = id
	}
	if spec.Tag != "" {
		f.refs[spec.Tag] = id
	}
	return id, nil
}

func (f *fakeEngine) counts() (pulls, builds int, removed []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pulls), len(f.builds), slices.Clone(f.removed)
}

func imageManager(t testing.TB, root string, eng *fakeEngine, adjust ...func(*manager.Config)) *manager.Manager {
	t.Helper()
	return newManager(t, root, append([]func(*manager.Config){func(c *manager.Config) {
		c.Docker = eng
		c.CleanupInterval = time.Hour // only the test sweeps
	}}, adjust...)...)
}

// getImage registers dep on the image src and waits for it.
func getImage(t testing.TB, m *manager.Manager, dep, src string) (state.Entry, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	e, err := m.Get(ctx, dep, mustKey(t, src, ""))
	if err != nil {
		t.Fatal(err)
	}
	return m.Wait(ctx, e.Key)
}

var sweepAll = manager.PolicyChange{MaxSizeBytes: ptr[int64](1), MinAge: ptr(time.Duration(0))}

// TestImagePulledOnceAndEvictedWhenUnused: an image is pulled once for
// every dependent of the daemon, published with its ID, and removed from
// the daemon by ID when a sweep evicts it, once nobody holds it.
func TestImagePulledOnceAndEvictedWhenUnused(t *testing.T) {
	root := t.TempDir()
	eng := newFakeEngine()
	m := imageManager(t, root, eng)
	const src = "docker://registry.test/team/app:1"
	e, err := getImage(t, m, "run1", src)
	if err != nil {
		t.Fatal(err)
	}
	if e.Key.Daemon != eng.id || e.ImageID != imageID("registry.test/team/app:1") || e.External || e.SizeBytes != 100 || e.RepoDigest == "" {
		t.Fatalf("READY image entry: %+v", e)
	}
	if _, err := getImage(t, m, "run2", src); err != nil {
		t.Fatal(err)
	}
	if pulls, _, _ := eng.counts(); pulls != 1 {
		t.Fatalf("%d pulls, want 1", pulls)
	}
	ctx := context.Background()
	if err := m.Release(ctx, "run1", e.Key); err != nil {
		t.Fatal(err)
	}
	// Held by run2: not evicted.
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 0 {
		t.Fatalf("sweep while held: %+v, %v", rep.Victims, err)
	}
	if err := m.Release(ctx, "run2", e.Key); err != nil {
		t.Fatal(err)
	}
	rep, err := m.SweepWith(ctx, false, sweepAll)
	if err != nil || len(rep.Victims) != 1 {
		t.Fatalf("sweep: %+v, %v", rep.Victims, err)
	}
	if _, _, removed := eng.counts(); !slices.Equal(removed, []string{e.ImageID}) {
		t.Errorf("removed %v, want the image by ID", removed)
	}
	if st, err := m.Entries(ctx); err != nil || st.Get(e.Key) != nil {
		t.Errorf("the evicted entry is still there (%v)", err)
	}
}

// TestImageNeverRemovedWhileUsedOrNotOurs: a sweep leaves alone an image a
// container uses, an image the daemon had before depcache was asked for it,
// and every image when the engine cannot list its containers.
func TestImageNeverRemovedWhileUsedOrNotOurs(t *testing.T) {
	root := t.TempDir()
	eng := newFakeEngine()
	had := eng.add("registry.test/had:1", 10)
	m := imageManager(t, root, eng)
	ctx := context.Background()
	ext, err := getImage(t, m, "run", "docker://registry.test/had:1")
	if err != nil {
		t.Fatal(err)
	}
	if !ext.External || ext.ImageID != had.ID {
		t.Fatalf("an image the daemon had: %+v, want it External with its ID", ext)
	}
	used, err := getImage(t, m, "run", "docker://registry.test/used:1")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []state.Entry{ext, used} {
		if err := m.Release(ctx, "run", e.Key); err != nil {
			t.Fatal(err)
		}
	}
	eng.mu.Lock()
	eng.inUse[used.ImageID] = true
	eng.inUseErr = errors.New("engine busy")
	eng.mu.Unlock()
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 0 {
		t.Fatalf("sweep with the containers unknown: %+v, %v", rep.Victims, err)
	}
	eng.mu.Lock()
	eng.inUseErr = nil
	eng.mu.Unlock()
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 0 {
		t.Fatalf("sweep: %+v, %v; want nothing evicted", rep.Victims, err)
	}
	if pulls, _, removed := eng.counts(); pulls != 1 || len(removed) != 0 {
		t.Errorf("%d pulls, removed %v; want 1 pull (not the image it had), nothing removed", pulls, removed)
	}
	_, desc, err := m.Describe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if why := desc[ext.Key.ID()].Kept; why != "not fetched by depcache" {
		t.Errorf("the image it had is kept for %q", why)
	}
}

// TestImageRemovalRefusedKeepsTheEntry: an image whose removal the engine
// refuses (a container started between the sweep's look and the removal)
// gets its entry back, is not reported evicted, and a later sweep removes
// it once it is free. An rm the engine refuses so says so (ErrInUse), and
// reports nothing removed.
func TestImageRemovalRefusedKeepsTheEntry(t *testing.T) {
	root := t.TempDir()
	eng := newFakeEngine()
	m := imageManager(t, root, eng)
	ctx := context.Background()
	e, err := getImage(t, m, "run", "docker://registry.test/racy:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Release(ctx, "run", e.Key); err != nil {
		t.Fatal(err)
	}
	eng.setOnRemove(func(id string) error {
		eng.mu.Lock()
		defer eng.mu.Unlock()
		eng.inUse[id] = true // the container appears now
		return nil
	})
	// Not evicted after all: the report does not say so (it listed the
	// victim and its bytes as freed).
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 0 || rep.Freed != 0 {
		t.Fatalf("sweep: %+v, freed %d, %v; want no victim", rep.Victims, rep.Freed, err)
	}
	st, err := m.Entries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if back := st.Get(e.Key); back == nil || back.Stage != state.Ready || back.ImageID != e.ImageID {
		t.Fatalf("after a refused removal: %+v, want the READY entry back", back)
	}
	eng.mu.Lock()
	eng.onRemove = nil
	delete(eng.inUse, e.ImageID)
	eng.mu.Unlock()
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 1 {
		t.Fatalf("later sweep: %+v, %v", rep.Victims, err)
	}
	e, err = getImage(t, m, "run", "docker://registry.test/racy:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Release(ctx, "run", e.Key); err != nil {
		t.Fatal(err)
	}
	eng.setOnRemove(func(string) error {
		return fmt.Errorf("conflict: image is referenced in multiple repositories: %w", manager.ErrImageInUse)
	})
	rep, err := m.Remove(ctx, []state.Key{e.Key}, false)
	if !errors.Is(err, manager.ErrInUse) || len(rep.Removed) != 0 || rep.Freed != 0 {
		t.Errorf("rm refused by the engine: %+v, %v; want ErrInUse and nothing removed", rep, err)
	}
	if st, err := m.Entries(ctx); err != nil || st.Get(e.Key) == nil {
		t.Errorf("the entry rm could not remove is gone (%v)", err)
	}
	if _, _, removed := eng.counts(); !slices.Equal(removed, []string{e.ImageID}) {
		t.Errorf("removed %v", removed)
	}
}

// TestImageNamedTwice: a tag and a digest of one image are two entries;
// evicting one leaves the image for the other. An entry made READY naming
// an image while it was being removed (a Get racing the eviction) is
// fetched again.
func TestImageNamedTwice(t *testing.T) {
	root := t.TempDir()
	eng := newFakeEngine()
	m := imageManager(t, root, eng)
	ctx := context.Background()
	tag, err := getImage(t, m, "run", "docker://registry.test/twice:1")
	if err != nil {
		t.Fatal(err)
	}
	// The same image under another name, held.
	digest := "registry.test/twice@sha256:" + strings.Repeat("ab", 32)
	eng.mu.Lock()
	eng.refs[digest] = tag.ImageID
	eng.mu.Unlock()
	other, err := getImage(t, m, "holder", "docker://"+digest)
	if err != nil {
		t.Fatal(err)
	}
	if other.ImageID != tag.ImageID {
		t.Fatalf("the digest names %s, the tag %s", other.ImageID, tag.ImageID)
	}
	// Found in the daemon, but pulled by depcache under the tag: not
	// External (marked so, it kept the image for ever once the tag's
	// entry was evicted).
	if other.External {
		t.Errorf("the digest's entry of an image depcache pulled as the tag is External: %+v", other)
	}
	if err := m.Release(ctx, "run", tag.Key); err != nil {
		t.Fatal(err)
	}
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 1 || rep.Victims[0].Key.ID() != tag.Key.ID() {
		t.Fatalf("sweep: %+v, %v", rep.Victims, err)
	}
	if _, _, removed := eng.counts(); len(removed) != 0 {
		t.Fatalf("removed %v while another entry names the image", removed)
	}
	if err := m.Release(ctx, "holder", other.Key); err != nil {
		t.Fatal(err)
	}
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 1 || rep.Victims[0].Key.ID() != other.Key.ID() {
		t.Fatalf("sweep of the digest's entry: %+v, %v", rep.Victims, err)
	}
	if _, _, removed := eng.counts(); !slices.Equal(removed, []string{tag.ImageID}) {
		t.Fatalf("removed %v, want %s once neither entry named it", removed, tag.ImageID)
	}
	eng.mu.Lock()
	eng.removed = nil
	eng.mu.Unlock()

	// Another image is evicted while a Get of it finds it still in the
	// daemon and makes its entry READY again.
	race, err := getImage(t, m, "run", "docker://registry.test/race:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Release(ctx, "run", race.Key); err != nil {
		t.Fatal(err)
	}
	racer := race
	racer.Generation, racer.External = 100, true
	racer.Dependents = map[string]state.Dependent{"racer": {Since: time.Now()}}
	eng.setOnRemove(func(string) error {
		behind(t, root, func(st *state.State) { st.Put(&racer) })
		return nil
	})
	if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 1 || rep.Victims[0].Key.ID() != race.Key.ID() {
		t.Fatalf("sweep: %+v, %v", rep.Victims, err)
	}
	eng.setOnRemove(nil)
	if _, _, removed := eng.counts(); !slices.Equal(removed, []string{race.ImageID}) {
		t.Fatalf("removed %v, want %s once no entry named it", removed, race.ImageID)
	}
	st, err := m.Entries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if e := st.Get(race.Key); e == nil || e.Stage != state.Downloading || e.ImageID != "" {
		t.Fatalf("the racing entry after its image was removed: %+v, want it to be fetched again", e)
	}
	// It is fetched again for its dependent.
	if _, err := m.Get(ctx, "racer", race.Key); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	e, err := m.Wait(wctx, race.Key)
	if err != nil || e.Generation <= 100 {
		t.Fatalf("fetched again: gen %d, %v", e.Generation, err)
	}
	if info, ok, _ := eng.Inspect(ctx, e.ImageID); !ok || info.ID != e.ImageID {
		t.Errorf("READY naming %s, which the daemon does not have", e.ImageID)
	}
}

// TestImageGoneFromTheDaemonFetchedAgain: a Get that finds a READY image
// gone from the daemon (docker rmi by hand) pulls it again under a new
// generation instead of handing out a dead ID.
func TestImageGoneFromTheDaemonFetchedAgain(t *testing.T) {
	root := t.TempDir()
	eng := newFakeEngine()
	m := imageManager(t, root, eng)
	e, err := getImage(t, m, "run", "docker://registry.test/rmi:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := eng.Remove(context.Background(), e.ImageID); err != nil { // by hand
		t.Fatal(err)
	}
	e2, err := getImage(t, m, "run2", "docker://registry.test/rmi:1")
	if err != nil {
		t.Fatal(err)
	}
	if e2.Generation <= e.Generation {
		t.Errorf("generation %d after %d: not fetched again", e2.Generation, e.Generation)
	}
	if pulls, _, _ := eng.counts(); pulls != 2 {
		t.Errorf("%d pulls, want 2", pulls)
	}
}

// TestImageFailures: an image larger than MaxImageBytes fails before any
// pull; a pull that keeps failing fails after the retries; a permanent
// error fails at once; images of another daemon are not driven here.
func TestImageFailures(t *testing.T) {
	ctx := context.Background()
	t.Run("too large", func(t *testing.T) {
		eng := newFakeEngine()
		eng.sizes["registry.test/big:1"] = 10 << 30
		m := imageManager(t, t.TempDir(), eng, func(c *manager.Config) { c.MaxImageBytes = 1 << 30 })
		_, err := getImage(t, m, "run", "docker://registry.test/big:1")
		var fe *manager.FailedError
		if !errors.As(err, &fe) || !strings.Contains(fe.Reason, "exceeds the image size limit") {
			t.Fatalf("err = %v, want FAILED over the size limit", err)
		}
		if pulls, _, _ := eng.counts(); pulls != 0 {
			t.Errorf("%d pulls of an image over the limit", pulls)
		}
	})
	t.Run("size unknown", func(t *testing.T) {
		eng := newFakeEngine()
		m := imageManager(t, t.TempDir(), eng, func(c *manager.Config) { c.MaxImageBytes = 1 << 30 })
		if _, err := getImage(t, m, "run", "docker://registry.test/unknown:1"); err != nil {
			t.Fatalf("an image whose size the registry does not tell: %v, want it pulled", err)
		}
	})
	t.Run("retried", func(t *testing.T) {
		eng := newFakeEngine()
		eng.pullErrs = []error{errors.New("net down"), errors.New("net down"), errors.New("net down")}
		m := imageManager(t, t.TempDir(), eng, func(c *manager.Config) { c.Retries = 2 })
		_, err := getImage(t, m, "run", "docker://registry.test/flaky:1")
		if !errors.Is(err, manager.ErrFailed) || !strings.Contains(err.Error(), "net down") {
			t.Fatalf("err = %v, want FAILED with the pull's error", err)
		}
		if pulls, _, _ := eng.counts(); pulls != 3 {
			t.Errorf("%d pulls, want 3", pulls)
		}
	})
	t.Run("permanent", func(t *testing.T) {
		eng := newFakeEngine()
		eng.pullErrs = []error{fmt.Errorf("manifest unknown: %w", manager.ErrPermanent)}
		m := imageManager(t, t.TempDir(), eng)
		if _, err := getImage(t, m, "run", "docker://registry.test/none:1"); !errors.Is(err, manager.ErrFailed) {
			t.Fatalf("err = %v, want FAILED", err)
		}
		if pulls, _, _ := eng.counts(); pulls != 1 {
			t.Errorf("%d pulls, want 1", pulls)
		}
	})
	t.Run("no engine", func(t *testing.T) {
		m := newManager(t, t.TempDir())
		if _, err := m.Get(ctx, "run", mustKey(t, "docker://registry.test/x:1", "")); !errors.Is(err, manager.ErrBadSource) {
			t.Fatalf("Get of an image without an engine: %v, want ErrBadSource", err)
		}
	})
	t.Run("another daemon", func(t *testing.T) {
		root := t.TempDir()
		eng := newFakeEngine()
		m := imageManager(t, root, eng)
		k := mustKey(t, "docker://registry.test/theirs:1", "")
		k.Daemon = "daemon-2"
		if _, err := m.Get(ctx, "run", k); err != nil {
			t.Fatal(err)
		}
		// Passes later (one has published a bundle since), it is still
		// nobody's here.
		blob := filepath.Join(t.TempDir(), "blob")
		if err := os.WriteFile(blob, []byte("later"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := getWait(t, m, "run", mustKey(t, "file://"+blob, "")); err != nil {
			t.Fatal(err)
		}
		if e := viewEntry(t, root, k); e.Stage != state.Downloading || e.Owner != nil {
			t.Fatalf("another daemon's image was driven here: %+v", e)
		}
		if rep, err := m.SweepWith(ctx, false, sweepAll); err != nil || len(rep.Victims) != 0 {
			t.Fatalf("sweep: %+v, %v", rep.Victims, err)
		}
		if pulls, _, _ := eng.counts(); pulls != 0 {
			t.Errorf("%d pulls of another daemon's image", pulls)
		}
	})
}

// TestImageBuilt: a docker-build:// source is built once from a tar of its
// context, labelled with its fingerprint; the same context under another
// root (or after its entry was evicted) finds the labelled image instead of
// building again.
func TestImageBuilt(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "built", "sub/g": "nested"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("f", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	eng := newFakeEngine()
	src := "docker-build://" + dir + "?tag=registry.test/built:1&arg=V=1"
	m := imageManager(t, t.TempDir(), eng)
	e, err := getImage(t, m, "run", src)
	if err != nil {
		t.Fatal(err)
	}
	_, builds, _ := eng.counts()
	if builds != 1 || e.ImageID == "" || e.External {
		t.Fatalf("%d builds, entry %+v", builds, e)
	}
	eng.mu.Lock()
	files := eng.builds[0]
	eng.mu.Unlock()
	for name, want := range map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "built", "sub/g": "nested", "link": ""} {
		if got, ok := files[name]; !ok || got != want {
			t.Errorf("context file %s: %q (present %v), want %q", name, got, ok, want)
		}
	}
	again, err := getImage(t, imageManager(t, t.TempDir(), eng), "run", src)
	if err != nil {
		t.Fatal(err)
	}
	if _, builds, _ := eng.counts(); builds != 1 || again.ImageID != e.ImageID {
		t.Errorf("%d builds, image %s then %s: want the labelled image found, not built again", builds, e.ImageID, again.ImageID)
	}
}

// TestStalledPullIsRetried: a pull whose bytes do not move for the stall
// limit (the download timeout here) fails and is retried; it blocked the
// owner, and every waiter behind it, for ever (its heartbeat kept beating).
func TestStalledPullIsRetried(t *testing.T) {
	eng := newFakeEngine()
	eng.stalls = 1
	m := imageManager(t, t.TempDir(), eng, func(c *manager.Config) { c.Policy.DownloadTimeout = 300 * time.Millisecond })
	e, err := getImage(t, m, "job", "docker://registry.example/app:1")
	if err != nil || e.Stage != state.Ready {
		t.Fatalf("after a stalled pull: %s, %v; want READY", e.Stage, err)
	}
	if pulls, _, _ := eng.counts(); pulls != 2 {
		t.Errorf("%d pulls, want 2 (the stalled one, then its retry)", pulls)
	}
}

// TestHungEngineDoesNotHoldBundles: an engine that accepts and never
// answers does not hold up a manager of a root without images, nor its
// bundles (the start asked it for its ID, without a bound).
func TestHungEngineDoesNotHoldBundles(t *testing.T) {
	eng := newFakeEngine()
	eng.hung = true
	root := t.TempDir()
	src := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(src, []byte("a bundle"), 0o644); err != nil {
		t.Fatal(err)
	}
	m := imageManager(t, root, eng)
	if e, err := getWait(t, m, "job", mustKey(t, "file://"+src, "")); err != nil || e.Stage != state.Ready {
		t.Fatalf("a bundle beside a hung engine: %s, %v", e.Stage, err)
	}
}
