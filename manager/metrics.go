package manager

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the manager's Prometheus metrics. They are registered with
// Config.Metrics when it is set, and kept private otherwise.
type metrics struct {
	requests        *prometheus.CounterVec
	downloads       *prometheus.CounterVec
	takeovers       *prometheus.CounterVec
	bytes           prometheus.Counter
	downloadSeconds prometheus.Histogram
	waitSeconds     prometheus.Histogram
	evictions       *prometheus.CounterVec
	freedBytes      prometheus.Counter
	lockWait        prometheus.Histogram
	lockHold        prometheus.Histogram
	combined        *prometheus.CounterVec
	entries         *prometheus.GaugeVec
	entryBytes      *prometheus.GaugeVec
	lostDependents  prometheus.Counter
	usage           prometheus.Gauge
	budget          prometheus.Gauge
	// root is the cache root whose filesystem the disk gauges measure, on
	// scrape (space); unset, they read 0.
	root  atomic.Pointer[string]
	space DiskSpace
}

func newMetrics(reg prometheus.Registerer, space DiskSpace) *metrics {
	lockBuckets := prometheus.ExponentialBuckets(0.0001, 4, 10) // 100µs .. 26s
	m := &metrics{
		space: space,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "depcache_requests_total",
			Help: "Get calls by result: hit (READY), miss (created), wait (someone downloads), failed."}, []string{"result"}),
		downloads: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "depcache_downloads_total",
			Help: "Downloads run by this process, by event: started, finished, failed."}, []string{"event"}),
		takeovers: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "depcache_takeovers_total",
			Help: "Downloads taken over from another owner, by reason: dead_owner, stalled."}, []string{"reason"}),
		bytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "depcache_downloaded_bytes_total",
			Help: "Bytes fetched by downloads that were published."}),
		downloadSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "depcache_download_duration_seconds",
			Help: "Time from claim to publish of downloads run by this process.", Buckets: prometheus.ExponentialBuckets(0.01, 4, 10)}),
		waitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "depcache_wait_duration_seconds",
			Help: "Time Wait calls waited until READY or FAILED.", Buckets: prometheus.ExponentialBuckets(0.001, 4, 12)}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "depcache_evictions_total",
			Help: "Entries evicted by sweeps of this process, by reason: budget, age, free disk, failed."}, []string{"reason"}),
		freedBytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "depcache_evicted_bytes_total",
			Help: "Bytes freed by evictions of this process."}),
		lockWait: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "depcache_lock_wait_seconds",
			Help: "Time spent waiting for the state lock.", Buckets: lockBuckets}),
		combined: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "depcache_combined_operations_total",
			Help: "Gets and releases of this process left for another process's lock hold (proposed), applied by one (answered), and other processes' ones applied in this process's holds (served); README, The lock."}, []string{"event"}),
		lockHold: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "depcache_lock_hold_seconds",
			Help: "Time the state lock was held per update.", Buckets: lockBuckets}),
		entries: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "depcache_entries",
			Help: "Entries in the cache by stage, as last seen."}, []string{"stage"}),
		entryBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "depcache_entry_bytes",
			Help: "Bytes of entries by stage, as last seen (expected size for downloads)."}, []string{"stage"}),
		lostDependents: prometheus.NewCounter(prometheus.CounterOpts{Name: "depcache_lost_dependents_total",
			Help: "Dependents this process registered that were found gone from their entry without a release (reaped while the process was stopped past its lease, or removed by hand)."}),
		usage: prometheus.NewGauge(prometheus.GaugeOpts{Name: "depcache_usage_bytes",
			Help: "Bytes the cache takes as a sweep counts them (READY and FAILED entries on disk, downloads at their expected size), as last seen."}),
		budget: prometheus.NewGauge(prometheus.GaugeOpts{Name: "depcache_budget_bytes",
			Help: "The root's byte budget (max-size of the stored policy, else the default), as last seen; 0 means no budget."}),
	}
	for _, stage := range []state.Stage{state.Downloading, state.Ready, state.Failed} {
		m.entries.WithLabelValues(string(stage))
		m.entryBytes.WithLabelValues(string(stage))
	}
	for _, r := range []string{"hit", "miss", "wait", "failed"} {
		m.requests.WithLabelValues(r)
	}
	for _, e := range []string{"started", "finished", "failed"} {
		m.downloads.WithLabelValues(e)
	}
	for _, e := range []string{"proposed", "answered", "served"} {
		m.combined.WithLabelValues(e) // there at 0 before the first
	}
	if reg != nil {
		// Managers given one registry (two in a process, or one started
		// again after its stop) share its collectors: the second takes
		// the first's rather than panic on the duplicate.
		m.requests = register(reg, m.requests)
		m.downloads = register(reg, m.downloads)
		m.takeovers = register(reg, m.takeovers)
		m.bytes = register(reg, m.bytes)
		m.downloadSeconds = register(reg, m.downloadSeconds)
		m.waitSeconds = register(reg, m.waitSeconds)
		m.evictions = register(reg, m.evictions)
		m.freedBytes = register(reg, m.freedBytes)
		m.lockWait = register(reg, m.lockWait)
		m.lockHold = register(reg, m.lockHold)
		m.combined = register(reg, m.combined)
		m.entries = register(reg, m.entries)
		m.entryBytes = register(reg, m.entryBytes)
		m.lostDependents = register(reg, m.lostDependents)
		m.usage = register(reg, m.usage)
		m.budget = register(reg, m.budget)
		register(reg, prometheus.Collector(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "depcache_disk_free_bytes",
			Help: "Bytes free for unprivileged users on the root's filesystem (statfs at scrape time)."},
			func() float64 { free, _ := m.disk(); return float64(free) })))
		register(reg, prometheus.Collector(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "depcache_disk_size_bytes",
			Help: "Size of the root's filesystem (statfs at scrape time)."},
			func() float64 { _, size := m.disk(); return float64(size) })))
	}
	return m
}

// disk returns the free and total bytes of the root's filesystem, or zeros
// before the root is known or when statfs fails.
func (m *metrics) disk() (free, size int64) {
	root := m.root.Load()
	if root == nil {
		return 0, 0
	}
	return m.space.Space(*root)
}

// observeState sets the per-stage gauges, the usage and the budget.
func (m *metrics) observeState(st *state.State) {
	m.usage.Set(float64(transitions.Measure(st.Entries)))
	m.budget.Set(float64(policyOf(st).MaxSizeBytes))
	counts := map[state.Stage]float64{}
	sizes := map[state.Stage]float64{}
	for _, e := range st.Entries {
		counts[e.Stage]++
		if e.Stage == state.Downloading {
			sizes[e.Stage] += float64(max(e.Progress.Total, e.Progress.Bytes))
		} else {
			sizes[e.Stage] += float64(e.SizeBytes)
		}
	}
	for _, stage := range []state.Stage{state.Downloading, state.Ready, state.Failed} {
		m.entries.WithLabelValues(string(stage)).Set(counts[stage])
		m.entryBytes.WithLabelValues(string(stage)).Set(sizes[stage])
	}
}

// Totals is what a status page shows above the entries: what the cache
// takes against its budget, the policy the loops apply and the room left
// on the root's filesystem.
type Totals struct {
	// UsageBytes counts as a sweep does: READY and FAILED entries on disk,
	// downloads in flight at their expected size.
	UsageBytes int64
	// Policy is the stored policy, or the default when Stored is false.
	Policy state.Policy
	Stored bool
	// DiskFree and DiskSize are the root filesystem's free and total bytes
	// (statfs now); 0 when unknown.
	DiskFree, DiskSize int64
	// Downloading, Ready and Failed count the entries by stage.
	Downloading, Ready, Failed int
}

// TotalsOf returns the totals of st, a state this manager's store handed
// out (Entries, Describe), with the disk measured now.
func (m *Manager) TotalsOf(st *state.State) Totals {
	t := Totals{UsageBytes: transitions.Measure(st.Entries), Policy: policyOf(st), Stored: st.Policy != nil}
	t.DiskFree, t.DiskSize = m.cfg.Disk.Space(m.Root())
	for _, e := range st.Entries {
		switch e.Stage {
		case state.Downloading:
			t.Downloading++
		case state.Ready:
			t.Ready++
		case state.Failed:
			t.Failed++
		}
	}
	return t
}

func seconds(d time.Duration) float64 { return d.Seconds() }

// register registers c, or returns the collector of the same description
// already registered; any other failure (a conflicting description) is a
// bug in depcache's metrics, and panics as MustRegister would.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	err := reg.Register(c)
	if err == nil {
		return c
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing
		}
	}
	panic(err)
}
