package manager_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

func quietLog() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	if os.Getenv("DT_VERBOSE") != "" {
		l.SetOutput(os.Stderr)
		l.SetLevel(logrus.DebugLevel)
	}
	return l
}

func newManager(t testing.TB, root string, adjust ...func(*manager.Config)) *manager.Manager {
	t.Helper()
	m, _ := startManager(t, root, adjust...)
	return m
}

func mustKey(t testing.TB, src, sha string) state.Key {
	t.Helper()
	k, err := manager.ParseKey(src, sha)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func getWait(t testing.TB, m *manager.Manager, dep string, k state.Key) (state.Entry, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := m.Get(ctx, dep, k); err != nil {
		t.Fatal(err)
	}
	return m.Wait(ctx, k)
}

// server serves body at /b, counting requests; behaviour can be changed.
type server struct {
	*httptest.Server
	body     []byte
	requests atomic.Int32
	mu       sync.Mutex
	handle   func(w http.ResponseWriter, r *http.Request) bool // true: handled
}

func newServer(t testing.TB, body []byte) *server {
	s := &server{body: body}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		s.mu.Lock()
		h := s.handle
		s.mu.Unlock()
		if h != nil && h(w, r) {
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(s.body)))
		w.Write(s.body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *server) set(h func(w http.ResponseWriter, r *http.Request) bool) {
	s.mu.Lock()
	s.handle = h
	s.mu.Unlock()
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(b)
	return b
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestGetFileBundle(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root)
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	e, err := getWait(t, m, "run1", k)
	if err != nil {
		t.Fatal(err)
	}
	p, err := m.Abs(e)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(p, "hello", "README.txt"))
	if err != nil || string(b) != "hello from depcache\n" {
		t.Fatalf("content: %q %v", b, err)
	}
	if e.SizeBytes <= 0 || e.Owner != nil || e.Generation != 1 {
		t.Errorf("entry = %+v", e)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(p), "meta.json")); err != nil {
		t.Errorf("no metadata file: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "staging")); len(ents) != 0 {
		t.Errorf("staging litter: %v", ents)
	}
	// A second Get is a hit: no new generation.
	e2, err := getWait(t, m, "run2", k)
	if err != nil || e2.Generation != 1 || len(e2.Dependents) != 2 {
		t.Fatalf("second get: %+v %v", e2, err)
	}
}

// Managers in one process on one root: one download.
func TestDedupInProcess(t *testing.T) {
	body := randomBytes(3 << 20)
	srv := newServer(t, body)
	root := t.TempDir()
	k := mustKey(t, srv.URL+"/b", sum(body))
	var wg sync.WaitGroup
	paths := make([]string, 6)
	for i := range paths {
		m := newManager(t, root)
		wg.Add(1)
		go func() {
			defer wg.Done()
			e, err := getWait(t, m, fmt.Sprintf("run%d", i), k)
			if err != nil {
				t.Error(err)
				return
			}
			paths[i], _ = m.Abs(e)
		}()
	}
	wg.Wait()
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d downloads, want 1", n)
	}
	for _, p := range paths {
		if p != paths[0] {
			t.Errorf("paths differ: %v", paths)
		}
	}
	got, err := os.ReadFile(paths[0])
	if err != nil || sum(got) != sum(body) {
		t.Fatalf("content does not verify: %v", err)
	}
}

func TestFailures(t *testing.T) {
	body := randomBytes(64 << 10)
	tests := []struct {
		name   string
		sha    string
		handle func(w http.ResponseWriter, r *http.Request) bool
		wmsg   string
		wreq   int32 // requests made: 1 for permanent errors, 1+retries otherwise
	}{
		{name: "404", handle: func(w http.ResponseWriter, r *http.Request) bool { http.NotFound(w, r); return true },
			wmsg: "404", wreq: 1},
		{name: "500 retried then failed", handle: func(w http.ResponseWriter, r *http.Request) bool {
			http.Error(w, "boom", http.StatusInternalServerError)
			return true
		}, wmsg: "500", wreq: 3},
		{name: "connection reset", handle: func(w http.ResponseWriter, r *http.Request) bool {
			w.Header().Set("Content-Length", "100000")
			w.WriteHeader(200)
			w.Write(body[:1000])
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.(*net.TCPConn).SetLinger(0)
			conn.Close()
			return true
		}, wmsg: "after", wreq: 3},
		{name: "digest mismatch", sha: strings.Repeat("ab", 32), wmsg: "sha256 mismatch", wreq: 1},
		{name: "server stalls mid-body", handle: func(w http.ResponseWriter, r *http.Request) bool {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(200)
			w.Write(body[:1000])
			w.(http.Flusher).Flush()
			<-r.Context().Done() // the idle timeout must end it
			return true
		}, wmsg: "no data for", wreq: 3},
		{name: "server never answers", handle: func(w http.ResponseWriter, r *http.Request) bool {
			<-r.Context().Done() // no headers, ever: the idle timeout must end it
			return true
		}, wmsg: "no data for", wreq: 3},
		{name: "body shorter than Content-Length", handle: func(w http.ResponseWriter, r *http.Request) bool {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)+500))
			w.WriteHeader(200)
			w.Write(body)
			return true
		}, wmsg: "unexpected EOF", wreq: 3},
		{name: "wrong content", sha: sum(randomBytes(10)), handle: func(w http.ResponseWriter, r *http.Request) bool {
			w.Write([]byte("not the bundle you want"))
			return true
		}, wmsg: "sha256 mismatch", wreq: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := newServer(t, body)
			srv.set(tc.handle)
			root := t.TempDir()
			m := newManager(t, root, func(c *manager.Config) {
				c.Retries = 2
				h := manager.HTTPSource(nil, 200*time.Millisecond) // a short idle timeout for the stall
				c.Sources = map[string]manager.Source{"http": h, "https": h}
			})
			k := mustKey(t, srv.URL+"/b", tc.sha)
			e, err := getWait(t, m, "run1", k)
			var fe *manager.FailedError
			if !errors.As(err, &fe) || !errors.Is(err, manager.ErrFailed) {
				t.Fatalf("err = %v, want FailedError", err)
			}
			if !strings.Contains(fe.Reason, tc.wmsg) || e.Stage != state.Failed {
				t.Errorf("reason %q (stage %s), want it to mention %q", fe.Reason, e.Stage, tc.wmsg)
			}
			if n := srv.requests.Load(); n != tc.wreq {
				t.Errorf("%d requests, want %d", n, tc.wreq)
			}
			for _, d := range []string{"entries", "staging"} {
				if ents, _ := os.ReadDir(filepath.Join(root, d)); len(ents) != 0 {
					t.Errorf("%s not empty after a failure: %v", d, ents)
				}
			}
		})
	}
}

// A FAILED entry is retried once its cool-down has passed.
func TestRetryAfterCooldown(t *testing.T) {
	body := randomBytes(1000)
	srv := newServer(t, body)
	srv.set(func(w http.ResponseWriter, r *http.Request) bool { http.NotFound(w, r); return true })
	m := newManager(t, t.TempDir(), func(c *manager.Config) { c.Policy.FailureCooldown = 50 * time.Millisecond })
	k := mustKey(t, srv.URL+"/b", "")
	if _, err := getWait(t, m, "run1", k); !errors.Is(err, manager.ErrFailed) {
		t.Fatalf("err = %v, want FAILED", err)
	}
	srv.set(nil) // the server is fixed
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		e, err := m.Wait(ctx, k) // the loop retries the entry: it has a dependent
		if err == nil {
			if e.Failures != 0 || e.Stage != state.Ready {
				t.Fatalf("entry = %+v", e)
			}
			break
		}
		if !errors.Is(err, manager.ErrFailed) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // poll until the cool-down passes
	}
	if n := srv.requests.Load(); n != 2 {
		t.Errorf("%d requests, want 2", n)
	}
}

// Releasing the last dependent cancels the download within a tick, the
// entry disappears, and a later Get downloads again.
func TestCancelOnRelease(t *testing.T) {
	body := randomBytes(1 << 20)
	srv := newServer(t, body)
	started := make(chan struct{}, 10)
	cancelled := make(chan struct{}, 10)
	srv.set(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(200)
		w.Write(body[:1000])
		w.(http.Flusher).Flush()
		started <- struct{}{}
		<-r.Context().Done() // stall until the client goes away
		cancelled <- struct{}{}
		return true
	})
	root := t.TempDir()
	m := newManager(t, root)
	k := mustKey(t, srv.URL+"/b", "")
	ctx := context.Background()
	if _, err := m.Get(ctx, "run1", k); err != nil {
		t.Fatal(err)
	}
	<-started
	if err := m.Release(ctx, "run1", k); err != nil {
		t.Fatal(err)
	}
	<-cancelled // the download stopped: the server saw the client leave
	st, err := m.Entries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Get(k) != nil {
		t.Fatal("entry still there after its last dependent left")
	}
	if err := m.Release(ctx, "run1", k); !errors.Is(err, manager.ErrNotRegistered) {
		t.Errorf("second release: %v, want ErrNotRegistered", err)
	}
	srv.set(nil)
	e, err := getWait(t, m, "run2", k)
	if err != nil {
		t.Fatal(err)
	}
	// The new incarnation must not reuse the cancelled one's generation:
	// it is the fencing token and names the staging directory.
	if e.Generation != 2 {
		t.Errorf("generation %d after a cancelled generation 1, want 2", e.Generation)
	}
	if n := srv.requests.Load(); n != 2 {
		t.Errorf("%d requests, want 2", n)
	}
	waitNoStaging(t, root)
}

func waitNoStaging(t testing.TB, root string) {
	t.Helper()
	staging := func() []os.DirEntry { ents, _ := os.ReadDir(filepath.Join(root, "staging")); return ents }
	waitFor(t, 10*time.Second, func() bool { return len(staging()) == 0 },
		func() string { return fmt.Sprintf("staging litter: %v", staging()) })
}

func TestParseKey(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		werr     bool
	}{
		{"HTTP://Example.COM:80/a.tgz#frag", "http://example.com/a.tgz", false},
		{"https://example.com:443", "https://example.com/", false},
		{"https://example.com:8443/x?y=1", "https://example.com:8443/x?y=1", false},
		{"file:///tmp/../tmp/x", "file:///tmp/x", false},
		// RFC 3986 6.2.2: escaped unreserved characters are the characters,
		// escapes are upper case; an escaped "/" stays one.
		{"https://example.com/%7Euser/a%2db%2Ec", "https://example.com/~user/a-b.c", false},
		{"https://example.com/~user/a-b.c", "https://example.com/~user/a-b.c", false},
		{"https://example.com/a%2fb%3a?q=%7e%2f%41", "https://example.com/a%2Fb%3A?q=~%2FA", false},
		{"https://example.com/a%2Fb", "https://example.com/a%2Fb", false},
		{"https://example.com/%25", "https://example.com/%25", false},
		// 6.2.2.3: dot segments go, escaped ones too; an escaped "/" is no
		// separator, and "..." is a name.
		{"http://h/./small.txt", "http://h/small.txt", false},
		{"http://h/x/../small.txt", "http://h/small.txt", false},
		{"http://h/a/b/../../../c", "http://h/c", false},
		{"http://h/a/%2E%2E/b", "http://h/b", false},
		{"http://h/a/.", "http://h/a/", false},
		{"http://h/a/b/..", "http://h/a/", false},
		{"http://h/..", "http://h/", false},
		{"http://h/a%2F../b", "http://h/a%2F../b", false},
		{"http://h/a/.../b/.x/..y", "http://h/a/.../b/.x/..y", false},
		{"http://h/a//b/./c?x=/../", "http://h/a//b/c?x=/../", false},
		// The kept-packed key as ls shows it names that key again.
		{"https://example.com/a.zip#no-unpack", "https://example.com/a.zip#no-unpack", false},
		{"HTTPS://Example.com:443/a.zip#no-unpack", "https://example.com/a.zip#no-unpack", false},
		{"file:///tmp/a.tar#no-unpack", "file:///tmp/a.tar#no-unpack", false},
		{"https://example.com/a.zip#other", "https://example.com/a.zip", false},
		{"file:///tmp/odd%23no-unpack", "", true}, // a path that would read as a kept-packed key
		{"file:///tmp/a%3Fb", "", true},           // found by FuzzParseKey: not named back by its source
		{"file:///tmp/a%23b#no-unpack", "", true},
		{"file:///tmp/a%2541", "", true},
		{"file://relative/x", "", true},
		{"ftp://example.com/x", "", true},
		{"/just/a/path", "", true},
		{"http:///nohost", "", true},
		{"https://:443", "", true}, // found by FuzzParseKey: normalised to "https:///"
		{"http://:8080/x", "", true},
		{"http://example.com/\x7f", "", true},
		{"https://user:secret@example.com/a.tgz", "", true}, // credentials would be stored and shown
		{"https://user@example.com/a.tgz", "", true},
		{"docker://alpine", "docker://index.docker.io/library/alpine:latest", false},
		{"docker://127.0.0.1:5000/team/app", "docker://127.0.0.1:5000/team/app:latest", false},
		{"docker://127.0.0.1:5000/team/app@sha256:" + strings.Repeat("a", 64), "docker://127.0.0.1:5000/team/app@sha256:" + strings.Repeat("a", 64), false},
		{"docker://UPPER/case", "", true},
		{"docker-build://relative/ctx", "", true},
		{"docker-build:///nonexistent/ctx", "", true},
		// A built image as ls prints it names it again (rm, release).
		{"docker-build://sha256:" + strings.Repeat("Ab", 32), "docker-build://sha256:" + strings.Repeat("ab", 32), false},
		{"DOCKER-BUILD://SHA256:" + strings.Repeat("0", 64), "docker-build://sha256:" + strings.Repeat("0", 64), false},
		{"docker-build://sha256:" + strings.Repeat("a", 63), "", true},
		{"docker-build://sha256:" + strings.Repeat("g", 64), "", true},
	} {
		k, err := manager.ParseKey(tc.in, "")
		if (err != nil) != tc.werr {
			t.Errorf("%q: err = %v, want error %v", tc.in, err, tc.werr)
			continue
		}
		if err != nil {
			if !errors.Is(err, manager.ErrBadSource) {
				t.Errorf("%q: %v does not wrap ErrBadSource", tc.in, err)
			}
			continue
		}
		if k.Source != tc.want {
			t.Errorf("%q → %q, want %q", tc.in, k.Source, tc.want)
		}
	}
	if _, err := manager.ParseKey("https://x/y", "ABC"); !errors.Is(err, state.ErrBadKey) {
		t.Errorf("bad sha256 accepted: %v", err)
	}
}

// TestDiskFull: a bundle larger than the disk-full rig's filesystem fails
// with ENOSPC named in the reason, publishes nothing, leaves no staging data
// and a state file that parses.
func TestDiskFull(t *testing.T) {
	dir := rigtest.DiskFull(t)
	root, err := os.MkdirTemp(dir, "root-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	body := randomBytes(12 << 20)
	srv := newServer(t, body)
	m := newManager(t, root)
	k := mustKey(t, srv.URL+"/big", "")
	e, err := getWait(t, m, "run1", k)
	var fe *manager.FailedError
	if !errors.As(err, &fe) || !strings.Contains(fe.Reason, "no space left on device") {
		t.Fatalf("err = %v, want FAILED naming the full disk", err)
	}
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d requests: a full disk should not be retried", n)
	}
	if e.Stage != state.Failed {
		t.Errorf("stage %s", e.Stage)
	}
	if _, err := state.DecodeFile(root, state.StateFile); err != nil {
		t.Fatalf("state does not parse after the full disk: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "entries")); len(ents) != 0 {
		t.Errorf("something was published: %v", ents)
	}
	waitNoStaging(t, root)
}

// A hostile archive fails the entry as permanent (a retry would fetch the
// same bytes and refuse them again), a corrupt one as transient (it may
// have been cut short), and neither writes anything outside its staging
// directory.
func TestHostileArchiveFails(t *testing.T) {
	for _, c := range []struct {
		file, reason string
		permanent    bool
	}{
		{"symlink-escape.tar", "hostile archive", true},
		{"dotdot.tar", "hostile archive", true},
		{"zip-symlink-chain.zip", "hostile archive", true},
		{"truncated.tar.gz", "corrupt archive", false},
	} {
		t.Run(c.file, func(t *testing.T) { testHostileArchiveFails(t, c.file, c.reason, c.permanent) })
	}
}

func testHostileArchiveFails(t *testing.T, file, reason string, permanent bool) {
	root := t.TempDir()
	m := newManager(t, root)
	abs, _ := filepath.Abs("../testdata/hostile/" + file)
	_, err := getWait(t, m, "run1", mustKey(t, "file://"+abs, ""))
	var fe *manager.FailedError
	if !errors.As(err, &fe) || !strings.Contains(fe.Reason, reason) {
		t.Fatalf("err = %v, want FAILED as a %s", err, reason)
	}
	if fe.Permanent != permanent || errors.Is(err, manager.ErrPermanent) != permanent {
		t.Errorf("%s: FAILED with permanent %v, want %v: %v", file, fe.Permanent, permanent, err)
	}
	ents, _ := os.ReadDir(root)
	for _, e := range ents {
		switch n := e.Name(); {
		case n == "state.json", n == "state.json.prev", n == state.ShardDir, n == state.ReserveFile, n == "staging", n == "entries", strings.HasPrefix(n, "state.lock"):
		default:
			t.Errorf("unexpected %s in the root", e.Name())
		}
	}
	waitNoStaging(t, root)
}

// TestReconcile: at start-up a READY entry without content is dropped,
// published content that no entry names is removed, staging data of a dead
// writer is removed and that of a live writer kept.
func TestReconcile(t *testing.T) {
	root := t.TempDir()
	procs, err := state.System()
	if err != nil {
		t.Fatal(err)
	}
	self := procs.Self()
	dead := self
	dead.StartTime++ // our pid, another start time: a process that is gone

	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	kept := state.Key{Kind: state.Bundle, Source: "https://example.com/kept"}
	lost := state.Key{Kind: state.Bundle, Source: "https://example.com/lost"}
	keptDir := filepath.Join("entries", kept.ID()+"-g1")
	mkfile := func(p, content string) {
		os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755)
		if err := os.WriteFile(filepath.Join(root, p), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mkfile(filepath.Join(keptDir, "content"), "kept")
	orphanDir := filepath.Join("entries", state.Key{Kind: state.Bundle, Source: "https://example.com/orphan"}.ID()+"-g1")
	mkfile(filepath.Join(orphanDir, "content"), "orphan")
	owner := func(p state.Process) string {
		b, _ := json.Marshal(map[string]any{"owner": state.Owner{Process: p, ManagerID: "x"}, "generation": 1})
		return string(b)
	}
	mkfile("staging/dead-g1/owner.json", owner(dead))
	mkfile("staging/live-g1/owner.json", owner(self))
	err = s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: kept, Stage: state.Ready, Path: filepath.Join(keptDir, "content")})
		st.Put(&state.Entry{Key: lost, Stage: state.Ready, Path: filepath.Join("entries", lost.ID()+"-g1", "content")})
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	m := newManager(t, root)
	st, err := m.Entries(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Get(kept) == nil || st.Get(lost) != nil {
		t.Errorf("entries after reconcile: kept %v, lost %v", st.Get(kept) != nil, st.Get(lost) != nil)
	}
	if c := trashContent(root); len(c) != 0 {
		t.Errorf("trash not emptied: %v", c)
	}
	for p, want := range map[string]bool{
		filepath.Join(keptDir, "content"): true,
		orphanDir:                         false,
		"staging/dead-g1":                 false,
		"staging/live-g1":                 true,
	} {
		_, err := os.Stat(filepath.Join(root, p))
		if got := err == nil; got != want {
			t.Errorf("%s exists: %v, want %v", p, got, want)
		}
	}
}

// A root whose state file is gone while content is published is refused,
// not reconciled into an empty cache.
func TestMissingStateRefused(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root)
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	if _, err := getWait(t, m, "run1", mustKey(t, "file://"+abs, "")); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(root, state.StateFile))
	m2, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m2.Start(context.Background()); !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), "doctor --rebuild") {
		t.Fatalf("Start on a root without its state: %v, want ErrCorrupt pointing to doctor --rebuild", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "entries")); len(ents) != 1 {
		t.Errorf("published content touched: %d entries left", len(ents))
	}
}

// Wait gives up with the error when the loop cannot read the state, instead
// of waiting forever.
func TestWaitReportsUnreadableState(t *testing.T) {
	body := randomBytes(1000)
	srv := newServer(t, body)
	srv.set(func(w http.ResponseWriter, r *http.Request) bool { <-r.Context().Done(); return true })
	root := t.TempDir()
	m := newManager(t, root)
	k := mustKey(t, srv.URL+"/b", "")
	if _, err := m.Get(context.Background(), "run1", k); err != nil {
		t.Fatal(err)
	}
	// Corrupt it under the lock, so that no pass in flight writes over it.
	l, err := state.NewLock(filepath.Join(root, state.LockFile), state.LockOptions{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := l.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, state.StateFile), []byte("garbage"), 0o644)
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	_, err = m.Wait(context.Background(), k)
	if !errors.Is(err, state.ErrCorrupt) {
		t.Fatalf("Wait = %v, want ErrCorrupt", err)
	}
}

// TestGroupShared: with GroupShared, what depcache creates is usable by the
// group (directories 2770, files 0660, unpacked files with the owner's bits
// for the group), whatever the umask.
func TestGroupShared(t *testing.T) {
	old := unix.Umask(0o077) // the most hostile umask
	defer unix.Umask(old)
	root := t.TempDir()
	m := newManager(t, root, func(c *manager.Config) { c.GroupShared = true })
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	e, err := getWait(t, m, "run1", mustKey(t, "file://"+abs, ""))
	if err != nil {
		t.Fatal(err)
	}
	p, _ := m.Abs(e)
	for path, want := range map[string]os.FileMode{
		filepath.Join(root, "state.json"):           0o660,
		filepath.Join(root, "entries"):              0o770 | os.ModeSetgid | os.ModeDir,
		filepath.Join(filepath.Dir(p), "meta.json"): 0o660,
		filepath.Join(p, "hello"):                   0o770 | os.ModeSetgid | os.ModeDir,
		filepath.Join(p, "hello", "README.txt"):     0o660,
		filepath.Join(root, "staging"):              0o770 | os.ModeSetgid | os.ModeDir,
	} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", path, fi.Mode(), want)
		}
	}
	// Every shard file and pack, not only the first the store wrote.
	shards, err := filepath.Glob(filepath.Join(root, state.ShardDir, "*"))
	if err != nil || len(shards) < 2 {
		t.Fatalf("shard files: %v, %v; want at least 2", shards, err)
	}
	for _, p := range shards {
		fi, err := os.Stat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			// retired by the manager's background loop since the Glob
		case err != nil:
			t.Errorf("%s: %v", p, err)
		case fi.Mode() != 0o660:
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), os.FileMode(0o660))
		}
	}
}

// TestInterruptedSweepRolledBack: a sweep killed after moving an entry's
// content into its trash but before committing leaves the entry READY in
// the state; the next start puts the content back instead of dropping the
// entry as one whose content is missing.
func TestInterruptedSweepRolledBack(t *testing.T) {
	root := t.TempDir()
	procs, err := state.System()
	if err != nil {
		t.Fatal(err)
	}
	dead := procs.Self()
	dead.StartTime++
	key := state.Key{Kind: state.Bundle, Source: "https://example.com/interrupted"}
	name := key.ID() + "-g1"
	trash := filepath.Join(root, "trash", "deadmanager")
	os.MkdirAll(filepath.Join(trash, name), 0o755)
	os.WriteFile(filepath.Join(trash, name, "content"), []byte("still needed"), 0o644)
	b, _ := json.Marshal(map[string]any{"owner": state.Owner{Process: dead, ManagerID: "deadmanager"}})
	os.WriteFile(filepath.Join(trash, "owner.json"), b, 0o644)
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: key, Stage: state.Ready, Path: filepath.Join("entries", name, "content"), SizeBytes: 12})
		return true, nil
	})
	m := newManager(t, root)
	st, err := m.Entries(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if e := st.Get(key); e == nil || e.Stage != state.Ready {
		t.Fatalf("entry after start: %+v, want it READY", e)
	}
	got, err := os.ReadFile(filepath.Join(root, "entries", name, "content"))
	if err != nil || string(got) != "still needed" {
		t.Fatalf("content not put back: %q %v", got, err)
	}
	if _, err := os.Stat(trash); !os.IsNotExist(err) {
		t.Errorf("the dead manager's trash is still there: %v", err)
	}
}

// A loop run under the caller's context stops when it ends; Wait then
// reports the context's error, not ErrNotRunning (the CLI's --timeout maps
// the former to exit 3).
func TestWaitAfterTheLoopsContextEnds(t *testing.T) {
	m, err := manager.New(manager.Config{Root: t.TempDir(), Log: quietLog(), PollInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	k := mustKey(t, "file:///nonexistent/wait-after-end", "")
	if _, err := m.Get(ctx, "job", k); err != nil {
		t.Fatal(err)
	}
	cancel()
	<-done // the loop has ended: running is false from here on
	if _, err := m.Wait(ctx, k); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait after the loop's context ended: %v, want context.Canceled", err)
	}
	if _, err := m.Wait(context.Background(), k); !errors.Is(err, manager.ErrNotRunning) {
		t.Fatalf("Wait on a stopped manager: %v, want ErrNotRunning", err)
	}
}

// An empty tar archive (what `tar cf x.tar -T /dev/null` writes: zeros,
// no header to sniff), plain or gzip, is an empty directory when its name
// says tar, without the not-an-archive warning; the same zeros under
// another name, or kept packed, stay a file.
func TestEmptyTarIsAnEmptyDirectory(t *testing.T) {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(make([]byte, 10240))
	zw.Close()
	src := t.TempDir()
	for name, b := range map[string][]byte{"empty.tar": make([]byte, 10240), "empty.tgz": gz.Bytes(), "zeros.img": make([]byte, 10240)} {
		if err := os.WriteFile(filepath.Join(src, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	root := t.TempDir()
	var log logRecorder
	m := newManager(t, root, func(c *manager.Config) { c.Log = log.logger() })
	packed, err := manager.KeepPacked(mustKey(t, "file://"+filepath.Join(src, "empty.tar"), ""))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		key state.Key
		dir bool
	}{
		{mustKey(t, "file://"+filepath.Join(src, "empty.tar"), ""), true},
		{mustKey(t, "file://"+filepath.Join(src, "empty.tgz"), ""), true},
		{mustKey(t, "file://"+filepath.Join(src, "zeros.img"), ""), false},
		{packed, false},
	} {
		e, err := getWait(t, m, "run", tc.key)
		if err != nil {
			t.Fatalf("%s: %v", tc.key.Source, err)
		}
		p, err := m.Abs(e)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.IsDir() != tc.dir {
			t.Errorf("%s: a directory %v, want %v", tc.key.Source, fi.IsDir(), tc.dir)
		}
		if tc.dir {
			if ents, err := os.ReadDir(p); err != nil || len(ents) != 0 {
				t.Errorf("%s: %v, %v; want an empty directory", tc.key.Source, ents, err)
			}
		}
	}
	if got := log.find("is named like a"); len(got) != 0 {
		t.Errorf("warned: %v", got)
	}
}
