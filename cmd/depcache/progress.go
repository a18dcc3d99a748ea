package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
	"github.com/mattn/go-runewidth"
	"golang.org/x/term"
)

// progress shows a wait: a bar on a terminal, a plain line every few
// seconds otherwise (run.go's runProgress draws one bar per dependency).
type progress interface {
	show(e state.Entry, who string)
	finish(e state.Entry) // the entry is READY
	close()
}

// waitShowingProgress waits for key, telling the user whom it waits for and
// how far they are.
func waitShowingProgress(ctx context.Context, g *globals, m *manager.Manager, key state.Key) (state.Entry, error) {
	p, every := newProgress(g, key)
	defer p.close()
	return waitWith(ctx, m, key, p, every)
}

func newProgress(g *globals, key state.Key) (progress, time.Duration) {
	if g.json {
		return quiet{}, 2 * time.Second
	}
	f, ok := g.stderr.(*os.File)
	terminal := ok && term.IsTerminal(int(f.Fd()))
	cols := func() int {
		w, _, err := term.GetSize(int(f.Fd()))
		if err != nil {
			return 0
		}
		return w
	}
	return progressFor(g.stderr, key, terminal, cols, time.Now())
}

// progressFor is a bar on a terminal that tells its width, plain lines
// elsewhere: on a pipe, and on a terminal whose size reads as 0x0 (a bar
// there would be drawn in no columns at all).
func progressFor(w io.Writer, key state.Key, terminal bool, cols func() int, start time.Time) (progress, time.Duration) {
	if terminal && cols() > 0 {
		return &bar{w: w, cols: cols, name: key.Source, rate: rateMeter{start: start}}, 200 * time.Millisecond
	}
	return &lines{w: w, key: key, rate: rateMeter{start: start}}, 2 * time.Second
}

type quiet struct{}

func (quiet) show(state.Entry, string) {}
func (quiet) finish(state.Entry)       {}
func (quiet) close()                   {}

// lines prints one plain line per look: the sizes for humans, the rate and
// the time left, judged from what this process watched.
type lines struct {
	w    io.Writer
	key  state.Key
	rate rateMeter
}

func (l *lines) show(e state.Entry, who string) {
	now := time.Now()
	if e.Owner == nil && e.Progress.Bytes == 0 {
		fmt.Fprintf(l.w, "waiting for %s: not started yet (%s)\n", l.key.Source, who)
		return
	}
	desc := sizes(e.Progress)
	if s := speedETA(e.Progress, l.rate.observe(e, who == selfOwner, now)); s != "" {
		desc += ", " + s
	}
	fmt.Fprintf(l.w, "waiting for %s: downloaded by %s, %s\n", l.key.Source, who, desc)
}

func (l *lines) finish(state.Entry) {}
func (l *lines) close()             {}

// selfOwner is what waitShowingProgress calls this process as an owner.
const selfOwner = "this process"

// rateMeter estimates a download's rate from the progress it watched, on
// its own clock (never from a timestamp another host wrote).
type rateMeter struct {
	start      time.Time // when the wait began
	gen        uint64
	firstBytes int64
	firstAt    time.Time
}

// observe returns the rate in bytes per second since the first look at
// this generation, or 0 while unknown. A download of this process began
// no earlier than the wait, from 0 bytes: its rate is known at the first
// look.
func (r *rateMeter) observe(e state.Entry, self bool, now time.Time) float64 {
	if r.firstAt.IsZero() || e.Generation != r.gen || e.Progress.Bytes < r.firstBytes {
		r.gen, r.firstBytes, r.firstAt = e.Generation, e.Progress.Bytes, now
		if !self || r.start.IsZero() {
			return 0
		}
		r.firstBytes, r.firstAt = 0, r.start
	}
	dt := now.Sub(r.firstAt).Seconds()
	if dt <= 0 {
		return 0
	}
	return float64(e.Progress.Bytes-r.firstBytes) / dt
}

// sizes is "1.2 MiB / 10 MiB (12%)", or "1.2 MiB of an unknown size".
func sizes(p state.Progress) string {
	if p.Total > 0 {
		return fmt.Sprintf("%s / %s (%d%%)", humanize.IBytes(uint64(p.Bytes)), humanize.IBytes(uint64(p.Total)), p.Bytes*100/p.Total)
	}
	return humanize.IBytes(uint64(p.Bytes)) + " of an unknown size"
}

// speedETA is "3.4 MiB/s, 3s left", as far as known.
func speedETA(p state.Progress, rate float64) string {
	if rate <= 0 {
		return ""
	}
	s := humanize.IBytes(uint64(rate)) + "/s"
	if p.Total > p.Bytes {
		left := time.Duration(float64(p.Total-p.Bytes) / rate * float64(time.Second))
		s += ", " + left.Round(time.Second).String() + " left"
	}
	return s
}

// bar redraws one line on a terminal, fitted to its width at each draw
// (barLine).
type bar struct {
	w     io.Writer
	cols  func() int // the terminal's width now; 0 when unknown
	name  string
	rate  rateMeter
	drawn bool
}

func (b *bar) show(e state.Entry, who string) {
	eta := speedETA(e.Progress, b.rate.observe(e, who == selfOwner, time.Now()))
	line := barLine(b.cols(), b.name, who, e.Progress, eta)
	if line == "" {
		return // no width to draw in now: keep the last line
	}
	// Back to the line's start, the line, and erase what a longer one left.
	fmt.Fprint(b.w, "\r"+line+"\x1b[K")
	b.drawn = true
}

func (b *bar) finish(e state.Entry) { b.show(e, "done") }

func (b *bar) close() {
	if b.drawn {
		fmt.Fprintln(b.w)
	}
}

// The bar's widths, brackets included: it shrinks to barMin before the
// line gives up a part, and grows to barMax when there is room.
const (
	barMin = 12
	barMax = 42
	// nameMin is the narrowest the name shrinks to while another part can
	// go instead.
	nameMin = 16
)

// barLine is the line of a bar in a terminal width columns wide, in at
// most width-1 columns (the last column of a line wraps on some
// terminals): the name, who, the bar, the sizes and percentage, the rate
// and time left. A name too long is shrunk in its middle ("https://ex…
// model.tar.gz"), down to nameMin columns; then the bar shrinks to
// barMin; then who, the rate and time left, and the bar go, in that order.
// The sizes always stay. It is "" for a width of 0 or less.
func barLine(width int, name, who string, p state.Progress, eta string) string {
	avail := width - 1
	if avail <= 0 {
		return ""
	}
	counts := humanize.IBytes(uint64(max(p.Bytes, 0))) + " so far"
	if p.Total > 0 {
		counts = fmt.Sprintf("%s / %s %d%%", humanize.IBytes(uint64(max(p.Bytes, 0))), humanize.IBytes(uint64(p.Total)), min(max(p.Bytes, 0)*100/p.Total, 100))
	}
	who = "(" + who + ")"
	full := runewidth.StringWidth(name)
	type layout struct {
		who, bar, eta bool
	}
	for _, l := range []layout{{true, true, true}, {false, true, true}, {false, true, false}, {false, false, false}} {
		l.eta = l.eta && eta != ""
		l.bar = l.bar && p.Total > 0 // no size to show a fraction of
		var fixed []string
		if l.who {
			fixed = append(fixed, who)
		}
		fixed = append(fixed, counts)
		if l.eta {
			fixed = append(fixed, eta)
		}
		used := len(fixed) // a space before each
		for _, f := range fixed {
			used += runewidth.StringWidth(f)
		}
		room := avail - used
		nameW, barW := min(full, room), 0
		if l.bar {
			room-- // the space after the bar's part
			if room < min(full, nameMin)+barMin {
				continue
			}
			nameW = min(full, room-barMin)
			barW = min(barMax, room-nameW)
		} else if nameW < min(full, nameMin) && !(l == layout{}) {
			continue
		}
		if nameW <= 0 {
			// Not even the name's first column: the sizes alone.
			return runewidth.Truncate(counts, avail, "…")
		}
		parts := []string{shrinkMiddle(name, nameW)}
		if l.who {
			parts = append(parts, who)
		}
		if l.bar {
			parts = append(parts, drawBar(barW, p))
		}
		parts = append(parts, counts)
		if l.eta {
			parts = append(parts, eta)
		}
		return strings.Join(parts, " ")
	}
	return runewidth.Truncate(counts, avail, "…")
}

// drawBar is "[=====>    ]", w columns wide, brackets included.
func drawBar(w int, p state.Progress) string {
	inner := w - 2
	done := 0
	if p.Total > 0 {
		done = int(min(max(p.Bytes, 0), p.Total) * int64(inner) / p.Total)
	}
	switch {
	case done >= inner:
		return "[" + strings.Repeat("=", inner) + "]"
	case done == 0:
		return "[" + strings.Repeat(" ", inner) + "]"
	}
	return "[" + strings.Repeat("=", done-1) + ">" + strings.Repeat(" ", inner-done) + "]"
}

// shrinkMiddle fits s in w columns by putting "…" in place of its middle:
// the start (a URL's scheme and host) and the end (its file name) stay.
func shrinkMiddle(s string, w int) string {
	if runewidth.StringWidth(s) <= w {
		return s
	}
	switch {
	case w <= 0:
		return ""
	case w == 1:
		return "…"
	}
	rs := []rune(s)
	headW := (w - 1) / 2
	tailW := w - 1 - headW
	var head, tail []rune
	for i, n := 0, 0; i < len(rs); i++ {
		if n += runewidth.RuneWidth(rs[i]); n > headW {
			break
		}
		head = append(head, rs[i])
	}
	for i, n := len(rs)-1, 0; i >= 0; i-- {
		if n += runewidth.RuneWidth(rs[i]); n > tailW {
			break
		}
		tail = append([]rune{rs[i]}, tail...)
	}
	return string(head) + "…" + string(tail)
}
