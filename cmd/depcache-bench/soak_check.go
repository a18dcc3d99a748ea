package main

// The soak's judgement, kept apart from the processes it runs so that it
// can be tested: parsing logrus text records, telling expected warnings
// from false ones, telling failed gets caused by the fault injection from
// the others, and the growth check of serve's samples.

import (
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// logRecord is one logrus record (text format) written by serve or by a
// depcache command of a worker.
type logRecord struct {
	Proc  string `json:"proc"` // serve, get, run, release, verify
	Level string `json:"level"`
	Msg   string `json:"msg"`
	Err   string `json:"error,omitempty"`
	Key   string `json:"key,omitempty"`
	// Line is the record as written, with its time and every field, for
	// the report's example of each false warning.
	Line string `json:"line,omitempty"`
}

// parseLogfmt parses one line of logrus's text formatter without colours:
// key=value pairs, values bare or quoted as Go strings. ok is false for a
// line that is not a record (no level= or no msg=).
func parseLogfmt(line string) (fields map[string]string, ok bool) {
	fields = map[string]string{}
	s := strings.TrimSpace(line)
	for s != "" {
		eq := strings.IndexByte(s, '=')
		if eq <= 0 || strings.ContainsAny(s[:eq], " \t\"") {
			return nil, false
		}
		k := s[:eq]
		s = s[eq+1:]
		var v string
		if strings.HasPrefix(s, `"`) {
			// The shortest prefix that unquotes: a quoted value ends at
			// the first unescaped quote.
			end := -1
			for i := 1; i < len(s); i++ {
				if s[i] == '\\' {
					i++
					continue
				}
				if s[i] == '"' {
					end = i
					break
				}
			}
			if end < 0 {
				return nil, false
			}
			u, err := strconv.Unquote(s[:end+1])
			if err != nil {
				return nil, false
			}
			v, s = u, s[end+1:]
		} else if sp := strings.IndexByte(s, ' '); sp >= 0 {
			v, s = s[:sp], s[sp:]
		} else {
			v, s = s, ""
		}
		fields[k] = v
		s = strings.TrimLeft(s, " ")
	}
	_, hasLevel := fields["level"]
	_, hasMsg := fields["msg"]
	return fields, hasLevel && hasMsg
}

// parseRecord turns a stderr line of proc into a record; ok is false for
// lines that are not logrus records (progress lines, error summaries).
func parseRecord(proc, line string) (logRecord, bool) {
	f, ok := parseLogfmt(line)
	if !ok {
		return logRecord{}, false
	}
	return logRecord{Proc: proc, Level: f["level"], Msg: f["msg"], Err: f["error"], Key: f["key"], Line: strings.TrimSpace(line)}, true
}

// isWarning: the levels the soak judges (logrus's text names).
func isWarning(level string) bool {
	switch level {
	case "warning", "error", "fatal", "panic":
		return true
	}
	return false
}

// faultSignatures are how the failures that the source server injects
// read in depcache's errors: a 500, a connection reset after part of the
// body, the body cut short, a stall past the idle timeout.
var faultSignatures = []string{
	"HTTP 500 Internal Server Error",
	"connection reset by peer",
	"unexpected EOF",
	"Content-Length said",
	"no data for",
}

// namesInjectedFault reports whether msg describes one of the injected
// fetch failures.
func namesInjectedFault(msg string) bool {
	for _, s := range faultSignatures {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// faultLog is when the source server injected a failing fault, by source
// URL, in time order.
type faultLog map[string][]time.Time

// before reports whether a failing fault was injected on url at or before t.
func (f faultLog) before(url string, t time.Time) bool {
	ts := f[url]
	return len(ts) > 0 && !ts[0].After(t)
}

// faultedSourceIn returns the faulted source that text names, if any.
func (f faultLog) faultedSourceIn(text string) (string, bool) {
	best := ""
	for url := range f {
		// The longest match: /src/s1.bin must not claim /src/s12.bin.
		if strings.Contains(text, url) && len(url) > len(best) {
			best = url
		}
	}
	return best, best != ""
}

// expectedFetchWarnings are the records a fetch failure produces: a failed
// attempt that is retried, and a download that failed for good (a warning
// when no caller of the process waits for it, as in serve).
var expectedFetchWarnings = map[string]bool{
	"fetch failed, retrying": true,
	"download failed":        true,
}

// classifyWarning tells whether a warning or error record describes a
// real event. In a run without faults, every warning is suspect: nothing
// is wrong with the sources, the disk or the processes. With faults, the
// warnings of fetch failures are expected, and only when they name the
// failure injected and the source it was injected on.
func classifyWarning(r logRecord, faults bool, log faultLog) (expected bool, why string) {
	if !faults {
		return false, "no fault was injected: nothing should be warned about"
	}
	if !expectedFetchWarnings[r.Msg] {
		return false, "not a fetch failure, the only problem injected"
	}
	if !namesInjectedFault(r.Err) {
		return false, "a fetch failure that names none of the injected faults"
	}
	if _, ok := log.faultedSourceIn(r.Err + " " + r.Key); !ok {
		return false, "a fetch failure that does not name a source a fault was injected on"
	}
	return true, "names an injected fetch failure"
}

// failedGet is a get (or the fetch of a run) that did not give a path.
type failedGet struct {
	Op     string    `json:"op"`
	Source string    `json:"source"`
	Start  time.Time `json:"start"`
	End    time.Time `json:"end"`
	Code   int       `json:"code"`
	Msg    string    `json:"msg"`
}

// causedByFault reports whether a failed get is explained by the fault
// injection: faults were on, its message names an injected failure, and a
// failing fault was injected on its source before it ended (a FAILED entry
// keeps its reason through the cool-down, so later gets see the same).
func causedByFault(g failedGet, faults bool, log faultLog) bool {
	return faults && namesInjectedFault(g.Msg) && log.before(g.Source, g.End)
}

// sample is one reading of serve's process.
type sample struct {
	At         time.Duration `json:"at"` // since the workers started
	RSSKB      int64         `json:"rss_kb"`
	FDs        int           `json:"fds"`
	Threads    int           `json:"threads"`
	Goroutines int           `json:"goroutines"`
}

// growthLimits are the targets: RSS at most +5 %, open files and
// goroutines flat within a small constant slack.
type growthLimits struct {
	RSSPercent     float64
	FDSlack        int
	GoroutineSlack int
	SteadyAfter    time.Duration // the warm-up: 5 minutes
	SteadyFraction float64       // ... or this fraction of a shorter run: 1/4
	// RSSMinRun is the shortest run whose RSS growth is judged (10
	// minutes): in a shorter one a Go heap is still warming up, the more
	// so on a loaded machine where the run does less work (a 30 s run in
	// CI beside a soak grew 5.1 % from 8 s to its end). Shorter runs
	// report it; open files and goroutines are judged in every run.
	RSSMinRun       time.Duration
	WindowFraction  float64 // each compared window is this fraction of the steady part
	MinWindowPoints int
}

var defaultGrowthLimits = growthLimits{RSSPercent: 5, FDSlack: 5, GoroutineSlack: 5,
	SteadyAfter: 5 * time.Minute, SteadyFraction: 0.25, WindowFraction: 0.2, MinWindowPoints: 1,
	RSSMinRun: 10 * time.Minute}

// growth is the comparison of the first window of the steady part with
// the last one: the last window's medians, so that one sample taken during
// a burst of downloads does not decide, against the first window's median
// (open files, goroutines) or highest reading (RSS).
type growth struct {
	From, To              time.Duration // start of the steady part, end of the run
	EarlyRSSKB, LateRSSKB int64
	EarlyFDs, LateFDs     int
	EarlyGor, LateGor     int
	RSSPercent            float64
}

// checkGrowth compares serve's samples of a run of length dur from the
// steady point (5 minutes in, or a quarter of a shorter run) to the end.
func checkGrowth(samples []sample, dur time.Duration, lim growthLimits) (growth, []string) {
	from := min(lim.SteadyAfter, time.Duration(float64(dur)*lim.SteadyFraction))
	g := growth{From: from, To: dur}
	w := time.Duration(float64(dur-from) * lim.WindowFraction)
	var early, late []sample
	for _, s := range samples {
		if s.At >= from && s.At <= from+w {
			early = append(early, s)
		}
		if s.At >= dur-w {
			late = append(late, s)
		}
	}
	// Too few points in a window (a very short run): the sample nearest
	// each end stands for it.
	if len(early) < lim.MinWindowPoints {
		early = nearest(samples, from)
	}
	if len(late) < lim.MinWindowPoints {
		late = nearest(samples, dur)
	}
	if len(early) == 0 || len(late) == 0 {
		return g, []string{"growth: no samples of serve"}
	}
	// RSS: the end against the highest reading of the first window. A
	// Go heap's RSS steps up and down with its collections for a while
	// after the warm-up; a leak still shows as the end rising above all of
	// them.
	g.EarlyRSSKB, g.LateRSSKB = maxOf(early, func(s sample) int64 { return s.RSSKB }), median(late, func(s sample) int64 { return s.RSSKB })
	g.EarlyFDs, g.LateFDs = int(median(early, func(s sample) int64 { return int64(s.FDs) })), int(median(late, func(s sample) int64 { return int64(s.FDs) }))
	g.EarlyGor, g.LateGor = int(median(early, func(s sample) int64 { return int64(s.Goroutines) })), int(median(late, func(s sample) int64 { return int64(s.Goroutines) }))
	if g.EarlyRSSKB > 0 {
		g.RSSPercent = 100 * float64(g.LateRSSKB-g.EarlyRSSKB) / float64(g.EarlyRSSKB)
	}
	var problems []string
	if g.RSSPercent > lim.RSSPercent && dur >= lim.RSSMinRun {
		problems = append(problems, fmt.Sprintf("growth: serve's RSS grew %.1f %% from %s to the end (%d → %d KB), more than %.0f %%",
			g.RSSPercent, from.Round(time.Second), g.EarlyRSSKB, g.LateRSSKB, lim.RSSPercent))
	}
	if g.LateFDs > g.EarlyFDs+lim.FDSlack {
		problems = append(problems, fmt.Sprintf("growth: serve's open files went from %d to %d (slack %d)", g.EarlyFDs, g.LateFDs, lim.FDSlack))
	}
	if g.LateGor > g.EarlyGor+lim.GoroutineSlack {
		problems = append(problems, fmt.Sprintf("growth: serve's goroutines went from %d to %d (slack %d)", g.EarlyGor, g.LateGor, lim.GoroutineSlack))
	}
	return g, problems
}

func nearest(samples []sample, at time.Duration) []sample {
	if len(samples) == 0 {
		return nil
	}
	best := samples[0]
	for _, s := range samples[1:] {
		if (s.At - at).Abs() < (best.At - at).Abs() {
			best = s
		}
	}
	return []sample{best}
}

func maxOf(ss []sample, f func(sample) int64) int64 {
	m := f(ss[0])
	for _, s := range ss[1:] {
		m = max(m, f(s))
	}
	return m
}

func median(ss []sample, f func(sample) int64) int64 {
	v := make([]int64, len(ss))
	for i, s := range ss {
		v[i] = f(s)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

// tally counts distinct messages.
type tally map[string]int

// keys returns the keys of t, most frequent first, then in order.
func (t tally) keys() []string {
	keys := make([]string, 0, len(t))
	for k := range t {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if t[keys[i]] != t[keys[j]] {
			return t[keys[i]] > t[keys[j]]
		}
		return keys[i] < keys[j]
	})
	return keys
}

// top returns the entries of t, most frequent first.
func (t tally) top() []string {
	keys := t.keys()
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = fmt.Sprintf("%6d × %s", t[k], k)
	}
	return out
}
