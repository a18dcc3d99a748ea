package manager

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/sirupsen/logrus"
)

// observation is what this manager watched of an entry's owner and
// progress, and since when (on its own clock) it has stayed the same.
type observation struct {
	sig   string
	since time.Time
}

// keyedAction is an action for the entry with key.
type keyedAction struct {
	key state.Key
	act transitions.Action
}

// Run reconciles the root with its state, then runs the transition loop
// until ctx is done. On return, every download this manager ran has
// stopped; an interrupted download's entry is handed back unowned so that
// others claim it at once.
func (m *Manager) Run(ctx context.Context) error {
	if err := m.begin(); err != nil {
		return err
	}
	if err := m.reconcile(ctx); err != nil {
		m.end()
		return err
	}
	return m.run(ctx)
}

// end marks the manager stopped and releases every waiter.
func (m *Manager) end() {
	m.mu.Lock()
	m.running = false
	close(m.passDone) // waiters wake and see !running
	m.passDone = make(chan struct{})
	m.mu.Unlock()
}

// begin marks the manager running, so that Wait works from then on.
func (m *Manager) begin() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.running {
		return errors.New("manager: already running")
	}
	m.running = true
	return nil
}

func (m *Manager) run(ctx context.Context) error {
	defer m.end()
	renewing := make(chan struct{})
	go func() {
		defer close(renewing)
		m.renewLeases(ctx)
	}()
	defer func() { <-renewing }()
	var lastErr error
	owed := false // a sweep that was due when ctx ended
	w, _ := m.store.(state.Watcher)
	for {
		var mark state.Mark
		if w != nil {
			mark = w.Mark() // before the pass reads: no later change is missed
		}
		if err := m.step(ctx); err != nil && ctx.Err() == nil {
			// A lock or state problem: say it once per kind, keep trying.
			if lastErr == nil || err.Error() != lastErr.Error() {
				m.log.WithError(err).Error("transition pass failed")
			}
			lastErr = err
		} else {
			lastErr = nil
		}
		m.mu.Lock()
		sweep := m.sweepSoon || m.cfg.Clock.Now().Sub(m.lastSweep) >= m.cfg.CleanupInterval
		m.sweepSoon = false
		m.mu.Unlock()
		if sweep {
			swept := false
			if m.electedSweeper(ctx) { // else another manager of the store sweeps
				_, err := m.Sweep(ctx, false)
				if err != nil && ctx.Err() == nil {
					m.log.WithError(err).Error("sweep failed")
				}
				swept = err == nil
			}
			owed = !swept && ctx.Err() != nil // cut short by the stop
			m.mu.Lock()
			m.lastSweep = m.cfg.Clock.Now()
			m.mu.Unlock()
		}
		if !m.sleep(ctx, w, mark) {
			m.stopDownloads()
			m.sweepOnExit(ctx, owed)
			return nil
		}
	}
}

// exitSweepTimeout bounds the sweep a stopping loop owes.
const exitSweepTimeout = 10 * time.Second

// sweepOnExit runs the sweep that a publish asked for (or that ctx's end
// cut short) before the loop stops: a get's loop stops as soon as its
// entry is READY, and the cache would stay over its budget until the next
// command. It empties what it evicts, as any sweep does: trash left to a
// later process of another host or container would never be adopted.
func (m *Manager) sweepOnExit(ctx context.Context, owed bool) {
	m.mu.Lock()
	owed = owed || m.sweepSoon
	m.sweepSoon = false
	m.mu.Unlock()
	if !owed {
		return
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), exitSweepTimeout)
	defer cancel()
	if !m.electedSweeper(sctx) {
		return
	}
	if _, err := m.Sweep(sctx, false); err != nil {
		m.log.WithError(err).Warn("the sweep owed at the loop's stop failed")
	}
}

// electedSweeper reports whether this manager's loop sweeps: always, but
// with a store that elects one sweeper among its managers
// (state.SweepElector), only while it is the elected one.
func (m *Manager) electedSweeper(ctx context.Context) bool {
	el, ok := m.store.(state.SweepElector)
	if !ok {
		return true
	}
	elected, err := el.MaySweep(ctx)
	if err != nil && ctx.Err() == nil {
		m.log.WithError(err).Warn("cannot tell whether this manager is the elected sweeper: not sweeping")
	}
	return elected
}

// watchFallback is how long the loop waits between passes while a store
// watches the entries it waits for (at least PollInterval): passes then
// only time what no commit announces (a stalled owner, lapsed leases) and
// run the sweeps.
const watchFallback = 2 * time.Second

// sleep waits until the next pass is due: a kick, the poll interval, or,
// with a store that watches (w), a change after mark of an entry this
// process holds or downloads, or of the stored policy, whichever comes
// first. It returns false when ctx ended. The watch runs on a goroutine
// that sleep waits for.
//
// With nothing held, the poll interval stays: no watch announces an entry
// that another process queued (get --no-wait) for this one to take up.
func (m *Manager) sleep(ctx context.Context, w state.Watcher, mark state.Mark) bool {
	interval := m.cfg.PollInterval
	var changed chan error
	if w != nil && mark > 0 {
		// Without a mark (nothing read yet) a watch returns at once:
		// polled, or a loop whose passes fail would spin.
		ids := m.watchedIDs()
		wctx, cancel := context.WithCancel(ctx)
		changed = make(chan error, 1)
		go func() { changed <- w.WaitEntries(wctx, ids, mark) }()
		defer func() {
			cancel()
			if changed != nil {
				<-changed
			}
		}()
		if len(ids) > 0 {
			interval = max(interval, watchFallback)
		}
	}
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-m.wake:
			return true
		case <-t.C:
			return true
		case err := <-changed:
			changed = nil
			if err == nil || ctx.Err() != nil {
				return true
			}
			// The store cannot watch now: poll.
			m.log.WithError(err).Debug("watch failed: polling")
			t.Reset(m.cfg.PollInterval)
		}
	}
}

// watchedIDs returns the entries whose changes a pass must see at once:
// those this process holds dependents on or downloads.
func (m *Manager) watchedIDs() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]string, 0, len(m.local)+len(m.downloads))
	for id := range m.local {
		ids = append(ids, id)
	}
	for id := range m.downloads {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

// MaxRenewInterval bounds how long a manager goes without renewing the
// leases of its process's dependents, whatever its own lease: another host
// may run with a shorter one, down to [MinDependentLease].
const MaxRenewInterval = 10 * time.Second

// MinDependentLease is the shortest dependent lease the CLI accepts: three
// renewals fit in it, so a host never reaps a live dependent of a host
// that renews at MaxRenewInterval.
const MinDependentLease = 3 * MaxRenewInterval

// renewLeases bumps the leases of this process's dependents until ctx ends,
// on its own ticker: a pass or a sweep that takes long (a tree of a million
// files to delete from trash, a slow Docker engine) must not let another
// host see a live dependent's lease unchanged for its whole lease and evict
// what a run is using.
//
// With a store that holds them on its own leases (state.DependentLeaser)
// there is nothing to renew here: the store's session keeps its lease
// alive.
func (m *Manager) renewLeases(ctx context.Context) {
	if m.leased {
		return
	}
	t := time.NewTicker(max(min(m.cfg.Policy.LeaseDuration/3, MaxRenewInterval), time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.mu.Lock()
		registered := len(m.local)
		m.mu.Unlock()
		if registered == 0 {
			continue // no dependent of ours: no need to read the state
		}
		err := m.store.UpdateBatched(ctx, func(st *state.State) (bool, error) {
			changed := false
			for id, e := range st.Entries {
				if r := transitions.Renew(e, m.self.Process); r.Changed {
					st.Entries[id] = r.Entry
					changed = true
				}
			}
			return changed, nil
		})
		if err != nil && ctx.Err() == nil {
			m.log.WithError(err).Error("renewing the leases of this process's dependents")
		}
	}
}

// step runs one pass: all entries through transitions.Step under one lock
// hold, then the actions outside it.
func (m *Manager) step(ctx context.Context) (err error) {
	var acts []keyedAction
	var seenState *state.State
	m.mu.Lock()
	m.started++
	seq := m.started
	m.mu.Unlock()
	defer func() {
		if err == nil {
			return
		}
		// Wake waiters, so that they can give up with the error.
		m.mu.Lock()
		m.passErr = err
		m.failures++
		close(m.passDone)
		m.passDone = make(chan struct{})
		m.mu.Unlock()
	}()
	var pruned []string // entry directories of removed entries
	err = m.store.Update(ctx, func(st *state.State) (bool, error) {
		acts = acts[:0]
		pruned = pruned[:0]
		now := m.cfg.Clock.Now()
		changed := false
		m.mu.Lock()
		defer m.mu.Unlock()
		for id, e := range st.Entries {
			r, err := transitions.Step(e, m.viewLocked(id, e, now), m.cfg.Policy, now)
			if err != nil {
				m.log.WithError(err).WithField("key", e.Key.String()).Warn("entry skipped")
				continue
			}
			if r.Changed {
				if r.Entry == nil && e.Path != "" {
					// A pruned FAILED entry still naming content kept for
					// the runs that held it: nobody holds it now. It
					// moves to trash once the removal is committed.
					pruned = append(pruned, filepath.Dir(e.Path))
				}
				changed = true
				if r.Entry == nil {
					delete(st.Entries, id)
				} else {
					st.Entries[id] = r.Entry
				}
			}
			for _, a := range r.Actions {
				acts = append(acts, keyedAction{key: e.Key, act: a})
			}
			if r.Entry != nil {
				m.watchedLocked(id, r.Entry, now) // ages count from when this manager first saw them
			}
		}
		for id := range m.seen {
			if st.Entries[id] == nil {
				delete(m.seen, id)
			}
		}
		for _, seen := range []map[string]map[string]observation{m.leases, m.registrations} {
			for id := range seen {
				if st.Entries[id] == nil {
					delete(seen, id)
				}
			}
		}
		for id := range m.ages {
			if st.Entries[id] == nil {
				delete(m.ages, id)
			}
		}
		seenState = st
		return changed, nil
	})
	if err != nil {
		return err
	}
	if len(pruned) > 0 {
		m.moveToTrash(pruned, "a pruned")
		m.emptyTrash()
	}
	m.metrics.observeState(seenState)
	m.mu.Lock()
	lost := m.findLostLocked(seenState, seq)
	if m.last != nil && !reflect.DeepEqual(m.last.Policy, seenState.Policy) {
		// The stored policy changed (depcache policy set, on any host):
		// sweep by it now, not at the next cleanup interval, so that a
		// smaller budget frees its space within a pass.
		m.sweepSoon = true
	}
	m.last = seenState
	m.pass = seq
	m.passErr, m.failures = nil, 0
	close(m.passDone)
	m.passDone = make(chan struct{})
	// A download whose entry was removed (its last dependent released or
	// reaped, here or by another process) or taken by another owner: stop
	// it, with the reason runDownload acts on. A CancelDownload action of
	// this pass finds it stopped already.
	for id, d := range m.downloads {
		switch e := seenState.Entries[id]; {
		case e == nil:
			d.cancel(errReleased)
		case e.Generation != d.gen || !e.Owner.Same(&m.self):
			d.cancel(errSuperseded)
		}
	}
	m.mu.Unlock()
	m.reportLost(lost)
	for _, ka := range acts {
		m.carryOut(ctx, ka)
	}
	return nil
}

// findLostLocked returns the dependents registered here before pass seq
// started that st no longer holds, and moves them from m.local to m.lost.
// m.mu is held.
func (m *Manager) findLostLocked(st *state.State, seq uint64) []LostDependent {
	var lost []LostDependent
	now := m.cfg.Clock.Now()
	for id, names := range m.local {
		e := st.Entries[id]
		for name, d := range names {
			if !d.bound || d.since >= seq {
				continue // anyone's to release, or registered after this pass read the state
			}
			if e != nil {
				if _, ok := e.Dependents[name]; ok {
					if !d.expires.IsZero() {
						d.seen = now
						names[name] = d
					}
					continue
				}
			}
			if !d.expires.IsZero() && !now.Before(d.expires) && !d.seen.Before(d.expires.Add(-m.ttlGrace())) {
				// Its TTL ended, as the caller asked, while this process
				// watched it: reaped, not lost.
				m.log.WithFields(logrus.Fields{"key": m.localKeys[id].String(), "dependent": name}).Debug("a dependent's TTL ended")
				delete(names, name)
				continue
			}
			lost = append(lost, LostDependent{Key: m.localKeys[id], Dependent: name, Evicted: e == nil})
			delete(names, name)
			if m.lost[id] == nil {
				m.lost[id] = map[string]bool{}
			}
			m.lost[id][name] = true
		}
		if len(names) == 0 {
			delete(m.local, id)
			delete(m.localKeys, id)
		}
	}
	return lost
}

// ttlGrace is how long before its TTL's end a dependent may have been
// last seen and still be taken for one reaped at that end: two of the
// loop's longest sleeps (etcd ends a TTL's lease on the dot, and the pass
// before may be that far back), and at least a minute, for a pass held up
// by a long lock wait or by its own sweep's deletes. A process stopped
// past its lease and its TTL is still told, unless its stop began in that
// last minute.
func (m *Manager) ttlGrace() time.Duration {
	return max(2*max(m.cfg.PollInterval, watchFallback), time.Minute)
}

// reportLost says, loudly, that runs of this process lost what they hold.
func (m *Manager) reportLost(lost []LostDependent) {
	for _, l := range lost {
		m.metrics.lostDependents.Inc()
		what := "its entry is still there, but nothing holds it for this dependent now"
		if l.Evicted {
			what = "its entry was evicted: a run using its path may be reading deleted files"
		}
		m.log.WithFields(logrus.Fields{"key": l.Key.String(), "dependent": l.Dependent}).
			Errorf("a dependent bound to this process is gone from its entry without its release (reaped after this process was stopped past its dependent lease, or released by another process); %s", what)
		if m.cfg.OnLost != nil {
			m.cfg.OnLost(l)
		}
	}
}

// lostDependents returns the dependents of entry id found lost, while
// no dependent of this manager holds the entry.
func (m *Manager) lostDependents(id string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.local[id]) > 0 {
		return nil
	}
	var out []string
	for name := range m.lost[id] {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

// viewLocked builds what this manager knows about entry e. m.mu is held.
func (m *Manager) viewLocked(id string, e *state.Entry, now time.Time) transitions.View {
	v := transitions.View{Self: m.self, Drive: m.cfg.DriveAll || len(m.local[id]) > 0,
		Dependents: m.dependentViewsLocked(e, now)}
	if e.Key.Kind == state.Image && (e.Key.Daemon == "" || e.Key.Daemon != m.daemonID) {
		v.Drive = false // images live in their daemon: only its managers drive them
	}
	if d := m.downloads[id]; d != nil && d.gen == e.Generation {
		v.Running = true
	}
	if e.Stage != state.Downloading || e.Owner == nil {
		delete(m.seen, id)
		return v
	}
	if m.self.SameMachine(e.Owner.Process) && !e.Owner.Same(&m.self) {
		alive, err := m.cfg.Processes.Alive(e.Owner.Process)
		if err != nil {
			m.log.WithError(err).WithField("key", e.Key.String()).Warn("cannot tell whether the owner is alive")
		} else {
			v.OwnerDead = !alive
		}
	}
	if m.owners != nil {
		// The store times the owner's stall on its lease, renewed with
		// each progress report: no clock of ours.
		v.OwnerLeaseEnded = m.owners.OwnerLapsed(id, e.Generation)
		delete(m.seen, id)
		return v
	}
	sig := fmt.Sprintf("%s/%d/%d/%d/%d/%d", e.Owner.ManagerID, e.Owner.PID, e.Generation, e.Progress.Bytes, e.Progress.Total, e.Progress.Heartbeat)
	o, ok := m.seen[id]
	if !ok || o.sig != sig {
		o = observation{sig: sig, since: now}
		m.seen[id] = o
	}
	v.Unchanged = now.Sub(o.since)
	return v
}

// applyResult writes a rule's result for key into tx; its actions are the
// caller's to carry out.
func applyResult(tx *state.Txn, key state.Key, r transitions.Result) {
	if !r.Changed {
		return
	}
	if r.Entry == nil {
		tx.Delete(key)
		return
	}
	tx.Put(r.Entry)
}

func (m *Manager) carryOut(ctx context.Context, ka keyedAction) {
	log := m.log.WithField("key", ka.key.String())
	switch a := ka.act.(type) {
	case transitions.StartDownload:
		log.WithField("gen", a.Generation).Info("claimed download")
		m.startDownload(ctx, ka.key, a.Generation)
	case transitions.CancelDownload:
		m.mu.Lock()
		if d := m.downloads[ka.key.ID()]; d != nil {
			d.cancel(errReleased)
		}
		m.mu.Unlock()
	case transitions.TakeOver:
		reason := "stalled"
		if a.Dead {
			reason = "dead_owner"
		}
		m.metrics.takeovers.WithLabelValues(reason).Inc()
		log.WithFields(logrus.Fields{"from_host": a.From.Host, "from_pid": a.From.PID, "reason": a.Reason}).Info("took over download")
	case transitions.RemoveStaging:
		m.removeDeadOwnerStaging(ka.key, a.Generation, log)
	case transitions.Reaped:
		log.WithField("dependents", a.Dependents).Info("reaped dependents that no longer hold the entry")
	case transitions.Removed:
		log.WithField("reason", a.Reason).Info("entry removed")
	}
}

func (m *Manager) stopDownloads() {
	m.mu.Lock()
	for _, d := range m.downloads {
		d.cancel(errShutdown)
	}
	m.mu.Unlock()
	m.wg.Wait()
}

// Start reconciles the root with its state (an unreadable state file is
// returned here), then runs the loop in a goroutine. It returns the
// function that stops the loop and waits for it, and for every download it
// ran, to end.
func (m *Manager) Start(ctx context.Context) (stop func() error, err error) {
	if err := m.begin(); err != nil {
		return nil, err
	}
	if err := m.reconcile(ctx); err != nil {
		m.end()
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.run(ctx) }()
	var once sync.Once
	var runErr error
	return func() error { // may be called more than once
		once.Do(func() {
			cancel()
			runErr = <-done
		})
		return runErr
	}, nil
}
