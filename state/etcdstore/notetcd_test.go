package etcdstore

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"google.golang.org/grpc"
)

// TestOpenNotEtcd: an endpoint that answers, but not as etcd (a plain
// HTTP server, a gRPC server of another service, a port that closes every
// connection), is named, said not to answer as etcd, and is unavailable
// (state.ErrUnavailable), as an endpoint that cannot be reached is; the
// client alone only timed out, or answered with gRPC's raw status.
func TestOpenNotEtcd(t *testing.T) {
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("hello")) }))
	t.Cleanup(web.Close)

	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer() // no service at all
	go gs.Serve(gl)
	t.Cleanup(gs.Stop)

	cl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	go func() {
		for {
			c, err := cl.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()

	for _, c := range []struct {
		name, ep, want string
	}{
		{"plain HTTP", strings.TrimPrefix(web.URL, "http://"), "does not answer as etcd: it answered HTTP/2's preface with \"HTTP/1.1 \""},
		{"another gRPC service", gl.Addr().String(), "do not answer as etcd: a gRPC server without etcd's KV service answered"},
		{"closes at once", cl.Addr().String(), "does not answer as etcd: it accepted the connection and closed it"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			s, err := Open(ctx, Options{Endpoints: []string{c.ep}, Prefix: "/x", DialTimeout: 500 * time.Millisecond})
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, ErrUnavailable) || !errors.Is(err, state.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) ||
				!strings.Contains(err.Error(), c.ep) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Open: %v; want ErrUnavailable naming %s and %q", err, c.ep, c.want)
			}
		})
	}

	// A real member is never taken for something else, nor is a port
	// where nothing listens (unreachable, as before).
	m := etcdtest.Start(t)
	if why := notEtcd(context.Background(), []string{m.Endpoint}, nil); why != "" {
		t.Errorf("notEtcd of a real member: %s", why)
	}
	if why := notEtcd(context.Background(), []string{"127.0.0.1:1"}, nil); why != "" {
		t.Errorf("notEtcd of a closed port: %s", why)
	}
}
