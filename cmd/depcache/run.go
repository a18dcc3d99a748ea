package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"golang.org/x/term"
)

// envName is what an environment variable name may be: the portable
// shell names.
var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// maxEnvName bounds a --dep NAME, which becomes part of a dependent name.
const maxEnvName = 128

// runDep is one --dep of run.
type runDep struct {
	name, source, sha string
	key               state.Key
	dependent         string
	entry             state.Entry
}

// parseRunDeps checks the --dep NAME=SOURCE and --sha256 NAME=HEX flags.
func parseRunDeps(deps, shas []string) ([]*runDep, error) {
	var out []*runDep
	byName := map[string]*runDep{}
	for _, d := range deps {
		name, src, ok := strings.Cut(d, "=")
		if !ok {
			return nil, usageErrorf("--dep %q: want NAME=SOURCE", d)
		}
		if err := checkEnvName(name); err != nil {
			return nil, fmt.Errorf("--dep %q: %w", d, err)
		}
		if src == "" {
			return nil, usageErrorf("--dep %q: empty SOURCE", d)
		}
		if byName[name] != nil {
			return nil, usageErrorf("--dep %q: %s is given twice", d, name)
		}
		r := &runDep{name: name, source: src}
		byName[name] = r
		out = append(out, r)
	}
	for _, s := range shas {
		name, hex, ok := strings.Cut(s, "=")
		if !ok {
			return nil, usageErrorf("--sha256 %q: want NAME=HEX", s)
		}
		r := byName[name]
		if r == nil {
			return nil, usageErrorf("--sha256 %q: no --dep %s=SOURCE", s, name)
		}
		hex = manager.NormaliseDigest(hex) // as get's --sha256: either case, with or without sha256:
		if err := state.CheckSHA256(hex); err != nil {
			return nil, fmt.Errorf("--sha256 %q: %w", s, err)
		}
		if r.sha != "" && r.sha != hex {
			// The last would be checked, and the first dropped.
			return nil, usageErrorf("--sha256 %q: %s is given another sha256 already (%s): a file has one", s, name, r.sha)
		}
		r.sha = hex
	}
	for _, r := range out {
		key, err := manager.ParseKey(r.source, r.sha)
		if err != nil {
			return nil, fmt.Errorf("--dep %s: %w", r.name, err)
		}
		if err := refuseDirectory(key); err != nil {
			return nil, fmt.Errorf("--dep %s: %w", r.name, err)
		}
		r.key = key
	}
	return out, nil
}

func checkEnvName(name string) error {
	switch {
	case name == "":
		return usageErrorf("empty NAME")
	case len(name) > maxEnvName:
		return usageErrorf("NAME %.20q...: longer than %d characters", name, maxEnvName)
	case !envName.MatchString(name):
		return usageErrorf("NAME %q is not a valid environment variable name (letters, digits and _, not starting with a digit)", name)
	case strings.HasPrefix(name, "DEPCACHE_"), strings.HasPrefix(name, "LD_"), reservedEnv[name]:
		return usageErrorf("NAME %q would replace a variable that CMD, its shell or depcache itself reads (DEPCACHE_*, LD_*, %s): choose another name", name, strings.Join(reservedEnvNames, ", "))
	}
	return nil
}

// reservedEnvNames are the variables a --dep must not replace: a path in
// $PATH or $HOME breaks CMD in ways that are hard to trace back.
var reservedEnvNames = []string{"PATH", "HOME", "IFS", "PWD", "OLDPWD", "SHELL", "USER", "LOGNAME", "TERM", "TMPDIR", "ENV", "BASH_ENV"}

var reservedEnv = func() map[string]bool {
	m := map[string]bool{}
	for _, n := range reservedEnvNames {
		m[n] = true
	}
	return m
}()

// cmdArgs returns CMD: the arguments after "--" (or all of them when no
// "--" was given, flags ending at the first argument).
func cmdArgs(cmd *cobra.Command, args []string, usage string) ([]string, error) {
	if n := cmd.ArgsLenAtDash(); n > 0 {
		return nil, usageErrorf("%q before --: %s", args[:n], usage)
	}
	if len(args) == 0 || args[0] == "" {
		return nil, usageErrorf("missing CMD: %s", usage)
	}
	return args, nil
}

const runUsage = "depcache run [--dep NAME=SOURCE]... [--timeout DUR] [--sha256 NAME=HEX]... -- CMD [ARGS...]"

func newRun(g *globals) *cobra.Command {
	var (
		deps, shas []string
		timeout    time.Duration
		lf         loopFlags
		pf         policyFlags
	)
	cmd := &cobra.Command{
		Use: "run [--dep NAME=SOURCE]... [--timeout DUR] [--sha256 NAME=HEX]... -- CMD [ARGS...]",
		Example: `  depcache run --dep DATA=https://example.com/data.tar.gz -- python train.py
  depcache run --dep IMG=docker://python:3.12 --dep SRC=file:///srv/src.tar -- ./build.sh
  depcache run --dep M=https://example.com/m.bin --sha256 M=HEX --timeout 30m -- sh -c 'ls "$M"'`,
		Short: "Hold dependencies for the life of CMD and give CMD their paths in the environment",
		Long: `run registers one dependent per --dep, bound to this process, fetches every
source in parallel (each once across processes and hosts), exports each path
(or image ID) as the environment variable NAME, and runs CMD with the terminal
and standard streams passed through. SIGINT, SIGTERM and SIGHUP are forwarded
to CMD. When CMD exits, run releases everything and exits with CMD's status
(128+N for a signal N). If run dies, CMD gets SIGKILL and its dependents are
reaped like any dead process's. Without --, CMD starts at the first argument
that is not one of run's flags, and every argument from there on is CMD's,
flags and -- included, as for lock.

Before CMD starts: exit 1 when a source is FAILED, 2 for bad usage or input,
3 when --timeout passed. While CMD runs: exit 75 when a dependency was lost
(reaped after run was stopped past its dependent lease, or released by
another process): run names it, ends CMD (SIGTERM, then SIGKILL after 10s)
and exits 75.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return passStatus(runRun(cmd, g, args, deps, shas, timeout, &lf, &pf))
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false) // the first argument starts CMD
	f.StringArrayVar(&deps, "dep", nil, "NAME=SOURCE: fetch SOURCE and export its path (or image ID) as $NAME (repeatable)")
	f.StringArrayVar(&shas, "sha256", nil, "NAME=HEX: the expected sha256 of the dependency NAME (repeatable)")
	f.DurationVar(&timeout, "timeout", 0, "give up fetching after this long, before CMD starts (exit 3)")
	lf.register(f)
	pf.register(f)
	return cmd
}

func runRun(cmd *cobra.Command, g *globals, args, depFlags, shas []string, timeout time.Duration, lf *loopFlags, pf *policyFlags) (int, error) {
	if timeout < 0 {
		return 0, fmt.Errorf("--timeout %s: %w: must not be negative", timeout, errBadFlag)
	}
	deps, err := parseRunDeps(depFlags, shas)
	if err != nil {
		return 0, err
	}
	argv, err := cmdArgs(cmd, args, runUsage)
	if err != nil {
		return 0, err
	}
	cfg, err := g.config(lf, pf)
	if err != nil {
		return 0, err
	}
	lost := make(chan manager.LostDependent, 64)
	cfg.OnLost = func(l manager.LostDependent) {
		select {
		case lost <- l:
		default: // one report is enough to end CMD
		}
	}
	m, err := manager.New(cfg)
	if err != nil {
		return 0, err
	}
	sigs, stopSigs := notifySignals()
	defer stopSigs()
	// The loop runs for run's whole life, whatever main's context says on
	// SIGINT: CMD may take its time to exit, and the leases must go on.
	base := context.WithoutCancel(cmd.Context())
	stop, err := m.Start(base)
	if err != nil {
		return 0, err
	}
	defer stop()
	g.notePolicyMismatch(m)

	prefix := runDependentPrefix()
	var registered []*runDep
	defer func() {
		ctx, cancel := context.WithTimeout(base, time.Minute)
		defer cancel()
		for _, d := range registered {
			if err := m.Release(ctx, d.dependent, d.key); err != nil && !errors.Is(err, manager.ErrNotRegistered) {
				fmt.Fprintf(g.stderr, "depcache run: releasing %s (%s): %v\n", d.name, d.source, err)
			}
		}
	}()

	// Fetch, stopping at a signal, the first failure or the timeout.
	fetchCtx, cancelFetch := context.WithCancel(base)
	defer cancelFetch()
	if timeout > 0 {
		var c context.CancelFunc
		fetchCtx, c = context.WithTimeout(fetchCtx, timeout)
		defer c()
	}
	var interrupted atomic.Value
	watching := make(chan struct{})
	go func() {
		select {
		case s := <-sigs:
			interrupted.Store(s)
			cancelFetch()
		case <-watching:
		}
	}()
	err = fetchAll(fetchCtx, g, m, prefix, deps, &registered)
	close(watching)
	if s, ok := interrupted.Load().(os.Signal); ok {
		// An error, not a bare status, so that --json prints its object
		// (kind interrupted); the exit code stays 128+N.
		return 0, fmt.Errorf("%w before CMD started", &interruptedError{sig: s})
	}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return 0, fmt.Errorf("not ready after --timeout %s: %w", timeout, err)
		}
		return 0, err
	}

	env := make([]string, 0, len(deps))
	for _, d := range deps {
		v := d.entry.ImageID
		if d.entry.Key.Kind != state.Image {
			if v, err = m.Abs(d.entry); err != nil {
				return 0, err
			}
		}
		env = append(env, d.name+"="+v)
	}
	c, err := startChild(argv, env, cmd.InOrStdin(), g.stdout, g.stderr)
	if err != nil {
		return 0, err
	}
	for {
		select {
		case <-c.done:
			return c.status(), nil
		case s := <-sigs:
			c.signal(s)
		case l := <-lost:
			name := l.Dependent
			for _, d := range deps {
				if d.dependent == l.Dependent {
					name = d.name
				}
			}
			what := "its dependent was reaped or released by another process"
			if l.Evicted {
				what = "its entry was evicted, and CMD may have been reading deleted files"
			}
			msg := fmt.Sprintf("dependency %s (%s) was lost while CMD ran: %s; CMD was ended", name, l.Key.Source, what)
			if !g.json {
				// Said now: ending CMD may take its grace.
				fmt.Fprintf(g.stderr, "depcache run: dependency %s (%s) was lost while CMD ran: %s; ending CMD, exit %d\n",
					name, l.Key.Source, what, exitLost)
			}
			c.end(endGrace)
			return 0, &lostError{msg: msg, told: !g.json}
		}
	}
}

// runDependentPrefix names this run's dependents: run-HOST-PID-RANDOM.
func runDependentPrefix() string {
	b := make([]byte, 4)
	rand.Read(b)
	host, _ := os.Hostname()
	if len(host) > 64 {
		host = host[:64]
	}
	return fmt.Sprintf("run-%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b))
}

// fetchAll registers a dependent on each dep and waits for all of them in
// parallel, showing their progress. It stops at the first failure.
func fetchAll(ctx context.Context, g *globals, m *manager.Manager, prefix string, deps []*runDep, registered *[]*runDep) error {
	for _, d := range deps {
		d.dependent = prefix + "-" + d.name
		e, err := m.Get(ctx, d.dependent, d.key)
		if err != nil {
			return fmt.Errorf("--dep %s: %w", d.name, err)
		}
		*registered = append(*registered, d)
		d.key = e.Key // an image's key names the daemon
	}
	if len(deps) == 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	bars := newRunProgress(g)
	defer bars.wait()
	errs := make([]error, len(deps))
	var wg sync.WaitGroup
	for i, d := range deps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, every := bars.add(d.key)
			defer p.close()
			e, err := waitWith(ctx, m, d.key, p, every)
			if err != nil {
				errs[i] = fmt.Errorf("--dep %s: %w", d.name, err)
				cancel()
				return
			}
			d.entry = e
		}()
	}
	wg.Wait()
	// The first real failure, not the cancellations it caused.
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// waitWith is waitShowingProgress with the display given.
func waitWith(ctx context.Context, m *manager.Manager, key state.Key, p progress, every time.Duration) (state.Entry, error) {
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
					who = selfOwner
				}
			}
			p.show(s, who)
		}
	}
}

// runProgress shows the waits of run: one line per dependency on a
// terminal that tells its width (barLine, each fitted to the width at each
// draw), redrawn together in place; plain lines otherwise.
type runProgress struct {
	g     *globals
	w     io.Writer
	cols  func() int // nil: no terminal
	mu    sync.Mutex
	lines []string // the block's lines, one per bar, as last drawn
	drawn int      // how many of them are on the screen
}

func newRunProgress(g *globals) *runProgress {
	r := &runProgress{g: g, w: g.stderr}
	if f, ok := g.stderr.(*os.File); ok && !g.json && term.IsTerminal(int(f.Fd())) {
		cols := func() int {
			w, _, err := term.GetSize(int(f.Fd()))
			if err != nil {
				return 0
			}
			return w
		}
		if cols() > 0 {
			r.cols = cols
		}
	}
	return r
}

func (r *runProgress) add(key state.Key) (progress, time.Duration) {
	switch {
	case r.g.json:
		return quiet{}, 2 * time.Second
	case r.cols == nil:
		return &lines{w: r.g.stderr, key: key, rate: rateMeter{start: time.Now()}}, 2 * time.Second
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, "")
	return &runBar{r: r, i: len(r.lines) - 1, name: key.Source, rate: rateMeter{start: time.Now()}}, 200 * time.Millisecond
}

// draw sets line i and redraws the block: up to its first line, each line
// erased to its end.
func (r *runProgress) draw(i int, line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines[i] = line
	var b strings.Builder
	if r.drawn > 1 {
		fmt.Fprintf(&b, "\x1b[%dA", r.drawn-1)
	}
	for k, l := range r.lines {
		if k > 0 {
			b.WriteString("\n")
		}
		b.WriteString("\r" + l + "\x1b[K")
	}
	fmt.Fprint(r.w, b.String())
	r.drawn = len(r.lines)
}

// wait ends the block with a newline once it was drawn.
func (r *runProgress) wait() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.drawn > 0 {
		fmt.Fprintln(r.w)
		r.drawn = 0
	}
}

type runBar struct {
	r    *runProgress
	i    int
	name string
	rate rateMeter
}

func (b *runBar) show(e state.Entry, who string) {
	eta := speedETA(e.Progress, b.rate.observe(e, who == selfOwner, time.Now()))
	if line := barLine(b.r.cols(), b.name, who, e.Progress, eta); line != "" {
		b.r.draw(b.i, line)
	}
}

func (b *runBar) finish(e state.Entry) { b.show(e, "done") }

func (b *runBar) close() {}

// The child: CMD of run and lock.

// exitLost is the exit status of run and lock when what they held for CMD
// was lost while CMD ran (a dependency of run, the lease of lock): CMD was
// ended. 75 is EX_TEMPFAIL of sysexits.h: the command may be retried.
const exitLost = 75

// endGrace is how long CMD has between SIGTERM and SIGKILL when run or
// lock ends it.
const endGrace = 10 * time.Second

// forwarded are the signals run and lock pass on to CMD.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP}

// errCmdStart marks a CMD that could not be started.
var errCmdStart = errors.New("cannot start the command")

// child is CMD, run with the terminal and the standard streams passed
// through.
type child struct {
	cmd *exec.Cmd
	// group: CMD leads its own process group, so that signals reach its
	// children too. It does not when depcache runs in the foreground of a
	// terminal: there CMD stays in depcache's group, which keeps the
	// terminal, and the terminal's own signals (Ctrl-C) reach it directly.
	group bool
	// foreground: depcache was in the foreground of its terminal when CMD
	// started.
	foreground bool
	done       chan struct{} // closed when CMD is waited for
	state      *os.ProcessState
	waitErr    error
}

// startChild starts argv with env added to the environment. The child gets
// SIGKILL if depcache dies (Pdeathsig), so that CMD never outlives what
// depcache holds for it.
func startChild(argv []string, env []string, stdin io.Reader, stdout, stderr io.Writer) (*child, error) {
	c := &child{done: make(chan struct{})}
	c.foreground = inForeground()
	c.group = !c.foreground
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: c.group, Pdeathsig: syscall.SIGKILL}
	c.cmd = cmd
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the thread that forked the child ends, not
		// the process: keep this goroutine on its thread while CMD runs.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			close(c.done)
			return
		}
		started <- nil
		c.waitErr = cmd.Wait()
		c.state = cmd.ProcessState
		close(c.done)
	}()
	if err := <-started; err != nil {
		if errors.Is(err, exec.ErrNotFound) && foundNotExecutable(argv[0]) {
			// exec.LookPath passes over a file on PATH that cannot be
			// executed; env and shells report it as found (126).
			err = fmt.Errorf("%s is on PATH but cannot be executed: %w", argv[0], os.ErrPermission)
		}
		return nil, fmt.Errorf("%w %q: %w", errCmdStart, argv[0], err)
	}
	return c, nil
}

// foundNotExecutable reports whether name, looked up on PATH, names a
// file that is there but not executable.
func foundNotExecutable(name string) bool {
	if strings.Contains(name, "/") {
		return false
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if fi, err := os.Stat(filepath.Join(cmp.Or(dir, "."), name)); err == nil && !fi.IsDir() {
			return true
		}
	}
	return false
}

// inForeground reports whether depcache runs in the foreground process
// group of the terminal on its standard input.
func inForeground() bool {
	pgrp, err := unix.IoctlGetInt(0, unix.TIOCGPGRP)
	return err == nil && pgrp == unix.Getpgrp()
}

// signal passes sig on to CMD (its process group when it has one). In the
// foreground of a terminal, SIGINT and SIGHUP came from the terminal to the
// whole group, CMD included: they are not sent twice.
func (c *child) signal(sig os.Signal) {
	s := sig.(syscall.Signal)
	if c.group {
		unix.Kill(-c.cmd.Process.Pid, s)
		return
	}
	if c.foreground && (s == syscall.SIGINT || s == syscall.SIGHUP) {
		return
	}
	c.cmd.Process.Signal(s)
}

// end stops CMD: SIGTERM, then SIGKILL after grace. It returns once CMD
// was waited for.
func (c *child) end(grace time.Duration) {
	c.signalAll(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-c.done:
		return
	case <-t.C:
	}
	c.signalAll(syscall.SIGKILL)
	<-c.done
}

func (c *child) signalAll(s syscall.Signal) {
	if c.group {
		unix.Kill(-c.cmd.Process.Pid, s)
	} else {
		c.cmd.Process.Signal(s)
	}
}

// status is CMD's exit status, 128+N for a signal N. Call after done.
func (c *child) status() int {
	if c.state == nil {
		return exitFailed
	}
	if ws, ok := c.state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return c.state.ExitCode()
}

// notifySignals starts catching the forwarded signals; stop undoes it.
func notifySignals() (ch chan os.Signal, stop func()) {
	ch = make(chan os.Signal, 8)
	signal.Notify(ch, forwarded...)
	return ch, func() { signal.Stop(ch) }
}
