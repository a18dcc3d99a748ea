package manager_test

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
)

// A FailedError tells a permanent failure (a missing file, a 404) from a
// transient one (an HTTP 500) through errors.Is, says when the cool-down
// ends (FailedAt plus the cool-down, doubled per failure in a row), and the
// entry remembers which it was.
func TestFailedErrorPermanentAndRetryAt(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root, func(c *manager.Config) {
		c.Retries = -1
		c.Policy = transitions.Policy{FailureCooldown: time.Hour}
	})
	srv := newServer(t, []byte("x"))
	srv.set(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/gone" {
			w.WriteHeader(http.StatusNotFound)
		} else {
			w.WriteHeader(http.StatusInternalServerError)
		}
		return true
	})
	for _, tc := range []struct {
		src       string
		permanent bool
	}{
		{"file://" + filepath.Join(t.TempDir(), "missing"), true},
		{srv.URL + "/gone", true},
		{srv.URL + "/flaky", false},
	} {
		t.Run(tc.src, func(t *testing.T) {
			k := mustKey(t, tc.src, "")
			_, err := getWait(t, m, "job", k)
			var failed *manager.FailedError
			if !errors.As(err, &failed) || !errors.Is(err, manager.ErrFailed) {
				t.Fatalf("err = %v, want a FailedError", err)
			}
			if errors.Is(err, manager.ErrPermanent) != tc.permanent || failed.Permanent != tc.permanent {
				t.Errorf("errors.Is(err, ErrPermanent) = %v, Permanent = %v; want %v (%v)", errors.Is(err, manager.ErrPermanent), failed.Permanent, tc.permanent, err)
			}
			e := viewEntry(t, root, k)
			if e == nil || e.Stage != state.Failed || e.Permanent != tc.permanent {
				t.Fatalf("entry %+v: want FAILED with Permanent %v", e, tc.permanent)
			}
			if want := e.FailedAt.Add(time.Hour); !failed.RetryAt.Equal(want) {
				t.Errorf("RetryAt = %v, want FailedAt + 1h = %v", failed.RetryAt, want)
			}
		})
	}
}

// Retry() skips what is left of a FAILED entry's cool-down; without it, the
// entry stays FAILED until the cool-down ends. A success clears the
// permanent mark.
func TestGetRetrySkipsTheCooldown(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root, func(c *manager.Config) { c.Retries = -1 })
	p := filepath.Join(t.TempDir(), "later")
	k := mustKey(t, "file://"+p, "")
	if _, err := getWait(t, m, "job", k); !errors.Is(err, manager.ErrPermanent) {
		t.Fatalf("err = %v, want a permanent failure", err)
	}
	if err := os.WriteFile(p, []byte("here now"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := getWait(t, m, "job", k); !errors.Is(err, manager.ErrFailed) {
		t.Fatalf("a get within the cool-down: err = %v, want still FAILED", err)
	}
	ctx := context.Background()
	if _, err := m.Get(ctx, "job", k, manager.Retry()); err != nil {
		t.Fatal(err)
	}
	e, err := m.Wait(ctx, k)
	if err != nil || e.Stage != state.Ready {
		t.Fatalf("after Retry: %v %v, want READY", e.Stage, err)
	}
	if e := viewEntry(t, root, k); e.Permanent || e.Failures != 0 {
		t.Errorf("READY entry keeps Permanent %v, Failures %d", e.Permanent, e.Failures)
	}
}

// A kept-packed key is another entry than the default one, whose key (and
// ID) is what it always was; the kept copy is the archive's bytes, the
// default one its unpacked tree.
func TestKeepPacked(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root)
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	if k.ID() != (state.Key{Kind: state.Bundle, Source: "file://" + abs}).ID() {
		t.Fatal("the default key changed")
	}
	kept, err := manager.KeepPacked(k)
	if err != nil {
		t.Fatal(err)
	}
	if kept.ID() == k.ID() || !manager.IsKeptPacked(kept) || manager.IsKeptPacked(k) {
		t.Fatalf("kept key %v is not told from %v", kept, k)
	}
	if _, err := manager.KeepPacked(state.Key{Kind: state.Image, Source: "docker://x:1"}); !errors.Is(err, manager.ErrBadSource) {
		t.Errorf("an image kept packed: err = %v, want ErrBadSource", err)
	}
	for _, tc := range []struct {
		k   state.Key
		dir bool
	}{{k, true}, {kept, false}} {
		e, err := getWait(t, m, "job", tc.k)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := m.Abs(e)
		fi, err := os.Stat(p)
		if err != nil || fi.IsDir() != tc.dir {
			t.Fatalf("%s: %v %v, want a directory: %v", tc.k.Source, fi, err, tc.dir)
		}
		if !tc.dir {
			got, _ := os.ReadFile(p)
			want, _ := os.ReadFile(abs)
			if !bytes.Equal(got, want) {
				t.Error("the kept archive is not the source's bytes")
			}
		}
	}
}

// A .zip is unpacked, spooled to staging and held to the budget; the same
// bytes under another name (a .jar) stay a file; a zip bomb under a small
// budget fails with ErrTooLarge and publishes nothing.
func TestZipBundles(t *testing.T) {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	w, _ := zw.Create("dir/hello.txt")
	w.Write([]byte("hello from a zip\n"))
	zw.Close()
	src := t.TempDir()
	for _, n := range []string{"b.zip", "b.jar"} {
		os.WriteFile(filepath.Join(src, n), buf.Bytes(), 0o644)
	}
	root := t.TempDir()
	m := newManager(t, root)
	e, err := getWait(t, m, "job", mustKey(t, "file://"+filepath.Join(src, "b.zip"), ""))
	if err != nil {
		t.Fatal(err)
	}
	p, _ := m.Abs(e)
	if b, err := os.ReadFile(filepath.Join(p, "dir", "hello.txt")); err != nil || string(b) != "hello from a zip\n" {
		t.Fatalf("unpacked zip: %q %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(p), "spool.zip")); !os.IsNotExist(err) {
		t.Errorf("the spool was published with the entry: %v", err)
	}
	e, err = getWait(t, m, "job", mustKey(t, "file://"+filepath.Join(src, "b.jar"), ""))
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := m.Abs(e); !isFile(p) {
		t.Errorf("a .jar was unpacked at %s", p)
	}

	bombRoot := t.TempDir()
	limit := int64(4 << 20)
	bm := newManager(t, bombRoot, func(c *manager.Config) {
		c.Retries = -1
		c.Cleanup = manager.PolicyChange{MaxSizeBytes: &limit}
		c.SetPolicy = true
	})
	bomb, _ := filepath.Abs("../testdata/hostile/zip-bomb.zip")
	_, err = getWait(t, bm, "job", mustKey(t, "file://"+bomb, ""))
	if !errors.Is(err, manager.ErrFailed) {
		t.Fatalf("zip bomb: err = %v, want FAILED", err)
	}
	if e := viewEntry(t, bombRoot, mustKey(t, "file://"+bomb, "")); e == nil || !bytes.Contains([]byte(e.Message), []byte("exceeds the size budget")) {
		t.Errorf("zip bomb entry: %+v, want FAILED for the budget", e)
	}
	if ents, _ := os.ReadDir(filepath.Join(bombRoot, "entries")); len(ents) != 0 {
		t.Errorf("the zip bomb published %d entries", len(ents))
	}
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// TestMalformedArchiveNotRetried: an archive whose data all arrived and is
// still wrong (a gzip CRC that does not match) fails at once and for good:
// one request, not one per retry, and the entry is permanent.
func TestMalformedArchiveNotRetried(t *testing.T) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: "a", Mode: 0o644, Size: 5, Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	body := buf.Bytes()
	body[len(body)-8] ^= 0xff // the CRC-32
	var requests atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		_, _ = w.Write(body)
	}))
	defer srv.Close()
	root := t.TempDir()
	m := newManager(t, root, func(c *manager.Config) { c.Retries = 3 })
	k := mustKey(t, srv.URL+"/bad-crc.tar.gz", "")
	_, err := getWait(t, m, "job", k)
	var failed *manager.FailedError
	if !errors.As(err, &failed) || !failed.Permanent || !errors.Is(err, manager.ErrPermanent) {
		t.Fatalf("err = %v, want a permanent FailedError", err)
	}
	if n := requests.Load(); n != 1 {
		t.Errorf("%d requests for an archive that cannot change, want 1", n)
	}
}
