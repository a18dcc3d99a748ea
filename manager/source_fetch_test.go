package manager_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
)

// TestSourceFetch: the plain Fetch of the built-in sources, what an
// embedder that wraps one calls (the manager itself resumes through
// FetchRange): the whole content, its size announced first, and the
// answers that no retry changes (a missing file, a directory, an HTTP 404)
// wrapped in ErrPermanent; a server error is not.
func TestSourceFetch(t *testing.T) {
	ctx := context.Background()
	body := []byte("the whole content")
	dir := t.TempDir()
	file := filepath.Join(dir, "blob")
	if err := os.WriteFile(file, body, 0o644); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/blob":
			w.Write(body)
		case "/busy":
			http.Error(w, "busy", http.StatusServiceUnavailable)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	httpSrc := manager.HTTPSource(nil, time.Minute)

	for _, tc := range []struct {
		name string
		src  manager.Source
		url  string
	}{
		{"file", manager.FileSource(), "file://" + file},
		{"http", httpSrc, srv.URL + "/blob"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			announced := int64(-2)
			err := tc.src.Fetch(ctx, tc.url, &buf, func(n int64) {
				if buf.Len() != 0 {
					t.Errorf("the size was announced after %d bytes were written", buf.Len())
				}
				announced = n
			})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf.Bytes(), body) || announced != int64(len(body)) {
				t.Errorf("fetched %q, announced %d; want %q, %d", buf.Bytes(), announced, body, len(body))
			}
		})
	}

	for _, tc := range []struct {
		name      string
		src       manager.Source
		url       string
		permanent bool
		says      string
	}{
		{"missing file", manager.FileSource(), "file://" + filepath.Join(dir, "missing"), true, "no such file"},
		{"directory", manager.FileSource(), "file://" + dir, true, manager.DirectoryHint(dir)},
		{"http 404", httpSrc, srv.URL + "/missing", true, "404"},
		{"http 503", httpSrc, srv.URL + "/busy", false, "503"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := tc.src.Fetch(ctx, tc.url, &buf, func(int64) {})
			if err == nil {
				t.Fatalf("fetched %q", buf.Bytes())
			}
			if errors.Is(err, manager.ErrPermanent) != tc.permanent {
				t.Errorf("err = %v: permanent %v, want %v", err, errors.Is(err, manager.ErrPermanent), tc.permanent)
			}
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("err = %v, want it to say %q", err, tc.says)
			}
			if buf.Len() != 0 {
				t.Errorf("a failed fetch wrote %q", buf.Bytes())
			}
		})
	}
	// A FIFO nobody writes to: refused at once, not waited on in open(2)
	// (where no ctx reaches).
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- manager.FileSource().Fetch(ctx, "file://"+fifo, io.Discard, func(int64) {}) }()
	select {
	case err := <-done:
		if !errors.Is(err, manager.ErrPermanent) || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("fetch of a FIFO: %v, want a permanent \"not a regular file\"", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("a fetch of a FIFO nobody writes to did not return within a minute")
	}
	hint := manager.DirectoryHint(dir + "/")
	if want := "tar -czf " + dir + ".tar.gz -C " + filepath.Dir(dir) + " " + filepath.Base(dir); !strings.Contains(hint, want) {
		t.Errorf("hint %q does not say %q", hint, want)
	}
}
