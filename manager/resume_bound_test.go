package manager_test

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
)

// TestResumedArchiveSpoolBounded: the copy of an archive kept to resume
// from is bounded by the length the source declares. A resumed range
// that declares no length ("bytes X-Y/*") is not resumed but fetched
// again whole, and one whose body runs past its declared length (a 206
// with no Content-Length) is cut at that length instead of growing the
// spool: the entry fails, saying so (a source that breaks its own
// framing is not retried at once).
func TestResumedArchiveSpoolBounded(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	data := make([]byte, 16<<20)
	for i := range data {
		data[i] = byte(i * 7 / 5)
	}
	if err := tw.WriteHeader(&tar.Header{Name: "data.bin", Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write(data)
	tw.Close()
	body := buf.Bytes()
	const garbage = 64 << 20

	for _, tc := range []struct {
		name string
		// second answers the first resumed request.
		second func(w http.ResponseWriter, from int) int64
		said   string
		fails  bool
	}{
		{"no declared length", func(w http.ResponseWriter, from int) int64 {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/*", from, len(body)-1))
			w.Header().Set("Content-Length", fmt.Sprint(len(body)-from))
			w.WriteHeader(http.StatusPartialContent)
			n, _ := w.Write(body[from:])
			return int64(n)
		}, "no length that bounds", false},
		{"body past its length", func(w http.ResponseWriter, from int) int64 {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", from, len(body)-1, len(body)))
			w.WriteHeader(http.StatusPartialContent) // no Content-Length: chunked
			n, _ := w.Write(body[from:])
			zeros := make([]byte, 1<<20)
			for i := 0; i < garbage/len(zeros); i++ {
				m, err := w.Write(zeros)
				n += m
				if err != nil {
					break
				}
			}
			return int64(n)
		}, "sent more than the", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var ranges []string
			var secondSent atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				ranges = append(ranges, r.Header.Get("Range"))
				n := len(ranges)
				mu.Unlock()
				w.Header().Set("ETag", `"v1"`)
				switch {
				case n == 1:
					w.Header().Set("Content-Length", fmt.Sprint(len(body)))
					w.WriteHeader(http.StatusOK)
					w.Write(body[:len(body)*6/10])
					w.(http.Flusher).Flush()
					<-r.Context().Done()
				case n == 2 && r.Header.Get("Range") != "":
					var from int
					fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &from)
					secondSent.Store(tc.second(w, from))
				default:
					http.ServeContent(w, r, "b.tar", resumeModTime, bytes.NewReader(body))
				}
			}))
			t.Cleanup(srv.Close)

			var recs logRecorder
			h := newResumeHosts(t.TempDir(), recs.logger())
			key := mustKey(t, srv.URL+"/b.tar", "")
			h.interruptAtCheckpoint(t, key, 2001)

			b, stopB := h.start(t, 2002)
			defer stopB()
			if _, err := b.Get(context.Background(), "run2", key, manager.Detached()); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			e, err := b.Wait(ctx, key)
			mu.Lock()
			defer mu.Unlock()
			if tc.fails {
				if err == nil || !strings.Contains(err.Error(), tc.said) {
					t.Fatalf("Wait: %v, want a failure saying %q", err, tc.said)
				}
				if len(ranges) != 2 || ranges[1] == "" {
					t.Errorf("requests with Range %q: want a resumed one, last", ranges)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				p, _ := b.Abs(e)
				got, err := os.ReadFile(filepath.Join(p, "data.bin"))
				if err != nil || !bytes.Equal(got, data) {
					t.Errorf("published data.bin: %d bytes, equal %v, %v", len(got), bytes.Equal(got, data), err)
				}
				if !recs.said(tc.said) {
					t.Errorf("no log record says %q", tc.said)
				}
				if len(ranges) != 3 || ranges[1] == "" || ranges[2] != "" {
					t.Errorf("requests with Range %q: want a resumed one, then a whole one", ranges)
				}
			}
			// Without the bound, the client read all of the garbage; the
			// kernel's buffers hold a few MiB at most.
			if n := secondSent.Load(); n > int64(len(body))+garbage/2 {
				t.Errorf("the bad range sent %d bytes in full: the client read past the declared length", n)
			}
		})
	}
}
