package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state/rigtest"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/sys/unix"
)

// heldServer serves one body at every path but /held.bin, where it sends
// the first quarter and then holds the response open until the test ends.
type heldServer struct {
	*httptest.Server
	body []byte
}

func newHeldServer(t *testing.T, body []byte) *heldServer {
	s := &heldServer{body: body}
	release := make(chan struct{})
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(200)
		if r.URL.Path != "/held.bin" {
			w.Write(body)
			return
		}
		w.Write(body[:len(body)/4])
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(s.Close)
	t.Cleanup(func() { close(release) }) // runs first: Close waits for held requests
	return s
}

// startServe starts `depcache serve` on 127.0.0.1 and returns its URL. The
// process is killed when the test ends; stop it with stopServe to check
// that it stops cleanly.
func startServe(t *testing.T, root string, flags ...string) (string, *exec.Cmd) {
	t.Helper()
	serve := exec.Command(bin, append([]string{"--root", root, "serve", "--listen", "127.0.0.1:0"}, flags...)...)
	errPipe, err := serve.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { serve.Process.Kill(); serve.Wait() })
	sc := bufio.NewScanner(errPipe)
	var addr string
	var said []string
	for sc.Scan() {
		said = append(said, sc.Text())
		if m := regexp.MustCompile(`serving .* on (http://\S+)`).FindStringSubmatch(sc.Text()); m != nil {
			addr = m[1]
			break
		}
	}
	if addr == "" {
		t.Fatalf("serve did not say where it listens: %s", strings.Join(said, "\n"))
	}
	go io.Copy(io.Discard, errPipe)
	return addr, serve
}

func stopServe(t *testing.T, serve *exec.Cmd) {
	t.Helper()
	serve.Process.Signal(syscall.SIGTERM)
	if err := serve.Wait(); err != nil {
		t.Errorf("serve after SIGTERM: %v", err)
	}
}

func getEntries(t *testing.T, addr string) []entryJSON {
	t.Helper()
	resp, err := http.Get(addr + "/v1/entries")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out []entryJSON
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

// scrapeFamilies parses serve's /metrics as Prometheus' text format.
func scrapeFamilies(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

// gauge returns the value of the gauge name whose labels include labels
// (name=value pairs), and whether there is one.
func gauge(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f := fams[name]
	if f == nil || f.GetType() != dto.MetricType_GAUGE {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == labels[i] && l.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		return m.GetGauge().GetValue(), true
	}
	return 0, false
}

func statfs(t *testing.T, dir string) (free, size int64) {
	t.Helper()
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		t.Fatal(err)
	}
	return int64(s.Bavail) * int64(s.Bsize), int64(s.Blocks) * int64(s.Bsize)
}

// TestE2EStatusPageAndGauges: a real serve on a root with a stored policy,
// one READY entry whose source and dependent name hold markup, and one
// download that the source server holds at a quarter. Its /metrics, parsed
// as the text format, carries the usage, the budget, the free disk and the
// entries by stage; its status page, rendered by a headless Chromium,
// shows the totals, the policy, "... ago", a bar a quarter full and the
// markup as text.
func TestE2EStatusPageAndGauges(t *testing.T) {
	const size = 1 << 20
	body := randomBody(size)
	srv := newHeldServer(t, body)
	root := t.TempDir()
	if out, err := exec.Command(bin, "--root", root, "policy", "set", "--max-size", "64MiB", "--min-age", "10m").CombinedOutput(); err != nil {
		t.Fatalf("policy set: %v: %s", err, out)
	}
	addr, serve := startServe(t, root, "--progress-interval", "100ms", "--download-timeout", "10m")

	hostileSource := srv.URL + `/page.bin?<script>document.title='pwned'</script>`
	const hostileName = `<img src=x onerror=alert(1)>`
	before := time.Now()
	if out, err := exec.Command(bin, "--root", root, "get", "--dependent", hostileName, hostileSource).CombinedOutput(); err != nil {
		t.Fatalf("get: %v: %s", err, out)
	}
	heldSource := srv.URL + "/held.bin"
	if out, err := exec.Command(bin, "--root", root, "get", "--no-wait", "--dependent", "job-1", heldSource).CombinedOutput(); err != nil {
		t.Fatalf("get --no-wait: %v: %s", err, out)
	}
	var hostile, held entryJSON
	waitFor(t, "serve to report the held download at a quarter", func() bool {
		hostile, held = entryJSON{}, entryJSON{}
		for _, e := range getEntries(t, addr) {
			switch e.Source {
			case hostileSource:
				hostile = e
			case heldSource:
				held = e
			}
		}
		return held.Progress.Bytes == size/4 && held.Progress.Total == size
	})
	if hostile.Stage != "READY" || hostile.SizeBytes != size {
		t.Fatalf("the entry of %s: %+v, want READY with %d bytes (the source must keep its markup)", hostileSource, hostile, size)
	}
	if held.Stage != "DOWNLOADING" {
		t.Fatalf("held entry: %+v, want DOWNLOADING", held)
	}

	t.Run("metrics", func(t *testing.T) {
		const usage = 2 * size // READY on disk plus the download at its expected size
		var fams map[string]*dto.MetricFamily
		waitFor(t, "the usage gauge to count both entries", func() bool {
			fams = scrapeFamilies(t, addr)
			v, _ := gauge(fams, "depcache_usage_bytes")
			return v == usage
		})
		freeBefore, diskSize := statfs(t, root)
		fams = scrapeFamilies(t, addr)
		freeAfter, _ := statfs(t, root)
		for _, c := range []struct {
			name   string
			labels []string
			want   float64
		}{
			{"depcache_usage_bytes", nil, usage},
			{"depcache_budget_bytes", nil, 64 << 20},
			{"depcache_disk_size_bytes", nil, float64(diskSize)},
			{"depcache_entries", []string{"stage", "READY"}, 1},
			{"depcache_entries", []string{"stage", "DOWNLOADING"}, 1},
			{"depcache_entries", []string{"stage", "FAILED"}, 0},
		} {
			if got, ok := gauge(fams, c.name, c.labels...); !ok || got != c.want {
				t.Errorf("%s%v = %v (found: %v), want %v", c.name, c.labels, got, ok, c.want)
			}
		}
		// Other processes write to this disk too: the gauge must lie within
		// what statfs said just before and just after, give or take 64 MiB.
		const slack = 64 << 20
		lo, hi := float64(min(freeBefore, freeAfter)-slack), float64(max(freeBefore, freeAfter)+slack)
		if got, ok := gauge(fams, "depcache_disk_free_bytes"); !ok || got <= 0 || got < lo || got > hi {
			t.Errorf("depcache_disk_free_bytes = %v (found: %v), want within [%v, %v]", got, ok, lo, hi)
		}
	})

	t.Run("browser", func(t *testing.T) {
		chromium := rigtest.Chromium(t)
		dom := string(runChromium(t, chromium, "--dump-dom", addr+"/"))
		row := func(e entryJSON) string {
			m := regexp.MustCompile(`(?s)<tr id="entry-` + e.Key + `">.*?</tr>`).FindString(dom)
			if m == "" {
				t.Fatalf("no row for %s in the rendered page:\n%s", e.Source, dom)
			}
			return m
		}

		totals := regexp.MustCompile(`(?s)<p id="totals">(.*?)</p>`).FindStringSubmatch(dom)
		wantTotals := regexp.MustCompile(`^Usage 2\.0 MiB of 64 MiB budget \(3\.1%\)\s+· free disk \d[\d.]* [KMGTPE]?i?B of \d[\d.]* [KMGTPE]?i?B\s+· 2 entries: 1 downloading, 1 ready, 0 failed$`)
		if totals == nil || !wantTotals.MatchString(totals[1]) {
			t.Errorf("totals line %q, want it to match %s", totals, wantTotals)
		}
		for _, want := range []string{
			"stored in the root",
			"<dt>max-size</dt><dd>64 MiB</dd>",
			"<dt>high-watermark</dt><dd>95%</dd>",
			"<dt>low-watermark</dt><dd>85%</dd>",
			"<dt>min-age</dt><dd>10m0s</dd>",
		} {
			if !strings.Contains(dom, want) {
				t.Errorf("the policy lacks %q", want)
			}
		}

		// Last used: at most as long ago as this test's get began.
		agoText := regexp.MustCompile(`<td class="last-used" title="[^"]+">(?:(\d+)m )?(\d+)s ago</td>`).FindStringSubmatch(row(hostile))
		if agoText == nil {
			t.Errorf("no \"last used ... ago\" in the READY entry's row: %s", row(hostile))
		} else {
			mins, _ := strconv.Atoi(agoText[1])
			secs, _ := strconv.Atoi(agoText[2])
			if shown, bound := time.Duration(mins)*time.Minute+time.Duration(secs)*time.Second, time.Since(before)+time.Second; shown > bound {
				t.Errorf("last used %v ago; the get was only %v ago", shown, bound)
			}
		}

		heldRow := row(held)
		for _, want := range []string{
			`role="progressbar" aria-valuemin="0" aria-valuenow="262144" aria-valuemax="1048576"`,
			`style="display:block;width:25.00%"`,
			`<span class="progress-text">256 KiB / 1.0 MiB (25%)</span>`,
		} {
			if !strings.Contains(heldRow, want) {
				t.Errorf("the download's row lacks %s: %s", want, heldRow)
			}
		}

		// The markup is text: escaped in the serialized DOM, no element made.
		for _, want := range []string{
			`<td class="source">` + srv.URL + `/page.bin?&lt;script&gt;document.title='pwned'&lt;/script&gt;</td>`,
			`<span class="dependent">&lt;img src=x onerror=alert(1)&gt;</span>`,
		} {
			if !strings.Contains(dom, want) {
				t.Errorf("the page lacks %s", want)
			}
		}
		for _, bad := range []string{"<script", "<img", "<title>pwned"} {
			if strings.Contains(dom, bad) {
				t.Errorf("the rendered page contains %q: markup from the state was not escaped", bad)
			}
		}

		// What a person sees: the bar of the held download is a quarter full.
		const w, h = 1920, 1200
		shot := filepath.Join(t.TempDir(), "status.png")
		runChromium(t, chromium, "--screenshot="+shot, fmt.Sprintf("--window-size=%d,%d", w, h),
			"--hide-scrollbars", "--force-device-scale-factor=1", addr+"/")
		if dir := os.Getenv("DEPCACHE_KEEP_SCREENSHOT"); dir != "" {
			b, _ := os.ReadFile(shot)
			os.WriteFile(filepath.Join(dir, "status.png"), b, 0o644)
		}
		f, err := os.Open(shot)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		img, err := png.Decode(f)
		if err != nil {
			t.Fatalf("screenshot: %v", err)
		}
		if b := img.Bounds(); b.Dx() != w || b.Dy() != h {
			t.Fatalf("screenshot is %v, want %dx%d", b, w, h)
		}
		fill, track, ok := barPixels(img, color.RGBA{0x2f, 0x6f, 0xdf, 0xff}, color.RGBA{0xdb, 0xe4, 0xf5, 0xff})
		if !ok {
			t.Fatal("no download bar (fill #2f6fdf on #dbe4f5) in the screenshot")
		}
		if frac := float64(fill) / float64(fill+track); fill+track < 190 || fill+track > 210 || math.Abs(frac-0.25) > 0.02 {
			t.Errorf("the download bar: %d px filled of %d, want a quarter of 200", fill, fill+track)
		}
	})

	stopServe(t, serve)
}

// barPixels finds the first row of img holding pixels of the bar's fill
// colour and counts, on it, the fill and the track pixels.
func barPixels(img image.Image, fill, track color.RGBA) (nFill, nTrack int, ok bool) {
	near := func(c color.Color, want color.RGBA) bool {
		r, g, b, _ := c.RGBA()
		d := func(x uint32, y uint8) bool { return math.Abs(float64(x>>8)-float64(y)) <= 6 }
		return d(r, want.R) && d(g, want.G) && d(b, want.B)
	}
	bounds := img.Bounds()
	for y := bounds.Min.Y; y < bounds.Max.Y; y++ {
		nFill, nTrack = 0, 0
		for x := bounds.Min.X; x < bounds.Max.X; x++ {
			switch c := img.At(x, y); {
			case near(c, fill):
				nFill++
			case near(c, track):
				nTrack++
			}
		}
		if nFill > 0 {
			return nFill, nTrack, true
		}
	}
	return 0, 0, false
}

// runChromium runs Debian's Chromium headless on a fresh profile with the
// flags this machine needs (no sandbox as root; no background networking,
// which a closed network refuses) and returns its standard output.
func runChromium(t *testing.T, chromium string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	profile := t.TempDir()
	cmd := exec.CommandContext(ctx, chromium, append([]string{"--headless", "--no-sandbox", "--disable-gpu",
		"--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
		"--disable-sync", "--disable-dev-shm-usage", "--user-data-dir=" + profile}, args...)...)
	// Chromium forks helpers: a time-out ends the whole group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", chromium, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes()
}
