package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// rangeServer serves one body with http.ServeContent (Range, If-Range,
// ETag, Last-Modified) and counts the body bytes it sends. Its first
// request sends at most hold bytes, then waits until the client goes away.
type rangeServer struct {
	*httptest.Server
	mu       sync.Mutex
	body     []byte
	etag     string
	noRange  bool
	sent     atomic.Int64
	requests []served
	hold     int64
	held     chan struct{} // closed once the first request sent hold bytes
}

type served struct {
	Range  string
	Status int
}

func newRangeServer(t *testing.T, body []byte, etag string, hold int64) *rangeServer {
	s := &rangeServer{body: body, etag: etag, hold: hold, held: make(chan struct{})}
	modtime := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		i := len(s.requests)
		s.requests = append(s.requests, served{Range: r.Header.Get("Range")})
		body, etag, noRange := s.body, s.etag, s.noRange
		s.mu.Unlock()
		if noRange {
			r.Header.Del("Range")
			r.Header.Del("If-Range")
		}
		if etag != "" {
			w.Header().Set("ETag", etag)
		}
		cw := &countingWriter{ResponseWriter: w, s: s, req: i, limit: -1, done: r.Context().Done()}
		if i == 0 && s.hold > 0 {
			cw.limit = s.hold
		}
		http.ServeContent(cw, r, "b.bin", modtime, bytes.NewReader(body))
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *rangeServer) served() []served {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]served(nil), s.requests...)
}

func (s *rangeServer) set(body []byte, etag string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.body, s.etag = body, etag
}

type countingWriter struct {
	http.ResponseWriter
	s     *rangeServer
	req   int
	limit int64 // body bytes this response may send; -1: all
	n     int64
	done  <-chan struct{}
}

func (c *countingWriter) WriteHeader(code int) {
	c.s.mu.Lock()
	c.s.requests[c.req].Status = code
	c.s.mu.Unlock()
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.limit >= 0 && c.n+int64(len(p)) >= c.limit {
		p = p[:c.limit-c.n]
		n, err := c.ResponseWriter.Write(p)
		c.n += int64(n)
		c.s.sent.Add(int64(n))
		c.ResponseWriter.(http.Flusher).Flush()
		close(c.s.held)
		if err == nil {
			<-c.done // the client went away
		}
		return n, io.ErrClosedPipe
	}
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	c.s.sent.Add(int64(n))
	return n, err
}

// resumeSize is the size of the bundles of the resume tests.
func resumeSize() int {
	if testing.Short() {
		return 20 << 20
	}
	return 200 << 20
}

// tarGz makes a tar.gz of one random file of n bytes; it returns the
// archive and the file's digest.
func tarGz(t *testing.T, n int) ([]byte, string) {
	t.Helper()
	data := make([]byte, n)
	rand.NewChaCha8([32]byte{9}).Read(data)
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: "data/blob.bin", Mode: 0o644, Size: int64(n), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write(data)
	tw.Close()
	zw.Close()
	return buf.Bytes(), hexSum(data)
}

// stagingOf returns the staging directory of generation gen in root.
func stagingOf(t *testing.T, root string, gen int) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(root, "staging", fmt.Sprintf("*-g%d", gen)))
	if len(m) != 1 {
		return ""
	}
	return m[0]
}

// checkpointOffset reads the offset of a staging directory's checkpoint
// (0: none).
func checkpointOffset(dir string) int64 {
	var c struct {
		Offset int64 `json:"offset"`
		Raw    string
	}
	b, err := os.ReadFile(filepath.Join(dir, "checkpoint.json"))
	if err != nil || json.Unmarshal(b, &c) != nil {
		return 0
	}
	return c.Offset
}

// awaitCheckpoint waits until generation 1 of root checkpointed at least
// min bytes, and returns its staging directory.
func awaitCheckpoint(t *testing.T, root string, min int64) string {
	t.Helper()
	var dir string
	waitFor(t, fmt.Sprintf("a checkpoint past %d bytes", min), func() bool {
		dir = stagingOf(t, root, 1)
		return dir != "" && checkpointOffset(dir) >= min
	})
	return dir
}

type getProc struct {
	cmd    *exec.Cmd
	out    *bufio.Reader
	stderr *strings.Builder
}

func startGet(t *testing.T, args ...string) *getProc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &getProc{cmd: cmd, out: bufio.NewReader(out), stderr: &strings.Builder{}}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGCONT)
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return p
}

// path waits for the get to print its path and exit 0.
func (p *getProc) path(t *testing.T) string {
	t.Helper()
	line, err := p.out.ReadString('\n')
	if werr := p.cmd.Wait(); werr != nil || err != nil {
		t.Fatalf("get: %v %v\n%s", werr, err, p.stderr.String())
	}
	return strings.TrimSpace(line)
}

// resumeRig is one bundle (a plain file or a tar.gz) served by a
// rangeServer whose first request stops at 60 %.
type resumeRig struct {
	srv      *rangeServer
	body     []byte
	want     string // digest of the content: the file, or the archive's one file
	archive  bool
	root     string
	url      string
	ckptFrom int64 // the checkpoint to await before the owner is stopped
}

func newResumeRig(t *testing.T, archive bool, size int, etag string) *resumeRig {
	r := &resumeRig{archive: archive, root: t.TempDir()}
	if archive {
		r.body, r.want = tarGz(t, size)
	} else {
		r.body = randomBody(size)
		r.want = hexSum(r.body)
	}
	hold := int64(len(r.body)) * 6 / 10
	r.srv = newRangeServer(t, r.body, etag, hold)
	r.url = r.srv.URL + "/b.bin"
	if archive {
		r.url = r.srv.URL + "/b.tar.gz"
	}
	// Checkpoints come every 8 MiB, one at a time: by the hold, the owner
	// has one within 16 MiB of it.
	r.ckptFrom = max(hold-16<<20, 64<<10)
	return r
}

func (r *resumeRig) args(extra ...string) []string {
	return append([]string{"--root", r.root, "get", "--sha256", hexSum(r.body)}, append(extra, r.url)...)
}

// verify checks the published content and reports the bytes sent, as a
// multiple of the bundle's size.
func (r *resumeRig) verify(t *testing.T, p string, wantGen uint64, want string) float64 {
	t.Helper()
	if r.archive {
		p = filepath.Join(p, "data", "blob.bin")
	}
	if got := fileSum(t, p); got != want {
		t.Errorf("published content does not verify")
	}
	e := onlyEntry(t, readState(t, r.root))
	if e.Stage != state.Ready || e.Generation != wantGen {
		t.Errorf("entry %s gen %d, want READY gen %d", e.Stage, e.Generation, wantGen)
	}
	ratio := float64(r.srv.sent.Load()) / float64(len(r.body))
	t.Logf("bytes sent: %.3f × the bundle's %d bytes; requests %+v", ratio, len(r.body), r.srv.served())
	return ratio
}

func (r *resumeRig) awaitRegistered(t *testing.T, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d dependents", n), func() bool {
		for _, e := range readState(t, r.root).Entries {
			return len(e.Dependents) == n
		}
		return false
	})
}

// secondRanged reports whether the second request asked for a range and
// got one.
func (r *resumeRig) secondRanged(t *testing.T) bool {
	t.Helper()
	s := r.srv.served()
	if len(s) < 2 {
		t.Fatalf("requests %+v, want 2", s)
	}
	return s[1].Range != "" && s[1].Status == http.StatusPartialContent
}

// TestE2EResumeAfterKill: the owner is SIGKILLed at 60 % of a bundle and
// of a tar.gz; the waiter takes over, copies the checkpointed prefix,
// fetches the rest with Range and publishes the right content, and the
// server sends at most 1.5 × the size in all.
func TestE2EResumeAfterKill(t *testing.T) {
	for _, archive := range []bool{false, true} {
		t.Run(map[bool]string{false: "file", true: "tar.gz"}[archive], func(t *testing.T) {
			r := newResumeRig(t, archive, resumeSize(), `"v1"`)
			args := r.args("--download-timeout", "1h")
			owner := startGet(t, args...)
			<-r.srv.held
			awaitCheckpoint(t, r.root, r.ckptFrom)
			waiter := startGet(t, args...)
			r.awaitRegistered(t, 2)
			if err := owner.cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			owner.cmd.Wait()
			ratio := r.verify(t, waiter.path(t), 2, r.want)
			if !r.secondRanged(t) {
				t.Errorf("the takeover did not resume: %+v", r.srv.served())
			}
			if ratio > 1.5 {
				t.Errorf("the server sent %.2f × the size, want ≤ 1.5", ratio)
			}
			noStaging(t, r.root)
		})
	}
}

// TestE2EResumeStoppedOwner: the owner is SIGSTOPped at 60 % past the
// download timeout; the waiter takes over and resumes. Then the stopped
// owner continues: it finds itself superseded, changes nothing of its
// successor's, and the server sent at most 1.6 × the size.
func TestE2EResumeStoppedOwner(t *testing.T) {
	for _, archive := range []bool{false, true} {
		t.Run(map[bool]string{false: "file", true: "tar.gz"}[archive], func(t *testing.T) {
			r := newResumeRig(t, archive, resumeSize(), `"v1"`)
			args := r.args("--download-timeout", "3s", "--lock-lease", "5s")
			owner := startGet(t, args...)
			<-r.srv.held
			awaitCheckpoint(t, r.root, r.ckptFrom)
			waiter := startGet(t, args...)
			r.awaitRegistered(t, 2)
			if err := owner.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			p := waiter.path(t)
			r.verify(t, p, 2, r.want)
			if !r.secondRanged(t) {
				t.Errorf("the takeover did not resume: %+v", r.srv.served())
			}
			published := treeSums(t, filepath.Dir(p))
			if err := owner.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			if got := owner.path(t); got != p {
				t.Errorf("the resumed owner printed %q, want %q", got, p)
			}
			ratio := r.verify(t, p, 2, r.want)
			if after := treeSums(t, filepath.Dir(p)); !equalMaps(after, published) {
				t.Errorf("the resumed owner changed the published entry")
			}
			if ratio > 1.6 {
				t.Errorf("the server sent %.2f × the size, want ≤ 1.6", ratio)
			}
			noStaging(t, r.root)
		})
	}
}

// treeSums maps every file under dir to its digest.
func treeSums(t *testing.T, dir string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		sums[p] = fileSum(t, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sums
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestE2EResumeRestarts: every case in which the prefix must not be used
// restarts from 0 and publishes the right content, never a mix: the file
// changed on the server (new ETag), a server without Range support, a
// weak ETag, a prefix corrupted after its checkpoint. And an interrupted
// get (SIGINT) keeps its staging, from which the next get resumes.
func TestE2EResumeRestarts(t *testing.T) {
	size := 20 << 20
	kill := func(t *testing.T, r *resumeRig, owner *getProc) {
		t.Helper()
		if err := owner.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		owner.cmd.Wait()
	}
	t.Run("changed", func(t *testing.T) {
		r := newResumeRig(t, false, size, `"v1"`)
		args := []string{"--root", r.root, "get", "--download-timeout", "1h", r.url}
		owner := startGet(t, args...)
		<-r.srv.held
		awaitCheckpoint(t, r.root, r.ckptFrom)
		body2 := randomBody(size + 4096)
		body2[0] ^= 0xff // not the first body's prefix... nor its length
		r.srv.set(body2, `"v2"`)
		waiter := startGet(t, args...)
		r.awaitRegistered(t, 2)
		kill(t, r, owner)
		ratio := r.verify(t, waiter.path(t), 2, hexSum(body2))
		if s := r.srv.served(); len(s) != 2 || s[1].Status != http.StatusOK {
			t.Errorf("requests %+v: want the second answered 200 (If-Range did not match)", s)
		}
		t.Logf("changed file: %.2f × sent", ratio)
		noStaging(t, r.root)
	})
	t.Run("no-range", func(t *testing.T) {
		r := newResumeRig(t, false, size, `"v1"`)
		r.srv.mu.Lock()
		r.srv.noRange = true
		r.srv.mu.Unlock()
		args := r.args("--download-timeout", "1h")
		owner := startGet(t, args...)
		<-r.srv.held
		awaitCheckpoint(t, r.root, r.ckptFrom)
		waiter := startGet(t, args...)
		r.awaitRegistered(t, 2)
		kill(t, r, owner)
		r.verify(t, waiter.path(t), 2, r.want)
		if s := r.srv.served(); len(s) != 2 || s[1].Range == "" || s[1].Status != http.StatusOK {
			t.Errorf("requests %+v: want the second to ask for a range and get 200", s)
		}
		noStaging(t, r.root)
	})
	t.Run("weak-etag", func(t *testing.T) {
		r := newResumeRig(t, false, size, `W/"v1"`)
		args := r.args("--download-timeout", "1h")
		owner := startGet(t, args...)
		<-r.srv.held
		waitFor(t, "the owner's staging", func() bool { return stagingOf(t, r.root, 1) != "" })
		waiter := startGet(t, args...)
		r.awaitRegistered(t, 2)
		kill(t, r, owner)
		if off := checkpointOffset(stagingOf(t, r.root, 1)); off != 0 {
			t.Errorf("a checkpoint at %d under a weak ETag", off)
		}
		r.verify(t, waiter.path(t), 2, r.want)
		if s := r.srv.served(); len(s) != 2 || s[1].Range != "" {
			t.Errorf("requests %+v: want the second without Range", s)
		}
		noStaging(t, r.root)
	})
	t.Run("corrupt-prefix", func(t *testing.T) {
		r := newResumeRig(t, false, size, `"v1"`)
		args := r.args("--download-timeout", "1h")
		owner := startGet(t, args...)
		<-r.srv.held
		dir := awaitCheckpoint(t, r.root, r.ckptFrom)
		kill(t, r, owner)
		f, err := os.OpenFile(filepath.Join(dir, "content"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		f.ReadAt(b, 1<<20)
		b[0] ^= 0x01
		f.WriteAt(b, 1<<20)
		f.Close()
		// A new get after the owner died.
		r.verify(t, startGet(t, args...).path(t), 2, r.want)
		if s := r.srv.served(); len(s) != 2 || s[1].Range != "" {
			t.Errorf("requests %+v: want the second without Range", s)
		}
		noStaging(t, r.root)
	})
	t.Run("interrupted", func(t *testing.T) {
		r := newResumeRig(t, true, size, `"v1"`)
		args := r.args()
		owner := startGet(t, args...)
		<-r.srv.held
		dir := awaitCheckpoint(t, r.root, r.ckptFrom)
		owner.cmd.Process.Signal(syscall.SIGINT)
		if err := owner.cmd.Wait(); owner.cmd.ProcessState.ExitCode() != 130 {
			t.Fatalf("after SIGINT: %v, want exit 130\n%s", err, owner.stderr.String())
		}
		if checkpointOffset(dir) < r.ckptFrom {
			t.Fatalf("the interrupted get did not keep its checkpointed staging")
		}
		ratio := r.verify(t, startGet(t, args...).path(t), 2, r.want)
		if !r.secondRanged(t) {
			t.Errorf("the next get did not resume: %+v", r.srv.served())
		}
		if ratio > 1.5 {
			t.Errorf("the server sent %.2f × the size, want ≤ 1.5", ratio)
		}
		noStaging(t, r.root)
	})
}
