package main

import (
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestFailedGetPrintsOneLine: at the default log level a failed get says
// why in one human line on stderr, not that line and a log record of the
// same failure.
func TestFailedGetPrintsOneLine(t *testing.T) {
	cmd := exec.Command(bin, "--root", t.TempDir(), "get", "file:///nonexistent/depcache-one-line.tar.gz")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("get of a missing file: %v, want exit 1", err)
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "no such file") || strings.Contains(lines[0], "level=") {
		t.Errorf("stderr: %q, want one human line naming the cause", stderr.String())
	}
}

// TestTransientFailurePrintsOneLine: a source that fails every attempt
// (HTTP 500) is retried, and get still prints one human line, the final
// failure; the attempts show with --log-level info.
func TestTransientFailurePrintsOneLine(t *testing.T) {
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		http.Error(w, "no", http.StatusInternalServerError)
	}))
	defer srv.Close()
	for _, tc := range []struct {
		args    []string
		retries int
	}{{nil, 0}, {[]string{"--log-level", "info"}, 1}} {
		hits.Store(0)
		args := append([]string{"--root", t.TempDir()}, tc.args...)
		cmd := exec.Command(bin, append(args, "get", "--retries", "1", srv.URL+"/x.tar.gz")...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || hits.Load() != 2 {
			t.Fatalf("get of a failing source: %v after %d requests, want exit 1 after 2", err, hits.Load())
		}
		var retries, other []string
		for _, l := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
			if strings.Contains(l, "fetch failed, retrying") {
				retries = append(retries, l)
			} else if !strings.Contains(l, "level=info") && !strings.HasPrefix(l, "waiting for ") {
				other = append(other, l)
			}
		}
		if len(other) != 1 || !strings.Contains(other[0], "500") || strings.Contains(other[0], "level=") {
			t.Errorf("%q: stderr %q, want one human line naming the cause", tc.args, stderr.String())
		}
		if len(retries) != tc.retries {
			t.Errorf("%q: %d retry records, want %d: %q", tc.args, len(retries), tc.retries, stderr.String())
		}
	}
}

// TestNegativeDurationsNameTheirFlag: a duration out of range names the
// one flag that is wrong, with exit 2.
func TestNegativeDurationsNameTheirFlag(t *testing.T) {
	root := t.TempDir()
	for _, tc := range []struct{ flag, other string }{{"--timeout", "--ttl"}, {"--ttl", "--timeout"}} {
		code, _, errs := cli(t, root, "get", tc.flag, "-1s", "file:///nonexistent/x")
		if code != 2 || !strings.Contains(errs, tc.flag+" -1s") || strings.Contains(errs, tc.other) {
			t.Errorf("get %s -1s: exit %d, %q; want 2 naming %s alone", tc.flag, code, errs, tc.flag)
		}
	}
}

// TestInvalidUTF8IsBadInput: a name or source that is not valid UTF-8 is
// bad input (exit 2, naming it) in every command that takes one, before
// anything is looked up.
func TestInvalidUTF8IsBadInput(t *testing.T) {
	root := t.TempDir()
	for _, args := range [][]string{
		{"get", "--dependent", "\xff", "file:///nonexistent/x"},
		{"release", "--dependent", "\xfe", "file:///nonexistent/x"},
		{"get", "file:///nonexistent/\xff"},
		{"policy", "set", "--pin", "\xfe"},
		{"lock", "\xff", "--", "true"},
		{"run", "--dep", "A=file:///nonexistent/\xff", "--", "true"},
	} {
		code, _, errs := cli(t, root, args...)
		if code != 2 || !strings.Contains(errs, "not valid UTF-8") {
			t.Errorf("%q: exit %d, %q; want 2 and \"not valid UTF-8\"", args, code, errs)
		}
	}
}

// TestHTTPDiagnosticsStayOffStderr: a server that sends more than the
// length it declared makes net/http complain on its standard logger about
// an unsolicited response; that line is not depcache's, and with --json
// stderr stays empty on success (the contract: one error object or
// nothing).
func TestHTTPDiagnosticsStayOffStderr(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				buf := make([]byte, 4096)
				if _, err := c.Read(buf); err != nil {
					return
				}
				_, _ = c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nplain text and more"))
				time.Sleep(2 * time.Second) // keep the connection open: the rest is "unsolicited"
			}(c)
		}
	}()
	root := t.TempDir()
	code, out, stderr := depcache(t, root, "--json", "get", "http://"+ln.Addr().String()+"/lie.txt")
	if code != 0 || stderr != "" {
		t.Fatalf("get --json from a server that sends past its length: exit %d, stderr %q (stdout %s); want 0 and nothing on stderr", code, stderr, out)
	}
}
