package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// progress shows a wait: a bar on a terminal, a plain line every few
// seconds otherwise.
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
	if f, ok := g.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return newBar(f, key, time.Now()), 200 * time.Millisecond
	}
	return &lines{w: g.stderr, key: key, rate: rateMeter{start: time.Now()}}, 2 * time.Second
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

type bar struct {
	p    *mpb.Progress
	bar  *mpb.Bar
	who  atomic.Pointer[string] // read by mpb's goroutine
	eta  atomic.Pointer[string] // rate and time left, read by mpb's goroutine
	rate rateMeter
}

func newBar(w io.Writer, key state.Key, start time.Time) *bar {
	b := &bar{p: mpb.New(mpb.WithOutput(w), mpb.WithWidth(40)), rate: rateMeter{start: start}}
	load := func(p *atomic.Pointer[string]) decor.Decorator {
		return decor.Any(func(decor.Statistics) string {
			if s := p.Load(); s != nil {
				return *s
			}
			return ""
		}, decor.WCSyncSpace)
	}
	b.bar = b.p.AddBar(0,
		mpb.PrependDecorators(decor.Name(key.Source+" "), load(&b.who)),
		mpb.AppendDecorators(decor.Counters(decor.SizeB1024(0), "% .1f / % .1f"), decor.Percentage(decor.WCSyncSpace), load(&b.eta)))
	return b
}

func (b *bar) show(e state.Entry, who string) {
	w := "(" + who + ")"
	b.who.Store(&w)
	eta := speedETA(e.Progress, b.rate.observe(e, who == selfOwner, time.Now()))
	b.eta.Store(&eta)
	if e.Progress.Total > 0 {
		b.bar.SetTotal(e.Progress.Total, false)
	}
	b.bar.SetCurrent(e.Progress.Bytes)
}

func (b *bar) finish(e state.Entry) { b.show(e, "done") }

func (b *bar) close() {
	b.bar.Abort(false)
	b.p.Wait()
}
