package manager_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// Helpers of the tests that drive the paths which keep the data safe
// (fencing, takeover, publish, eviction): a source whose fetches the test
// runs by hand, a log that can be read back, metrics and the state store
// as another process sees them.

// within bounds every wait of these tests: generous, since CI shares its
// machine, and only reached when the awaited event never comes.
const within = 60 * time.Second

// errGateClosed is what a fetch still held at the end of a test returns.
var errGateClosed = errors.New("gate closed: the test is over")

// gate is a Source whose fetches the test runs by hand: each Fetch
// announces itself on calls and waits for its body. A deaf gate's fetches
// ignore their context until given the body (a writer that does not
// notice it was told to stop); others return when it is cancelled. A
// mute gate's fetches never announce the body's size: the size a source
// announces asks for a progress report at once, and a report is a
// heartbeat that can find the download fenced before it publishes.
type gate struct {
	deaf  bool
	mute  bool
	calls chan *fetchCall
	quit  chan struct{}
	once  sync.Once
}

// fetchCall is one Fetch in progress.
type fetchCall struct {
	ctx  context.Context
	src  string
	body chan []byte
	// returned receives what Fetch returned.
	returned chan error
}

func newGate(deaf bool) *gate {
	return &gate{deaf: deaf, calls: make(chan *fetchCall, 16), quit: make(chan struct{})}
}

func (g *gate) Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) (err error) {
	c := &fetchCall{ctx: ctx, src: src, body: make(chan []byte, 1), returned: make(chan error, 1)}
	defer func() { c.returned <- err }()
	select {
	case g.calls <- c:
	case <-g.quit:
		return errGateClosed
	}
	var done <-chan struct{}
	if !g.deaf {
		done = ctx.Done()
	}
	var b []byte
	select {
	case b = <-c.body:
	case <-done:
		return ctx.Err()
	case <-g.quit:
		return errGateClosed
	}
	if !g.mute {
		total(int64(len(b)))
	}
	_, err = w.Write(b)
	return err
}

// close lets every fetch still held return. Register it (t.Cleanup) after
// the managers that use the gate, so that it runs before they stop.
func (g *gate) close() { g.once.Do(func() { close(g.quit) }) }

// sources routes http:// to the gate.
func (g *gate) sources() map[string]manager.Source { return map[string]manager.Source{"http": g} }

// next returns the next fetch to arrive.
func (g *gate) next(t testing.TB) *fetchCall {
	t.Helper()
	select {
	case c := <-g.calls:
		return c
	case <-time.After(within):
		t.Fatalf("no fetch arrived within %s", within)
		return nil
	}
}

// serve gives the fetch its body and waits for it to return.
func (c *fetchCall) serve(t testing.TB, body string) {
	t.Helper()
	c.body <- []byte(body)
	select {
	case <-c.returned:
	case <-time.After(within):
		t.Fatalf("the fetch of %s did not return within %s of being served", c.src, within)
	}
}

// stopped waits until the fetch's context is cancelled: its download was
// told to stop.
func (c *fetchCall) stopped(t testing.TB, what string) {
	t.Helper()
	select {
	case <-c.ctx.Done():
	case <-time.After(within):
		t.Fatalf("%s: the download of %s was not stopped within %s", what, c.src, within)
	}
}

// logRecorder keeps every log entry of a manager.
type logRecorder struct {
	mu      sync.Mutex
	entries []logrus.Entry
}

func (r *logRecorder) Levels() []logrus.Level { return logrus.AllLevels }

func (r *logRecorder) Fire(e *logrus.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	data := make(logrus.Fields, len(e.Data))
	for k, v := range e.Data {
		data[k] = v
	}
	r.entries = append(r.entries, logrus.Entry{Level: e.Level, Message: e.Message, Data: data})
	return nil
}

// logger returns a logger that records into r (and prints with DT_VERBOSE).
func (r *logRecorder) logger() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	if os.Getenv("DT_VERBOSE") != "" {
		l.SetOutput(os.Stderr)
	}
	l.SetLevel(logrus.DebugLevel)
	l.AddHook(r)
	return l
}

// find returns the entries whose message contains msg.
func (r *logRecorder) find(msg string) []logrus.Entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []logrus.Entry
	for _, e := range r.entries {
		if strings.Contains(e.Message, msg) {
			out = append(out, e)
		}
	}
	return out
}

// said reports whether an entry's message or error contains s.
func (r *logRecorder) said(s string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.entries {
		if strings.Contains(e.Message, s) || strings.Contains(fmt.Sprint(e.Data[logrus.ErrorKey]), s) {
			return true
		}
	}
	return false
}

// messages lists every message, for failure reports.
func (r *logRecorder) messages() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.entries))
	for _, e := range r.entries {
		out = append(out, e.Level.String()+": "+e.Message)
	}
	return out
}

// counter reads the counter name{label=value} from reg, or the unlabelled
// counter name when label is "" (0 when absent).
func counter(t testing.TB, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if label == "" && len(m.GetLabel()) == 0 {
				return m.GetCounter().GetValue()
			}
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// startManager is newManager that also returns the stop function (which
// the test's cleanup calls too: it may be called more than once).
func startManager(t testing.TB, root string, adjust ...func(*manager.Config)) (*manager.Manager, func() error) {
	t.Helper()
	cfg := manager.Config{Root: root, Log: quietLog(), PollInterval: 20 * time.Millisecond,
		RetryBackoff: 10 * time.Millisecond, ProgressInterval: 100 * time.Millisecond,
		Policy: transitions.Policy{FailureCooldown: time.Hour}}
	for _, a := range adjust {
		a(&cfg)
	}
	m, err := manager.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop, err := m.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	return m, stop
}

// fakeProcess is process pid of the fake machine host.
func fakeProcess(host string, pid int) state.Process {
	return state.Process{Host: host, BootID: "boot-" + host, PIDNS: "ns", PID: pid, StartTime: 1}
}

// behind changes the state of root as another process would, under the
// lock, behind the managers' backs.
func behind(t testing.TB, root string, fn func(st *state.State)) {
	t.Helper()
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		fn(st)
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
}

// changeEntry replaces key's entry in root's state with change applied to a
// copy of it.
func changeEntry(t testing.TB, root string, key state.Key, change func(e *state.Entry)) {
	t.Helper()
	behind(t, root, func(st *state.State) {
		e := st.Get(key)
		if e == nil {
			t.Fatalf("no entry for %s to change", key.Source)
		}
		n := e.Clone()
		change(n)
		st.Put(n)
	})
}

// dirNames lists the names in root/sub ("" for none or a missing one).
func dirNames(t testing.TB, root, sub string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(root, sub))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// exists says whether root/rel exists.
func exists(t testing.TB, root, rel string) bool {
	t.Helper()
	_, err := os.Lstat(filepath.Join(root, rel))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

// gen names the entry directory of key's generation n (under staging/ or
// entries/).
func gen(key state.Key, n uint64) string {
	return key.ID() + "-g" + strconv.FormatUint(n, 10)
}
