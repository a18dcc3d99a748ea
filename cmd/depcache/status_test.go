package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// TestStatusPageEscapes: a source, a dependent name and a failure message
// holding markup are shown as text on the status page, never as markup.
func TestStatusPageEscapes(t *testing.T) {
	log := logrus.New()
	log.SetOutput(io.Discard)
	m, err := manager.New(manager.Config{Root: t.TempDir(), Log: log})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	hostileSource := "file://" + filepath.Join(dir, "<script>alert(1)</script>")
	key, err := manager.ParseKey(hostileSource, "")
	if err != nil {
		t.Fatal(err)
	}
	if key.Source != hostileSource {
		t.Fatalf("source normalised to %q; the test needs the markup kept", key.Source)
	}
	const hostileName = `"><img src=x onerror=alert(2)>`
	if _, err := m.Get(context.Background(), hostileName, key, manager.Detached()); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(serveMux(m, prometheus.NewRegistry()))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	page := string(b)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("status %d, content type %q: %s", resp.StatusCode, resp.Header.Get("Content-Type"), page)
	}
	if strings.Contains(page, "<!-- template:") {
		t.Fatalf("the template failed: %s", page)
	}
	for _, want := range []string{
		`<td class="source">file://` + dir + `/&lt;script&gt;alert(1)&lt;/script&gt;</td>`,
		`<span class="dependent">&#34;&gt;&lt;img src=x onerror=alert(2)&gt;</span>`,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %s:\n%s", want, page)
		}
	}
	for _, bad := range []string{"<script", "<img"} {
		if strings.Contains(page, bad) {
			t.Errorf("page contains %q:\n%s", bad, page)
		}
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
		t.Errorf("Content-Security-Policy %q: want scripts refused", csp)
	}
	// No policy stored: the page says the defaults apply.
	if !strings.Contains(page, "the defaults: no policy is stored in the root") {
		t.Errorf("page does not say the default policy applies:\n%s", page)
	}
}

func TestAgo(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, c := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s ago"},
		{1500 * time.Millisecond, "1s ago"},
		{59 * time.Second, "59s ago"},
		{61 * time.Second, "1m 1s ago"},
		{2*time.Hour + 3*time.Minute + 4*time.Second, "2h 3m ago"},
		{72 * time.Hour, "3d ago"},
		{-3 * time.Second, "3s ahead of this host's clock"},
	} {
		if got := agoAt(now.Add(-c.d), now); got != c.want {
			t.Errorf("agoAt(%v) = %q, want %q", c.d, got, c.want)
		}
	}
	if got := agoAt(time.Time{}, now); got != "never" {
		t.Errorf("agoAt(zero) = %q, want never", got)
	}
}

func TestPercentAndBar(t *testing.T) {
	for _, c := range []struct {
		part, whole int64
		want        string
	}{{1, 4, "25%"}, {2 << 20, 64 << 20, "3.1%"}, {1, 1 << 30, "<0.1%"}, {0, 10, "0%"}, {5, 0, "-"}, {150, 100, "150%"}} {
		if got := percent(c.part, c.whole); got != c.want {
			t.Errorf("percent(%d, %d) = %q, want %q", c.part, c.whole, got, c.want)
		}
	}
	if b := newPageBar(1, 0); b != nil {
		t.Errorf("bar of an unknown total: %+v, want none", b)
	}
	if b := newPageBar(256, 1024); b.Width != "25.00" || b.Over {
		t.Errorf("bar 256/1024: %+v", b)
	}
	if b := newPageBar(3, 2); b.Width != "100.00" || !b.Over {
		t.Errorf("bar 3/2: %+v, want full and over", b)
	}
}
