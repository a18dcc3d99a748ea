package main

import (
	"strings"
	"testing"
	"time"
)

func TestParseLogfmt(t *testing.T) {
	line := `time="2026-12-02T10:00:00Z" level=warning msg="fetch failed, retrying" attempt=1 error="GET http://127.0.0.1:4000/src/s01.bin: HTTP 500 Internal Server Error" gen=3 key="bundle:http://127.0.0.1:4000/src/s01.bin" retry_in=1s`
	r, ok := parseRecord("get", line)
	if !ok {
		t.Fatal("not parsed")
	}
	want := logRecord{Proc: "get", Level: "warning", Msg: "fetch failed, retrying",
		Err: "GET http://127.0.0.1:4000/src/s01.bin: HTTP 500 Internal Server Error", Key: "bundle:http://127.0.0.1:4000/src/s01.bin", Line: line}
	if r != want {
		t.Fatalf("got %+v, want %+v", r, want)
	}
	if r, ok := parseRecord("serve", `time="x" level=info msg="say \"hi\"" dir=a\b`); !ok || r.Msg != `say "hi"` {
		t.Fatalf("escaped quote: %+v %v", r, ok)
	}
	for _, l := range []string{
		"depcache: serving /r on http://127.0.0.1:1",
		"http://x/s.bin: 12 KB of 40 KB (pid 3 on h)",
		`level=warning msg="unterminated`,
		"",
	} {
		if _, ok := parseRecord("get", l); ok {
			t.Errorf("%q parsed as a record", l)
		}
	}
}

func TestClassifyWarning(t *testing.T) {
	src := "http://127.0.0.1:4000/src/s1.bin"
	log := faultLog{src: {time.Unix(100, 0)}}
	fetch := logRecord{Proc: "serve", Level: "warning", Msg: "fetch failed, retrying", Err: "GET " + src + ": after 1000 bytes: read tcp: connection reset by peer"}
	for _, c := range []struct {
		name   string
		r      logRecord
		faults bool
		want   bool
	}{
		{"fetch failure without faults", fetch, false, false},
		{"fetch failure naming the injected reset", fetch, true, true},
		{"download failed naming a 500", logRecord{Level: "warning", Msg: "download failed", Err: "after 4 attempts: GET " + src + ": HTTP 500 Internal Server Error"}, true, true},
		{"stall past the idle timeout", logRecord{Level: "warning", Msg: "fetch failed, retrying", Err: "GET " + src + ": no data for 8s"}, true, true},
		{"fetch failure of a source never faulted", logRecord{Level: "warning", Msg: "fetch failed, retrying", Err: "GET http://127.0.0.1:4000/src/s12.bin: HTTP 500 Internal Server Error"}, true, false},
		{"fetch failure not naming a fault", logRecord{Level: "warning", Msg: "fetch failed, retrying", Err: "GET " + src + ": no space left on device"}, true, false},
		{"an orphan under churn, with faults", logRecord{Level: "warning", Msg: "moving aside published content that no entry names"}, true, false},
		{"an error with faults", logRecord{Level: "error", Msg: "transition pass failed", Err: "GET " + src + ": HTTP 500 Internal Server Error"}, true, false},
	} {
		if got, why := classifyWarning(c.r, c.faults, log); got != c.want {
			t.Errorf("%s: expected=%v (%s), want %v", c.name, got, why, c.want)
		}
	}
}

func TestCausedByFault(t *testing.T) {
	src := "http://127.0.0.1:4000/src/s1.bin"
	log := faultLog{src: {time.Unix(100, 0)}}
	g := failedGet{Source: src, End: time.Unix(101, 0), Msg: "depcache: " + src + ": FAILED: GET " + src + ": HTTP 500 Internal Server Error"}
	if !causedByFault(g, true, log) {
		t.Error("a 500 on a faulted source, after the fault: not counted as caused by it")
	}
	if causedByFault(g, false, log) {
		t.Error("counted as a fault in a run without faults")
	}
	early := g
	early.End = time.Unix(99, 0)
	if causedByFault(early, true, log) {
		t.Error("a get that ended before the first fault on its source was counted as caused by it")
	}
	other := g
	other.Msg = "depcache: timed out"
	if causedByFault(other, true, log) {
		t.Error("a timeout, which no fault explains, was counted as caused by one")
	}
	cousin := g
	cousin.Source = "http://127.0.0.1:4000/src/s12.bin"
	if causedByFault(cousin, true, log) {
		t.Error("a source whose URL extends a faulted one's was counted as faulted")
	}
}

func TestCheckGrowth(t *testing.T) {
	series := func(dur time.Duration, n int, f func(frac float64) sample) []sample {
		var out []sample
		for i := 0; i <= n; i++ {
			frac := float64(i) / float64(n)
			s := f(frac)
			s.At = time.Duration(frac * float64(dur))
			out = append(out, s)
		}
		return out
	}
	hour := time.Hour
	flat := series(hour, 360, func(frac float64) sample {
		// Warm-up in the first minutes, then flat with noise.
		rss := int64(22000)
		if frac < 0.05 {
			rss = 15000
		}
		return sample{RSSKB: rss + int64(frac*100)%300, FDs: 10 + int(frac*1000)%3, Goroutines: 12 + int(frac*700)%4}
	})
	g, p := checkGrowth(flat, hour, defaultGrowthLimits)
	if len(p) != 0 {
		t.Errorf("flat run judged as growing: %v (%+v)", p, g)
	}
	if g.From != 5*time.Minute {
		t.Errorf("an hour's run: steady from %s, want 5m", g.From)
	}
	leak := series(hour, 360, func(frac float64) sample {
		return sample{RSSKB: 22000 + int64(frac*3000), FDs: 10 + int(frac*20), Goroutines: 12 + int(frac*30)}
	})
	_, p = checkGrowth(leak, hour, defaultGrowthLimits)
	if len(p) != 3 || !strings.Contains(p[0], "RSS") || !strings.Contains(p[1], "open files") || !strings.Contains(p[2], "goroutines") {
		t.Errorf("a leak of RSS, files and goroutines: %q", p)
	}
	// One burst sample in the last window does not decide.
	burst := series(hour, 360, func(frac float64) sample { return sample{RSSKB: 22000, FDs: 10, Goroutines: 12} })
	burst[len(burst)-1].Goroutines, burst[len(burst)-1].FDs = 40, 30
	if _, p := checkGrowth(burst, hour, defaultGrowthLimits); len(p) != 0 {
		t.Errorf("one burst sample decided: %v", p)
	}
	// A short run starts its steady part at a quarter.
	short := series(30*time.Second, 30, func(frac float64) sample { return sample{RSSKB: 20000, FDs: 10, Goroutines: 12} })
	if g, p := checkGrowth(short, 30*time.Second, defaultGrowthLimits); g.From != 7500*time.Millisecond || len(p) != 0 {
		t.Errorf("30 s run: from %s, problems %v", g.From, p)
	}
	// A short run's RSS is reported, not judged: its heap is still
	// warming up. Its open files and goroutines are judged.
	warming := series(30*time.Second, 30, func(frac float64) sample {
		return sample{RSSKB: 20000 + int64(frac*4000), FDs: 10, Goroutines: 12}
	})
	if g, p := checkGrowth(warming, 30*time.Second, defaultGrowthLimits); len(p) != 0 || g.RSSPercent <= 5 {
		t.Errorf("30 s run warming up: +%.1f %%, problems %v; want the growth reported, not judged", g.RSSPercent, p)
	}
	leakShort := series(30*time.Second, 30, func(frac float64) sample {
		return sample{RSSKB: 20000, FDs: 10 + int(frac*20), Goroutines: 12}
	})
	if _, p := checkGrowth(leakShort, 30*time.Second, defaultGrowthLimits); len(p) != 1 || !strings.Contains(p[0], "open files") {
		t.Errorf("30 s run leaking files: %v", p)
	}
	if _, p := checkGrowth(nil, time.Minute, defaultGrowthLimits); len(p) != 1 {
		t.Errorf("no samples: %v", p)
	}
}
