package transitions

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// cacheEntry builds entry i: READY, size MB, last used at minute used,
// created an hour before t0.
func cacheEntry(i int, size int64, used int, opts ...func(*state.Entry)) *state.Entry {
	e := &state.Entry{Key: state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://x/%d", i)}, Stage: state.Ready,
		SizeBytes: size << 20, LastUsed: t0.Add(time.Duration(used) * time.Minute), Created: t0.Add(-time.Hour)}
	for _, o := range opts {
		o(e)
	}
	return e
}

func entries(es ...*state.Entry) map[string]*state.Entry {
	m := map[string]*state.Entry{}
	for _, e := range es {
		m[e.Key.ID()] = e
	}
	return m
}

func victims(vs []Victim) []string {
	out := []string{}
	for _, v := range vs {
		out = append(out, v.Key.Source[len("https://x/"):]+":"+v.Reason)
	}
	return out
}

func TestPlanEviction(t *testing.T) {
	pol := state.Policy{MaxSizeBytes: 100 << 20, HighWatermark: 90, LowWatermark: 50, MinAge: state.Duration(2 * time.Minute)}
	dep := func(e *state.Entry) { e.Dependents = map[string]state.Dependent{"run": {}} }
	young := func(e *state.Entry) { e.Created = t0.Add(-time.Minute) }
	failed := func(e *state.Entry) { e.Stage, e.SizeBytes = state.Failed, 0 }
	downloading := func(e *state.Entry) { e.Stage, e.Progress.Total = state.Downloading, e.SizeBytes; e.SizeBytes = 0 }
	tests := []struct {
		name string
		pol  func(state.Policy) state.Policy
		es   map[string]*state.Entry
		u    Usage
		want []string
	}{
		{name: "under the high watermark: nothing", es: entries(cacheEntry(1, 40, 1), cacheEntry(2, 40, 2)), want: []string{}},
		{name: "over: least recently used first, down to the low watermark",
			es:   entries(cacheEntry(1, 30, 3), cacheEntry(2, 30, 1), cacheEntry(3, 35, 2)),
			want: []string{"2:budget", "3:budget"}},
		{name: "failed first", es: entries(cacheEntry(1, 60, 1), cacheEntry(2, 35, 2), cacheEntry(3, 0, 9, failed)),
			want: []string{"3:failed", "1:budget"}},
		{name: "never with a dependent, young, downloading or pinned",
			pol: func(p state.Policy) state.Policy { p.Pins = []string{"https://x/4*"}; return p },
			es: entries(cacheEntry(1, 30, 1, dep), cacheEntry(2, 30, 1, young), cacheEntry(3, 30, 1, downloading),
				cacheEntry(4, 30, 1), cacheEntry(5, 5, 9)),
			want: []string{"5:budget"}},
		{name: "ties broken by key", es: entries(cacheEntry(1, 50, 1), cacheEntry(2, 50, 1)),
			want: []string{fmt.Sprint(map[bool]int{true: 1, false: 2}[cacheEntry(1, 0, 0).Key.ID() < cacheEntry(2, 0, 0).Key.ID()]) + ":budget"}},
		{name: "max-age evicts under budget",
			pol: func(p state.Policy) state.Policy { p.MaxAge = state.Duration(time.Hour); return p },
			es:  entries(cacheEntry(1, 1, -120), cacheEntry(2, 1, -10)), want: []string{"1:age"}},
		{name: "free-disk floor", pol: func(p state.Policy) state.Policy { p.MaxSizeBytes = 0; p.MinFreeDiskBytes = 50 << 20; return p },
			es: entries(cacheEntry(1, 30, 1), cacheEntry(2, 30, 2), cacheEntry(3, 30, 3)), u: Usage{DiskFree: 10 << 20, DiskSize: 1 << 30},
			want: []string{"1:free disk", "2:free disk"}},
		{name: "no budget, no floor: nothing", pol: func(p state.Policy) state.Policy { p.MaxSizeBytes = 0; return p },
			es: entries(cacheEntry(1, 300, 1)), want: []string{}},
		{name: "not enough evictable: evicts what it can", es: entries(cacheEntry(1, 80, 1, dep), cacheEntry(2, 20, 2)),
			want: []string{"2:budget"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := pol
			if tc.pol != nil {
				p = tc.pol(p)
			}
			u := tc.u
			u.Bytes = Measure(tc.es)
			got := victims(PlanEviction(p, tc.es, watchedAllOf(tc.es), u, t0))
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("victims = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestFits(t *testing.T) {
	pol := state.Policy{MaxSizeBytes: 100 << 20, HighWatermark: 90, LowWatermark: 50}
	held := cacheEntry(1, 60, 1, func(e *state.Entry) { e.Dependents = map[string]state.Dependent{"r": {}} })
	free := cacheEntry(2, 30, 1)
	self := state.Key{Kind: state.Bundle, Source: "https://x/new"}
	if err := Fits(pol, entries(held, free), self, 40<<20, t0); err != nil {
		t.Errorf("40 MB beside 60 MB held: %v", err)
	}
	if err := Fits(pol, entries(held, free), self, 41<<20, t0); !errors.Is(err, ErrTooLarge) {
		t.Errorf("41 MB beside 60 MB held: %v, want ErrTooLarge", err)
	}
	if err := Fits(state.Policy{}, entries(held), self, 1<<40, t0); err != nil {
		t.Errorf("no budget: %v", err)
	}
	// Another download of unknown size holds what it has written: two
	// such downloads must not each get the whole budget.
	other := cacheEntry(3, 0, 1, func(e *state.Entry) { e.Stage, e.Progress.Bytes = state.Downloading, 70<<20 })
	if room, fixed, _ := Room(pol, entries(other), self, nil, t0); fixed != 70<<20 || room != 30<<20 {
		t.Errorf("beside a download of unknown size that wrote 70 MB: room %d, fixed %d", room, fixed)
	}
	// A FAILED entry that a dependent holds keeps what it announced in its
	// progress, but holds no content: it takes nothing from the budget,
	// and Measure agrees.
	failed := cacheEntry(4, 0, 1, func(e *state.Entry) {
		e.Stage, e.Progress.Total, e.Progress.Bytes = state.Failed, 90<<20, 20<<20
		e.Dependents = map[string]state.Dependent{"r": {}}
	})
	if room, fixed, _ := Room(pol, entries(failed), self, nil, t0); fixed != 0 || room != 100<<20 {
		t.Errorf("beside a held FAILED entry with no content: room %d, fixed %d, want the whole budget", room, fixed)
	}
	if n := Measure(entries(failed, held)); n != 60<<20 {
		t.Errorf("Measure with a FAILED entry: %d, want 60 MB", n)
	}
	// Past min-age by its stamp, but within the clock skew tolerance of
	// it: a sweep that has not watched it for min-age may not evict it, so
	// the room judged as that sweep judges is without it; as recorded
	// (could a sweep ever make the room), with it.
	young := cacheEntry(5, 40, -1, func(e *state.Entry) { e.Created = t0.Add(-12 * time.Second) })
	yp := pol
	yp.MinAge = state.Duration(10 * time.Second)
	for _, tc := range []struct {
		name    string
		watched map[string]Watched
		room    int64
	}{
		{"as recorded", nil, 100 << 20},
		{"watched for nothing", map[string]Watched{}, 60 << 20},
		{"watched 5s", map[string]Watched{young.Key.ID(): {Created: 5 * time.Second, LastUsed: 5 * time.Second}}, 60 << 20},
		{"watched for min-age", map[string]Watched{young.Key.ID(): {Created: 10 * time.Second, LastUsed: 10 * time.Second}}, 100 << 20},
	} {
		if room, _, _ := Room(yp, entries(young), self, tc.watched, t0); room != tc.room {
			t.Errorf("beside an entry 12s old, min-age 10s, %s: room %d, want %d", tc.name, room, tc.room)
		}
		u := Usage{DiskFree: 10 << 20, DiskSize: 1 << 40}
		dp := yp
		dp.MinFreeDiskBytes = 5 << 20
		want := int64(5<<20) + (tc.room - 60<<20)
		if room, _, _ := RoomOnDisk(dp, entries(young), self, u, tc.watched, t0); room != want {
			t.Errorf("on disk, beside an entry 12s old, %s: room %d, want %d", tc.name, room, want)
		}
	}
}

func TestRoomOnDisk(t *testing.T) {
	held := cacheEntry(1, 60, 1, func(e *state.Entry) { e.Dependents = map[string]state.Dependent{"r": {}} })
	free := cacheEntry(2, 30, 1)
	self := state.Key{Kind: state.Bundle, Source: "https://x/new"}
	for _, tc := range []struct {
		name        string
		pol         state.Policy
		u           Usage
		room, floor int64
		ok          bool
	}{
		{"no floor", state.Policy{}, Usage{DiskFree: 10 << 20, DiskSize: 1 << 30}, 0, 0, false},
		{"disk size unknown", state.Policy{MinFreeDiskPercent: 10}, Usage{DiskFree: 10 << 20}, 0, 0, false},
		{"bytes: free plus the evictable, less the floor", state.Policy{MinFreeDiskBytes: 50 << 20}, Usage{DiskFree: 100 << 20, DiskSize: 1 << 30}, 80 << 20, 50 << 20, true},
		{"percent", state.Policy{MinFreeDiskPercent: 10}, Usage{DiskFree: 200 << 20, DiskSize: 1000 << 20}, 130 << 20, 100 << 20, true},
		{"the larger of both", state.Policy{MinFreeDiskBytes: 150 << 20, MinFreeDiskPercent: 10}, Usage{DiskFree: 200 << 20, DiskSize: 1000 << 20}, 80 << 20, 150 << 20, true},
		{"below the floor already: no room", state.Policy{MinFreeDiskBytes: 500 << 20}, Usage{DiskFree: 100 << 20, DiskSize: 1 << 30}, 0, 500 << 20, true},
	} {
		room, floor, ok := RoomOnDisk(tc.pol, entries(held, free), self, tc.u, nil, t0)
		if room != tc.room || floor != tc.floor || ok != tc.ok {
			t.Errorf("%s: room %d, floor %d, ok %v; want %d, %d, %v", tc.name, room, floor, ok, tc.room, tc.floor, tc.ok)
		}
	}
}

func TestLivenessAndReap(t *testing.T) {
	p := Policy{LeaseDuration: time.Minute}
	proc := &state.Process{Host: "h2", PID: 9}
	past, future := t0.Add(-time.Second), t0.Add(time.Hour)
	tests := []struct {
		name  string
		d     state.Dependent
		dv    DependentView
		wlive bool
	}{
		{"named, no ttl: until released", state.Dependent{}, DependentView{}, true},
		{"ttl in the future", state.Dependent{Expires: &future}, DependentView{}, true},
		{"ttl passed, watched for the whole ttl", state.Dependent{Since: past.Add(-time.Hour), Expires: &past}, DependentView{Registered: time.Hour}, false},
		{"ttl passed by our clock, watched for less than the ttl: maybe a clock ahead", state.Dependent{Since: past.Add(-time.Hour), Expires: &past}, DependentView{Registered: 59 * time.Minute}, true},
		{"ttl passed by more than the skew tolerance, never watched (a fresh gc)", state.Dependent{Since: t0.Add(-time.Hour - ClockSkewTolerance), Expires: ptrTime(t0.Add(-ClockSkewTolerance))}, DependentView{}, false},
		{"ttl passed by less than the skew tolerance, never watched", state.Dependent{Since: t0.Add(-time.Hour - ClockSkewTolerance + time.Second), Expires: ptrTime(t0.Add(-ClockSkewTolerance + time.Second))}, DependentView{}, true},
		{"short ttl: the tolerance is the ttl itself", state.Dependent{Since: t0.Add(-2 * time.Second), Expires: ptrTime(t0.Add(-time.Second))}, DependentView{}, false},
		{"ttl watched long enough, not passed by our clock: a clock behind", state.Dependent{Since: future.Add(-time.Hour), Expires: &future}, DependentView{Registered: 2 * time.Hour}, true},
		{"local process alive", state.Dependent{Process: proc}, DependentView{Local: true}, true},
		{"local process gone", state.Dependent{Process: proc}, DependentView{Local: true, Dead: true}, false},
		{"remote, lease renewed recently", state.Dependent{Process: proc}, DependentView{LeaseUnchanged: 59 * time.Second}, true},
		{"remote, lease not renewed", state.Dependent{Process: proc}, DependentView{LeaseUnchanged: time.Minute}, false},
		{"remote, dead flag ignored without proof", state.Dependent{Process: proc}, DependentView{Dead: true}, true},
		{"remote, on the store's lease, counter unchanged for long", state.Dependent{Process: proc}, DependentView{StoreLease: true, LeaseUnchanged: time.Hour}, true},
		{"local, on the store's lease, process gone", state.Dependent{Process: proc}, DependentView{StoreLease: true, Local: true, Dead: true}, false},
		{"on the store's lease, ttl passed", state.Dependent{Process: proc, Since: past.Add(-time.Hour), Expires: &past}, DependentView{StoreLease: true, Registered: time.Hour}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			live, why := Liveness(tc.d, tc.dv, p, t0)
			if live != tc.wlive || why == "" {
				t.Errorf("live = %v (%q), want %v", live, why, tc.wlive)
			}
			e := entry(state.Ready, func(e *state.Entry) { e.Dependents = map[string]state.Dependent{"d": tc.d} })
			r, dead := Reap(e, map[string]DependentView{"d": tc.dv}, p, t0)
			if r.Changed == tc.wlive || (len(dead) == 1) == tc.wlive {
				t.Errorf("reap changed=%v dead=%v, want live %v", r.Changed, dead, tc.wlive)
			}
			if len(e.Dependents) != 1 {
				t.Error("Reap modified its input")
			}
		})
	}
}

func TestStepReapsThenCancels(t *testing.T) {
	e := entry(state.Downloading, ownedBy(other), func(e *state.Entry) {
		e.Dependents = map[string]state.Dependent{"crashed": {Process: &state.Process{PID: 5}}}
	})
	v := view(func(v *View) { v.Dependents = map[string]DependentView{"crashed": {Local: true, Dead: true}} })
	r, err := Step(e, v, pol, t0)
	if err != nil {
		t.Fatal(err)
	}
	if r.Entry != nil || !reflect.DeepEqual(actionTypes(r.Actions), []string{"Reaped", "CancelDownload", "Removed"}) {
		t.Fatalf("result %+v, actions %v", r.Entry, actionTypes(r.Actions))
	}
}

func TestRenew(t *testing.T) {
	me := state.Process{Host: "h", BootID: "b", PIDNS: "n", PID: 1, StartTime: 1}
	e := entry(state.Ready, func(e *state.Entry) {
		e.Dependents = map[string]state.Dependent{"mine": {Process: &me}, "named": {}}
	})
	r := Renew(e, me)
	if !r.Changed || r.Entry.Dependents["mine"].Lease != 1 || r.Entry.Dependents["named"].Lease != 0 {
		t.Fatalf("%+v", r.Entry.Dependents)
	}
	if e.Dependents["mine"].Lease != 0 {
		t.Error("Renew modified its input")
	}
}

func ptrTime(t time.Time) *time.Time { return &t }

// watchedAllOf: a sweeper that saw every entry from its creation and its
// last use on, so that ages are the recorded ones.
func watchedAllOf(es map[string]*state.Entry) map[string]Watched {
	w := map[string]Watched{}
	for id, e := range es {
		w[id] = asRecorded(e, t0)
	}
	return w
}

// TestAgesOnTheSweepersClock: min-age and max-age are judged on the
// sweeper's own clock, as TTLs are. An entry's Created and LastUsed come
// from whichever host made or used it; a sweeper whose clock runs ahead of
// that host's (or, the same, a host that runs behind) never evicts early:
// it must have watched the value unchanged for the age, or see it past the
// age by ClockSkewTolerance. A sweeper that runs behind evicts late.
func TestAgesOnTheSweepersClock(t *testing.T) {
	pol := state.Policy{MaxSizeBytes: 10 << 20, HighWatermark: 90, LowWatermark: 50, MinAge: state.Duration(2 * time.Minute)}
	over := Usage{Bytes: 20 << 20} // every candidate is wanted
	for _, tc := range []struct {
		name    string
		minAge  time.Duration
		created time.Duration // before t0, on the writer's clock
		watched time.Duration
		evicted bool
	}{
		{"written by a host 3m behind, just now, one-shot", 2 * time.Minute, 3 * time.Minute, 0, false},
		{"written by a host 3m behind, watched 1m", 2 * time.Minute, 4 * time.Minute, time.Minute, false},
		{"written by a host 3m behind, watched for min-age", 2 * time.Minute, 5 * time.Minute, 2 * time.Minute, true},
		{"one-shot, past min-age by less than the tolerance", 2 * time.Minute, 7*time.Minute - time.Second, 0, false},
		{"one-shot, past min-age by the tolerance", 2 * time.Minute, 7 * time.Minute, 0, true},
		{"written by a host 3m ahead, watched far longer: it has existed that long", 2 * time.Minute, -3 * time.Minute, time.Hour, true},
		{"written by a host 3m ahead, watched 1m", 2 * time.Minute, -3 * time.Minute, time.Minute, false},
		{"written by a host 1m ahead, watched 3m: age 2m on our clock", 2 * time.Minute, 2 * time.Minute, 3 * time.Minute, true},
		{"min-age 0: at once", 0, -time.Hour, 0, true},
	} {
		p := pol
		p.MinAge = state.Duration(tc.minAge)
		e := cacheEntry(1, 20, -600, func(e *state.Entry) { e.Created = t0.Add(-tc.created) })
		es := entries(e)
		got := PlanEviction(p, es, map[string]Watched{e.Key.ID(): {Created: tc.watched, LastUsed: tc.watched}}, over, t0)
		if (len(got) == 1) != tc.evicted {
			t.Errorf("%s: victims %v, want evicted %v", tc.name, victims(got), tc.evicted)
		}
		why := Kept(p, e, Watched{Created: tc.watched}, t0)
		if (why == "") != tc.evicted {
			t.Errorf("%s: Kept = %q", tc.name, why)
		}
		// Old enough by its stamp, kept by the skew allowance: the reason
		// names the allowance, not min-age alone.
		if skew := strings.Contains(why, "for clock skew"); why != "" && skew != (tc.created >= tc.minAge) {
			t.Errorf("%s: Kept = %q, want the clock skew named: %v", tc.name, why, tc.created >= tc.minAge)
		}
	}

	// max-age, under budget: only the age rule evicts.
	under := Usage{Bytes: 1}
	for _, tc := range []struct {
		name    string
		unused  time.Duration // before t0, on the user's clock
		watched time.Duration
		evicted bool
	}{
		{"unused past max-age by 1m, one-shot", time.Hour + time.Minute, 0, false},
		{"unused past max-age by 1m, watched unused for max-age", time.Hour + time.Minute, time.Hour, true},
		{"unused past max-age by the tolerance, one-shot", time.Hour + ClockSkewTolerance, 0, true},
		{"used just now by a host an hour behind", time.Hour, 0, false},
	} {
		p := pol
		p.MinAge, p.MaxAge = 0, state.Duration(time.Hour)
		e := cacheEntry(1, 1, 0, func(e *state.Entry) { e.LastUsed = t0.Add(-tc.unused) })
		got := PlanEviction(p, entries(e), map[string]Watched{e.Key.ID(): {LastUsed: tc.watched}}, under, t0)
		if (len(got) == 1 && got[0].Reason == "age") != tc.evicted {
			t.Errorf("max-age, %s: victims %v, want evicted %v", tc.name, victims(got), tc.evicted)
		}
	}
}

func TestAbandoned(t *testing.T) {
	dep := map[string]state.Dependent{"r": {}}
	for _, tc := range []struct {
		e    *state.Entry
		want bool
	}{
		{nil, false},
		{&state.Entry{Stage: state.Downloading}, true},
		{&state.Entry{Stage: state.Downloading, Dependents: dep}, false},
		{&state.Entry{Stage: state.Ready}, false},
		{&state.Entry{Stage: state.Failed}, false},
	} {
		if got := Abandoned(tc.e); got != tc.want {
			t.Errorf("Abandoned(%+v) = %v, want %v", tc.e, got, tc.want)
		}
	}
}

// Budgets and ages near the top of their ranges, which are valid policy:
// the arithmetic must not wrap into "evict everything".
func TestEvictionAtTheEdgesOfRange(t *testing.T) {
	const eib = int64(1) << 60
	es := entries(cacheEntry(1, 30, 1), cacheEntry(2, 30, 2))
	u := Usage{Bytes: Measure(es)}
	for _, size := range []int64{97 << 50, 100 << 50, 512 << 50, eib, 2 * eib, 3 * eib, 4 * eib, 1<<63 - 1} {
		pol := state.Policy{MaxSizeBytes: size, HighWatermark: 90, LowWatermark: 50}
		if got := PlanEviction(pol, es, watchedAllOf(es), u, t0); len(got) != 0 {
			t.Errorf("budget %d, usage %d: victims %v, want none", size, u.Bytes, victims(got))
		}
	}
	// Over such a budget, it frees down to the low watermark, no further.
	pol := state.Policy{MaxSizeBytes: 1<<63 - 1, HighWatermark: 90, LowWatermark: 50}
	big := entries(cacheEntry(1, 0, 1, func(e *state.Entry) { e.SizeBytes = pol.MaxSizeBytes / 4 * 3 }),
		cacheEntry(2, 0, 2, func(e *state.Entry) { e.SizeBytes = pol.MaxSizeBytes / 5 }))
	if got := victims(PlanEviction(pol, big, watchedAllOf(big), Usage{Bytes: Measure(big)}, t0)); !reflect.DeepEqual(got, []string{"1:budget"}) {
		t.Errorf("over a budget of MaxInt64 bytes: victims %v, want [1:budget]", got)
	}
	if got, want := percentOf(1<<63-1, 90), int64((1<<63-1)/100*90+7*90/100); got != want {
		t.Errorf("percentOf(MaxInt64, 90) = %d, want %d", got, want)
	}
	if got := percentOf(199, 50); got != 99 {
		t.Errorf("percentOf(199, 50) = %d, want 99", got)
	}

	// Ages within ClockSkewTolerance of the longest Duration: nothing is
	// that old, so nothing is aged.
	const longest = time.Duration(1<<63 - 1)
	for _, d := range []time.Duration{longest, longest - time.Minute, longest - ClockSkewTolerance, longest - ClockSkewTolerance - time.Second} {
		p := state.Policy{MaxSizeBytes: 1, HighWatermark: 90, LowWatermark: 50, MinAge: state.Duration(d)}
		if got := PlanEviction(p, es, watchedAllOf(es), u, t0); len(got) != 0 {
			t.Errorf("min-age %s: victims %v, want none", d, victims(got))
		}
		p = state.Policy{MaxAge: state.Duration(d)}
		if got := PlanEviction(p, es, watchedAllOf(es), Usage{Bytes: 1}, t0); len(got) != 0 {
			t.Errorf("max-age %s: victims %v, want none", d, victims(got))
		}
	}
}

// TestSharedImageCountedOnce: a tag and a digest entry of one image (one
// image ID in one daemon) take its bytes once, and evicting one of them
// frees nothing while the other names the image.
func TestSharedImageCountedOnce(t *testing.T) {
	img := func(src, daemon, id string, size int64, used int, opts ...func(*state.Entry)) *state.Entry {
		e := &state.Entry{Key: state.Key{Kind: state.Image, Source: "https://x/" + src, Daemon: daemon}, Stage: state.Ready,
			ImageID: id, SizeBytes: size << 20, LastUsed: t0.Add(time.Duration(used) * time.Minute), Created: t0.Add(-time.Hour)}
		for _, o := range opts {
			o(e)
		}
		return e
	}
	dep := func(e *state.Entry) { e.Dependents = map[string]state.Dependent{"run": {}} }
	pol := state.Policy{MaxSizeBytes: 100 << 20, HighWatermark: 90, LowWatermark: 50}
	tag, digest := img("tag", "d1", "sha256:a", 60, 1), img("digest", "d1", "sha256:a", 60, 2)
	if n := Measure(entries(tag, digest)); n != 60<<20 {
		t.Errorf("Measure of a tag and a digest of one 60 MB image: %d MB, want 60", n>>20)
	}
	// The same ID in another daemon is another image.
	if n := Measure(entries(tag, img("elsewhere", "d2", "sha256:a", 60, 1))); n != 120<<20 {
		t.Errorf("Measure of one ID in two daemons: %d MB, want 120", n>>20)
	}
	type victim struct {
		name         string
		bytes, frees int64
	}
	got := func(vs []Victim) []victim {
		out := []victim{}
		for _, v := range vs {
			out = append(out, victim{v.Key.Source[len("https://x/"):], v.Bytes >> 20, v.Frees >> 20})
		}
		return out
	}
	tests := []struct {
		name string
		es   map[string]*state.Entry
		want []victim
	}{
		// 60 MB image + 40 MB bundle: 100 MB, over 90; to 50 means 50 MB.
		// The tag (used first) frees nothing, the digest the image: both
		// go, before the bundle used after them.
		{"both entries evictable", entries(tag, digest, cacheEntry(3, 40, 5)),
			[]victim{{"tag", 60, 0}, {"digest", 60, 60}}},
		// The digest's dependent keeps the image: evicting the tag frees
		// nothing, so the bundle goes too.
		{"the other entry held", entries(tag, img("digest", "d1", "sha256:a", 60, 2, dep), cacheEntry(3, 40, 5)),
			[]victim{{"tag", 60, 0}, {"3", 40, 40}}},
		// Under the high watermark once the image counts once: nothing.
		{"under budget counted once", entries(tag, digest, cacheEntry(3, 20, 5)), []victim{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u := Usage{Bytes: Measure(tc.es)}
			if g := got(PlanEviction(pol, tc.es, watchedAllOf(tc.es), u, t0)); !reflect.DeepEqual(g, tc.want) {
				t.Errorf("victims = %v, want %v", g, tc.want)
			}
		})
	}
	self := state.Key{Kind: state.Bundle, Source: "https://x/new"}
	heldTag, heldDigest := img("tag", "d1", "sha256:a", 60, 1, dep), img("digest", "d1", "sha256:a", 60, 2, dep)
	if room, fixed, _ := Room(pol, entries(heldTag, heldDigest), self, nil, t0); fixed != 60<<20 || room != 40<<20 {
		t.Errorf("beside one held image named twice: room %d MB, fixed %d MB; want 40, 60", room>>20, fixed>>20)
	}
	dp := state.Policy{MinFreeDiskBytes: 10 << 20}
	u := Usage{DiskFree: 20 << 20, DiskSize: 1 << 30}
	if room, _, _ := RoomOnDisk(dp, entries(tag, heldDigest), self, u, nil, t0); room != 10<<20 {
		t.Errorf("on disk, beside an image one held entry names: room %d MB, want 10 (evicting the tag frees nothing)", room>>20)
	}
	if room, _, _ := RoomOnDisk(dp, entries(tag, digest), self, u, nil, t0); room != 70<<20 {
		t.Errorf("on disk, beside an image two evictable entries name: room %d MB, want 70", room>>20)
	}
}
