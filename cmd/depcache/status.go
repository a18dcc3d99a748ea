package main

import (
	_ "embed"
	"fmt"
	"html/template"
	"math"
	"net/http"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
)

// statusRefresh is how often the status page reloads itself, in seconds.
const statusRefresh = 5

//go:embed web/status.html
var statusHTML string

// statusPage is serve's page at /. html/template escapes every string from
// the state (sources, dependent names, messages, pins) for its context.
var statusPage = template.Must(template.New("status").Funcs(template.FuncMap{
	"bytes":   humanBytes,
	"percent": percent,
}).Parse(statusHTML))

// statusData is what the page shows.
type statusData struct {
	Root    string
	Now     string
	Refresh int
	Count   int
	Totals  manager.Totals
	Usage   *pageBar // usage against the budget; nil without a budget
	Entries []statusEntry
}

type statusEntry struct {
	entryJSON
	Ago string   // since last use, on this server's clock
	Bar *pageBar // a download with a known size
}

// pageBar is a progress bar on the page: Done of Total, drawn Width percent full.
type pageBar struct {
	Done, Total int64
	Width       string
	Over        bool
}

func newPageBar(done, total int64) *pageBar {
	if total <= 0 {
		return nil
	}
	w := min(max(float64(done)/float64(total)*100, 0), 100)
	return &pageBar{Done: done, Total: total, Width: fmt.Sprintf("%.2f", w), Over: done > total}
}

func humanBytes(n int64) string { return humanize.IBytes(uint64(max(n, 0))) }

// percent is part of whole as a percentage for people: "25%", "3.1%".
func percent(part, whole int64) string {
	if whole <= 0 {
		return "-"
	}
	p := float64(part) / float64(whole) * 100
	if p > 0 && p < 0.1 {
		return "<0.1%"
	}
	if p == math.Trunc(p) || p >= 10 {
		return fmt.Sprintf("%.0f%%", p)
	}
	return fmt.Sprintf("%.1f%%", p)
}

// agoAt says how long before now t was, to the second under a minute and coarser
// after. t was written by some host's clock: a time ahead of ours says so.
func agoAt(t, now time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	if d < 0 {
		return fmt.Sprintf("%s ahead of this host's clock", (-d).Round(time.Second))
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm %ds ago", int(d/time.Minute), int(d%time.Minute/time.Second))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh %dm ago", int(d/time.Hour), int(d%time.Hour/time.Minute))
	default:
		return fmt.Sprintf("%dd ago", int(d/(24*time.Hour)))
	}
}

// statusOf gathers the page's content from one view of the state.
func statusOf(r *http.Request, m *manager.Manager) (statusData, error) {
	st, desc, err := m.Describe(r.Context())
	if err != nil {
		return statusData{}, err
	}
	now := time.Now()
	d := statusData{Root: m.Root(), Now: now.UTC().Format(time.RFC3339), Refresh: statusRefresh, Totals: m.TotalsOf(st)}
	d.Count = len(st.Entries)
	d.Usage = newPageBar(d.Totals.UsageBytes, d.Totals.Policy.MaxSizeBytes)
	for _, e := range st.Sorted() {
		j := toJSON(m, *e)
		j.Description = desc[e.Key.ID()]
		se := statusEntry{entryJSON: j, Ago: agoAt(e.LastUsed, now)}
		if e.Stage == state.Downloading {
			se.Bar = newPageBar(e.Progress.Bytes, e.Progress.Total)
		}
		d.Entries = append(d.Entries, se)
	}
	return d, nil
}

func serveStatus(m *manager.Manager) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		d, err := statusOf(r, m)
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
		if err := statusPage.Execute(w, d); err != nil {
			// Headers are sent; the page is cut short.
			fmt.Fprintf(w, "\n<!-- template: %s -->", template.HTMLEscapeString(err.Error()))
		}
	}
}
