package manager

import (
	"time"

	"github.com/depcache/depcache/state"
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
	entries         *prometheus.GaugeVec
	entryBytes      *prometheus.GaugeVec
	lostDependents  prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	lockBuckets := prometheus.ExponentialBuckets(0.0001, 4, 10) // 100µs .. 26s
	m := &metrics{
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
		lockHold: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "depcache_lock_hold_seconds",
			Help: "Time the state lock was held per update.", Buckets: lockBuckets}),
		entries: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "depcache_entries",
			Help: "Entries in the cache by stage, as last seen."}, []string{"stage"}),
		entryBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "depcache_entry_bytes",
			Help: "Bytes of entries by stage, as last seen (expected size for downloads)."}, []string{"stage"}),
		lostDependents: prometheus.NewCounter(prometheus.CounterOpts{Name: "depcache_lost_dependents_total",
			Help: "Dependents this process registered that were found gone from their entry without a release (reaped while the process was stopped past its lease, or removed by hand)."}),
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
	if reg != nil {
		reg.MustRegister(m.requests, m.downloads, m.takeovers, m.bytes, m.downloadSeconds, m.waitSeconds,
			m.evictions, m.freedBytes, m.lockWait, m.lockHold, m.entries, m.entryBytes, m.lostDependents)
	}
	return m
}

// observeState sets the per-stage gauges.
func (m *metrics) observeState(st *state.State) {
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

func seconds(d time.Duration) float64 { return d.Seconds() }
