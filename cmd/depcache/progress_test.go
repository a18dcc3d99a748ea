package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/mattn/go-runewidth"
)

// The bar's line fits the terminal: a long name shrinks in its middle so
// that the bar, the sizes, the rate and the time left stay; at 40 columns
// the sizes stay; a width of 0 draws nothing (and the wait shows plain
// lines instead, TestProgressWithoutAWidth).
func TestBarLineFitsTheTerminal(t *testing.T) {
	long := "https://downloads.example.com/datasets/2024/very/long/path/to/the/model-weights-v2.tar.gz" // 89 columns
	url55 := "https://example.com/data/abcdefghijklmnopqrstu/file.bin"                                  // 55
	if len(url55) != 55 {
		t.Fatalf("url55 is %d long", len(url55))
	}
	half := state.Progress{Bytes: 5 << 20, Total: 10 << 20}
	const eta = "3.4 MiB/s, 1s left"
	for _, tc := range []struct {
		width int
		name  string
		want  []string // parts that must be seen
	}{
		{80, long, []string{"https://", "…", "v2.tar.gz", "[", "]", "5.0 MiB / 10 MiB 50%", eta}},
		{100, url55, []string{"[", "]", "5.0 MiB / 10 MiB 50%", eta}},
		{100, long, []string{"https://", "…", "v2.tar.gz", "[", "]", "5.0 MiB / 10 MiB 50%", eta}},
		{200, long, []string{long, "(this process)", "[", "5.0 MiB / 10 MiB 50%", eta}},
		{40, long, []string{"…", "5.0 MiB / 10 MiB 50%"}},
	} {
		line := barLine(tc.width, tc.name, selfOwner, half, eta)
		if w := runewidth.StringWidth(line); w > tc.width-1 {
			t.Errorf("width %d: the line takes %d columns: %q", tc.width, w, line)
		}
		for _, want := range tc.want {
			if !strings.Contains(line, want) {
				t.Errorf("width %d: %q lacks %q", tc.width, line, want)
			}
		}
		if i, j := strings.Index(line, "["), strings.Index(line, "]"); i >= 0 && j > i {
			// Half done: half of the bar's inside is filled.
			inner := line[i+1 : j]
			if fill := strings.Count(inner, "=") + strings.Count(inner, ">"); fill*2 < len(inner)-1 || fill*2 > len(inner)+1 {
				t.Errorf("width %d: bar %q is not half full", tc.width, inner)
			}
			if len(inner) < barMin-2 {
				t.Errorf("width %d: bar %q narrower than %d", tc.width, inner, barMin-2)
			}
		}
	}
	if line := barLine(0, long, selfOwner, half, eta); line != "" {
		t.Errorf("width 0: %q, want nothing", line)
	}
	// A size not known yet: no bar, the bytes so far and the rate.
	if line := barLine(100, url55, "pid 7 on h", state.Progress{Bytes: 1 << 20}, "1.0 MiB/s"); !strings.Contains(line, "1.0 MiB so far") || strings.Contains(line, "[") || !strings.Contains(line, url55) {
		t.Errorf("unknown size: %q", line)
	}
	// Wide characters count for two columns.
	wide := "file:///data/" + strings.Repeat("模型", 30) + ".bin"
	if line := barLine(80, wide, selfOwner, half, eta); runewidth.StringWidth(line) > 79 || !strings.Contains(line, "[") {
		t.Errorf("wide name: %d columns: %q", runewidth.StringWidth(line), line)
	}
}

// On a terminal whose size reads 0x0, and on a pipe, a wait prints plain
// lines; on a terminal with a width, a bar redrawn in place.
func TestProgressWithoutAWidth(t *testing.T) {
	key := state.Key{Kind: state.Bundle, Source: "https://example.com/data.tar.gz"}
	e := state.Entry{Key: key, Stage: state.Downloading, Owner: &state.Owner{}, Progress: state.Progress{Bytes: 1 << 20, Total: 4 << 20}}
	for _, tc := range []struct {
		terminal bool
		cols     int
		want     string
	}{
		{true, 0, "waiting for https://example.com/data.tar.gz: downloaded by pid 1 on h, 1.0 MiB / 4.0 MiB (25%)\n"},
		{false, 80, "waiting for https://example.com/data.tar.gz: downloaded by pid 1 on h, 1.0 MiB / 4.0 MiB (25%)\n"},
		{true, 80, "\rhttps://example.com/data.tar.gz (pid 1 on h) ["},
	} {
		var buf bytes.Buffer
		p, _ := progressFor(&buf, key, tc.terminal, func() int { return tc.cols }, time.Now())
		p.show(e, "pid 1 on h")
		p.close()
		if !strings.HasPrefix(buf.String(), tc.want) {
			t.Errorf("terminal %v, %d columns: %q, want it to start %q", tc.terminal, tc.cols, buf.String(), tc.want)
		}
	}
}

// TestRunBarsRedrawTogether: run's bars (one line per dependency) are
// redrawn as one block in place: each draw after the first goes back up to
// the block's first line, and every line fits the terminal's width.
func TestRunBarsRedrawTogether(t *testing.T) {
	var out bytes.Buffer
	r := &runProgress{g: &globals{}, w: &out, cols: func() int { return 80 }}
	long := "https://example.com/" + strings.Repeat("very-long-path/", 8) + "model.tar.gz"
	a, _ := r.add(state.Key{Kind: state.Bundle, Source: long})
	b, _ := r.add(state.Key{Kind: state.Bundle, Source: "file:///data/b.tar.gz"})
	a.show(state.Entry{Progress: state.Progress{Bytes: 1 << 20, Total: 4 << 20}}, "pid 7 on h2")
	b.show(state.Entry{Progress: state.Progress{Bytes: 2 << 20, Total: 4 << 20}}, selfOwner)
	r.wait()
	if n := strings.Count(out.String(), "\x1b[1A"); n != 1 {
		t.Errorf("%d moves up a line in %q, want 1 (a block of two lines, drawn, then redrawn in place)", n, out.String())
	}
	last := out.String()[strings.LastIndex(out.String(), "\x1b[1A")+len("\x1b[1A"):]
	lines := strings.Split(strings.TrimSpace(last), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "model.tar.gz") || !strings.Contains(lines[1], "b.tar.gz") {
		t.Fatalf("last draw %q: want both bars, in order", last)
	}
	for _, l := range lines {
		l = strings.TrimSuffix(strings.TrimPrefix(l, "\r"), "\x1b[K")
		if w := runewidth.StringWidth(l); w > 80 || !strings.Contains(l, "MiB") {
			t.Errorf("line %q: %d columns, want at most 80 with its sizes", l, w)
		}
	}
}
