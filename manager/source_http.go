package manager

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// HTTPSource fetches http:// and https:// sources. A read that brings no
// byte for idle fails the attempt, so a server that stalls does not hold a
// live owner forever (its heartbeat would keep waiters from taking over).
//
// It asks for the bytes as the server stores them (Accept-Encoding:
// identity), never a body the transport decompresses: --sha256 and
// --no-unpack are about the file, and offsets to resume from are the
// server's. A client without a CheckRedirect of its own gets
// [CheckRedirect].
func HTTPSource(client *http.Client, idle time.Duration) Source {
	if client == nil {
		client = http.DefaultClient
	}
	if client.CheckRedirect == nil {
		c := *client
		c.CheckRedirect = CheckRedirect
		client = &c
	}
	if idle <= 0 {
		idle = time.Minute
	}
	return &httpSource{client: client, idle: idle}
}

// maxRedirects is how many redirects a fetch follows, as net/http's own
// default.
const maxRedirects = 10

// CheckRedirect is the redirect policy of [HTTPSource]: it follows up to 10
// redirects to http:// and https:// URLs, and refuses, for good
// ([ErrPermanent]: no retry would change them), more of them, one to any
// other scheme, and one from https:// to plain http://, which would fetch
// an https source without the transport's integrity.
func CheckRedirect(req *http.Request, via []*http.Request) error {
	first := via[0].URL
	switch {
	case len(via) >= maxRedirects:
		return fmt.Errorf("%w: stopped after %d redirects from %s (the last to %s)", ErrPermanent, maxRedirects, first.Redacted(), req.URL.Redacted())
	case req.URL.Scheme != "http" && req.URL.Scheme != "https":
		return fmt.Errorf("%w: %s redirected to %s: only http and https redirects are followed", ErrPermanent, first.Redacted(), req.URL.Redacted())
	case req.URL.Scheme == "http" && slices.ContainsFunc(via, func(r *http.Request) bool { return r.URL.Scheme == "https" }):
		return fmt.Errorf("%w: %s redirected to %s: a redirect from https to plain http is refused", ErrPermanent, first.Redacted(), req.URL.Redacted())
	}
	return nil
}

type httpSource struct {
	client *http.Client
	idle   time.Duration
}

func (h *httpSource) Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) error {
	return h.FetchRange(ctx, src, ResumeFrom{}, w, func(s RangeStart) error {
		if s.Total >= 0 {
			total(s.Total)
		}
		return nil
	})
}

// FetchRange asks for the bytes from from.Offset with Range and If-Range
// (the validator's ETag, or its Last-Modified time): a server that has
// another version, or cannot send a range, answers 200 with the whole
// content, which start is told (offset 0). A 206 whose Content-Range does
// not start at the offset, or whose validator differs, fails with
// errNoResume, so that the manager asks again for the whole content.
func (h *httpSource) FetchRange(ctx context.Context, src string, from ResumeFrom, w io.Writer, start func(RangeStart) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, src, nil)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPermanent, err)
	}
	req.Header.Set("Accept-Encoding", "identity")
	ranged := from.Offset > 0 && from.Validator.Strong()
	if ranged {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", from.Offset))
		ifRange := from.Validator.ETag
		if ifRange == "" {
			ifRange = from.Validator.LastModified
		}
		req.Header.Set("If-Range", ifRange)
	}
	// The idle timer runs from the start: a server that accepts the
	// connection and never answers must not hold the owner forever.
	timer := time.AfterFunc(h.idle, func() { cancel(fmt.Errorf("GET %s: no data for %s", src, h.idle)) })
	defer timer.Stop()
	resp, err := h.client.Do(req)
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && ctx.Err() != nil {
			return cause
		}
		return err
	}
	defer resp.Body.Close()
	got := RangeStart{Total: resp.ContentLength}
	switch {
	case resp.StatusCode == http.StatusPartialContent && ranged:
		first, last, size, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || first != from.Offset {
			return fmt.Errorf("GET %s: asked for bytes from %d, got Content-Range %q: %w", src, from.Offset, resp.Header.Get("Content-Range"), errNoResume)
		}
		if size >= 0 && last+1 != size {
			// A server may send less than the rest it was asked for
			// (RFC 9110 14.4): that is no continuation to the end.
			return fmt.Errorf("GET %s: asked for bytes from %d to the end, got Content-Range %q, which stops short of it: %w", src, from.Offset, resp.Header.Get("Content-Range"), errNoResume)
		}
		got.Offset, got.Total = first, size
		got.Validator = validatorOf(resp, size)
		if !got.Validator.names(from.Validator) {
			return fmt.Errorf("GET %s: the range sent is of another version (%+v, want %+v): %w", src, got.Validator, from.Validator, errNoResume)
		}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && ranged:
		// Nothing past the offset: the content is shorter than what we
		// have (it changed), or we have all of it. Either way, ask for the
		// whole content.
		resp.Body.Close()
		// This request's idle timer stops here: the new request has
		// its own, which its data resets.
		timer.Stop()
		return h.FetchRange(ctx, src, ResumeFrom{}, w, start)
	case resp.StatusCode == http.StatusOK:
		got.Validator = validatorOf(resp, resp.ContentLength)
	default:
		err := fmt.Errorf("GET %s: HTTP %s", src, resp.Status)
		// Client errors will not change on retry; server errors may.
		if resp.StatusCode >= 400 && resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusRequestTimeout {
			return fmt.Errorf("%w: %w", err, ErrPermanent)
		}
		return err
	}
	if err := start(got); err != nil {
		return err
	}
	timer.Reset(h.idle)
	// The timer measures the server only: it is stopped while our side
	// writes (an unpacker on a slow filesystem is not a stalled server).
	n, err := io.Copy(pausingWriter{w: w, timer: timer, idle: h.idle}, idleReader{r: resp.Body, timer: timer, idle: h.idle})
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && ctx.Err() != nil {
			return cause
		}
		return fmt.Errorf("GET %s: after %d bytes: %w", src, n, err)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return fmt.Errorf("GET %s: got %d bytes, Content-Length said %d", src, n, resp.ContentLength)
	}
	return nil
}

// validatorOf is the version a response names: its ETag, or its
// Last-Modified time with the full length. A body the transport
// decompressed has no validator: its offsets are not the server's.
func validatorOf(resp *http.Response, length int64) Validator {
	if resp.Uncompressed {
		return Validator{}
	}
	v := Validator{ETag: resp.Header.Get("ETag"), LastModified: resp.Header.Get("Last-Modified")}
	if length > 0 {
		v.Length = length
	}
	return v
}

// parseContentRange reads "bytes FIRST-LAST/SIZE" (SIZE may be "*": -1).
func parseContentRange(s string) (first, last, size int64, ok bool) {
	rest, found := strings.CutPrefix(s, "bytes ")
	if !found {
		return 0, 0, 0, false
	}
	span, total, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, 0, false
	}
	a, b, found := strings.Cut(span, "-")
	if !found {
		return 0, 0, 0, false
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || first < 0 || last < first {
		return 0, 0, 0, false
	}
	if total == "*" {
		return first, last, -1, true
	}
	size, err := strconv.ParseInt(total, 10, 64)
	if err != nil || size <= last {
		return 0, 0, 0, false
	}
	return first, last, size, true
}

// idleReader re-arms the idle timer on every read that brings data.
type idleReader struct {
	r     io.Reader
	timer *time.Timer
	idle  time.Duration
}

func (i idleReader) Read(p []byte) (int, error) {
	n, err := i.r.Read(p)
	if n > 0 {
		i.timer.Reset(i.idle)
	}
	return n, err
}

// pausingWriter stops the idle timer for the duration of each write.
type pausingWriter struct {
	w     io.Writer
	timer *time.Timer
	idle  time.Duration
}

func (p pausingWriter) Write(b []byte) (int, error) {
	p.timer.Stop()
	defer p.timer.Reset(p.idle)
	return p.w.Write(b)
}
