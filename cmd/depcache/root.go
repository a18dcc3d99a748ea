package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/manager/docker"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/dustin/go-humanize"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// errBadFlag marks a flag or environment value out of range.
var errBadFlag = errors.New("bad flag value")

// globals are the flags every command takes.
type globals struct {
	root      string
	json      bool
	logLevel  string
	logFormat string
	group     bool
	lockLease time.Duration
	reserve   sizeValue  // --disk-reserve
	state     stateFlags // --state and the etcd flags (statestore.go)
	stdout    io.Writer
	stderr    io.Writer
	log       *logrus.Logger
	// fromEnv names the flags given by their DEPCACHE_* twin rather than
	// on the command line.
	fromEnv map[string]bool
	// ctx is the context the state store is opened with: the command's
	// (ended by SIGINT and SIGTERM), or get's, which --timeout bounds.
	ctx context.Context
	// warnings is the log's formatter.
	warnings *warningLines
}

// warningLines formats the log. With human set (--log-format text), a
// record that is a warning about an entry's content
// (manager.WarningRecord) is one line for people, "depcache: warning:
// ..."; every other record, and every record without human (json), is as
// inner formats it. It remembers the warnings it wrote, so that get does
// not repeat them.
type warningLines struct {
	inner logrus.Formatter
	human bool
	mu    sync.Mutex
	shown map[string]bool
}

// Format implements logrus.Formatter.
func (w *warningLines) Format(r *logrus.Entry) ([]byte, error) {
	msg, ok := manager.WarningRecord(r)
	if !ok {
		return w.inner.Format(r)
	}
	w.mu.Lock()
	if w.shown == nil {
		w.shown = map[string]bool{}
	}
	w.shown[msg] = true
	w.mu.Unlock()
	if !w.human {
		return w.inner.Format(r)
	}
	return []byte("depcache: warning: " + msg + "\n"), nil
}

func (w *warningLines) wrote(msg string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.shown[msg]
}

// showWarnings writes the warnings about entry e's content (Manager.Warnings)
// that the log did not already write, as the log would: a line each on
// stderr with --log-format text, a record each with json; none when the
// log level hides warnings.
func (g *globals) showWarnings(e state.Entry, ws []string) {
	for _, msg := range ws {
		switch {
		case !g.log.IsLevelEnabled(logrus.WarnLevel) || g.warnings != nil && g.warnings.wrote(msg):
		case g.warnings == nil || g.warnings.human:
			fmt.Fprintln(g.stderr, "depcache: warning:", msg)
		default:
			g.log.WithField("source", e.Key.Source).Warn(msg)
		}
	}
}

// onceString is a string flag given at most once, or again with the same
// value: pflag's own keeps the last of two values and drops the first
// without a word, which for a flag such as get --dependent (one get
// registers one dependent) loses what the caller meant. why says why one
// value is all the flag takes.
type onceString struct {
	v   *string
	set bool
	why string
}

// newOnceString registers a onceString flag, as fs.StringVar does.
func newOnceString(fs *pflag.FlagSet, p *string, name, value, usage, why string) {
	*p = value
	fs.Var(&onceString{v: p, why: why}, name, usage)
}

func (o *onceString) String() string { return *o.v }
func (o *onceString) Type() string   { return "string" }

func (o *onceString) Set(v string) error {
	if o.set && v != *o.v {
		return fmt.Errorf("given twice, %q and then %q: %s", *o.v, v, o.why)
	}
	*o.v, o.set = v, true
	return nil
}

// loopFlags are the policy flags of the commands that run the loops.
type loopFlags struct {
	fs               *pflag.FlagSet
	downloadTimeout  time.Duration
	failureCooldown  time.Duration
	retries          int
	progressInterval time.Duration
}

func (l *loopFlags) register(fs *pflag.FlagSet) {
	l.fs = fs
	fs.DurationVar(&l.downloadTimeout, "download-timeout", 5*time.Minute, "take over a download whose progress stayed unchanged this long")
	fs.DurationVar(&l.failureCooldown, "failure-cooldown", time.Minute, "keep a FAILED entry this long before retrying (doubles per failure)")
	fs.IntVar(&l.retries, "retries", 3, "attempts after the first within one download")
	fs.DurationVar(&l.progressInterval, "progress-interval", defaultProgressInterval, "how often a downloader reports progress and its heartbeat; with only --download-timeout given, a quarter of it when that is shorter")
}

// defaultProgressInterval is --progress-interval's default when
// --download-timeout leaves room for it.
const defaultProgressInterval = 2 * time.Second

// minProgressInterval is the shortest --progress-interval. Each report is
// a commit of the state (a lock hold and a shard write on a shared
// filesystem, a transaction on etcd), which take milliseconds to tens of
// them: below a tenth of a second a downloader spends its time reporting,
// and holds the lock every other process waits for. 1ns was accepted.
const minProgressInterval = 100 * time.Millisecond

// minDownloadTimeout is the shortest --download-timeout: a live download
// reports at least twice per timeout (see validate), and at most every
// minProgressInterval.
const minDownloadTimeout = 2 * minProgressInterval

// maxProgressInterval is the longest --progress-interval given alone: the
// --download-timeout derived from it, four times as long, still fits in a
// time.Duration (whole hours, for the message).
const maxProgressInterval = time.Duration(math.MaxInt64/4) / time.Hour * time.Hour

// given reports whether the flag was set on the command line or through its
// DEPCACHE_* twin (applyEnv sets it through the flag set).
func (l *loopFlags) given(name string) bool { return l.fs != nil && l.fs.Changed(name) }

// validate checks the flags and derives the defaults of those that depend
// on another: a default scales to fit the value given for its partner, and
// only two values both given that conflict are an error.
func (l *loopFlags) validate() error {
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"download-timeout", l.downloadTimeout}, {"failure-cooldown", l.failureCooldown}, {"progress-interval", l.progressInterval}} {
		if d.v <= 0 {
			return fmt.Errorf("--%s %s: %w: must be positive", d.name, d.v, errBadFlag)
		}
	}
	// Absurdly short values, given alone or not: each names itself only,
	// never a partner the user did not give.
	if l.progressInterval < minProgressInterval {
		return fmt.Errorf("--progress-interval %s: %w: must be at least %s (each report is a commit of the state)", l.progressInterval, errBadFlag, minProgressInterval)
	}
	if l.downloadTimeout < minDownloadTimeout {
		return fmt.Errorf("--download-timeout %s: %w: must be at least %s (a live download reports progress at least twice per timeout, and at most every %s)",
			l.downloadTimeout, errBadFlag, minDownloadTimeout, minProgressInterval)
	}
	switch pi, dt := l.given("progress-interval"), l.given("download-timeout"); {
	case dt && !pi:
		// A live download reports at least twice per timeout; a quarter
		// leaves room for a slow lock, down to the shortest interval,
		// which still fits twice in the shortest timeout.
		l.progressInterval = min(defaultProgressInterval, max(l.downloadTimeout/4, minProgressInterval))
	case pi && !dt:
		// The derived timeout is four intervals: an interval whose four
		// do not fit in a duration is out of range itself.
		if l.progressInterval > maxProgressInterval {
			return fmt.Errorf("--progress-interval %s: %w: must be at most %s (the download timeout derived from it is 4 times as long)", l.progressInterval, errBadFlag, maxProgressInterval)
		}
		l.downloadTimeout = max(l.downloadTimeout, 4*l.progressInterval)
	}
	if l.retries < 0 || l.retries > 100 {
		return fmt.Errorf("--retries %d: %w: must be between 0 and 100", l.retries, errBadFlag)
	}
	// Only two values both given get here out of step (or two defaults,
	// which fit). Halving never overflows, as doubling may.
	if l.progressInterval > l.downloadTimeout/2 {
		return fmt.Errorf("--progress-interval %s: %w: must be at most half of --download-timeout (%s), or live downloads look stalled",
			l.progressInterval, errBadFlag, l.downloadTimeout)
	}
	return nil
}

func (g *globals) config(l *loopFlags, p *policyFlags) (manager.Config, error) {
	if err := l.validate(); err != nil {
		return manager.Config{}, err
	}
	if err := rootNotFile(g); err != nil {
		return manager.Config{}, err
	}
	change, err := p.change()
	if err != nil {
		return manager.Config{}, err
	}
	engine, err := dockerEngine()
	if err != nil {
		return manager.Config{}, err
	}
	retries := l.retries
	if retries == 0 {
		retries = -1 // manager.Config: 0 means the default
	}
	cfg := manager.Config{
		Root: g.root,
		Policy: transitions.Policy{
			DownloadTimeout: l.downloadTimeout,
			FailureCooldown: l.failureCooldown,
			LeaseDuration:   p.lease,
		},
		Docker:           engine,
		GroupShared:      g.group,
		MaxImageBytes:    p.maxImage.bytes,
		Cleanup:          change,
		SetPolicy:        p.setPolicy,
		CleanupInterval:  p.interval,
		Retries:          retries,
		ProgressInterval: l.progressInterval,
		LockLease:        g.lockLease,
		DiskReserve:      g.diskReserve(),
		Log:              g.log,
	}
	if cfg.State, err = g.stateStore(); err != nil {
		return manager.Config{}, err
	}
	return cfg, nil
}

// defaultRoot: $DEPCACHE_ROOT, else $XDG_CACHE_HOME/depcache, else
// ~/.cache/depcache.
func defaultRoot() string {
	if r := os.Getenv("DEPCACHE_ROOT"); r != "" {
		return r
	}
	if x := os.Getenv("XDG_CACHE_HOME"); x != "" {
		return filepath.Join(x, "depcache")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".cache", "depcache")
	}
	return ".depcache"
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:           "depcache",
		Short:         "Fetch dependencies once into a cache shared by processes and hosts",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			g.ctx = cmd.Context()
			if err := applyEnv(cmd, g); err != nil {
				return err
			}
			lvl, err := logrus.ParseLevel(g.logLevel)
			if err != nil {
				return fmt.Errorf("--log-level %q: %w: want one of %s", g.logLevel, errBadFlag, logLevels())
			}
			g.log.SetLevel(lvl)
			switch g.logFormat {
			case "text":
				g.warnings = &warningLines{inner: &logrus.TextFormatter{}, human: true}
				g.log.SetFormatter(g.warnings)
			case "json":
				g.warnings = &warningLines{inner: &logrus.JSONFormatter{}}
				g.log.SetFormatter(g.warnings)
			default:
				return fmt.Errorf("--log-format %q: %w: want text or json", g.logFormat, errBadFlag)
			}
			if !cmd.Flags().Changed("log-level") && (cmd.Name() == "get" || cmd.Name() == "run") {
				// A get or run says how its fetch ended in one line of
				// its own; the attempts before it are progress, not news.
				g.log.SetFormatter(quietRetries{g.log.Formatter})
			}
			if g.root == "" {
				return fmt.Errorf("--root: %w: empty", errBadFlag)
			}
			if g.lockLease < minLockLease || g.lockLease > maxLockLease {
				// A lease of nanoseconds let any waiter break another
				// host's live holder at once.
				return fmt.Errorf("--lock-lease %s: %w: must be from %s to %s", g.lockLease, errBadFlag, minLockLease, maxLockLease)
			}
			if g.reserve.bytes > maxDiskReserve {
				return fmt.Errorf("--disk-reserve %s: %w: must be at most %s (0: none)", g.reserve.text, errBadFlag, humanize.IBytes(maxDiskReserve))
			}
			return nil
		},
	}
	root.SetOut(g.stdout)
	root.SetErr(g.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return fmt.Errorf("%w: %w", errUsage, err) })
	pf := root.PersistentFlags()
	pf.StringVar(&g.root, "root", defaultRoot(), "cache directory (env DEPCACHE_ROOT)")
	pf.BoolVar(&g.json, "json", false, "machine-readable output")
	pf.StringVar(&g.logLevel, "log-level", "warning", "panic, fatal, error, warning, info, debug or trace")
	pf.StringVar(&g.logFormat, "log-format", "text", "text or json")
	pf.DurationVar(&g.lockLease, "lock-lease", 30*time.Second, "how long the state lock, held from another host, must stay unchanged before it is broken")
	g.reserve = sizeValue{bytes: state.DefaultReserve, text: humanize.IBytes(state.DefaultReserve)}
	pf.Var(&g.reserve, "disk-reserve", "space the file store keeps in the root, given up in parts so that release, rm and gc can still commit on a full disk (0: none)")
	g.state.register(pf)
	pf.BoolVar(&g.group, "group-shared", false, "make what depcache creates usable by the root's group: directories 2770, files 0660")
	root.AddCommand(newGet(g), newRelease(g), newLs(g), newGC(g), newServe(g), newPolicy(g), newDoctor(g), newVerify(g))
	root.AddCommand(newRm(g), newDir(g), newVersion(g), newRun(g), newLockCmd(g), newLocks(g))
	root.Version, root.Example = versionString(), rootExamples
	return root
}

// applyEnv gives every flag not set on the command line the value of its
// environment twin: --max-size <-> DEPCACHE_MAX_SIZE.
// The names of the flags set this way go into g.fromEnv.
func applyEnv(cmd *cobra.Command, g *globals) error {
	var err error
	g.fromEnv = map[string]bool{}
	set := func(f *pflag.Flag) {
		if err != nil || f.Changed {
			return
		}
		name := "DEPCACHE_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if f.Name == "root" {
			// Read by defaultRoot, not set through the flag.
			if v, ok := os.LookupEnv(name); ok && v != "" {
				g.fromEnv[f.Name] = true
			}
			return
		}
		if v, ok := os.LookupEnv(name); ok && v != "" {
			// Set through the flag set, so that the flag counts as given.
			if serr := cmd.Flags().Set(f.Name, v); serr != nil {
				err = fmt.Errorf("%s=%q: %w: %w", name, v, errBadFlag, serr)
			}
			g.fromEnv[f.Name] = true
		}
	}
	cmd.Flags().VisitAll(set)
	cmd.InheritedFlags().VisitAll(set)
	return err
}

// nameEnvTwin adds to a bad flag value that came from its DEPCACHE_*
// twin, not the command line, the variable's name: the message names the
// flag, which the user never typed.
func nameEnvTwin(g *globals, err error) error {
	if err == nil || !isUsage(err) {
		return err
	}
	// Only the flag the message starts with is the one at fault; a flag
	// named later is what it was compared with.
	msg := err.Error()
	for name := range g.fromEnv {
		if strings.HasPrefix(msg, "--"+name+" ") || strings.HasPrefix(msg, "--"+name+":") {
			return fmt.Errorf("%w (set by DEPCACHE_%s)", err, strings.ToUpper(strings.ReplaceAll(name, "-", "_")))
		}
	}
	return err
}

// run is main without the exit, for tests.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	g := &globals{stdout: stdout, stderr: stderr, log: logrus.New()}
	g.log.SetOutput(stderr)
	root := newRoot(g)
	if jsonAsked(args) || envTrue("DEPCACHE_JSON") {
		// With --json, stderr carries one JSON error object: log records
		// below error (a warning that repeats the error) stay out of it
		// unless --log-level (or DEPCACHE_LOG_LEVEL) asks for them.
		g.logLevel = "error"
	}
	root.SetArgs(args)
	err := classify(ctx, root.ExecuteContext(ctx))
	err = nameEnvTwin(g, err)
	g.closeStore()
	code := exitCode(err)
	var status cmdStatus
	var lost *lostError
	if err != nil && !errors.As(err, &status) {
		if g.json || jsonAsked(args) || envTrue("DEPCACHE_JSON") {
			printJSON(stderr, errorJSON{Error: err.Error(), ExitCode: code, Kind: errKind(err)})
		} else if !errors.As(err, &lost) || !lost.told {
			fmt.Fprintln(stderr, "depcache:", err)
		}
	}
	return code
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// dockerEngine is the Docker engine of DOCKER_HOST or the default socket,
// nil when there is neither.
func dockerEngine() (manager.Engine, error) {
	if os.Getenv("DOCKER_HOST") == "" && !fileExists("/var/run/docker.sock") {
		return nil, nil
	}
	e, err := docker.New()
	if err != nil {
		return nil, err
	}
	return e, nil
}

// plainConfig is the configuration of the commands that do not run the
// loops (release, ls, doctor, verify).
func (g *globals) plainConfig() manager.Config {
	return manager.Config{Root: g.root, Log: g.log, GroupShared: g.group, LockLease: g.lockLease, DiskReserve: g.diskReserve(), State: g.plainState()}
}

// engineConfig is plainConfig with this host's Docker engine, for the
// plain commands that look at images (ls, doctor, rm). The manager asks
// the engine only on a root that holds images, each call within its bound.
func (g *globals) engineConfig() (manager.Config, error) {
	cfg := g.plainConfig()
	engine, err := dockerEngine()
	cfg.Docker = engine
	return cfg, err
}

// maxDiskReserve bounds --disk-reserve: a commit needs megabytes at most.
const maxDiskReserve = 1 << 30

// diskReserve is --disk-reserve for manager.Config, where 0 is the default
// and a negative size none.
func (g *globals) diskReserve() int64 {
	if g.reserve.bytes == 0 {
		return -1
	}
	return g.reserve.bytes
}

// quietRetries leaves out the records that a get or run says in its own
// failure line: at the default log level, a fetch that fails prints one
// line, which counts the attempts and names the budget it did not fit.
type quietRetries struct{ logrus.Formatter }

// saidByTheFailure are those records' messages.
var saidByTheFailure = map[string]bool{"fetch failed, retrying": true, "download does not fit in the cache": true}

func (q quietRetries) Format(e *logrus.Entry) ([]byte, error) {
	if saidByTheFailure[e.Message] && e.Level >= logrus.WarnLevel {
		return nil, nil
	}
	return q.Formatter.Format(e)
}
