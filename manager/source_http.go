package manager

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"
)

// HTTPSource fetches http:// and https:// sources. A read that brings no
// byte for idle fails the attempt, so a server that stalls does not hold a
// live owner forever (its heartbeat would keep waiters from taking over).
func HTTPSource(client *http.Client, idle time.Duration) Source {
	if client == nil {
		client = http.DefaultClient
	}
	if idle <= 0 {
		idle = time.Minute
	}
	return &httpSource{client: client, idle: idle}
}

type httpSource struct {
	client *http.Client
	idle   time.Duration
}

func (h *httpSource) Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, src, nil)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPermanent, err)
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
	if resp.StatusCode != http.StatusOK {
		err := fmt.Errorf("GET %s: HTTP %s", src, resp.Status)
		// Client errors will not change on retry; server errors may.
		if resp.StatusCode >= 400 && resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusRequestTimeout {
			return fmt.Errorf("%w: %w", err, ErrPermanent)
		}
		return err
	}
	if resp.ContentLength >= 0 {
		total(resp.ContentLength)
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
