package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
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
	for {
		tick, cancel := context.WithTimeout(ctx, every)
		e, err := m.Wait(tick, key)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
			if err == nil {
				p.finish(e)
			}
			return e, err
		}
		if s, ok := m.Snapshot(key); ok {
			who := "no owner yet"
			if s.Owner != nil {
				who = fmt.Sprintf("pid %d on %s", s.Owner.PID, s.Owner.Host)
				if m.IsSelf(s.Owner) {
					who = "this process"
				}
			}
			p.show(s, who)
		}
	}
}

func newProgress(g *globals, key state.Key) (progress, time.Duration) {
	if g.json {
		return quiet{}, 2 * time.Second
	}
	if f, ok := g.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return newBar(f, key), 200 * time.Millisecond
	}
	return &lines{w: g.stderr, key: key}, 2 * time.Second
}

type quiet struct{}

func (quiet) show(state.Entry, string) {}
func (quiet) finish(state.Entry)       {}
func (quiet) close()                   {}

type lines struct {
	w   io.Writer
	key state.Key
}

func (l *lines) show(e state.Entry, who string) {
	total := "?"
	if e.Progress.Total > 0 {
		total = fmt.Sprint(e.Progress.Total)
	}
	fmt.Fprintf(l.w, "waiting for %s: downloaded by %s, %d/%s bytes\n", l.key.Source, who, e.Progress.Bytes, total)
}

func (l *lines) finish(state.Entry) {}
func (l *lines) close()             {}

type bar struct {
	p   *mpb.Progress
	bar *mpb.Bar
	who atomic.Pointer[string] // read by mpb's goroutine
}

func newBar(w io.Writer, key state.Key) *bar {
	b := &bar{p: mpb.New(mpb.WithOutput(w), mpb.WithWidth(40))}
	b.bar = b.p.AddBar(0,
		mpb.PrependDecorators(decor.Name(key.Source+" "), decor.Any(func(decor.Statistics) string {
			if w := b.who.Load(); w != nil {
				return *w
			}
			return ""
		})),
		mpb.AppendDecorators(decor.Counters(decor.SizeB1024(0), " % .1f / % .1f"), decor.Percentage(decor.WCSyncSpace)))
	return b
}

func (b *bar) show(e state.Entry, who string) {
	w := "(" + who + ")"
	b.who.Store(&w)
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
