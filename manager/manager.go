package manager

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

var (
	// ErrFailed means the entry is FAILED; errors wrapping it are
	// *FailedError and carry the reason.
	ErrFailed = errors.New("dependency failed")
	// ErrNotFound means the entry is not in the cache (it was released and
	// its download cancelled, or evicted).
	ErrNotFound = errors.New("no such entry")
	// ErrTooLarge means a download cannot fit in the cache budget: its
	// announced size, or the bytes it wrote (an archive unpacks to more
	// than it weighs), pass what the policy can make room for.
	ErrTooLarge = transitions.ErrTooLarge
	// ErrDependentLost means the dependents bound to this process that
	// held an entry are gone from it without a release by this manager:
	// reaped (the process was stopped past its dependent lease) or
	// released by another process, and the entry may have been evicted.
	// A run that used the entry's path may be reading deleted files. Wait
	// returns it until Get registers a dependent on the entry again. A
	// dependent reaped after its TTL ([WithTTL]) on this manager's clock
	// ended as asked, and is not lost.
	ErrDependentLost = errors.New("dependent lost")
	// ErrBadDependent means a dependent name is empty, too long, has
	// control characters or is not valid UTF-8.
	ErrBadDependent = errors.New("bad dependent name")
	// ErrNotRunning means Wait was called on a manager whose loop is not
	// running.
	ErrNotRunning = errors.New("manager is not running")
	// ErrNotRegistered means a release named a dependent the entry does
	// not have.
	ErrNotRegistered = transitions.ErrNotRegistered
	// ErrStateReadable means Rebuild was asked to replace a state file that
	// parses: rebuilding drops every dependent, owner and download in
	// flight, so it is only for a state that cannot be read.
	ErrStateReadable = errors.New("the state is readable")
)

// maxFailedPasses is how many passes in a row may fail (an unreadable
// state, a lock error) before Wait gives up with the error. A store that
// is unavailable (state.ErrUnavailable) is waited out instead.
const maxFailedPasses = 3

// FailedError is the error of a FAILED entry.
type FailedError struct {
	Key    state.Key
	Reason string
	// Permanent: the failure is one a retry would only repeat (the Source
	// said ErrPermanent: a 404, a missing file). errors.Is(err,
	// ErrPermanent) tells it.
	Permanent bool
	// RetryAt is when the entry's cool-down ends and a Get retries it:
	// FailedAt plus the failure cool-down, doubled per failure in a row
	// (transitions.Policy.Cooldown). It is on the clock of the host that
	// failed, as FailedAt is. Zero when unknown. Retry() skips the wait.
	RetryAt time.Time
	// Kept: the entry still names its content, kept for the dependents
	// that held it when verify failed it. No Get retries it, Retry() or
	// not, while it has any dependent (one registered since included):
	// the content could be in use. The first Get once none is left
	// retries it (past its cool-down, or with Retry) and moves that
	// content to trash.
	Kept bool
}

func (e *FailedError) Error() string { return fmt.Sprintf("%s: %s", e.Key.Source, e.Reason) }

// Unwrap makes errors.Is(err, ErrFailed) true.
func (e *FailedError) Unwrap() error { return ErrFailed }

// Is makes errors.Is(err, ErrPermanent) true for a permanent failure, and
// errors.Is(err, ErrTooLarge) true for a download that did not fit (the
// state keeps a failure's reason as text, which says so).
func (e *FailedError) Is(target error) bool {
	switch target {
	case ErrPermanent:
		return e.Permanent
	case ErrTooLarge:
		return strings.Contains(e.Reason, ErrTooLarge.Error())
	}
	return false
}

// Failed returns the error of the FAILED entry e under this manager's
// failure cool-down.
func (m *Manager) Failed(e state.Entry) *FailedError {
	f := &FailedError{Key: e.Key, Reason: e.Message, Permanent: e.Permanent, Kept: e.Path != ""}
	if !e.FailedAt.IsZero() {
		f.RetryAt = e.FailedAt.Add(m.cfg.Policy.Cooldown(e.Failures))
	}
	return f
}

// Config configures a Manager. Zero fields take the defaults.
type Config struct {
	// Root is the cache directory.
	Root string
	// Policy holds the download timeout and the failure cool-down.
	Policy transitions.Policy
	// Retries is the number of attempts after the first within one
	// download, with doubling back-off from RetryBackoff. Default 3 (when
	// 0); negative means none. RetryBackoff defaults to 1s.
	Retries      int
	RetryBackoff time.Duration
	// ProgressInterval is how often an owner reports progress and its
	// heartbeat. Default 2s, or a quarter of Policy.DownloadTimeout when
	// that is shorter. One over half the timeout makes other processes
	// take live downloads over as stalled.
	ProgressInterval time.Duration
	// PollInterval is how often the loop reads the state to notice other
	// processes' changes. Default 250ms.
	PollInterval time.Duration
	// MaxBundleBytes bounds the unpacked size of one bundle, below what
	// the stored policy's budget can make room for, which bounds every
	// download anyway. Default 0: the budget alone.
	MaxBundleBytes int64
	// LockLease is the state lock's lease across hosts. Default 30s.
	LockLease time.Duration
	// DriveAll makes the manager claim and take over every entry, not only
	// those it has dependents for (serve does this).
	DriveAll bool
	// Cleanup holds the cleanup settings this caller gives. A root stores
	// one policy for all its users, and its loops use that one (the
	// defaults while none is stored): settings that differ are reported
	// (see PolicyMismatch) and stored only when SetPolicy is true. A root
	// gets a stored policy only that way. A one-shot sweep with its own
	// settings is SweepWith.
	Cleanup   PolicyChange
	SetPolicy bool
	// CleanupInterval is how often the loop sweeps. Default 1m. A sweep
	// also runs after each publish by this manager.
	CleanupInterval time.Duration
	// OnLockHold, when set, is told how long each hold of the state lock
	// lasted (for metrics and tests).
	OnLockHold func(time.Duration)
	// GroupShared makes everything depcache creates in the root usable by
	// the root's group: directories 2770, files 0660 (state.GroupPerms).
	GroupShared bool
	// Docker is the engine for docker:// sources; nil: images are refused.
	Docker Engine
	// MaxImageBytes fails an image whose registry size exceeds it before
	// pulling; 0: no bound.
	MaxImageBytes int64
	// DiskReserve is the size of the file store's disk reserve, given up
	// in parts by a sweep, a removal or a release whose commit meets a
	// full disk (see state.Reserver). 0: state.DefaultReserve; negative:
	// none is made or grown (one that is there is still given up). Used
	// only when State is nil.
	DiskReserve int64
	// State is the state store. Default (nil): the file store in Root
	// (state.Open), safe across hosts that share Root. Content always
	// lives under Root.
	State state.Backend
	// Metrics, when set, receives the manager's Prometheus metrics.
	Metrics prometheus.Registerer
	// Sources by URL scheme. Default: http, https and file.
	Sources map[string]Source
	// Log receives the manager's logs. Default: logrus's standard logger.
	Log logrus.FieldLogger
	// OnLost, when set, is told of each dependent bound to this process
	// that a pass found gone from its entry without this manager's
	// release (see ErrDependentLost). It runs on the loop's goroutine: it
	// must not block.
	OnLost func(LostDependent)
	// Clock, Processes and Disk are for tests; production uses the real
	// ones (Disk: statfs(2)).
	Clock     state.Clock
	Processes state.Processes
	Disk      DiskSpace
}

// DiskSpace tells how much room a filesystem has: the free-disk floor, the
// bounds of a download and the keeping of abandoned downloads' data go by
// it.
type DiskSpace interface {
	// Space returns the bytes free to unprivileged users, and the size,
	// of the filesystem that holds dir; zeros when they cannot be told.
	Space(dir string) (free, size int64)
}

// localDep is a dependent registered by this manager.
type localDep struct {
	since uint64 // m.started when it was registered
	// bound: bound to this process, so only this process releases it;
	// others reap it when the process is gone or its lease lapsed. A
	// detached (named) dependent may be released by anyone.
	bound bool
	// expires is when its TTL ends, on this manager's clock (zero: no
	// TTL). seen is when a pass last found it in its entry: one found
	// gone that was seen past its TTL (give or take ttlGrace) ended as
	// asked, and is not lost; one last seen well before its TTL ended was
	// reaped early (this process was stopped past its lease).
	expires, seen time.Time
}

// LostDependent names a dependent that was found gone from its entry.
type LostDependent struct {
	Key       state.Key
	Dependent string
	// Evicted says the entry itself is gone too, not only the dependent.
	Evicted bool
}

// Manager drives the entries of one cache root: it registers dependents,
// downloads what its dependents need when nobody else does, takes over
// from dead or stalled owners, and publishes.
type Manager struct {
	cfg     Config
	perms   state.Perms
	store   state.Backend
	root    string // absolute
	metrics *metrics
	self    state.Owner
	log     logrus.FieldLogger
	// leased: the store holds dependents bound to processes, and named
	// ones with a TTL, on leases it times itself (state.DependentLeaser).
	leased bool
	// reserved: the disk reserve was looked for, at the first Get.
	reserved sync.Once
	// owners: the store holds owners on leases renewed with their
	// progress and says when one ended (state.OwnerLeaser); nil: this
	// manager times a stalled owner itself.
	owners state.OwnerLeaser

	// trashMu keeps emptyTrash (write) out while settleTrash (read) moves
	// content out of trash by what a snapshot of the state names.
	trashMu sync.RWMutex

	mu             sync.Mutex
	local          map[string]map[string]localDep    // key ID -> dependents registered here
	localKeys      map[string]state.Key              // key ID -> key, for the entries of m.local
	lost           map[string]map[string]bool        // key ID -> dependents found gone without a release
	downloads      map[string]*download              // key ID -> our running download
	seen           map[string]observation            // key ID -> what we watched stay unchanged
	leases         map[string]map[string]observation // key ID -> dependent -> its lease as watched
	registrations  map[string]map[string]observation // key ID -> dependent -> its TTL registration as watched
	ages           map[string]ageObservation         // key ID -> its creation and last use as watched
	lastSweep      time.Time                         // our clock, last sweep
	sweepSoon      bool                              // a publish, or a change of the stored policy, asked for a sweep
	policyMismatch []string
	daemonID       string        // the Docker daemon's ID, when Config.Docker is set
	last           *state.State  // the state the last pass saw
	pass           uint64        // sequence number of the last finished pass
	started        uint64        // sequence number of the last started pass
	passErr        error         // error of the last pass, if it failed
	failures       int           // passes failed in a row
	passDone       chan struct{} // closed when the current pass finishes
	running        bool

	wake chan struct{}
	wg   sync.WaitGroup // download goroutines
}

// check refuses what New would otherwise take for a default or crash on:
// a negative duration or bound, and a nil source.
func (cfg *Config) check() error {
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"LockLease", cfg.LockLease}, {"ProgressInterval", cfg.ProgressInterval}, {"PollInterval", cfg.PollInterval},
		{"CleanupInterval", cfg.CleanupInterval}, {"RetryBackoff", cfg.RetryBackoff},
		{"Policy.DownloadTimeout", cfg.Policy.DownloadTimeout}, {"Policy.FailureCooldown", cfg.Policy.FailureCooldown},
		{"Policy.MaxCooldown", cfg.Policy.MaxCooldown}, {"Policy.LeaseDuration", cfg.Policy.LeaseDuration},
	} {
		if d.v < 0 {
			return fmt.Errorf("manager: Config.%s %s: must not be negative (0 takes the default)", d.name, d.v)
		}
	}
	if cfg.MaxBundleBytes < 0 {
		return fmt.Errorf("manager: Config.MaxBundleBytes %d: must not be negative (0: no bound)", cfg.MaxBundleBytes)
	}
	for scheme, src := range cfg.Sources {
		if src == nil {
			return fmt.Errorf("manager: Config.Sources[%q] is nil", scheme)
		}
	}
	return nil
}

// New opens the cache root and returns a manager. Call Run (or Start) for
// downloads and Wait to work.
func New(cfg Config) (*Manager, error) {
	if cfg.Root == "" {
		return nil, errors.New("manager: no cache root")
	}
	if err := cfg.check(); err != nil {
		return nil, err
	}
	progressGiven := cfg.ProgressInterval > 0
	cfg.Policy = cfg.Policy.WithDefaults()
	switch {
	case cfg.Retries < 0:
		cfg.Retries = 0
	case cfg.Retries == 0:
		cfg.Retries = 3
	}
	if cfg.RetryBackoff <= 0 {
		cfg.RetryBackoff = time.Second
	}
	if !progressGiven {
		// Reported at least four times per download timeout, as the CLI
		// derives it: a 2 s default under a 1 s timeout made every other
		// process take each live download over as stalled.
		cfg.ProgressInterval = min(2*time.Second, max(cfg.Policy.DownloadTimeout/4, time.Millisecond))
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = 250 * time.Millisecond
	}
	if cfg.CleanupInterval <= 0 {
		cfg.CleanupInterval = time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = logrus.StandardLogger()
	}
	if cfg.Clock == nil {
		cfg.Clock = state.RealClock()
	}
	if cfg.Processes == nil {
		p, err := state.System()
		if err != nil {
			return nil, fmt.Errorf("manager: %w", err)
		}
		cfg.Processes = p
	}
	if cfg.Disk == nil {
		cfg.Disk = statfsSpace{}
	}
	if cfg.Sources == nil {
		h := HTTPSource(&http.Client{Transport: http.DefaultTransport}, min(cfg.Policy.DownloadTimeout, time.Minute))
		cfg.Sources = map[string]Source{"http": h, "https": h, "file": FileSource()}
	}
	met := newMetrics(cfg.Metrics, cfg.Disk)
	onHold := func(d time.Duration) {
		met.lockHold.Observe(seconds(d))
		if cfg.OnLockHold != nil {
			cfg.OnLockHold(d)
		}
	}
	perms := state.DefaultPerms()
	if cfg.GroupShared {
		perms = state.GroupPerms()
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, fmt.Errorf("manager: root %q: %w", cfg.Root, err)
	}
	store := cfg.State
	if store == nil {
		fs, err := state.Open(root, state.Options{OnHold: onHold, Perms: perms,
			OnWait:    func(d time.Duration) { met.lockWait.Observe(seconds(d)) },
			OnCombine: func(event string) { met.combined.WithLabelValues(event).Inc() },
			Reserve:   cfg.DiskReserve,
			Lock:      state.LockOptions{Lease: cfg.LockLease, Processes: cfg.Processes, Clock: cfg.Clock, Log: cfg.Log}})
		if err != nil {
			return nil, err
		}
		store = fs
	} else if err := perms.MkdirAll(root); err != nil {
		return nil, fmt.Errorf("manager: %w", err)
	}
	if err := checkLayout(root); err != nil {
		return nil, err
	}
	met.root.Store(&root) // the disk gauges measure its filesystem
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	self := state.Owner{Process: cfg.Processes.Self(), ManagerID: hex.EncodeToString(id)}
	leaser, leased := store.(state.DependentLeaser)
	if leased {
		leaser.LeaseDependents(cfg.Policy.LeaseDuration)
	}
	serveProposals(store)
	owners, _ := store.(state.OwnerLeaser)
	if owners != nil {
		owners.LeaseOwners(cfg.Policy.DownloadTimeout)
	}
	return &Manager{
		leased:        leased,
		owners:        owners,
		cfg:           cfg,
		perms:         perms,
		store:         store,
		root:          root,
		metrics:       met,
		self:          self,
		log:           cfg.Log.WithField("manager", self.ManagerID),
		local:         map[string]map[string]localDep{},
		localKeys:     map[string]state.Key{},
		lost:          map[string]map[string]bool{},
		downloads:     map[string]*download{},
		seen:          map[string]observation{},
		leases:        map[string]map[string]observation{},
		registrations: map[string]map[string]observation{},
		ages:          map[string]ageObservation{},
		passDone:      make(chan struct{}),
		wake:          make(chan struct{}, 1),
	}, nil
}

// Root returns the absolute cache root.
func (m *Manager) Root() string { return m.root }

// Abs returns the absolute path of an entry's content.
func (m *Manager) Abs(e state.Entry) (string, error) {
	if e.Path == "" {
		return "", fmt.Errorf("%s has no content path", e.Key.Source)
	}
	return state.AbsIn(m.root, e.Path)
}

// GetOption adjusts a Get.
type GetOption func(*getOptions)

type getOptions struct {
	ttl      time.Duration
	detached bool
	retry    bool
}

// Retry makes a Get that finds the entry FAILED retry it now, without
// waiting for its cool-down to end (transient and permanent failures
// alike). An entry that still names content kept for its runs (verify
// failed it) is not retried until they are gone; then that content goes
// to trash, whether the Get retries or its cool-down ended.
func Retry() GetOption {
	return func(o *getOptions) { o.retry = true }
}

// WithTTL makes the dependent lapse after d unless released earlier.
func WithTTL(d time.Duration) GetOption {
	return func(o *getOptions) { o.ttl = d }
}

// Detached registers a dependent that is not bound to this process: it
// lives until released (or until its TTL), as a named CLI dependent does.
func Detached() GetOption {
	return func(o *getOptions) { o.detached = true }
}

// Get registers dependent as a user of key and returns a snapshot of the
// entry without waiting. For an image, the key is completed with this
// manager's daemon: use the returned entry's Key to Wait and Release. A missing entry is created DOWNLOADING; the
// download starts in this process's loop if no one else runs it. By
// default the dependent is bound to this process.
func (m *Manager) Get(ctx context.Context, dependent string, key state.Key, opts ...GetOption) (state.Entry, error) {
	if err := checkDependent(dependent); err != nil {
		return state.Entry{}, err
	}
	m.reserved.Do(func() { m.keepReserve(ctx) })
	if key.Kind == state.Image && key.Daemon == "" {
		id, err := m.daemon(ctx)
		if err != nil {
			return state.Entry{}, err
		}
		key.Daemon = id
	}
	if err := key.Validate(); err != nil {
		return state.Entry{}, err
	}
	var o getOptions
	for _, opt := range opts {
		opt(&o)
	}
	var dep state.Dependent
	args := func() any {
		now := m.cfg.Clock.Now()
		dep = state.Dependent{Since: now}
		if !o.detached {
			p := m.self.Process
			dep.Process = &p
		}
		if o.ttl > 0 {
			exp := now.Add(o.ttl)
			dep.Expires = &exp
		}
		return requestArgs{Key: key, Dependent: dependent, Dep: dep, Policy: m.cfg.Policy, Now: now, Retry: o.retry}
	}
	// The hot path touches only this entry and the header, and may be
	// applied by another process's commit (propose.go).
	var out requestOutcome
	err := m.propose(ctx, opRequest, []string{key.ID()}, args, &out)
	if err == nil && out.Entry == nil {
		err = fmt.Errorf("manager: the result of %s names no entry", opRequest)
	}
	if err != nil && m.DiskFull(err) && !errors.Is(err, ErrDiskFull) {
		// A get adds a dependent, and so frees nothing: it leaves the
		// disk reserve to the releases and removals that do.
		err = fmt.Errorf("%w: registering %s on %s needs a commit, and a get does not give up the disk reserve, which is kept for releases and removals: free space on the root's filesystem (depcache gc, depcache rm) and get again: %w", ErrDiskFull, dependent, key.Source, err)
	}
	if err != nil {
		return state.Entry{}, err
	}
	snap, result := *out.Entry, out.Result
	if out.Drop != "" {
		// Committed: the entry no longer names it, and nobody held it.
		m.moveToTrash([]string{filepath.Dir(out.Drop)}, "a retried FAILED")
	}
	m.metrics.requests.WithLabelValues(result).Inc()
	m.mu.Lock()
	id := key.ID()
	if m.local[id] == nil {
		m.local[id] = map[string]localDep{}
	}
	// A pass that started before this commit may not see it: only later
	// passes judge whether the dependent is still there.
	ld := localDep{since: m.started, bound: !o.detached, seen: dep.Since}
	if dep.Expires != nil {
		ld.expires = *dep.Expires
	}
	m.local[id][dependent] = ld
	m.localKeys[id] = snap.Key
	// Held again by this process, under this name or another: Wait
	// waits for it again.
	delete(m.lost, id)
	m.mu.Unlock()
	if snap.Key.Kind == state.Image && snap.Stage == state.Ready && m.cfg.Docker != nil {
		// The daemon is not ours alone: an image removed by hand (docker
		// rmi) or by an eviction that raced this Get is fetched again
		// rather than handed out.
		ectx, cancel := engineContext(ctx)
		_, ok, ierr := m.cfg.Docker.Inspect(ectx, snap.ImageID)
		cancel()
		if ierr == nil && !ok {
			if snap, err = m.refetchImage(ctx, snap); err != nil {
				// The caller is told; a pass must not report it lost too.
				m.mu.Lock()
				delete(m.local[id], dependent)
				if len(m.local[id]) == 0 {
					delete(m.local, id)
					delete(m.localKeys, id)
				}
				m.mu.Unlock()
				return state.Entry{}, err
			}
		}
	}
	m.kick()
	return snap, nil
}

// refetchImage makes the READY entry seen turn into a download again, its
// image being gone from the daemon, and returns the entry as it is now.
func (m *Manager) refetchImage(ctx context.Context, seen state.Entry) (state.Entry, error) {
	var now state.Entry
	refetched := false
	err := m.store.Update(ctx, func(st *state.State) (bool, error) {
		e := st.Get(seen.Key)
		if e == nil {
			return false, fmt.Errorf("%s: %w (evicted meanwhile)", seen.Key.Source, ErrNotFound)
		}
		refetched = e.Stage == state.Ready && e.ImageID == seen.ImageID && e.Generation == seen.Generation
		if refetched {
			e = transitions.Refetch(e, "its image is no longer in the daemon: fetching it again").Entry
			st.Put(e)
		}
		now = *e.Clone() // e may be shared with the store's cache
		return refetched, nil
	})
	if refetched && err == nil {
		m.log.WithFields(logrus.Fields{"source": seen.Key.Source, "image_id": seen.ImageID}).Warn("a READY image is no longer in the daemon: fetching it again")
	}
	return now, err
}

// Wait blocks until the entry for key is READY (returned with a nil error)
// or FAILED (returned with a *FailedError), or ctx is done. Waiters in this
// process are woken by the pass that sees the change; changes made by other
// processes are seen at the next poll, or, with a store that watches
// (state.Watcher: the etcd store), by a pass that the change itself
// starts. The manager must be running.
func (m *Manager) Wait(ctx context.Context, key state.Key) (e state.Entry, err error) {
	began := time.Now()
	defer func() {
		if err == nil || errors.Is(err, ErrFailed) {
			m.metrics.waitSeconds.Observe(seconds(time.Since(began)))
		}
	}()
	id := key.ID()
	m.mu.Lock()
	start := m.started
	m.mu.Unlock()
	m.kick()
	for {
		m.mu.Lock()
		st, pass, done, running, passErr, failures := m.last, m.pass, m.passDone, m.running, m.passErr, m.failures
		m.mu.Unlock()
		if !running {
			// A loop run under the caller's context stops when that context
			// ends; say why it stopped, not that it did.
			if err := ctx.Err(); err != nil {
				return state.Entry{}, err
			}
			return state.Entry{}, ErrNotRunning
		}
		if failures >= maxFailedPasses && !errors.Is(passErr, state.ErrUnavailable) {
			// A store that is out (etcd without quorum) is waited out,
			// until ctx ends (--timeout): an owner's download goes on
			// meanwhile, and a get that gave up would throw it away.
			return state.Entry{}, fmt.Errorf("%s: the loop cannot read the state: %w", key.Source, passErr)
		}
		// Only a pass that started after this call can say the entry is
		// gone; an older one may predate the Get.
		if st != nil && pass > start {
			e := st.Entries[id]
			if lost := m.lostDependents(id); len(lost) > 0 {
				// Only while nothing of this process holds the entry.
				return state.Entry{}, fmt.Errorf("%s: dependent(s) %q: %w", key.Source, lost, ErrDependentLost)
			}
			switch {
			case e == nil:
				return state.Entry{}, fmt.Errorf("%s: %w (released, cancelled or evicted)", key.Source, ErrNotFound)
			case e.Stage == state.Ready:
				return *e.Clone(), nil // m.last shares its entries with the store's cache
			case e.Stage == state.Failed:
				return *e.Clone(), m.Failed(*e)
			}
		}
		select {
		case <-done:
		case <-ctx.Done():
			return state.Entry{}, ctx.Err()
		}
	}
}

// Release removes dependent from key's entry. A download left without
// dependents is cancelled wherever it runs, and its entry removed.
func (m *Manager) Release(ctx context.Context, dependent string, key state.Key) error {
	if err := checkDependent(dependent); err != nil {
		return err
	}
	// Forgotten before the commit, so that no pass takes the released
	// dependent for a lost one.
	id := key.ID()
	m.mu.Lock()
	delete(m.local[id], dependent)
	if len(m.local[id]) == 0 {
		delete(m.local, id)
		delete(m.localKeys, id)
	}
	delete(m.lost[id], dependent)
	if len(m.lost[id]) == 0 {
		delete(m.lost, id)
	}
	m.mu.Unlock()
	var out struct{}
	// On a full disk too: a dependent that cannot be released keeps its
	// entry from rm and from every sweep.
	err := m.freeing(ctx, "release", func() error {
		return m.propose(ctx, opRelease, []string{id}, func() any { return releaseArgs{Key: key, Dependent: dependent} }, &out)
	}, func() (bool, error) {
		// A release that would be refused spends nothing.
		st, err := m.store.View(ctx)
		if err != nil {
			return false, err
		}
		_, err = transitions.Release(st.Get(key), dependent)
		return err == nil, err
	})
	m.kick()
	if errors.Is(err, transitions.ErrNotRegistered) {
		return fmt.Errorf("%s: dependent %q: %w", key.Source, dependent, err)
	}
	return err
}

// Entries returns the current state, without the lock. Its entries are
// shared with the store's cache: read them, or Clone one to change it.
func (m *Manager) Entries(ctx context.Context) (*state.State, error) {
	return m.store.View(ctx)
}

// kick wakes the loop for an early pass.
func (m *Manager) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// CheckDependent reports what makes name unusable as a dependent's name:
// empty, longer than 256 bytes, a control character, or not valid UTF-8
// (errors wrap [ErrBadDependent]). Get and Release check it too; a caller
// checks it first to refuse bad input before anything else.
func CheckDependent(name string) error { return checkDependent(name) }

func checkDependent(name string) error {
	if err := state.CheckText("dependent name", name); err != nil {
		return fmt.Errorf("%w: %w", err, ErrBadDependent)
	}
	if name == "" || len(name) > 256 || strings.ContainsFunc(name, unicode.IsControl) {
		return fmt.Errorf("%q: %w (want 1 to 256 bytes of printable characters)", name, ErrBadDependent)
	}
	return nil
}

// Snapshot returns the entry for key as the loop last saw it, without I/O.
func (m *Manager) Snapshot(key state.Key) (state.Entry, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.last == nil {
		return state.Entry{}, false
	}
	e := m.last.Entries[key.ID()]
	if e == nil {
		return state.Entry{}, false
	}
	return *e.Clone(), true
}

// IsSelf reports whether o is this manager.
func (m *Manager) IsSelf(o *state.Owner) bool { return o.Same(&m.self) }

// requestResult classifies a Get by the entry it found.
func requestResult(e *state.Entry) string {
	switch {
	case e == nil:
		return "miss"
	case e.Stage == state.Ready:
		return "hit"
	case e.Stage == state.Failed:
		return "failed"
	}
	return "wait"
}

// daemon returns the Docker daemon's ID, or why images cannot be had.
func (m *Manager) daemon(ctx context.Context) (string, error) {
	if m.cfg.Docker == nil {
		return "", fmt.Errorf("docker:// sources need a Docker engine (set DOCKER_HOST): %w", ErrBadSource)
	}
	m.mu.Lock()
	id := m.daemonID
	m.mu.Unlock()
	if id != "" {
		return id, nil
	}
	ectx, cancel := engineContext(ctx)
	defer cancel()
	id, err := m.cfg.Docker.DaemonID(ectx)
	if err != nil {
		return "", engineErr(ctx, ectx, err)
	}
	m.mu.Lock()
	m.daemonID = id
	m.mu.Unlock()
	return id, nil
}
