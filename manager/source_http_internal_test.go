package manager

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestHTTPSourceFetchesTheStoredBytes: a server that sends a .tar.gz with
// Content-Encoding: gzip (a common misconfiguration) is asked for, and
// gives, the file's own bytes; the transport no longer decompresses them
// behind --sha256 and --no-unpack.
func TestHTTPSourceFetchesTheStoredBytes(t *testing.T) {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte("the tar inside"))
	zw.Close()
	stored := gz.Bytes()
	var asked []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked = append(asked, r.Header.Get("Accept-Encoding"))
		w.Header().Set("Content-Encoding", "gzip") // whatever was asked
		w.Header().Set("ETag", `"v1"`)
		w.Write(stored)
	}))
	defer srv.Close()
	for _, c := range []*http.Client{nil, {Transport: http.DefaultTransport}} {
		var got bytes.Buffer
		var start RangeStart
		err := HTTPSource(c, time.Minute).(RangeSource).FetchRange(context.Background(), srv.URL+"/a.tar.gz", ResumeFrom{}, &got, func(s RangeStart) error {
			start = s
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), stored) {
			t.Errorf("fetched %q, want the stored gzip bytes %q", got.Bytes(), stored)
		}
		if start.Validator.ETag != `"v1"` {
			t.Errorf("validator %+v: the stored bytes are resumable", start.Validator)
		}
	}
	for _, a := range asked {
		if a != "identity" {
			t.Errorf("Accept-Encoding %q, want identity", a)
		}
	}
}

// TestHTTPSourceRefusesAShortRange: a 206 that stops before the end
// (RFC 9110 lets a server send less than asked) is no resume: the fetch
// fails with errNoResume, so that the manager asks for the whole content,
// instead of taking the part for the rest.
func TestHTTPSourceRefusesAShortRange(t *testing.T) {
	const total = 1000
	body := strings.Repeat("x", total)
	for _, tc := range []struct {
		contentRange string
		wantNoResume bool
	}{
		{fmt.Sprintf("bytes 100-199/%d", total), true},
		{fmt.Sprintf("bytes 100-%d/%d", total-2, total), true},
		{fmt.Sprintf("bytes 100-%d/%d", total-1, total), false},
		{fmt.Sprintf("bytes 100-%d/*", total-1), false},
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var first, last int
			fmt.Sscanf(tc.contentRange, "bytes %d-%d/", &first, &last)
			w.Header().Set("ETag", `"v1"`)
			w.Header().Set("Content-Range", tc.contentRange)
			w.WriteHeader(http.StatusPartialContent)
			io.WriteString(w, body[first:last+1])
		}))
		var got bytes.Buffer
		err := HTTPSource(nil, time.Minute).(RangeSource).FetchRange(context.Background(), srv.URL+"/f", ResumeFrom{Offset: 100, Validator: Validator{ETag: `"v1"`}}, &got, func(RangeStart) error { return nil })
		srv.Close()
		if got := errors.Is(err, errNoResume); got != tc.wantNoResume {
			t.Errorf("Content-Range %q: error %v, want errNoResume: %v", tc.contentRange, err, tc.wantNoResume)
		}
		if tc.wantNoResume && got.Len() != 0 {
			t.Errorf("Content-Range %q: %d bytes of the part written", tc.contentRange, got.Len())
		}
	}
}

// TestCheckRedirect: redirects within http and https, and up from http to
// https, are followed; a redirect to another scheme, from https down to
// plain http, or past the tenth fail for good, naming the source.
func TestCheckRedirect(t *testing.T) {
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			io.WriteString(w, "plain")
		case "/loop":
			http.Redirect(w, r, "/loop", http.StatusFound)
		case "/file":
			http.Redirect(w, r, "file:///etc/passwd", http.StatusFound)
		}
	}))
	defer plain.Close()
	var secureURL string
	secure := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			io.WriteString(w, "secure")
		case "/down":
			http.Redirect(w, r, plain.URL+"/ok", http.StatusFound)
		case "/hop":
			http.Redirect(w, r, secureURL+"/ok", http.StatusMovedPermanently)
		}
	}))
	defer secure.Close()
	secureURL = secure.URL
	for _, tc := range []struct {
		src, want, wantErr string
	}{
		{src: secure.URL + "/hop", want: "secure"},
		{src: plain.URL + "/ok", want: "plain"},
		{src: secure.URL + "/down", wantErr: "from https to plain http is refused"},
		{src: plain.URL + "/file", wantErr: "only http and https redirects are followed"},
		{src: plain.URL + "/loop", wantErr: "stopped after 10 redirects from " + plain.URL + "/loop"},
	} {
		var got bytes.Buffer
		err := HTTPSource(secure.Client(), time.Minute).Fetch(context.Background(), tc.src, &got, func(int64) {})
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s: %v", tc.src, err)
		case tc.wantErr == "" && got.String() != tc.want:
			t.Errorf("%s: fetched %q, want %q", tc.src, got.String(), tc.want)
		case tc.wantErr != "" && (!errors.Is(err, ErrPermanent) || !strings.Contains(fmt.Sprint(err), tc.wantErr)):
			t.Errorf("%s: error %v, want a permanent one saying %q", tc.src, err, tc.wantErr)
		}
	}
	// A client's own policy is its own.
	c := secure.Client()
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return nil }
	if err := HTTPSource(c, time.Minute).Fetch(context.Background(), secure.URL+"/down", io.Discard, func(int64) {}); err != nil {
		t.Errorf("a client's own CheckRedirect was replaced: %v", err)
	}
}
