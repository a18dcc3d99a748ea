package main

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// The plain progress lines of the built binary show human sizes with the
// Content-Length from the first line, then the rate and the time left.
func TestE2EProgressLines(t *testing.T) {
	const size = 4 << 20
	body := randomBody(size)
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		w.WriteHeader(200)
		w.Write(body[:size/2])
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		w.Write(body[size/2:])
	}))
	defer srv.Close()
	cmd := exec.Command(bin, "--root", t.TempDir(), "get", "--progress-interval", "100ms", srv.URL+"/blob")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stderr)
	var first, rated string
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "waiting for ") {
			continue
		}
		if first == "" {
			first = line
		}
		if strings.Contains(line, "/s") && strings.Contains(line, "left") {
			rated = line
			break
		}
	}
	close(release) // the server sends the rest only once a line was read
	io.Copy(io.Discard, stderr)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("get: %v", err)
	}
	if !strings.Contains(first, "/ 4.0 MiB") || strings.Contains(first, "?") {
		t.Errorf("first progress line %q does not give the size from Content-Length", first)
	}
	if !strings.Contains(rated, "2.0 MiB / 4.0 MiB (50%)") || !strings.Contains(rated, "iB/s, ") {
		t.Errorf("no line with the size, the rate and the time left; last seen %q", rated)
	}
	if fileSum(t, strings.TrimSpace(stdout.String())) != hexSum(body) {
		t.Error("the download is not the body")
	}
}
