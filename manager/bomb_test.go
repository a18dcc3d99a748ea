package manager_test

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"golang.org/x/sys/unix"
)

// zerosTarGz is a gzipped tar of members files of size bytes of zeros each:
// megabytes unpacked, kilobytes on the wire.
func zerosTarGz(t testing.TB, members int, size int64) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	zeros := make([]byte, 1<<20)
	for i := range members {
		if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("z/%05d", i), Mode: 0o644, Size: size, Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		for left := size; left > 0; {
			n := min(left, int64(len(zeros)))
			if _, err := tw.Write(zeros[:n]); err != nil {
				t.Fatal(err)
			}
			left -= n
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// noiseThenZerosTarGz is a tar.gz of two members: noise random bytes
// (seeded), which do not compress, then zeros bytes of zeros, which do.
func noiseThenZerosTarGz(seed byte, noise, zeros int) []byte {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	tw := tar.NewWriter(zw)
	random := make([]byte, noise)
	rand.NewChaCha8([32]byte{seed}).Read(random)
	for i, data := range [][]byte{random, make([]byte, zeros)} {
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("f%d", i), Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg})
		tw.Write(data)
	}
	tw.Close()
	zw.Close()
	return b.Bytes()
}

// zipOf is a zip of one member of size bytes of zeros, stored by method.
func zipOf(t *testing.T, method uint16, size int) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	w, err := zw.CreateHeader(&zip.FileHeader{Name: "zeros", Method: method})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestDecompressionBombs: under a stored budget, no download writes more
// than the budget can make room for, whatever its Content-Length said:
// gzip bombs of one big member and of many small ones, and plain bodies
// sent without a length. Each fails with ErrTooLarge named in the reason,
// leaves nothing published or staged, and a bundle that fits still works.
func TestDecompressionBombs(t *testing.T) {
	const budget = 8 << 20
	oneBig := zerosTarGz(t, 1, 200<<20)
	manySmall := zerosTarGz(t, 2000, 100<<10)
	if len(oneBig) > 1<<20 || len(manySmall) > 1<<20 {
		t.Fatalf("the bombs are not small on the wire: %d and %d bytes", len(oneBig), len(manySmall))
	}
	fits := zerosTarGz(t, 4, 1<<20)
	// A zip is unpacked from its spool, which the staging directory
	// holds until the tree is written: stored (not compressed), 5 MiB of
	// spool and 5 MiB of tree pass the budget together; deflated, the
	// same tree fits beside its small spool.
	storedZip := zipOf(t, zip.Store, 5<<20)
	deflatedZip := zipOf(t, zip.Deflate, 5<<20)
	// A plain tar of 5 MiB: it fits the budget, but with a copy kept to
	// resume from it would not, so none is kept.
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: "zeros", Mode: 0o644, Size: 5 << 20, Typeflag: tar.TypeReg})
	tw.Write(make([]byte, 5<<20))
	tw.Close()
	plainTar := tb.Bytes()
	plain := bytes.Repeat([]byte("x"), 9<<20)
	// A tar.gz of 3 MiB on the wire and 6 MiB unpacked: under 8 MiB it
	// fits, but not beside the copy of itself that resuming would keep.
	crowded := noiseThenZerosTarGz(1, 3<<20, 3<<20)
	for _, tc := range []struct {
		name       string
		body       []byte
		noLength   bool
		wantFailed bool
		path       string
	}{
		{"gzip bomb, one member", oneBig, false, true, ""},
		{"gzip bomb, 2000 members", manySmall, false, true, ""},
		{"gzip bomb, no Content-Length", oneBig, true, true, ""},
		{"plain body past the budget, no Content-Length", plain, true, true, ""},
		{"archive that fits", fits, false, false, ""},
		{"zip whose spool and tree pass the budget", storedZip, false, true, "/b.zip"},
		{"zip that fits beside its spool", deflatedZip, false, false, "/b.zip"},
		{"resumable tar that fits only without a copy", plainTar, false, false, "/etag/b.tar"},
		{"resumable tar.gz whose tree fits only without a copy", crowded, false, false, "/etag/b.tar.gz"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			srv := newServer(t, tc.body)
			if strings.HasPrefix(tc.path, "/etag/") {
				srv.set(func(w http.ResponseWriter, r *http.Request) bool {
					w.Header().Set("ETag", `"v1"`) // strong: resumable
					http.ServeContent(w, r, "b.tar", time.Time{}, bytes.NewReader(tc.body))
					return true
				})
			}
			if tc.noLength {
				srv.set(func(w http.ResponseWriter, r *http.Request) bool {
					w.Header().Set("Content-Type", "application/octet-stream")
					for b := tc.body; len(b) > 0; b = b[min(len(b), 64<<10):] {
						if _, err := w.Write(b[:min(len(b), 64<<10)]); err != nil {
							return true
						}
						w.(http.Flusher).Flush() // chunked: no length up front
					}
					return true
				})
			}
			m := newManager(t, root, func(c *manager.Config) {
				c.SetPolicy = true
				c.Cleanup = manager.PolicyChange{MaxSizeBytes: ptr[int64](budget), MinAge: ptr(time.Duration(0))}
			})
			k := mustKey(t, srv.URL+cmp.Or(tc.path, "/b"), "")
			e, err := getWait(t, m, "job", k)
			if !tc.wantFailed {
				if err != nil || e.Stage != state.Ready {
					t.Fatalf("an archive within the budget: %+v %v", e, err)
				}
				return
			}
			var failed *manager.FailedError
			if !errors.As(err, &failed) || e.Stage != state.Failed {
				t.Fatalf("got %+v, %v; want FAILED", e, err)
			}
			if !strings.Contains(failed.Reason, manager.ErrTooLarge.Error()) || !strings.Contains(failed.Reason, "8388608") {
				t.Errorf("reason %q does not say it passed the budget of 8388608 bytes", failed.Reason)
			}
			for _, dir := range []string{"entries", "staging"} {
				ents, err := os.ReadDir(filepath.Join(root, dir))
				if err != nil && !errors.Is(err, os.ErrNotExist) {
					t.Fatal(err)
				}
				if len(ents) != 0 {
					t.Errorf("%s/ holds %d items after a refused bomb", dir, len(ents))
				}
			}
			if srv.requests.Load() != 1 {
				t.Errorf("%d requests: a budget failure is not retried", srv.requests.Load())
			}
		})
	}
}

// TestBombUnderTheFreeDiskFloor: with no budget, the free-disk floor bounds
// an unpack. A floor of all but 64 MiB of the free disk stops a gzip bomb
// of 1 GiB of zeros (1 MiB on the wire), sent with no Content-Length.
func TestBombUnderTheFreeDiskFloor(t *testing.T) {
	root := t.TempDir()
	var s unix.Statfs_t
	if err := unix.Statfs(root, &s); err != nil {
		t.Fatal(err)
	}
	free := int64(s.Bavail) * int64(s.Bsize)
	if free < 256<<20 {
		t.Fatalf("%d bytes free under %s: the test needs 256 MiB", free, root)
	}
	body := zerosTarGz(t, 1, 1<<30)
	srv := newServer(t, body)
	srv.set(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Content-Type", "application/octet-stream")
		for b := body; len(b) > 0; b = b[min(len(b), 64<<10):] {
			if _, err := w.Write(b[:min(len(b), 64<<10)]); err != nil {
				return true
			}
			w.(http.Flusher).Flush()
		}
		return true
	})
	m := newManager(t, root, func(c *manager.Config) {
		c.SetPolicy = true
		c.Cleanup = manager.PolicyChange{MinFreeDiskBytes: ptr(free - 64<<20), MinAge: ptr(time.Duration(0))}
	})
	e, err := getWait(t, m, "job", mustKey(t, srv.URL+"/b", ""))
	var failed *manager.FailedError
	if !errors.As(err, &failed) || e.Stage != state.Failed {
		t.Fatalf("got %+v, %v; want FAILED", e, err)
	}
	if !strings.Contains(failed.Reason, manager.ErrTooLarge.Error()) || !strings.Contains(failed.Reason, "min-free-disk") {
		t.Errorf("reason %q does not say it passed the free-disk floor", failed.Reason)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "staging")); len(ents) != 0 {
		t.Errorf("staging/ holds %d items after a refused bomb", len(ents))
	}
	// A plain file whose announced length passes the floor fails at once,
	// from its Content-Length, as one past the budget does. It announces
	// 1 TiB (of zeros, never all sent), far past what other tests on the
	// same disk can free meanwhile.
	big := newServer(t, nil)
	big.set(func(w http.ResponseWriter, r *http.Request) bool {
		http.ServeContent(w, r, "big.bin", time.Time{}, io.NewSectionReader(zeros{}, 0, 1<<40))
		return true
	})
	e, err = getWait(t, m, "job", mustKey(t, big.URL+"/big.bin", ""))
	if !errors.As(err, &failed) || e.Stage != state.Failed || !strings.Contains(failed.Reason, "cannot fit on the disk") {
		t.Fatalf("a file of 1 TiB under a floor of all but 64 MiB: %+v, %v; want FAILED at once, naming the disk", e, err)
	}
}

// zeros reads as zero bytes everywhere.
type zeros struct{}

func (zeros) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}

// TestTreeSizeIsItsDisk: an unpacked tree's size is the disk it takes, as
// du counts it, not its files' bytes: 300 files of one byte take a block
// each. The budget counts the size, so trees of many small files or
// directories cannot pass it together.
func TestTreeSizeIsItsDisk(t *testing.T) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for i := range 300 {
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("d%03d/f", i), Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
		tw.Write([]byte("x"))
	}
	tw.Close()
	zw.Close()
	srv := newServer(t, buf.Bytes())
	m := newManager(t, t.TempDir())
	e, err := getWait(t, m, "job", mustKey(t, srv.URL+"/t.tar.gz", ""))
	if err != nil || e.Stage != state.Ready {
		t.Fatalf("%+v %v", e, err)
	}
	if e.SizeBytes < 300*4096 {
		t.Errorf("size %d bytes for 300 one-byte files, each taking a block: want at least %d", e.SizeBytes, 300*4096)
	}
}

// TestRoomWithoutEntriesTheSweepKeeps: the room a download gets leaves out
// entries that this manager's sweep may not evict yet. An entry past
// min-age by its stamp, but within the clock skew tolerance of it, is kept
// by a sweep that has not watched it for min-age; counting it as room let a
// download publish over the budget, which no sweep then brought back.
func TestRoomWithoutEntriesTheSweepKeeps(t *testing.T) {
	const budget = 8 << 20
	root := t.TempDir()
	policy := func(c *manager.Config) {
		c.SetPolicy = true
		c.Cleanup = manager.PolicyChange{MaxSizeBytes: ptr[int64](budget), MinAge: ptr(10 * time.Second)}
	}
	old := mustKey(t, newServer(t, bytes.Repeat([]byte("o"), 5<<20)).URL+"/b", "")
	first := newManager(t, root, policy)
	if e, err := getWait(t, first, "job", old); err != nil || e.Stage != state.Ready {
		t.Fatalf("the first bundle: %s %v", e.Stage, err)
	}
	if err := first.Release(context.Background(), "job", old); err != nil {
		t.Fatal(err)
	}
	// Unused, 12 s old by its stamps: past min-age, within the tolerance.
	changeEntry(t, root, old, func(e *state.Entry) {
		e.Created, e.LastUsed = time.Now().Add(-12*time.Second), time.Now().Add(-12*time.Second)
	})
	m := newManager(t, root, policy) // a new process: it has watched nothing
	k := mustKey(t, newServer(t, bytes.Repeat([]byte("n"), 4<<20)).URL+"/b", "")
	e, err := getWait(t, m, "job", k)
	var failed *manager.FailedError
	if !errors.As(err, &failed) || !strings.Contains(failed.Reason, manager.ErrTooLarge.Error()) {
		t.Fatalf("4 MiB beside 5 MiB the sweep keeps, under 8 MiB: %s, %v; want FAILED, too large", e.Stage, err)
	}
	st, err := m.Entries(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if used := transitions.Measure(st.Entries); used > budget {
		t.Errorf("%d bytes used, over the budget of %d", used, budget)
	}
}

// TestConcurrentDownloadsOfUnknownSizeHeldToTheBudget: three archives
// whose compressed bytes say nothing of their trees (1.9 MiB each, a few
// KB on the wire), fetched at once by three managers under a 3 MiB budget.
// Each started with the whole budget as its room; the room each report
// and the end of each download recheck counts what the others have on
// disk, so what is published stays within the budget (all three were:
// 5.7 MiB under a budget of 3), and the others fail as too large.
func TestConcurrentDownloadsOfUnknownSizeHeldToTheBudget(t *testing.T) {
	// A few KB on the wire, unpacked at the end in one go; and 300 KB of
	// noise first, unpacked as it arrives, between reports.
	noisy := noiseThenZerosTarGz(2, 300<<10, 1600<<10)
	for name, tc := range map[string]struct {
		body  []byte
		chunk int
	}{
		"unpacked at the end":  {zerosTarGz(t, 19, 100<<10), 64},
		"unpacked as it comes": {noisy, 8 << 10},
	} {
		t.Run(name, func(t *testing.T) { concurrentUnknownSizes(t, tc.body, tc.chunk) })
	}
}

func concurrentUnknownSizes(t *testing.T, body []byte, chunk int) {
	const budget = 3 << 20
	root := t.TempDir()
	srv := newServer(t, body)
	srv.set(func(w http.ResponseWriter, r *http.Request) bool {
		// Paced, so that each download spans several progress reports.
		for b := body; len(b) > 0; b = b[min(len(b), chunk):] {
			if _, err := w.Write(b[:min(len(b), chunk)]); err != nil {
				return true
			}
			w.(http.Flusher).Flush()
			time.Sleep(10 * time.Millisecond)
		}
		return true
	})
	policy := func(c *manager.Config) {
		c.SetPolicy = true
		c.Cleanup = manager.PolicyChange{MaxSizeBytes: ptr[int64](budget), MinAge: ptr(time.Duration(0))}
	}
	keys := make([]state.Key, 3)
	ms := make([]*manager.Manager, 3)
	for i := range keys {
		keys[i] = mustKey(t, fmt.Sprintf("%s/b%d.tar.gz", srv.URL, i), "")
		ms[i] = newManager(t, root, policy)
	}
	type result struct {
		e   state.Entry
		err error
	}
	results := make([]result, 3)
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			e, err := getWait(t, ms[i], "job", keys[i])
			results[i] = result{e, err}
		})
	}
	wg.Wait()
	var published int64
	for i, r := range results {
		switch {
		case r.err == nil && r.e.Stage == state.Ready:
			published += r.e.SizeBytes
		case !errors.Is(r.err, manager.ErrTooLarge):
			t.Errorf("%s: %s, %v; want READY or FAILED as too large", keys[i].Source, r.e.Stage, r.err)
		}
	}
	if published > budget {
		t.Errorf("%d bytes published under a budget of %d: %+v", published, budget, results)
	}
}
