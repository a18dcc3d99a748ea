package transitions

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

var (
	t0   = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	key  = state.Key{Kind: state.Bundle, Source: "https://example.com/a.tar.gz"}
	self = owner("h1", 10, "m-self")
	// other is another manager on another host.
	other = owner("h2", 10, "m-other")
	pol   = Policy{DownloadTimeout: 5 * time.Minute, FailureCooldown: time.Minute, MaxCooldown: 8 * time.Minute}
)

func owner(host string, pid int, id string) state.Owner {
	return state.Owner{Process: state.Process{Host: host, BootID: "b-" + host, PIDNS: "ns", PID: pid, StartTime: 1}, ManagerID: id}
}

// entry builds an entry; opts adjust it.
func entry(stage state.Stage, opts ...func(*state.Entry)) *state.Entry {
	e := &state.Entry{Key: key, Stage: stage, Generation: 3,
		Dependents: map[string]state.Dependent{"run1": {Since: t0}}}
	for _, o := range opts {
		o(e)
	}
	return e
}

func ownedBy(o state.Owner) func(*state.Entry) { return func(e *state.Entry) { e.Owner = &o } }
func noDeps(e *state.Entry)                    { e.Dependents = nil }
func failedAt(t time.Time, n int) func(*state.Entry) {
	return func(e *state.Entry) { e.FailedAt, e.Failures, e.Message = t, n, "HTTP 404" }
}

func view(opts ...func(*View)) View {
	v := View{Self: self, Drive: true}
	for _, o := range opts {
		o(&v)
	}
	return v
}

func running(v *View)    { v.Running = true }
func ownerDead(v *View)  { v.OwnerDead = true }
func leaseEnded(v *View) { v.OwnerLeaseEnded = true }
func passive(v *View)    { v.Drive = false }
func unchanged(d time.Duration) func(*View) {
	return func(v *View) { v.Unchanged = d }
}

func actionTypes(as []Action) []string {
	var out []string
	for _, a := range as {
		out = append(out, reflect.TypeOf(a).Name())
	}
	return out
}

func TestStep(t *testing.T) {
	tests := []struct {
		name  string
		in    *state.Entry
		view  View
		now   time.Time
		wgen  uint64 // generation of the result; 0 = entry removed
		wown  *state.Owner
		wstg  state.Stage
		wchg  bool
		wacts []string
		werr  error
	}{
		{name: "downloading, unowned: claim", in: entry(state.Downloading), view: view(),
			wgen: 4, wown: &self, wstg: state.Downloading, wchg: true, wacts: []string{"StartDownload"}},
		{name: "downloading, unowned, not driven here: wait", in: entry(state.Downloading), view: view(passive),
			wgen: 3, wstg: state.Downloading},
		{name: "downloading, ours and running: nothing", in: entry(state.Downloading, ownedBy(self)), view: view(running),
			wgen: 3, wown: &self, wstg: state.Downloading},
		{name: "downloading, ours by record but not running: reclaim", in: entry(state.Downloading, ownedBy(self)), view: view(),
			wgen: 4, wown: &self, wstg: state.Downloading, wchg: true, wacts: []string{"StartDownload"}},
		{name: "owner equals self after restart (same host, new process): dead, take over",
			in: entry(state.Downloading, ownedBy(owner("h1", 99, "m-old"))), view: view(ownerDead),
			wgen: 4, wown: &self, wstg: state.Downloading, wchg: true, wacts: []string{"StartDownload", "TakeOver", "RemoveStaging"}},
		{name: "other owner making progress: wait", in: entry(state.Downloading, ownedBy(other)), view: view(unchanged(time.Minute)),
			wgen: 3, wown: &other, wstg: state.Downloading},
		{name: "other owner, unchanged just below the timeout: wait", in: entry(state.Downloading, ownedBy(other)),
			view: view(unchanged(5*time.Minute - time.Nanosecond)), wgen: 3, wown: &other, wstg: state.Downloading},
		{name: "other owner stalled for the timeout: take over, keep its staging", in: entry(state.Downloading, ownedBy(other)),
			view: view(unchanged(5 * time.Minute)), wgen: 4, wown: &self, wstg: state.Downloading, wchg: true,
			wacts: []string{"StartDownload", "TakeOver"}},
		{name: "other owner dead: take over, remove its staging", in: entry(state.Downloading, ownedBy(other)), view: view(ownerDead),
			wgen: 4, wown: &self, wstg: state.Downloading, wchg: true, wacts: []string{"StartDownload", "TakeOver", "RemoveStaging"}},
		{name: "stalled owner, not driven here: wait", in: entry(state.Downloading, ownedBy(other)), view: view(passive, unchanged(time.Hour)),
			wgen: 3, wown: &other, wstg: state.Downloading},
		{name: "other owner's lease ended: take over, keep its staging", in: entry(state.Downloading, ownedBy(other)), view: view(leaseEnded),
			wgen: 4, wown: &self, wstg: state.Downloading, wchg: true, wacts: []string{"StartDownload", "TakeOver"}},
		{name: "other owner's lease ended, not driven here: wait", in: entry(state.Downloading, ownedBy(other)), view: view(passive, leaseEnded),
			wgen: 3, wown: &other, wstg: state.Downloading},
		{name: "own lease ended, download running: keep it", in: entry(state.Downloading, ownedBy(self)), view: view(running, leaseEnded),
			wgen: 3, wown: &self, wstg: state.Downloading},
		{name: "downloading, no dependent left: cancel and remove", in: entry(state.Downloading, ownedBy(self), noDeps), view: view(running),
			wchg: true, wacts: []string{"CancelDownload", "Removed"}},
		{name: "downloading, no dependent, not driven here: still removed", in: entry(state.Downloading, ownedBy(other), noDeps), view: view(passive),
			wchg: true, wacts: []string{"CancelDownload", "Removed"}},
		{name: "ready: nothing", in: entry(state.Ready), view: view(), wgen: 3, wstg: state.Ready},
		{name: "ready without dependents: nothing (eviction decides)", in: entry(state.Ready, noDeps), view: view(), wgen: 3, wstg: state.Ready},
		{name: "failed, cooling down: nothing", in: entry(state.Failed, failedAt(t0, 1)), view: view(), now: t0.Add(59 * time.Second),
			wgen: 3, wstg: state.Failed},
		{name: "failed, cooled down, dependents: retry and claim", in: entry(state.Failed, failedAt(t0, 1)), view: view(), now: t0.Add(time.Minute),
			wgen: 4, wown: &self, wstg: state.Downloading, wchg: true, wacts: []string{"StartDownload"}},
		{name: "failed by verify, content left for the runs holding it, cooled down: not retried while they hold it",
			in: entry(state.Failed, failedAt(t0, 1), func(e *state.Entry) { e.Path = "entries/x-g3/content" }), view: view(), now: t0.Add(time.Hour),
			wgen: 3, wstg: state.Failed},
		{name: "failed by verify, content left, nobody holds it: pruned", in: entry(state.Failed, failedAt(t0, 1), noDeps, func(e *state.Entry) { e.Path = "entries/x-g3/content" }),
			view: view(), now: t0.Add(time.Minute), wchg: true, wacts: []string{"Removed"}},
		{name: "failed twice: cool-down doubled", in: entry(state.Failed, failedAt(t0, 2)), view: view(), now: t0.Add(90 * time.Second),
			wgen: 3, wstg: state.Failed},
		{name: "failed 10 times: cool-down capped", in: entry(state.Failed, failedAt(t0, 10)), view: view(), now: t0.Add(8 * time.Minute),
			wgen: 4, wown: &self, wstg: state.Downloading, wchg: true, wacts: []string{"StartDownload"}},
		{name: "failed, cooled down, no dependents: pruned", in: entry(state.Failed, failedAt(t0, 1), noDeps), view: view(), now: t0.Add(time.Hour),
			wchg: true, wacts: []string{"Removed"}},
		{name: "failed, cooled down, dependents, not driven here: nothing", in: entry(state.Failed, failedAt(t0, 1)), view: view(passive), now: t0.Add(time.Hour),
			wgen: 3, wstg: state.Failed},
		{name: "clock jumped back before the failure: still cooling", in: entry(state.Failed, failedAt(t0, 1)), view: view(), now: t0.Add(-time.Hour),
			wgen: 3, wstg: state.Failed},
		{name: "unknown stage: invalid", in: entry("DONE"), view: view(), werr: ErrInvalidTransition},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := *tc.in
			now := tc.now
			if now.IsZero() {
				now = t0
			}
			r, err := Step(tc.in, tc.view, pol, now)
			if !errors.Is(err, tc.werr) || (err != nil) != (tc.werr != nil) {
				t.Fatalf("err = %v, want %v", err, tc.werr)
			}
			if err != nil {
				return
			}
			if !reflect.DeepEqual(*tc.in, before) {
				t.Error("Step modified its input")
			}
			if r.Changed != tc.wchg {
				t.Errorf("changed = %v, want %v", r.Changed, tc.wchg)
			}
			if got := actionTypes(r.Actions); !reflect.DeepEqual(got, tc.wacts) {
				t.Errorf("actions = %v, want %v", got, tc.wacts)
			}
			if tc.wgen == 0 {
				if r.Entry != nil {
					t.Fatalf("entry kept: %+v, want removed", r.Entry)
				}
				return
			}
			if r.Entry == nil {
				t.Fatal("entry removed")
			}
			if r.Entry.Generation != tc.wgen || r.Entry.Stage != tc.wstg {
				t.Errorf("got %s gen %d, want %s gen %d", r.Entry.Stage, r.Entry.Generation, tc.wstg, tc.wgen)
			}
			if (r.Entry.Owner == nil) != (tc.wown == nil) || (tc.wown != nil && !r.Entry.Owner.Same(tc.wown)) {
				t.Errorf("owner = %v, want %v", r.Entry.Owner, tc.wown)
			}
			for _, a := range r.Actions {
				if s, ok := a.(StartDownload); ok && s.Generation != r.Entry.Generation {
					t.Errorf("StartDownload generation %d, entry at %d", s.Generation, r.Entry.Generation)
				}
			}
		})
	}
}

func TestOwnerEvents(t *testing.T) {
	mine := func() *state.Entry { return entry(state.Downloading, ownedBy(self)) }
	pub := Published{Path: "entries/x-g3/content", SizeBytes: 42}
	tests := []struct {
		name  string
		ev    func() (Result, error)
		werr  error
		wstg  state.Stage
		check func(t *testing.T, e *state.Entry)
	}{
		{name: "report bumps heartbeat", ev: func() (Result, error) { return Report(mine(), self, 3, 10, 100, 250) },
			wstg: state.Downloading, check: func(t *testing.T, e *state.Entry) {
				if e.Progress != (state.Progress{Bytes: 10, Total: 100, Heartbeat: 1}) {
					t.Errorf("progress = %+v", e.Progress)
				}
				if e.SizeBytes != 250 {
					t.Errorf("size %d, want the 250 bytes on disk", e.SizeBytes)
				}
			}},
		{name: "report without a disk figure keeps the size", ev: func() (Result, error) {
			e := mine()
			e.SizeBytes = 7
			return Report(e, self, 3, 10, 100, -1)
		},
			wstg: state.Downloading, check: func(t *testing.T, e *state.Entry) {
				if e.SizeBytes != 7 {
					t.Errorf("size %d, want 7 kept", e.SizeBytes)
				}
			}},
		{name: "publish: ready, owner cleared, size set", ev: func() (Result, error) { return Publish(mine(), self, 3, pub, t0) },
			wstg: state.Ready, check: func(t *testing.T, e *state.Entry) {
				if e.Owner != nil || e.Path != pub.Path || e.SizeBytes != 42 || e.Failures != 0 {
					t.Errorf("entry = %+v", e)
				}
			}},
		{name: "fail: failed, failures counted", ev: func() (Result, error) { return Fail(mine(), self, 3, "HTTP 500", t0) },
			wstg: state.Failed, check: func(t *testing.T, e *state.Entry) {
				if e.Owner != nil || e.Failures != 1 || e.Message != "HTTP 500" || !e.FailedAt.Equal(t0) {
					t.Errorf("entry = %+v", e)
				}
			}},
		{name: "publish with an old generation (taken over meanwhile): fenced",
			ev: func() (Result, error) { return Publish(mine(), self, 2, pub, t0) }, werr: ErrFenced},
		{name: "killed while publishing, taken over: late publish fenced",
			ev: func() (Result, error) {
				e := entry(state.Downloading, ownedBy(other))
				e.Generation = 4
				return Publish(e, self, 3, pub, t0)
			}, werr: ErrFenced},
		{name: "publish after the new owner published: fenced",
			ev: func() (Result, error) { return Publish(entry(state.Ready), self, 3, pub, t0) }, werr: ErrFenced},
		{name: "report after the entry was removed (released): fenced",
			ev: func() (Result, error) { return Report(nil, self, 3, 1, 1, 0) }, werr: ErrFenced},
		{name: "same host and pid but another manager: fenced",
			ev: func() (Result, error) { return Report(mine(), owner("h1", 10, "m-twin"), 3, 1, 1, 0) }, werr: ErrFenced},
		{name: "fail on a failed entry: fenced",
			ev: func() (Result, error) { return Fail(entry(state.Failed), self, 3, "x", t0) }, werr: ErrFenced},
		{name: "refetch: an unowned download keeping its dependents and generation, content cleared",
			ev: func() (Result, error) {
				return Refetch(entry(state.Ready, func(e *state.Entry) {
					e.ImageID, e.RepoDigest, e.SizeBytes, e.Progress = "sha256:aa", "r@sha256:bb", 42, state.Progress{Bytes: 42, Total: 42}
				}), "image removed"), nil
			},
			wstg: state.Downloading, check: func(t *testing.T, e *state.Entry) {
				if e.Owner != nil || e.ImageID != "" || e.RepoDigest != "" || e.SizeBytes != 0 || e.Progress != (state.Progress{}) ||
					e.Generation != 3 || len(e.Dependents) != 1 || e.Message != "image removed" {
					t.Errorf("entry = %+v", e)
				}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, err := tc.ev()
			if !errors.Is(err, tc.werr) || (err != nil) != (tc.werr != nil) {
				t.Fatalf("err = %v, want %v", err, tc.werr)
			}
			if err != nil {
				return
			}
			if !r.Changed || r.Entry == nil || r.Entry.Stage != tc.wstg {
				t.Fatalf("result = %+v, want changed %s", r, tc.wstg)
			}
			tc.check(t, r.Entry)
		})
	}
}

func TestRequestRelease(t *testing.T) {
	dep := state.Dependent{Since: t0}
	t.Run("missing: created downloading, unowned", func(t *testing.T) {
		r, err := Request(nil, key, "run1", dep, pol, t0)
		if err != nil || r.Entry.Stage != state.Downloading || r.Entry.Owner != nil || len(r.Entry.Dependents) != 1 {
			t.Fatalf("%+v %v", r.Entry, err)
		}
	})
	t.Run("ready: dependent added, last used bumped", func(t *testing.T) {
		r, err := Request(entry(state.Ready), key, "run2", dep, pol, t0.Add(time.Hour))
		if err != nil || r.Entry.Stage != state.Ready || len(r.Entry.Dependents) != 2 || !r.Entry.LastUsed.Equal(t0.Add(time.Hour)) {
			t.Fatalf("%+v %v", r.Entry, err)
		}
	})
	t.Run("failed within cool-down: stays failed", func(t *testing.T) {
		r, err := Request(entry(state.Failed, failedAt(t0, 1)), key, "run2", dep, pol, t0.Add(time.Second))
		if err != nil || r.Entry.Stage != state.Failed {
			t.Fatalf("%+v %v", r.Entry, err)
		}
	})
	t.Run("failed past cool-down: retried, failures kept", func(t *testing.T) {
		r, err := Request(entry(state.Failed, failedAt(t0, 2)), key, "run2", dep, pol, t0.Add(time.Hour))
		if err != nil || r.Entry.Stage != state.Downloading || r.Entry.Failures != 2 || r.Entry.Owner != nil {
			t.Fatalf("%+v %v", r.Entry, err)
		}
	})
	t.Run("failed by verify, content kept for the runs holding it, past cool-down: stays failed", func(t *testing.T) {
		e := entry(state.Failed, failedAt(t0, 1), func(e *state.Entry) { e.Path = "entries/x-g3/content" })
		r, err := Request(e, key, "run2", dep, pol, t0.Add(time.Hour))
		if err != nil || r.Entry.Stage != state.Failed || r.Entry.Path != e.Path || len(r.Entry.Dependents) != 2 {
			t.Fatalf("%+v %v", r.Entry, err)
		}
	})
	noDeps := func(e *state.Entry) { e.Dependents = nil }
	kept := func(e *state.Entry) { e.Path, e.SizeBytes = "entries/x-g3/content", 42 }
	t.Run("failed by verify, kept content nobody holds now, past cool-down: retried, content dropped", func(t *testing.T) {
		e := entry(state.Failed, failedAt(t0, 2), kept, noDeps)
		r, err := Request(e, key, "run2", dep, pol, t0.Add(time.Hour))
		if err != nil || r.Entry.Stage != state.Downloading || r.Entry.Path != "" || r.Entry.SizeBytes != 0 || r.Entry.Failures != 2 || len(r.Entry.Dependents) != 1 {
			t.Fatalf("%+v %v", r.Entry, err)
		}
		if !reflect.DeepEqual(r.Actions, []Action{DropContent{Path: "entries/x-g3/content"}}) {
			t.Fatalf("actions %+v, want the drop of the kept content", r.Actions)
		}
		if e.Path == "" || e.Stage != state.Failed {
			t.Fatalf("the entry given was changed: %+v", e)
		}
	})
	t.Run("failed by verify, kept content nobody holds now, within cool-down: stays failed, content kept", func(t *testing.T) {
		e := entry(state.Failed, failedAt(t0, 1), kept, noDeps)
		r, err := Request(e, key, "run2", dep, pol, t0.Add(time.Second))
		if err != nil || r.Entry.Stage != state.Failed || r.Entry.Path != e.Path || len(r.Actions) != 0 {
			t.Fatalf("%+v %+v %v", r.Entry, r.Actions, err)
		}
	})
	t.Run("retry now: kept content held by a dependent stays; nobody's is dropped", func(t *testing.T) {
		held := entry(state.Failed, failedAt(t0, 1), kept)
		if r := RetryNow(held); r.Changed || r.Entry.Stage != state.Failed || len(r.Actions) != 0 {
			t.Fatalf("held: %+v %+v", r.Entry, r.Actions)
		}
		free := entry(state.Failed, failedAt(t0, 1), kept, noDeps)
		r := RetryNow(free)
		if !r.Changed || r.Entry.Stage != state.Downloading || r.Entry.Path != "" ||
			!reflect.DeepEqual(r.Actions, []Action{DropContent{Path: "entries/x-g3/content"}}) {
			t.Fatalf("free: %+v %+v", r.Entry, r.Actions)
		}
		if r := RetryNow(entry(state.Failed, failedAt(t0, 1))); !r.Changed || r.Entry.Stage != state.Downloading || len(r.Actions) != 0 {
			t.Fatalf("no content: %+v %+v", r.Entry, r.Actions)
		}
	})
	t.Run("release the last dependent of a download: removed and cancelled", func(t *testing.T) {
		r, err := Release(entry(state.Downloading, ownedBy(other)), "run1")
		if err != nil || r.Entry != nil || !reflect.DeepEqual(actionTypes(r.Actions), []string{"CancelDownload", "Removed"}) {
			t.Fatalf("%+v %v", r, err)
		}
	})
	t.Run("release the last dependent of a ready entry: kept for eviction", func(t *testing.T) {
		r, err := Release(entry(state.Ready), "run1")
		if err != nil || r.Entry == nil || len(r.Entry.Dependents) != 0 {
			t.Fatalf("%+v %v", r, err)
		}
	})
	t.Run("release an unknown dependent: error", func(t *testing.T) {
		if _, err := Release(entry(state.Ready), "nobody"); !errors.Is(err, ErrNotRegistered) {
			t.Fatalf("err = %v", err)
		}
		if _, err := Release(nil, "run1"); !errors.Is(err, ErrNotRegistered) {
			t.Fatalf("err = %v", err)
		}
	})
}

// pureImports are the packages transitions may import directly: none of
// them does I/O, and time only for its types and arithmetic (the calls
// that read the clock or wait are refused by impure below).
var pureImports = map[string]bool{
	"cmp": true, "errors": true, "fmt": true, "maps": true, "math": true, "slices": true,
	"sort": true, "strconv": true, "strings": true, "time": true,
	"github.com/depcache/depcache/state": true,
}

// impure names, per import path, the selectors that read a clock, wait,
// draw random numbers or reach the operating system; "*" is every selector
// of that package.
var impure = map[string]map[string]bool{
	"time": {"Now": true, "Since": true, "Until": true, "Sleep": true, "After": true, "AfterFunc": true,
		"NewTimer": true, "NewTicker": true, "Tick": true, "LoadLocation": true, "Local": true},
	"fmt":                                {"Print": true, "Printf": true, "Println": true, "Scan": true, "Scanf": true, "Scanln": true},
	"github.com/depcache/depcache/state": {"Open": true, "NewLock": true, "SyncDir": true, "RealClock": true, "System": true},
	"os":                                 {"*": true},
	"math/rand":                          {"*": true},
	"math/rand/v2":                       {"*": true},
	"crypto/rand":                        {"*": true},
	"os/exec":                            {"*": true},
	"os/signal":                          {"*": true},
	"syscall":                            {"*": true},
	"net":                                {"*": true},
	"net/http":                           {"*": true},
	"io/ioutil":                          {"*": true},
	"path/filepath":                      {"*": true},
	"runtime":                            {"*": true},
	"golang.org/x/sys/unix":              {"*": true},
}

// statePath is the state package, the one package of this module that
// transitions imports.
const statePath = "github.com/depcache/depcache/state"

// pureState is every identifier of state that transitions may use: the
// data model (its types, stages and kinds) and functions that only
// compute. state also opens stores, takes locks, reads files and
// directories (DecodeFile, CheckLayout, CheckUnbound, ReadToken,
// ReadLockInfo, ...) and reads the clock (RealClock): every identifier not
// listed here is refused, so that a function state adds is refused until
// someone has read what it does and listed it. (Methods of the data model
// are reached through values, not through the package name; none of them
// does I/O.)
var pureState = map[string]bool{
	// The data model.
	"Entry": true, "Dependent": true, "Owner": true, "Process": true, "Progress": true,
	"Key": true, "Kind": true, "BuildSpec": true, "Stage": true, "Policy": true,
	"Duration": true, "State": true,
	"Downloading": true, "Ready": true, "Failed": true,
	"Bundle": true, "Image": true,
	// Functions that only compute.
	"New": true, "DefaultPolicy": true,
}

// TestPure: transitions imports neither os nor the network, and reads no
// clock, so that its rules stay pure. Every non-test file's direct imports
// must be in pureImports, no file may use an impure selector (nor `os.` or
// `rand.` whatever they name), and of state only what pureState lists.
func TestPure(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	parsed := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		// Every file, whatever its build constraints.
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		parsed++
		for _, p := range impureUses(f, fset) {
			t.Error(p)
		}
	}
	if parsed < 5 {
		t.Fatalf("parsed %d non-test files of %v: the check would prove nothing", parsed, files)
	}

	// Nothing reaches the network or the manager through state either.
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if dep == "net" || dep == "net/http" || dep == "os/exec" || strings.HasPrefix(dep, "github.com/depcache/depcache/manager") {
			t.Errorf("transitions depends on %s", dep)
		}
	}
}

// impureUses lists what in f breaks TestPure's rules.
func impureUses(f *ast.File, fset *token.FileSet) []string {
	var bad []string
	named := map[string]string{} // the name a file uses for an import -> its path
	for _, imp := range f.Imports {
		path, err := strconv.Unquote(imp.Path.Value)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: import %s: %v", fset.Position(imp.Pos()), imp.Path.Value, err))
			continue
		}
		if !pureImports[path] {
			bad = append(bad, fmt.Sprintf("%s: imports %q, which is not on the allow-list of pure packages", fset.Position(imp.Pos()), path))
		}
		name := path[strings.LastIndex(path, "/")+1:]
		if path == "math/rand/v2" {
			name = "rand"
		}
		if imp.Name != nil {
			name = imp.Name.Name
		}
		if name == "." {
			bad = append(bad, fmt.Sprintf("%s: dot-imports %q: its selectors could not be checked", fset.Position(imp.Pos()), path))
		}
		named[name] = path
	}
	ast.Inspect(f, func(n ast.Node) bool {
		sel, ok := n.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		x, ok := sel.X.(*ast.Ident)
		if !ok {
			return true
		}
		path := named[x.Name]
		switch {
		case x.Name == "os" || x.Name == "rand":
			bad = append(bad, fmt.Sprintf("%s: uses %s.%s", fset.Position(sel.Pos()), x.Name, sel.Sel.Name))
		case impure[path]["*"] || impure[path][sel.Sel.Name]:
			bad = append(bad, fmt.Sprintf("%s: uses %s.%s (%s)", fset.Position(sel.Pos()), x.Name, sel.Sel.Name, path))
		case path == statePath && !pureState[sel.Sel.Name]:
			bad = append(bad, fmt.Sprintf("%s: uses %s.%s, which is not on the allow-list of pure identifiers of state (pureState)", fset.Position(sel.Pos()), x.Name, sel.Sel.Name))
		}
		return true
	})
	return bad
}
