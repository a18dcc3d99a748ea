package etcdstore

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// notEtcdBudget bounds notEtcd's look at each endpoint: a TCP connect, a
// TLS handshake when the store uses TLS, and the first frame of the
// answer to HTTP/2's preface. A member that answers at all answers in
// milliseconds; one that takes longer is left to the error already
// reported (unavailable), as one that does not answer.
const notEtcdBudget = time.Second

// http2Preface is what every HTTP/2 client, and so gRPC, sends first,
// followed here by an empty SETTINGS frame (RFC 9113, 3.4).
var http2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + "\x00\x00\x00\x04\x00\x00\x00\x00\x00")

// notEtcd looks, after a first request of the store failed as
// unavailable, at each endpoint that accepts a connection, and returns
// what the first that is surely not etcd answered: "" when none is (each
// refused the connection, did not answer in time, or speaks HTTP/2, as
// etcd's gRPC does). The gRPC client only retries such an endpoint until
// the deadline: a plain HTTP server (a wrong port) read as a cluster
// without quorum.
func notEtcd(ctx context.Context, endpoints []string, tc *tls.Config) string {
	ctx, cancel := context.WithTimeout(ctx, notEtcdBudget)
	defer cancel()
	whys := make([]string, len(endpoints))
	var wg sync.WaitGroup
	for i, ep := range endpoints {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if why := answersHTTP2(ctx, ep, tc); why != "" {
				whys[i] = fmt.Sprintf("endpoint %s does not answer as etcd: %s", ep, why)
			}
		}()
	}
	wg.Wait()
	var out []string
	for _, w := range whys {
		if w != "" {
			out = append(out, w)
		}
	}
	return strings.Join(out, "; ")
}

// answersHTTP2 returns why ep is surely not an etcd member, "" when it may
// be one (or did not say in time).
func answersHTTP2(ctx context.Context, ep string, tc *tls.Config) string {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", ep)
	if err != nil {
		return "" // unreachable: said as unavailable already
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	if tc != nil {
		c := tc.Clone()
		c.NextProtos = []string{"h2"}
		if c.ServerName == "" {
			c.ServerName, _, _ = net.SplitHostPort(ep)
		}
		tconn := tls.Client(conn, c)
		err := tconn.HandshakeContext(ctx)
		var rh tls.RecordHeaderError
		switch {
		case errors.As(err, &rh):
			return fmt.Sprintf("it answered a TLS handshake with %q, which is not TLS", printable(rh.RecordHeader[:]))
		case err != nil:
			return "" // a certificate or a timeout: not what this looks for
		}
		conn = tconn
	}
	if _, err := conn.Write(http2Preface); err != nil {
		return ""
	}
	var head [9]byte // a frame header: length (3), type, flags, stream (4)
	n, err := io.ReadFull(conn, head[:])
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return ""
	case n == 0 && err != nil:
		if tc == nil {
			return "it accepted the connection and closed it without answering HTTP/2, which etcd's gRPC speaks (if it serves TLS, give its CA)"
		}
		return "it accepted the connection and closed it without answering HTTP/2, which etcd's gRPC speaks"
	case err != nil || head[3] != 0x4 || head[4]&0x1 != 0 || !bytes.Equal(head[5:], []byte{0, 0, 0, 0}):
		// An HTTP/2 server's first frame is its SETTINGS, not an ACK,
		// on stream 0.
		return fmt.Sprintf("it answered HTTP/2's preface with %q, not with HTTP/2 (a plain HTTP server, or another service, on that port?)", printable(head[:n]))
	}
	return ""
}

// printable is b with what is not printable ASCII as '.', for a message.
func printable(b []byte) string {
	return strings.Map(func(r rune) rune {
		if r < ' ' || r > '~' {
			return '.'
		}
		return r
	}, string(b))
}
