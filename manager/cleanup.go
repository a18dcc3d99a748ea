package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/dustin/go-humanize"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// ErrBadPolicy means a cleanup setting is out of range.
var ErrBadPolicy = errors.New("bad cleanup policy")

// PolicyChange lists the cleanup settings a caller gave; nil fields were
// not given and keep the stored (or default) value.
type PolicyChange struct {
	MaxSizeBytes       *int64
	HighWatermark      *int
	LowWatermark       *int
	MinFreeDiskBytes   *int64
	MinFreeDiskPercent *int
	MinAge             *time.Duration
	MaxAge             *time.Duration
	Pins               []string // nil: not given
}

// Apply returns p with the given settings. A setting not given whose value
// in p conflicts with its partner given scales to fit, as a default does:
// a high watermark given below p's low one brings the low one down with
// it (keeping p's gap), a low one given above p's high one brings the high
// one up, and a max-age given below p's min-age brings min-age down to it.
// Two settings both given that conflict stay for Validate to refuse.
func (c PolicyChange) Apply(p state.Policy) state.Policy {
	gap := max(p.HighWatermark-p.LowWatermark, 0)
	p = c.apply(p)
	switch {
	case c.HighWatermark != nil && c.LowWatermark == nil && p.LowWatermark > p.HighWatermark:
		p.LowWatermark = max(p.HighWatermark-gap, 0)
	case c.LowWatermark != nil && c.HighWatermark == nil && p.LowWatermark > p.HighWatermark:
		p.HighWatermark = min(p.LowWatermark+gap, 100)
	}
	if c.MaxAge != nil && c.MinAge == nil && p.MaxAge > 0 && p.MaxAge < p.MinAge {
		p.MinAge = p.MaxAge
	}
	return p
}

func (c PolicyChange) apply(p state.Policy) state.Policy {
	set := func(dst *int64, v *int64) {
		if v != nil {
			*dst = *v
		}
	}
	seti := func(dst *int, v *int) {
		if v != nil {
			*dst = *v
		}
	}
	set(&p.MaxSizeBytes, c.MaxSizeBytes)
	seti(&p.HighWatermark, c.HighWatermark)
	seti(&p.LowWatermark, c.LowWatermark)
	set(&p.MinFreeDiskBytes, c.MinFreeDiskBytes)
	seti(&p.MinFreeDiskPercent, c.MinFreeDiskPercent)
	if c.MinAge != nil {
		p.MinAge = state.Duration(*c.MinAge)
	}
	if c.MaxAge != nil {
		p.MaxAge = state.Duration(*c.MaxAge)
	}
	if c.Pins != nil {
		p.Pins = slices.Clone(c.Pins)
	}
	return p
}

// Differences lists, flag by flag, where the given settings differ from p.
func (c PolicyChange) Differences(p state.Policy) []string {
	return c.differences(p, "stored")
}

// differences is Differences, with p called what (stored, default).
func (c PolicyChange) differences(p state.Policy, what string) []string {
	var out []string
	q := c.Apply(p)
	add := func(name string, stored, given any) {
		if fmt.Sprint(stored) != fmt.Sprint(given) {
			out = append(out, fmt.Sprintf("%s: %s %v, given %v", name, what, stored, given))
		}
	}
	add("max-size", p.MaxSizeBytes, q.MaxSizeBytes)
	add("high-watermark", p.HighWatermark, q.HighWatermark)
	add("low-watermark", p.LowWatermark, q.LowWatermark)
	add("min-free-disk", p.MinFreeDiskBytes, q.MinFreeDiskBytes)
	add("min-free-disk-percent", p.MinFreeDiskPercent, q.MinFreeDiskPercent)
	add("min-age", p.MinAge, q.MinAge)
	add("max-age", p.MaxAge, q.MaxAge)
	add("pin", p.Pins, q.Pins)
	return out
}

// settlePolicy stores the configured policy when Config.SetPolicy says
// so, and otherwise reports how it differs from the stored one (or the
// defaults), which the loops use: one root, one budget. It runs inside the
// start-up Update.
func (m *Manager) settlePolicy(st *state.State) (bool, error) {
	stored := policyOf(st)
	given := m.cfg.Cleanup
	if given.Pins != nil {
		pins, err := resolvePins(given.Pins, st)
		if err != nil {
			return false, err
		}
		given.Pins = pins
	}
	p := given.Apply(stored)
	if err := p.Validate(); err != nil {
		return false, fmt.Errorf("%w: %w", ErrBadPolicy, err)
	}
	what := "stored"
	if st.Policy == nil {
		what = "default" // nothing stored: the loops use the defaults
	}
	diffs := given.differences(stored, what)
	if m.cfg.SetPolicy {
		if st.Policy != nil && len(diffs) == 0 {
			return false, nil
		}
		st.Policy = &p
		m.log.WithField("changes", diffs).Info("cleanup policy of the root changed")
		return true, nil
	}
	// A root without a stored policy keeps none until one is set: the
	// first worker's flags are not everyone's budget.
	m.mu.Lock()
	m.policyMismatch = diffs
	m.mu.Unlock()
	if len(diffs) > 0 {
		m.log.WithField("differences", diffs).Info("the configured cleanup policy differs from the one stored in the root; the loops use the stored one (Config.SetPolicy changes it)")
	}
	return false, nil
}

// resolvePins turns each pin that is a short key ID (8 to 31 hex
// characters, as ls shows them, in either case) into the full ID of the one
// entry whose ID starts with it, a full ID into lower case, and a source
// (no pattern characters) into the source as get normalises it. As given,
// each would match no entry, silently.
func resolvePins(pins []string, st *state.State) ([]string, error) {
	out := make([]string, len(pins))
	for i, pin := range pins {
		out[i] = pin
		if strings.Contains(pin, "://") && !strings.ContainsAny(pin, `*?[\`) {
			// A source, not a pattern: pinned as get names it
			// (HTTP://Host/x and http://host/x are one entry).
			if k, err := ParseKey(pin, ""); err == nil {
				out[i] = k.Source
			}
			continue
		}
		if len(pin) < 8 || len(pin) > 32 || strings.Trim(pin, "0123456789abcdefABCDEF") != "" {
			continue
		}
		// ls prints IDs in lower case, but people copy them from
		// anywhere: an ID in upper case pins the same entry.
		pin = strings.ToLower(pin)
		out[i] = pin
		if len(pin) == 32 {
			continue
		}
		var match []string
		for id := range st.Entries {
			if strings.HasPrefix(id, pin) {
				match = append(match, id)
			}
		}
		switch len(match) {
		case 1:
			out[i] = match[0]
		case 0:
			return nil, fmt.Errorf("pin %q: no entry's key ID starts with it (a pin is a full key ID, a source or a pattern): %w", pin, ErrBadPolicy)
		default:
			slices.Sort(match)
			return nil, fmt.Errorf("pin %q: ambiguous, %d key IDs start with it (%s): %w", pin, len(match), strings.Join(match, ", "), ErrBadPolicy)
		}
	}
	// One pin given twice (or as two spellings of one source) is one.
	seen := make(map[string]bool, len(out))
	return slices.DeleteFunc(out, func(p string) bool {
		dup := seen[p]
		seen[p] = true
		return dup
	}), nil
}

// PolicyMismatch returns the differences between the configured and the
// stored policy found at start-up (empty when they agree).
func (m *Manager) PolicyMismatch() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.policyMismatch)
}

func policyOf(st *state.State) state.Policy {
	if st.Policy == nil {
		return state.DefaultPolicy()
	}
	return *st.Policy
}

// SweepReport is what one sweep did (or, dry, would do).
type SweepReport struct {
	DryRun  bool
	Victims []transitions.Victim
	Freed   int64
	// Reaped lists dead dependents removed, by entry source.
	Reaped map[string][]string
	// Cancelled lists the downloads removed because no dependent was
	// left to wait for them.
	Cancelled []state.Key
	Usage     transitions.Usage
	Policy    state.Policy
}

// Sweep runs one cleanup now: it reaps dependents that no longer hold
// their entries, picks victims (transitions.PlanEviction) and removes them
// from the state in one commit; then, outside the lock, it moves their
// content to trash and deletes it. Leftovers of an interrupted sweep are
// deleted first. A dry run changes nothing.
func (m *Manager) Sweep(ctx context.Context, dryRun bool) (SweepReport, error) {
	return m.sweep(ctx, dryRun, nil)
}

// SweepWith is Sweep under the stored policy with the given settings
// applied over it, for this sweep only: what a one-shot cleanup asked for
// by hand (nix-collect-garbage --delete-older-than, docker image prune
// --filter until=) does, while the loops of every worker keep the stored
// budget. Settings out of range wrap [ErrBadPolicy].
func (m *Manager) SweepWith(ctx context.Context, dryRun bool, given PolicyChange) (SweepReport, error) {
	return m.sweep(ctx, dryRun, &given)
}

func (m *Manager) sweep(ctx context.Context, dryRun bool, given *PolicyChange) (SweepReport, error) {
	rep := SweepReport{DryRun: dryRun, Reaped: map[string][]string{}}
	root := m.Root()
	if err := checkLayout(root); err != nil {
		return rep, err
	}
	rep.Usage.DiskFree, rep.Usage.DiskSize = m.cfg.Disk.Space(root)
	var guards map[string]string
	if snap, err := m.store.View(ctx); err == nil {
		guards, _ = m.imageGuards(ctx, snap) // engine calls stay outside the lock; imageGuards logs what it could not ask
	}
	var evicted []string // entry directories, relative to the root
	var images []*state.Entry
	// A store that evicts each victim by a commit of its own (etcd: one
	// transaction of all would pass its limits) gets the victims after
	// the sweep's commit, with a mark that precedes the sweep's read.
	ev, _ := m.store.(state.Evictor)
	var since state.Mark
	if ev != nil {
		since = ev.Mark()
	}
	if !dryRun {
		if err := m.settleTrash(ctx); err != nil {
			return rep, err
		}
	}
	// A dry run plans on a snapshot and takes no lock, so it runs on a
	// root it cannot write, as ls does.
	update := m.planOnly
	if !dryRun {
		update = func(ctx context.Context, fn func(*state.State) (bool, error)) error {
			return m.freeing(ctx, "sweep", func() error { return m.store.Update(ctx, fn) }, func() (bool, error) {
				// Would it evict anything, or cancel an abandoned
				// download (whose staging then goes)? Else the
				// reserve is kept for a commit that would.
				err := m.planOnly(ctx, fn)
				return len(rep.Victims) > 0 || len(rep.Cancelled) > 0, err
			})
		}
	}
	err := update(ctx, func(st *state.State) (bool, error) {
		rep.Victims, rep.Reaped, rep.Cancelled = nil, map[string][]string{}, nil
		now := m.cfg.Clock.Now()
		pol := policyOf(st)
		switch {
		case given != nil:
			g := *given
			if g.Pins != nil {
				pins, err := resolvePins(g.Pins, st)
				if err != nil {
					return false, err
				}
				g.Pins = pins
			}
			pol = g.Apply(pol)
		case dryRun && m.cfg.SetPolicy:
			// What settlePolicy would store, without storing it.
			pol = m.cfg.Cleanup.Apply(pol)
		}
		if err := pol.Validate(); err != nil {
			return false, fmt.Errorf("%w: %w", ErrBadPolicy, err)
		}
		rep.Policy = pol
		changed := false
		watched := make(map[string]transitions.Watched, len(st.Entries))
		m.mu.Lock()
		for id, e := range st.Entries {
			r, dead := transitions.Reap(e, m.dependentViewsLocked(e, now), m.cfg.Policy, now)
			if len(dead) > 0 {
				// Two entries may share a source (with and without
				// --sha256, or #no-unpack): each adds its own.
				rep.Reaped[e.Key.Source] = append(rep.Reaped[e.Key.Source], dead...)
				st.Entries[id] = r.Entry
				changed = true
			}
			if n := st.Entries[id]; transitions.Abandoned(n) {
				// Nobody waits for it now (its last dependent was
				// reaped): cancelled, as that dependent's release would
				// have; an owner stops when it sees the entry gone, and
				// a dead writer's staging goes at the next start-up.
				delete(st.Entries, id)
				rep.Cancelled = append(rep.Cancelled, n.Key)
				changed = true
				continue
			}
			watched[id] = m.watchedLocked(id, e, now)
		}
		m.mu.Unlock()
		rep.Usage.Bytes = transitions.Measure(st.Entries)
		candidates := st.Entries
		if len(guards) > 0 || hasImages(st) {
			candidates = map[string]*state.Entry{}
			for id, e := range st.Entries {
				_, guarded := guards[id]
				// An image entry the snapshot did not cover (new since) is
				// not judged this time.
				if e.Key.Kind == state.Image && (guards == nil || guarded) {
					continue
				}
				if !guarded {
					candidates[id] = e
				}
			}
		}
		rep.Victims = transitions.PlanEviction(pol, candidates, watched, rep.Usage, now)
		if dryRun {
			return false, nil
		}
		images = images[:0]
		evicted = evicted[:0]
		for _, v := range rep.Victims {
			if e := st.Entries[v.Key.ID()]; e != nil && e.Key.Kind == state.Image {
				c := *e
				images = append(images, &c)
			}
			if ev != nil {
				continue // evicted after this commit
			}
			delete(st.Entries, v.Key.ID())
			changed = true
			if v.Path != "" {
				evicted = append(evicted, filepath.Dir(v.Path))
			}
		}
		if len(evicted) > 0 {
			failpoint("sweep-before-commit")
		}
		return changed, nil
	})
	if err != nil {
		return rep, err
	}
	var evictErr error
	if ev != nil && !dryRun && len(rep.Victims) > 0 {
		rep.Victims, images, evicted, evictErr = m.evict(ctx, ev, since, rep.Victims, images)
	}
	// Committed first, moved after: a crash in between leaves content that
	// no entry names (reconcile moves it aside), never a READY entry whose
	// content is in trash. Generations are never reused, so nobody else
	// can come to use these directories.
	if len(evicted) > 0 {
		failpoint("sweep-committed")
	}
	m.moveToTrash(evicted, "evicted")
	if dryRun {
		for _, v := range rep.Victims {
			rep.Freed += v.Frees
		}
		return rep, nil
	}
	if len(evicted) > 0 {
		failpoint("sweep-before-delete")
	}
	m.emptyTrash()
	if len(evicted) > 0 {
		m.keepReserve(ctx)
	}
	m.tidy(ctx)
	m.removeDeadStaging(ctx)
	var removed map[string]bool // image victims whose image went
	if len(images) > 0 {
		// An image the engine refused to remove has its entry back: not
		// evicted, and not freed.
		var kept map[string]error
		kept, removed = m.removeImages(ctx, images)
		rep.Victims = slices.DeleteFunc(rep.Victims, func(v transitions.Victim) bool {
			_, ok := kept[v.Key.ID()]
			return ok
		})
	}
	image := make(map[string]bool, len(images))
	for _, e := range images {
		image[e.Key.ID()] = true
	}
	for _, v := range rep.Victims {
		// An image frees its bytes once, when it is removed: not for an
		// entry whose image another entry still names, nor twice for a
		// tag and a digest of it evicted together.
		frees := v.Frees
		if image[v.Key.ID()] {
			frees = 0
			if removed[v.Key.ID()] {
				frees = v.Bytes
			}
		}
		rep.Freed += frees
		m.metrics.evictions.WithLabelValues(v.Reason).Inc()
		m.metrics.freedBytes.Add(float64(frees))
	}
	for src, names := range rep.Reaped {
		m.log.WithFields(logrus.Fields{"source": src, "dependents": names}).Info("reaped dependents that no longer hold their entry")
	}
	for _, k := range rep.Cancelled {
		m.log.WithField("source", k.Source).Info("cancelled a download that no dependent waits for")
	}
	if len(rep.Victims) > 0 {
		reasons := map[string]int{}
		for _, v := range rep.Victims {
			reasons[v.Reason]++
		}
		m.log.WithFields(logrus.Fields{"evicted": len(rep.Victims), "freed": humanize.IBytes(uint64(rep.Freed)),
			"reasons": reasons, "usage": humanize.IBytes(uint64(rep.Usage.Bytes - rep.Freed))}).Info("sweep")
	}
	return rep, evictErr
}

// planOnly runs fn, a store callback, on a snapshot: a plan that is not
// committed, made without the lock.
func (m *Manager) planOnly(ctx context.Context, fn func(*state.State) (bool, error)) error {
	st, err := m.store.View(ctx)
	if err != nil {
		return err
	}
	// fn plans on its own map: the entries stay shared, and fn replaces
	// any it changes (the sharing rule of State).
	own := *st
	own.Entries = maps.Clone(st.Entries)
	_, err = fn(&own)
	return err
}

// evict removes victims through ev and returns those it removed, with
// their images and entry directories. An entry changed since the mark
// (used, given a dependent) stays, and is no victim.
func (m *Manager) evict(ctx context.Context, ev state.Evictor, since state.Mark, victims []transitions.Victim, images []*state.Entry) ([]transitions.Victim, []*state.Entry, []string, error) {
	ids := make([]string, len(victims))
	for i, v := range victims {
		ids[i] = v.Key.ID()
	}
	removed, err := ev.Evict(ctx, ids, since)
	gone := make(map[string]bool, len(removed))
	for _, id := range removed {
		gone[id] = true
	}
	var kept []transitions.Victim
	var dirs []string
	for _, v := range victims {
		if gone[v.Key.ID()] {
			kept = append(kept, v)
			if v.Path != "" {
				dirs = append(dirs, filepath.Dir(v.Path))
			}
		}
	}
	var imgs []*state.Entry
	for _, e := range images {
		if gone[e.Key.ID()] {
			imgs = append(imgs, e)
		}
	}
	return kept, imgs, dirs, err
}

// intoTrash moves the entry directory rel (relative to the root) into this
// manager's trash, keeping its name: the name by which a move of an older
// version, made before its commit, is put back (settleTrash). A
// directory already gone is not an error.
func (m *Manager) intoTrash(rel string) error {
	from, err := state.AbsIn(m.root, rel)
	if err != nil {
		return err
	}
	own, err := m.ownTrash()
	if err != nil {
		return err
	}
	if err := os.Rename(from, filepath.Join(own, filepath.Base(from))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// moveToTrash moves entry directories whose entries a commit removed into
// trash, after that commit and outside the lock. One that cannot be moved
// stays an orphan, which reconcile moves aside; one already gone was moved
// by another process's reconcile. what names the operation.
func (m *Manager) moveToTrash(dirs []string, what string) {
	for _, rel := range dirs {
		if err := m.intoTrash(rel); err != nil {
			// On a full disk, making this manager's trash (a directory
			// and its owner note) may fail where deleting would not: the
			// commit already dropped the entry, and no later generation
			// takes its name.
			if abs, aerr := state.AbsIn(m.root, rel); aerr == nil && m.DiskFull(err) && os.RemoveAll(abs) == nil {
				m.log.WithField("dir", rel).Infof("the disk is full: deleted the content of %s entry in place", what)
			} else {
				m.log.WithError(err).WithField("dir", rel).Warnf("could not move the content of %s entry to trash; it stays as an orphan until reconcile moves it", what)
			}
		}
		failpoint("trash-moved")
	}
}

// ownTrash returns this manager's trash directory, creating it with a note
// of who owns it: only its owner empties it, or anyone once that owner is
// provably gone. Another manager's trash may hold content it will put back
// if its commit fails.
func (m *Manager) ownTrash() (string, error) {
	dir := filepath.Join(m.Root(), trashDir, m.self.ManagerID)
	note := filepath.Join(dir, ownerName)
	var rec struct {
		Owner state.Owner `json:"owner"`
	}
	// Read, not only stat'ed: a note cut short by a full disk would leave
	// what is moved in here no one's to empty.
	if b, err := readNote(note); err == nil && json.Unmarshal(b, &rec) == nil && rec.Owner.Same(&m.self) {
		return dir, nil
	}
	if err := m.perms.MkdirAll(dir); err != nil { // trash/ itself too, with the group's mode
		return "", err
	}
	rec.Owner = m.self
	b, _ := json.Marshal(rec)
	if err := m.perms.WriteFile(note, b); err != nil {
		os.Remove(note)
		return "", err
	}
	return dir, nil
}

// unwrittenTrashNote is how old a trash directory without a readable
// owner note must be before any sweep adopts it: a manager makes the
// directory and then writes the note, and a full disk can stop it between
// the two (or cut the note short) and then kill it.
const unwrittenTrashNote = 10 * time.Minute

// noteNeverWritten reports whether the trash directory dir has an owner
// note that is missing or empty, and has not changed for
// unwrittenTrashNote (by the file server's clock against ours).
func noteNeverWritten(dir string, now time.Time) bool {
	fi, err := os.Lstat(filepath.Join(dir, ownerName))
	if err == nil && fi.Size() > 0 {
		return false
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false
	}
	di, derr := os.Lstat(dir)
	if derr != nil || now.Sub(di.ModTime()) < unwrittenTrashNote || (err == nil && now.Sub(fi.ModTime()) < unwrittenTrashNote) {
		return false
	}
	return true
}

// emptyTrash deletes, outside the lock, what this manager moved aside.
// Content an entry still names stays for settleTrash to put back.
func (m *Manager) emptyTrash() {
	m.trashMu.Lock()
	defer m.trashMu.Unlock()
	if err := checkLayout(m.Root()); err != nil {
		m.log.WithError(err).Error("trash not emptied")
		return
	}
	dir := filepath.Join(m.Root(), trashDir, m.self.ManagerID)
	items, err := os.ReadDir(dir)
	if err != nil || len(items) <= 1 {
		return
	}
	st, err := m.store.View(context.Background())
	if err != nil {
		m.log.WithError(err).Warn("trash not emptied: cannot read the state to check nothing in it is still named")
		return
	}
	named := namedDirs(st)
	for _, it := range items {
		if it.Name() == ownerName || named[it.Name()] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, it.Name())); err != nil {
			m.log.WithError(err).WithField("path", it.Name()).Warn("deleting evicted content")
		}
		failpoint("trash-deleted")
	}
}

// settleTrash, outside the lock, puts back content in any manager's trash
// that a READY entry of the state still names: it was moved before a
// commit that never happened, by a process of an older depcache (which
// moved, then committed) killed in between, or by a hand. A sweep that
// evicts such an entry meanwhile only finds it gone, and the next
// reconcile moves it aside again. The rest of a dead manager's trash (this
// machine only: elsewhere death is not provable) is adopted into ours, to
// be deleted. A planted symlink in trash/ is never followed.
func (m *Manager) settleTrash(ctx context.Context) error {
	m.trashMu.RLock()
	defer m.trashMu.RUnlock()
	root := filepath.Join(m.Root(), trashDir)
	dirs, err := os.ReadDir(root)
	if err != nil {
		return nil
	}
	// Listed first, judged against a state read after: content a sweep
	// moved into trash after its commit is named by no state read after
	// the move, so it is never taken for content to put back.
	listed := map[string][]os.DirEntry{}
	for _, d := range dirs {
		if !d.IsDir() {
			continue // a symlink or a file planted in trash/ leads outside the root: never followed
		}
		listed[d.Name()], _ = os.ReadDir(filepath.Join(root, d.Name()))
	}
	st, err := m.store.View(ctx)
	if err != nil {
		return err
	}
	m.settleTrashAgainst(st, dirs, listed)
	return nil
}

func (m *Manager) settleTrashAgainst(st *state.State, dirs []os.DirEntry, listed map[string][]os.DirEntry) {
	root := filepath.Join(m.Root(), trashDir)
	named := namedDirs(st)
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		dir := filepath.Join(root, d.Name())
		for _, it := range listed[d.Name()] {
			// Our own trash too: a move whose commit and undo both failed.
			if named[it.Name()] {
				m.perms.MkdirAll(filepath.Join(m.Root(), entriesDir))
				if err := os.Rename(filepath.Join(dir, it.Name()), filepath.Join(m.Root(), entriesDir, it.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
					m.log.WithError(err).WithField("dir", it.Name()).Error("putting back content of an interrupted sweep")
				} else {
					m.log.WithField("dir", it.Name()).Warn("put back content an interrupted sweep had moved aside")
				}
			}
		}
		if d.Name() == m.self.ManagerID {
			continue
		}
		var rec struct {
			Owner state.Owner `json:"owner"`
		}
		b, err := readNote(filepath.Join(dir, ownerName))
		switch {
		case err == nil && json.Unmarshal(b, &rec) == nil:
			if !m.self.SameMachine(rec.Owner.Process) {
				continue // another host's
			}
			if alive, err := m.cfg.Processes.Alive(rec.Owner.Process); err != nil || alive {
				continue
			}
		case noteNeverWritten(dir, m.cfg.Clock.Now()):
			m.log.WithField("dir", dir).Warn("adopting evicted content in trash whose owner note was never written (a full disk, then a crash): it is deleted")
		default:
			continue // a note that does not parse: unknown, left alone
		}
		own, err := m.ownTrash()
		if err != nil {
			return
		}
		items, _ := os.ReadDir(dir)
		left := false
		for _, it := range items {
			switch {
			case it.Name() == ownerName:
			case named[it.Name()]:
				left = true // could not be put back above: never delete it
			default:
				os.Rename(filepath.Join(dir, it.Name()), filepath.Join(own, d.Name()+"-"+it.Name()))
			}
		}
		if !left {
			os.Remove(filepath.Join(dir, ownerName))
			os.Remove(dir)
		}
	}
}

// namedDirs returns the names of the entry directories that entries of st
// name (entries/NAME/content).
func namedDirs(st *state.State) map[string]bool {
	named := map[string]bool{}
	for _, e := range st.Entries {
		if e.Path != "" {
			named[filepath.Base(filepath.Dir(e.Path))] = true
		}
	}
	return named
}

// dependentViewsLocked observes the dependents of e. m.mu is held.
func (m *Manager) dependentViewsLocked(e *state.Entry, now time.Time) map[string]transitions.DependentView {
	if len(e.Dependents) == 0 {
		return nil
	}
	views := make(map[string]transitions.DependentView, len(e.Dependents))
	for name, d := range e.Dependents {
		var v transitions.DependentView
		if d.Expires != nil {
			v.Registered = m.watch(m.registrations, e.Key.ID(), name, fmt.Sprint(d.Since.UnixNano(), "/", d.Expires.UnixNano()), now)
		}
		if d.Process == nil {
			views[name] = v
			continue
		}
		if m.self.SameMachine(*d.Process) {
			v.Local = true
			alive, err := m.cfg.Processes.Alive(*d.Process)
			v.Dead = err == nil && !alive
		} else {
			v.LeaseUnchanged = m.watch(m.leases, e.Key.ID(), name, fmt.Sprint(d.Process.PID, "/", d.Process.StartTime, "/", d.Lease), now)
		}
		v.StoreLease = m.leased
		views[name] = v
	}
	return views
}

// watchedLocked records what this manager sees of e's creation and last
// use, and returns how long it has seen each unchanged on its own clock
// (transitions.Watched). m.mu is held.
func (m *Manager) watchedLocked(id string, e *state.Entry, now time.Time) transitions.Watched {
	o, ok := m.ages[id]
	c, u := e.Created.UnixNano(), e.LastUsed.UnixNano()
	if !ok || o.created != c {
		o.created, o.createdSince = c, now
	}
	if !ok || o.lastUsed != u {
		o.lastUsed, o.lastUsedSince = u, now
	}
	m.ages[id] = o
	return transitions.Watched{Created: now.Sub(o.createdSince), LastUsed: now.Sub(o.lastUsedSince)}
}

// ageObservation is what a manager saw of one entry's creation and last
// use, and since when on its own clock. It is flat, with no map or string
// of its own: a manager driving every entry keeps one per entry.
type ageObservation struct {
	created, lastUsed           int64 // UnixNano, as the state said
	createdSince, lastUsedSince time.Time
}

// watch returns how long the dependent name of entry id has shown sig to
// this manager, on its own clock, and records sig if it is new. m.mu is
// held.
func (m *Manager) watch(seen map[string]map[string]observation, id, name, sig string, now time.Time) time.Duration {
	byName := seen[id]
	if byName == nil {
		byName = map[string]observation{}
		seen[id] = byName
	}
	o, ok := byName[name]
	if !ok || o.sig != sig {
		o = observation{sig: sig, since: now}
		byName[name] = o
	}
	return now.Sub(o.since)
}

// statfsSpace is the real DiskSpace.
type statfsSpace struct{}

func (statfsSpace) Space(dir string) (free, size int64) {
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		return 0, 0
	}
	return int64(s.Bavail) * int64(s.Bsize), int64(s.Blocks) * int64(s.Bsize)
}

// DependentInfo is one dependent with its liveness, for ls.
type DependentInfo struct {
	Name     string `json:"name"`
	Live     bool   `json:"live"`
	Liveness string `json:"liveness"`
}

// Description explains an entry for ls: its dependents' liveness and why a
// sweep would keep it ("" if it may be evicted).
type Description struct {
	Dependents []DependentInfo `json:"dependents_detail"`
	Kept       string          `json:"kept"`
}

// Describe returns the state and, by key ID, why each entry is kept. The
// liveness of a dependent on another host is judged from this manager's
// own observations of its lease; a one-shot caller has none, so such a
// dependent shows as live. The state's entries are shared with the store's
// cache: read them, or Clone one to change it.
//
// WithContainers makes it ask the engine too, for a root that holds
// images, which containers use them: an image a container uses is kept
// for that, as a sweep keeps it.
func (m *Manager) Describe(ctx context.Context, opts ...DescribeOption) (*state.State, map[string]Description, error) {
	var o describeOptions
	for _, opt := range opts {
		opt(&o)
	}
	st, err := m.store.View(ctx)
	if err != nil {
		return nil, nil, err
	}
	var users map[string]string
	if o.containers {
		users = m.containerUsers(ctx, st) // the engine is asked before m.mu is taken
	}
	now := m.cfg.Clock.Now()
	pol := policyOf(st)
	out := map[string]Description{}
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, e := range st.Entries {
		d := m.describeLocked(id, e, pol, now)
		// Downloading and live dependents say more; any other reason (or
		// none) is less than a container's use, which keeps it whatever
		// its age or pins.
		held := slices.ContainsFunc(d.Dependents, func(di DependentInfo) bool { return di.Live })
		if why := users[id]; why != "" && e.Stage != state.Downloading && !held {
			d.Kept = why
		}
		out[id] = d
	}
	return st, out, nil
}

// DescribeOption changes what Describe looks at.
type DescribeOption func(*describeOptions)

type describeOptions struct{ containers bool }

// WithContainers makes Describe ask the Docker engine (each call within
// its bound) which containers use the images of a root that holds any,
// and say so of each: "used by container NAME". A root without images
// does not contact the engine.
func WithContainers() DescribeOption { return func(o *describeOptions) { o.containers = true } }

// containerUsers says, by key ID, which containers use the image of each
// image entry of st in this manager's daemon. An engine that cannot be
// asked is logged, and leaves it empty.
func (m *Manager) containerUsers(ctx context.Context, st *state.State) map[string]string {
	if m.cfg.Docker == nil || !hasImages(st) {
		return nil
	}
	daemon, err := m.daemon(ctx)
	var users map[string][]string
	if err == nil {
		users, err = m.containersByImage(ctx)
	}
	if err != nil {
		m.log.WithError(err).Warn("cannot ask the Docker engine which containers use images")
		return nil
	}
	out := map[string]string{}
	for id, e := range st.Entries {
		if e.Key.Kind != state.Image || e.Key.Daemon != daemon || e.ImageID == "" {
			continue
		}
		if names, used := users[e.ImageID]; used {
			out[id] = usedBy(names)
		}
	}
	return out
}

// DescribeEntry returns key's entry as the store holds it now and why it
// is kept, as Describe does for every entry, reading only that entry (and
// the stored policy). It is ErrNotFound when there is none.
func (m *Manager) DescribeEntry(ctx context.Context, key state.Key) (state.Entry, Description, error) {
	var e *state.Entry
	var pol state.Policy
	err := m.store.UpdateEntries(ctx, []string{key.ID()}, func(tx *state.Txn) (bool, error) {
		e = tx.Get(key)
		pol = state.DefaultPolicy()
		if p := tx.Policy(); p != nil {
			pol = *p
		}
		return false, nil
	})
	if err != nil {
		return state.Entry{}, Description{}, err
	}
	if e == nil {
		return state.Entry{}, Description{}, fmt.Errorf("%s: %w", key, ErrNotFound)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return *e, m.describeLocked(key.ID(), e, pol, m.cfg.Clock.Now()), nil
}

// describeLocked is the description of entry e (of ID id). m.mu is held.
func (m *Manager) describeLocked(id string, e *state.Entry, pol state.Policy, now time.Time) Description {
	views := m.dependentViewsLocked(e, now)
	var d Description
	live := 0
	names := make([]string, 0, len(e.Dependents))
	for name := range e.Dependents {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		ok, why := transitions.Liveness(e.Dependents[name], views[name], m.cfg.Policy, now)
		d.Dependents = append(d.Dependents, DependentInfo{Name: name, Live: ok, Liveness: why})
		if ok {
			live++
		}
	}
	reaped, _ := transitions.Reap(e, views, m.cfg.Policy, now)
	d.Kept = transitions.Kept(pol, reaped.Entry, m.watchedLocked(id, e, now), now)
	if live > 0 {
		var who []string
		for _, di := range d.Dependents {
			if di.Live {
				who = append(who, di.Name)
			}
		}
		d.Kept = fmt.Sprintf("in use by %v", who)
	}
	if d.Dependents == nil {
		d.Dependents = []DependentInfo{}
	}
	return d
}

func hasImages(st *state.State) bool {
	for _, e := range st.Entries {
		if e.Key.Kind == state.Image {
			return true
		}
	}
	return false
}

// tidy removes what the lock attempts of dead processes left behind, with
// a store that leaves such files (state.Tidier: the file store).
func (m *Manager) tidy(ctx context.Context) {
	t, ok := m.store.(state.Tidier)
	if !ok {
		return
	}
	n, err := t.Tidy(ctx)
	if err != nil && ctx.Err() == nil {
		m.log.WithError(err).Warn("removing the files of dead processes' lock attempts")
	}
	if n > 0 {
		m.log.WithField("files", n).Info("removed the files that dead processes' lock attempts left")
	}
}
