package manager_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/sirupsen/logrus"
)

var resumeModTime = time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)

// TestHTTPSourceFetchRange: Range and If-Range against http.ServeContent.
func TestHTTPSourceFetchRange(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789"), 10000)
	var mu sync.Mutex
	etag := `"a"`
	var ranges []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		ranges = append(ranges, r.Header.Get("Range"))
		if etag != "" {
			w.Header().Set("ETag", etag)
		}
		mu.Unlock()
		http.ServeContent(w, r, "b", resumeModTime, bytes.NewReader(body))
	}))
	defer srv.Close()
	src := manager.HTTPSource(nil, time.Minute).(manager.RangeSource)
	n := int64(len(body))
	lm := resumeModTime.Format(http.TimeFormat)
	for _, c := range []struct {
		name       string
		etag       string
		from       manager.ResumeFrom
		wantOffset int64
		wantRange  bool
	}{
		{"same etag", `"a"`, manager.ResumeFrom{Offset: 100, Validator: manager.Validator{ETag: `"a"`, LastModified: lm, Length: n}}, 100, true},
		{"changed etag", `"b"`, manager.ResumeFrom{Offset: 100, Validator: manager.Validator{ETag: `"a"`, LastModified: lm, Length: n}}, 0, true},
		{"weak etag", `W/"a"`, manager.ResumeFrom{Offset: 100, Validator: manager.Validator{ETag: `W/"a"`, LastModified: lm, Length: n}}, 0, false},
		{"last-modified", "", manager.ResumeFrom{Offset: 100, Validator: manager.Validator{LastModified: lm, Length: n}}, 100, true},
		{"at the end", `"a"`, manager.ResumeFrom{Offset: n, Validator: manager.Validator{ETag: `"a"`, Length: n}}, 0, true},
		{"from 0", `"a"`, manager.ResumeFrom{}, 0, false},
	} {
		mu.Lock()
		etag, ranges = c.etag, nil
		mu.Unlock()
		var got manager.RangeStart
		var buf bytes.Buffer
		err := src.FetchRange(context.Background(), srv.URL+"/b", c.from, &buf, func(s manager.RangeStart) error {
			got = s
			return nil
		})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got.Offset != c.wantOffset || got.Total != n || !bytes.Equal(buf.Bytes(), body[got.Offset:]) {
			t.Errorf("%s: start %+v, %d bytes; want offset %d of %d", c.name, got, buf.Len(), c.wantOffset, n)
		}
		mu.Lock()
		if (ranges[0] != "") != c.wantRange {
			t.Errorf("%s: Range %q sent, want one: %v", c.name, ranges[0], c.wantRange)
		}
		mu.Unlock()
		if c.etag != "" && got.Validator.ETag != c.etag {
			t.Errorf("%s: validator %+v", c.name, got.Validator)
		}
	}
}

// fakeProcs is a process table in which some pids are dead: managers of
// one test process that stand for processes of one machine.
type fakeProcs struct {
	self state.Process
	dead *sync.Map
}

func (f fakeProcs) Self() state.Process { return f.self }
func (f fakeProcs) Alive(p state.Process) (bool, error) {
	_, dead := f.dead.Load(p.PID)
	return !dead, nil
}

// holdServer sends its first request up to hold bytes and then waits for
// the client to go; it records the Range of every request.
type holdServer struct {
	*httptest.Server
	mu     sync.Mutex
	ranges []string
}

func newHoldServer(t *testing.T, body []byte, hold int) *holdServer {
	s := &holdServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.ranges = append(s.ranges, r.Header.Get("Range"))
		first := len(s.ranges) == 1
		s.mu.Unlock()
		w.Header().Set("ETag", `"v1"`)
		if first {
			w.Header().Set("Content-Length", itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			w.Write(body[:hold])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			return
		}
		http.ServeContent(w, r, "b", resumeModTime, bytes.NewReader(body))
	}))
	t.Cleanup(s.Close)
	return s
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func checkpointAt(t testing.TB, root string) int64 {
	ps, _ := filepath.Glob(filepath.Join(root, "staging", "*", "checkpoint.json"))
	var off int64
	for _, p := range ps {
		var c struct {
			Offset int64 `json:"offset"`
		}
		if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &c) == nil {
			off = max(off, c.Offset)
		}
	}
	return off
}

func stagingDirs(root string) []string {
	ents, _ := os.ReadDir(filepath.Join(root, "staging"))
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// resumeHosts start managers on one root as processes of one machine,
// each of its own pid, which a test declares dead once stopped.
type resumeHosts struct {
	root string
	log  logrus.FieldLogger
	dead *sync.Map
}

func newResumeHosts(root string, log logrus.FieldLogger) *resumeHosts {
	return &resumeHosts{root: root, log: log, dead: &sync.Map{}}
}

// start starts the manager of process pid.
func (h *resumeHosts) start(t *testing.T, pid int) (*manager.Manager, func() error) {
	t.Helper()
	m, err := manager.New(manager.Config{Root: h.root, Log: h.log, PollInterval: 20 * time.Millisecond,
		RetryBackoff: 10 * time.Millisecond, ProgressInterval: 100 * time.Millisecond,
		Processes: fakeProcs{self: state.Process{Host: "h", BootID: "boot", PIDNS: "ns", PID: pid, StartTime: 1}, dead: h.dead},
		Disk:      roomyDisk()})
	if err != nil {
		t.Fatal(err)
	}
	stop, err := m.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return m, stop
}

// interruptAtCheckpoint has process pid start downloading key, stops it
// once its download checkpointed 8 MiB, and declares it dead: the next
// owner may resume from its staging.
func (h *resumeHosts) interruptAtCheckpoint(t *testing.T, key state.Key, pid int) {
	t.Helper()
	a, stop := h.start(t, pid)
	if _, err := a.Get(context.Background(), "run1", key, manager.Detached()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, func() bool { return checkpointAt(t, h.root) >= 8<<20 },
		func() string { return "no checkpoint" })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	h.dead.Store(pid, true)
}

// TestResumeAfterShutdown: a manager stopped mid-download hands the entry
// back and keeps its checkpointed staging; the manager of another (later)
// process resumes from it with Range, publishes the right bytes and
// removes the old staging. And a checkpointed staging whose entry went
// away is kept for a later get to resume from, and removed by the next
// sweep or start-up once its checkpoint is 10 minutes old.
func TestResumeAfterShutdown(t *testing.T) {
	body := make([]byte, 16<<20)
	for i := range body {
		body[i] = byte(i * 7 / 5)
	}
	sum := sha256.Sum256(body)
	for _, release := range []bool{false, true} {
		root := t.TempDir()
		hosts := newResumeHosts(root, quietLog())
		srv := newHoldServer(t, body, len(body)*6/10)
		key := mustKey(t, srv.URL+"/b.bin", hex.EncodeToString(sum[:]))
		hosts.interruptAtCheckpoint(t, key, 1001)
		if got := stagingDirs(root); len(got) != 1 || checkpointAt(t, root) < 8<<20 {
			t.Fatalf("after the shutdown, staging %v, checkpoint at %d: want it kept", got, checkpointAt(t, root))
		}
		if release {
			b, stopB := hosts.start(t, 1002)
			if err := b.Release(context.Background(), "run1", key); err != nil {
				t.Fatal(err)
			}
			waitFor(t, time.Minute, func() bool { return viewEntry(t, root, key) == nil }, func() string { return "entry still there" })
			stopB()
			got := stagingDirs(root)
			if len(got) != 1 {
				t.Fatalf("staging %v after the entry went: want its recent checkpoint kept", got)
			}
			old := time.Now().Add(-11 * time.Minute)
			if err := os.Chtimes(filepath.Join(root, "staging", got[0], "checkpoint.json"), old, old); err != nil {
				t.Fatal(err)
			}
			_, stopC := hosts.start(t, 1003)
			stopC()
			if got := stagingDirs(root); len(got) != 0 {
				t.Errorf("staging %v: a start-up keeps a checkpoint 11 minutes old of an entry that is gone", got)
			}
			continue
		}
		b, stopB := hosts.start(t, 1002)
		if _, err := b.Get(context.Background(), "run2", key, manager.Detached()); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		e, err := b.Wait(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := b.Abs(e)
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		io.Copy(h, f)
		f.Close()
		if !bytes.Equal(h.Sum(nil), sum[:]) || e.Generation != 2 {
			t.Errorf("published gen %d, content verifies: %v", e.Generation, bytes.Equal(h.Sum(nil), sum[:]))
		}
		srv.mu.Lock()
		if len(srv.ranges) != 2 || srv.ranges[1] == "" {
			t.Errorf("requests with Range %q: want the second to resume", srv.ranges)
		}
		srv.mu.Unlock()
		waitNoStaging(t, root)
		stopB()
	}
}

// TestHTTPSourceRefetchAfter416: a 416 to a resumed range asks for the
// whole content again, and the idle timeout of that new request is reset
// by its own data. The first request's timer, left running, cut a refetch
// that took longer than the timeout however steadily its data came.
func TestHTTPSourceRefetchAfter416(t *testing.T) {
	const idle = 300 * time.Millisecond
	body := bytes.Repeat([]byte("x"), 40<<10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", `"v1"`)
		if r.Header.Get("Range") != "" {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", len(body)))
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		// Paced by the server, well inside the idle timeout, for about
		// three times it in all.
		for b := body; len(b) > 0; b = b[1<<10:] {
			if _, err := w.Write(b[:1<<10]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			time.Sleep(idle / 12)
		}
	}))
	defer srv.Close()
	src := manager.HTTPSource(nil, idle).(manager.RangeSource)
	var got bytes.Buffer
	var starts []manager.RangeStart
	err := src.FetchRange(context.Background(), srv.URL+"/b", manager.ResumeFrom{Offset: 100 << 10, Validator: manager.Validator{ETag: `"v1"`}}, &got,
		func(s manager.RangeStart) error { starts = append(starts, s); return nil })
	if err != nil || !bytes.Equal(got.Bytes(), body) {
		t.Fatalf("416, then the whole content: %d of %d bytes, %v", got.Len(), len(body), err)
	}
	if len(starts) != 1 || starts[0].Offset != 0 {
		t.Errorf("started %+v, want once from 0", starts)
	}
}

// TestResumedMixFetchedWhole: a server that answers If-Range with the rest
// of another version under the same ETag makes a resumed download a mix of
// two. With --sha256, the mix fails its digest; the owner then fetches the
// whole content once from 0, and publishes the right bytes.
func TestResumedMixFetchedWhole(t *testing.T) {
	good := make([]byte, 16<<20)
	other := make([]byte, len(good))
	for i := range good {
		good[i], other[i] = byte(i*7/5), byte(i*3/2)
	}
	sum := sha256.Sum256(good)
	b, e, rec, ranges := resumedMix(t, good, other, "/b.bin", hex.EncodeToString(sum[:]))
	p, _ := b.Abs(e)
	got, err := os.ReadFile(p)
	if err != nil || !bytes.Equal(got, good) {
		t.Fatalf("published %d bytes (%v), equal to the right version: %v", len(got), err, bytes.Equal(got, good))
	}
	if len(ranges) != 3 || ranges[1] == "" || ranges[2] != "" {
		t.Errorf("requests with Range %q: want the first, a resumed one, then one whole", ranges)
	}
	if !rec.said("does not match --sha256; fetching it whole once") {
		t.Errorf("the refetch was not said: %q", rec.messages())
	}
}

// resumedMix serves good to a first owner until 60 % of it and holds that
// response until the owner is stopped at its checkpoint; a request with
// Range then gets the rest of other under the same ETag, and one without
// gets good whole. A second owner resumes the entry of path; resumedMix
// returns it, its READY entry, its log and the Range headers of the
// requests in order.
func resumedMix(t *testing.T, good, other []byte, path, sha string) (*manager.Manager, state.Entry, *logRecorder, []string) {
	t.Helper()
	var mu sync.Mutex
	var ranges []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		ranges = append(ranges, r.Header.Get("Range"))
		n := len(ranges)
		mu.Unlock()
		w.Header().Set("ETag", `"v1"`)
		switch {
		case n == 1: // the first owner's, held until it is stopped
			w.Header().Set("Content-Length", itoa(len(good)))
			w.Write(good[:len(good)*6/10])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		case r.Header.Get("Range") != "": // the rest, of another version
			http.ServeContent(w, r, "b", resumeModTime, bytes.NewReader(other))
		default:
			http.ServeContent(w, r, "b", resumeModTime, bytes.NewReader(good))
		}
	}))
	t.Cleanup(srv.Close)
	root := t.TempDir()
	rec := &logRecorder{}
	hosts := newResumeHosts(root, rec.logger())
	key := mustKey(t, srv.URL+path, sha)
	hosts.interruptAtCheckpoint(t, key, 1001)
	b, stopB := hosts.start(t, 1002)
	t.Cleanup(func() { stopB() })
	if _, err := b.Get(context.Background(), "run2", key, manager.Detached()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := b.Wait(ctx, key)
	if err != nil || e.Stage != state.Ready {
		t.Fatalf("after a resumed mix: %+v %v; want READY", e, err)
	}
	mu.Lock()
	defer mu.Unlock()
	return b, e, rec, slices.Clone(ranges)
}

// tarGzOf makes a tar.gz of n files of size bytes each, stored
// (uncompressed deflate): two seeds give archives of one length.
func tarGzOf(t *testing.T, seed byte, n, size int) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.NoCompression)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(zw)
	data := make([]byte, size)
	x := uint32(seed) + 1
	for i := range n {
		for j := range data {
			x = x*1664525 + 1013904223
			data[j] = byte(x >> 24)
		}
		if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("f%d", i), Mode: 0o644, Size: int64(size), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
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

// TestCutArchiveResumedInTheSameGeneration: a tar.gz whose first response
// is cut off mid-way is resumed by the same owner's next attempt, which
// unpacks the spool again from its first byte into a fresh tree. It
// failed for good as "duplicate member" over the tree the first attempt
// had half made.
func TestCutArchiveResumedInTheSameGeneration(t *testing.T) {
	body := tarGzOf(t, 1, 4, 1<<20)
	var mu sync.Mutex
	var ranges []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		ranges = append(ranges, r.Header.Get("Range"))
		n := len(ranges)
		mu.Unlock()
		w.Header().Set("ETag", `"v1"`)
		if n == 1 {
			w.Header().Set("Content-Length", itoa(len(body)))
			w.Write(body[:len(body)*6/10])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler) // the connection drops mid-body
		}
		http.ServeContent(w, r, "a.tar.gz", resumeModTime, bytes.NewReader(body))
	}))
	defer srv.Close()
	root := t.TempDir()
	m := newManager(t, root, func(c *manager.Config) { c.Retries = 2 })
	key := mustKey(t, srv.URL+"/a.tar.gz", "")
	e, err := getWait(t, m, "run", key)
	if err != nil || e.Stage != state.Ready {
		t.Fatalf("after a cut first response: %+v %v; want READY", e, err)
	}
	p, _ := m.Abs(e)
	for i := range 4 {
		if fi, err := os.Stat(filepath.Join(p, fmt.Sprintf("f%d", i))); err != nil || fi.Size() != 1<<20 {
			t.Errorf("f%d: %v %v", i, fi, err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ranges) != 2 || ranges[1] == "" {
		t.Errorf("requests with Range %q: want the cut one, then the rest", ranges)
	}
}

// TestResumedArchiveMixFetchedWhole: without --sha256, a resumed tar.gz
// whose rest came from another version under the same validator fails
// its gzip checksum (ErrMalformed); that is not taken for a bad archive
// at once: it is fetched whole once, and published right.
func TestResumedArchiveMixFetchedWhole(t *testing.T) {
	good, other := tarGzOf(t, 1, 16, 1<<20), tarGzOf(t, 2, 16, 1<<20)
	if len(good) != len(other) {
		t.Fatalf("setup: versions of %d and %d bytes", len(good), len(other))
	}
	_, _, rec, ranges := resumedMix(t, good, other, "/b.tar.gz", "")
	if len(ranges) != 3 || ranges[1] == "" || ranges[2] != "" {
		t.Errorf("requests with Range %q: want the first, a resumed one, then one whole", ranges)
	}
	if !rec.said("the resumed archive is malformed; fetching it whole once") {
		t.Errorf("the refetch was not said: %q", rec.messages())
	}
}
