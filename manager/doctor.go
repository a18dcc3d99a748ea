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
	"strconv"
	"strings"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
	"github.com/google/renameio/v2"
)

// VerifyResult is the outcome of re-hashing one READY bundle.
type VerifyResult struct {
	Key state.Key `json:"key"`
	// OK: the content matches its recorded digest, or none was recorded.
	OK bool `json:"ok"`
	// Failed: the digest differed and the entry is now FAILED. Not OK and
	// not Failed means it could not be checked (metadata or content
	// unreadable), which condemns nothing.
	Failed bool   `json:"failed"`
	Detail string `json:"detail"`
}

// Verify re-hashes READY bundles (all, or those whose source is in
// sources) against the digest recorded when they were published. A
// mismatch marks the entry FAILED, with the reason, in the same commit that
// moves its content to trash (or leaves it to the runs that hold it).
// Content or metadata that cannot be read is reported and left alone: only
// a digest that differs condemns content. Nothing is skipped silently: an
// entry without a recorded digest is reported as such.
func (m *Manager) Verify(ctx context.Context, sources []string) ([]VerifyResult, error) {
	st, err := m.store.View(ctx)
	if err != nil {
		return nil, err
	}
	want := map[string]bool{}
	for _, s := range sources {
		want[s] = true
	}
	var out []VerifyResult
	for _, e := range st.Sorted() {
		if e.Stage != state.Ready || e.Key.Kind != state.Bundle || (len(want) > 0 && !want[e.Key.Source]) {
			continue
		}
		r := VerifyResult{Key: e.Key}
		abs, err := state.AbsIn(m.root, e.Path)
		if err != nil {
			return out, err
		}
		var meta Meta
		metaPath := filepath.Join(filepath.Dir(abs), metaName)
		b, err := readNote(metaPath)
		if err == nil {
			if err = json.Unmarshal(b, &meta); err != nil {
				err = fmt.Errorf("%s does not parse: %w", metaPath, err)
			}
		}
		// Only a digest that differs condemns content: a file that cannot
		// be read is reported, never a reason to delete anything.
		mismatch := false
		switch {
		case err != nil:
			r.Detail = "not checked: no readable metadata: " + err.Error()
		case meta.ContentSHA256 == "":
			r.OK, r.Detail = true, "no recorded digest (published by an older depcache); not checked"
		default:
			got, derr := ContentDigest(abs)
			switch {
			case derr != nil:
				r.Detail = "not checked: content unreadable: " + derr.Error()
			case got != meta.ContentSHA256:
				r.Detail = fmt.Sprintf("content digest %s, recorded %s", got, meta.ContentSHA256)
				mismatch = true
			default:
				r.OK, r.Detail = true, "sha256 "+got
			}
		}
		if mismatch {
			why := r.Detail
			// The mark next to the content comes first, outside the lock;
			// see recordFailed for why in this order.
			if merr := m.recordFailed(filepath.Dir(abs), b, why); merr != nil {
				m.log.WithError(merr).WithField("key", e.Key.String()).Warn("verify: could not record the failure next to the content")
				r.Detail += " (not recorded next to the content, so a rebuild would not know: " + merr.Error() + ")"
			}
			marked, err := m.markCorrupt(ctx, *e, why)
			if err != nil {
				return out, err
			}
			r.Failed = marked
			if !marked {
				r.Detail += " (the entry changed meanwhile: not marked)"
			}
		}
		out = append(out, r)
	}
	return out, nil
}

// recordFailed records in the metadata file of the entry directory dir
// (whose bytes are raw) that its content failed verification, and why, so
// that a rebuild of the state keeps it FAILED. The file is replaced
// atomically; fields this depcache does not know are kept.
//
// It runs before the commit that makes the entry FAILED. A crash between
// the two leaves a mark that is true (the content did not match) on an
// entry still READY, which the next verify marks again; the other order
// could leave a FAILED entry whose metadata a rebuild would publish READY.
func (m *Manager) recordFailed(dir string, raw []byte, why string) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil || fields == nil {
		return fmt.Errorf("metadata in %s: not a JSON object: %w", dir, err)
	}
	reason, err := json.Marshal(why)
	if err != nil {
		return err
	}
	at, err := json.Marshal(m.cfg.Clock.Now())
	if err != nil {
		return err
	}
	fields["failed"], fields["failed_reason"], fields["failed_at"] = json.RawMessage("true"), reason, at
	b, err := json.MarshalIndent(fields, "", "  ")
	if err != nil {
		return err
	}
	p := filepath.Join(dir, metaName)
	if err := renameio.WriteFile(p, b, m.perms.File, renameio.WithTempDir(dir), renameio.WithStaticPermissions(m.perms.File)); err != nil {
		return fmt.Errorf("recording the failure in %s: %w", p, err)
	}
	if err := state.SyncDir(dir); err != nil {
		return fmt.Errorf("recording the failure in %s: %w", p, err)
	}
	return nil
}

// markCorrupt makes a READY entry that failed verification FAILED and moves
// its content to trash, if it is still the entry that was checked.
func (m *Manager) markCorrupt(ctx context.Context, checked state.Entry, why string) (marked bool, err error) {
	var moved string // the content's directory, once the commit removes it
	err = m.store.Update(ctx, func(st *state.State) (bool, error) {
		moved, marked = "", false
		e := st.Get(checked.Key)
		if e == nil || e.Stage != state.Ready || e.Path != checked.Path || e.Generation != checked.Generation {
			return false, nil // changed meanwhile: not what was checked
		}
		n := e.Clone() // e is shared with the store's cache
		n.Stage = state.Failed
		n.Failures++
		n.FailedAt = m.cfg.Clock.Now()
		n.Message = "verify: " + why
		if len(e.Dependents) == 0 {
			// Nobody holds it: the content goes once this commits. Runs
			// that still hold it keep the files; the sweep removes a
			// FAILED entry once nobody holds it.
			n.Path, n.SizeBytes = "", 0
			moved = filepath.Dir(checked.Path)
		}
		st.Put(n)
		marked = true
		return true, nil
	})
	if err != nil {
		return false, err
	}
	if moved != "" {
		m.moveToTrash([]string{moved}, "a corrupt")
		m.emptyTrash()
	}
	return marked, nil
}

// RebuildReport says what a Rebuild built and what it dropped of the last
// state that parses. Its lists are never nil.
type RebuildReport struct {
	// Entries is how many entries the rebuilt state has, Failed among
	// them those rebuilt FAILED.
	Entries int             `json:"entries"`
	Failed  []RebuiltFailed `json:"failed"`
	// Unreadable is where the state file that did not parse is kept
	// aside, and UnreadableReason why it was not used; both empty when
	// it parsed (a forced rebuild) or was missing.
	Unreadable       string `json:"unreadable_copy"`
	UnreadableReason string `json:"unreadable_reason"`
	// LastState is the last state that parses, which the lists below are
	// taken from: the state file itself (a forced rebuild), else
	// state.json.prev, else the first of them whose manifest parses, read
	// shard by shard (see UnreadShards); empty when none does, and then
	// nothing can be said about what was dropped. LastStateCopy is a copy
	// of it that no later commit replaces.
	LastState     string `json:"last_state"`
	LastStateCopy string `json:"last_state_copy"`
	// UnreadShards are, when neither the state file nor state.json.prev
	// parses whole (a damaged shard that both name), the shards of
	// LastState that did not read. The lists below cover every other
	// shard, and a listed one whose From names the file it was read from
	// instead; for one with an empty From, what was dropped is unknown.
	UnreadShards []state.UnreadShard `json:"unread_shards"`
	// DroppedDependents are the dependents of LastState's entries, which a
	// rebuild never keeps: re-register those that still run.
	DroppedDependents []DroppedDependents `json:"dropped_dependents"`
	// DroppedDownloads are LastState's downloads in flight.
	DroppedDownloads []DroppedDownload `json:"dropped_downloads"`
	// DroppedEntries are LastState's other entries that have no content to
	// rebuild them from (a FAILED download, content gone).
	DroppedEntries []DroppedEntry `json:"dropped_entries"`
	Policy         RebuiltPolicy  `json:"policy"`
}

// RebuiltFailed is an entry rebuilt FAILED: verify had failed its content.
type RebuiltFailed struct {
	Key        state.Key `json:"key"`
	Generation uint64    `json:"generation"`
	Reason     string    `json:"reason"`
}

// DroppedDependents are the dependents one entry had in the last state.
type DroppedDependents struct {
	Key        state.Key          `json:"key"`
	Dependents []DroppedDependent `json:"dependents"`
}

// DroppedDependent is one dependent a rebuild dropped.
type DroppedDependent struct {
	Name string `json:"name"`
	// Process is the process it was bound to, if any.
	Process string `json:"process,omitempty"`
	// Expires is when a dependent with a TTL lapses.
	Expires *time.Time `json:"expires,omitempty"`
}

// DroppedDownload is a download in flight that a rebuild dropped.
type DroppedDownload struct {
	Key        state.Key `json:"key"`
	Generation uint64    `json:"generation"`
	// Owner is the process that was downloading it; empty when nobody was.
	Owner string `json:"owner"`
	Bytes int64  `json:"bytes"`
	Total int64  `json:"total_bytes"`
}

// DroppedEntry is an entry of the last state that a rebuild has nothing
// to rebuild from.
type DroppedEntry struct {
	Key        state.Key   `json:"key"`
	Stage      state.Stage `json:"stage"`
	Generation uint64      `json:"generation"`
	Message    string      `json:"message,omitempty"`
}

// RebuiltPolicy says where the rebuilt state's policy comes from.
type RebuiltPolicy struct {
	// Carried: it is the last state's policy, carried over unchanged.
	// Otherwise the last state had none (or there is no last state) and
	// it is the defaults with this manager's settings.
	Carried bool `json:"carried"`
	// Previous is the last state's policy, null when it had none.
	Previous *state.Policy `json:"previous"`
	Rebuilt  state.Policy  `json:"rebuilt"`
}

// Rebuild replaces an unreadable state with one built from the metadata
// files published next to each entry's content. Published content becomes
// READY entries (the newest generation of a key wins), or FAILED ones,
// with the reason, when verify failed it (the mark verify left in its
// metadata, or the last state that parses having that generation FAILED):
// a rebuild never republishes content verify condemned. The content is not
// re-hashed; run verify for that. Dependents, owners and downloads in flight
// are lost; the report lists them as the last state that parses (the
// previous version, state.json.prev, when the state file does not) had
// them, and a copy of that state is kept. When neither parses whole, as
// after damage to a shard both name, the shards that read still count:
// the report says which did not. The policy of that state is
// carried over; without one it is the defaults plus this manager's
// settings. The unreadable file stays aside; no content is deleted.
//
// A state file that parses is refused with [ErrStateReadable], and one of a
// newer format version with [state.ErrUnsupportedVersion], unless force is
// set: rebuilding it would drop the dependents of running jobs, after which
// a sweep may evict what they use.
func (m *Manager) Rebuild(ctx context.Context, force bool) (RebuildReport, error) {
	return m.rebuild(ctx, force, nil, "")
}

// RebuildFrom is Rebuild for a root that moves to this manager's store
// from another, as from the file store to etcd: when the store has no
// last state of its own (an empty prefix), what Rebuild carries over (the
// policy, each entry's last use and age, the generation counter, the
// failures verify recorded) is taken from from, read from fromName, and
// the report lists what from had that the rebuild drops (its dependents
// and downloads in flight).
func (m *Manager) RebuildFrom(ctx context.Context, force bool, from *state.State, fromName string) (RebuildReport, error) {
	return m.rebuild(ctx, force, from, fromName)
}

// emptyState reports whether st holds nothing a rebuild could carry over.
func emptyState(st *state.State) bool {
	return st == nil || (len(st.Entries) == 0 && st.Policy == nil)
}

func (m *Manager) rebuild(ctx context.Context, force bool, from *state.State, fromName string) (RebuildReport, error) {
	rep := RebuildReport{Failed: []RebuiltFailed{}, DroppedDependents: []DroppedDependents{},
		DroppedDownloads: []DroppedDownload{}, DroppedEntries: []DroppedEntry{}, UnreadShards: []state.UnreadShard{}}
	if !force {
		// A missing state file (with content left, which start-up refuses)
		// or one that does not parse is what this is for.
		if exists, err := m.store.Exists(ctx); err == nil && exists {
			_, verr := m.store.View(ctx)
			switch {
			case verr == nil:
				return rep, fmt.Errorf("rebuild %s: %w; rebuilding would drop every dependent and download in flight (force it only if you mean that)", m.store, ErrStateReadable)
			case errors.Is(verr, state.ErrUnsupportedVersion):
				return rep, fmt.Errorf("rebuild: %w; a newer depcache wrote it: upgrade this one instead (forcing the rebuild drops that state)", verr)
			case !errors.Is(verr, state.ErrCorrupt):
				return rep, fmt.Errorf("rebuild: %w", verr)
			}
		} else if err != nil {
			return rep, fmt.Errorf("rebuild: %w", err)
		}
	}
	found, err := m.publishedMeta()
	if err != nil {
		return rep, err
	}
	// Past any generation a staging directory (a download the lost state
	// no longer names) may still be written under.
	var stagingGen uint64
	if ents, err := os.ReadDir(filepath.Join(m.Root(), stagingDir)); err == nil {
		for _, d := range ents {
			if i := strings.LastIndex(d.Name(), "-g"); i >= 0 {
				if g, err := strconv.ParseUint(d.Name()[i+2:], 10, 64); err == nil {
					stagingGen = max(stagingGen, g)
				}
			}
		}
	}
	now := m.cfg.Clock.Now()
	var built *state.State
	usedFrom := false
	replaced, err := m.store.Reset(ctx, func(st, last *state.State) error {
		usedFrom = from != nil && emptyState(last)
		if usedFrom {
			last = from
		}
		for _, f := range found {
			st.Put(f.entry(last, now))
		}
		st.NoteGenerations()
		st.MaxGeneration = max(st.MaxGeneration, stagingGen)
		if last != nil {
			st.MaxGeneration = max(st.MaxGeneration, last.MaxGeneration)
		}
		if last != nil && last.Policy != nil {
			p := *last.Policy
			p.Pins = slices.Clone(last.Policy.Pins)
			st.Policy = &p
		} else {
			p := m.cfg.Cleanup.Apply(state.DefaultPolicy())
			st.Policy = &p
		}
		built = st
		return nil
	})
	if err != nil {
		return rep, err
	}
	if usedFrom {
		replaced.Last, replaced.LastFile, replaced.LastCopy = from, fromName, ""
	}
	rep.fill(replaced, built)
	return rep, nil
}

// metaFile is what the metadata of one entry directory says.
type metaFile struct {
	dir  string
	meta Meta
}

// publishedMeta reads the metadata of every published entry directory:
// for each key, that of its newest generation with content.
func (m *Manager) publishedMeta() (map[string]metaFile, error) {
	dir := filepath.Join(m.Root(), entriesDir)
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("rebuild: %w", err)
	}
	found := map[string]metaFile{}
	for _, d := range ents {
		b, err := readNote(filepath.Join(dir, d.Name(), metaName))
		if err != nil {
			continue
		}
		var meta Meta
		if json.Unmarshal(b, &meta) != nil || meta.Key.Validate() != nil || d.Name() != stagingName(meta.Key, meta.Generation) {
			continue
		}
		if _, err := os.Lstat(filepath.Join(dir, d.Name(), contentName)); err != nil {
			continue
		}
		if old, ok := found[meta.Key.ID()]; ok && old.meta.Generation > meta.Generation {
			continue
		}
		found[meta.Key.ID()] = metaFile{dir: d.Name(), meta: meta}
	}
	return found, nil
}

// entry is the rebuilt entry of p: READY, or FAILED when verify failed
// this generation's content (its mark in the metadata, or last, the last
// state that parses, having this generation FAILED with its content).
func (p metaFile) entry(last *state.State, now time.Time) *state.Entry {
	meta := p.meta
	e := &state.Entry{Key: meta.Key, Stage: state.Ready, Generation: meta.Generation,
		Path: filepath.Join(entriesDir, p.dir, contentName), SizeBytes: meta.SizeBytes,
		Created: meta.Published, LastUsed: meta.Published,
		Progress: state.Progress{Bytes: meta.Fetched, Total: meta.Fetched}}
	var prev *state.Entry
	if last != nil {
		prev = last.Get(meta.Key)
	}
	if prev != nil && prev.Generation == meta.Generation && prev.Path == e.Path {
		// The same content as the last state knew it: keep its place in
		// the LRU order and its age, which the metadata cannot know (a
		// rebuild that made every entry as young as its publish would
		// send the eviction order back to the order of the publishes).
		if !prev.LastUsed.IsZero() {
			e.LastUsed = prev.LastUsed
		}
		if !prev.Created.IsZero() {
			e.Created = prev.Created
		}
	}
	switch {
	case meta.Failed:
		e.Stage, e.Message, e.FailedAt = state.Failed, meta.FailedReason, meta.FailedAt
		if !strings.HasPrefix(e.Message, "verify: ") {
			e.Message = "verify: " + e.Message
		}
	case prev != nil && prev.Stage == state.Failed && prev.Generation == meta.Generation && prev.Path == e.Path:
		e.Stage, e.Message, e.FailedAt = state.Failed, prev.Message, prev.FailedAt
	default:
		return e
	}
	e.Failures = 1
	if prev != nil && prev.Stage == state.Failed {
		e.Failures = max(1, prev.Failures)
	}
	if e.FailedAt.IsZero() {
		e.FailedAt = now
	}
	return e
}

// fill says what the rebuild built and what it dropped of the last state.
func (rep *RebuildReport) fill(r state.Replaced, built *state.State) {
	rep.Unreadable, rep.LastState, rep.LastStateCopy = r.Unreadable, r.LastFile, r.LastCopy
	if len(r.Unread) > 0 {
		rep.UnreadShards = r.Unread
	}
	if r.UnreadableErr != nil {
		rep.UnreadableReason = r.UnreadableErr.Error()
	}
	rep.Entries = len(built.Entries)
	for _, e := range built.Sorted() {
		if e.Stage == state.Failed {
			rep.Failed = append(rep.Failed, RebuiltFailed{Key: e.Key, Generation: e.Generation, Reason: e.Message})
		}
	}
	rep.Policy.Rebuilt = *built.Policy
	if r.Last == nil {
		return
	}
	if p := r.Last.Policy; p != nil {
		rep.Policy.Previous, rep.Policy.Carried = p, true
	}
	for _, e := range r.Last.Sorted() {
		if len(e.Dependents) > 0 {
			d := DroppedDependents{Key: e.Key, Dependents: []DroppedDependent{}}
			for _, name := range slices.Sorted(maps.Keys(e.Dependents)) {
				dep := e.Dependents[name]
				dd := DroppedDependent{Name: name, Expires: dep.Expires}
				if dep.Process != nil {
					dd.Process = dep.Process.String()
				}
				d.Dependents = append(d.Dependents, dd)
			}
			rep.DroppedDependents = append(rep.DroppedDependents, d)
		}
		switch {
		case e.Stage == state.Downloading:
			dl := DroppedDownload{Key: e.Key, Generation: e.Generation, Bytes: e.Progress.Bytes, Total: e.Progress.Total}
			if e.Owner != nil {
				dl.Owner = e.Owner.Process.String()
			}
			rep.DroppedDownloads = append(rep.DroppedDownloads, dl)
		case built.Get(e.Key) == nil:
			rep.DroppedEntries = append(rep.DroppedEntries, DroppedEntry{Key: e.Key, Stage: e.Stage, Generation: e.Generation, Message: e.Message})
		}
	}
}

// Check is one verdict of Doctor.
type Check struct {
	Name   string `json:"name"`
	Status string `json:"status"` // ok, warn, fail, or skip (not probed)
	Detail string `json:"detail"`
}

// DoctorOption changes what Doctor checks.
type DoctorOption func(*doctorOptions)

type doctorOptions struct{ probe bool }

// WithProbes makes Doctor run the checks that must write to look: a probe
// lock beside the state lock (does link(2) exclude here?) and a probe file
// whose mtime gives the file server's clock. Both are removed at once.
func WithProbes() DoctorOption { return func(o *doctorOptions) { o.probe = true } }

// Doctor checks the root and says, check by check, what it found. It
// writes nothing, unless WithProbes asks for the probes; then it writes
// only those, and removes them.
func (m *Manager) Doctor(ctx context.Context, opts ...DoctorOption) []Check {
	var o doctorOptions
	for _, opt := range opts {
		opt(&o)
	}
	var out []Check
	add := func(name, status, format string, args ...any) {
		out = append(out, Check{Name: name, Status: status, Detail: fmt.Sprintf(format, args...)})
	}
	root := m.Root()

	prober, _ := m.store.(state.Prober)
	if prober != nil && o.probe {
		for _, c := range prober.Probe(ctx) {
			out = append(out, Check(c))
		}
	} else if prober != nil {
		add("lock", "skip", "not probed: doctor --probe tests, with a probe lock made and removed in the root, that link(2) excludes on its filesystem")
	}
	inspector, _ := m.store.(state.Inspector)
	if inspector != nil {
		// The store's own checks first: its lock, where it has one.
		for _, c := range inspector.Checks(ctx) {
			out = append(out, Check(c))
		}
	}

	// Clock: compare ours with the file server's, through a file's mtime.
	if !o.probe {
		add("clock", "skip", "not probed: doctor --probe compares this host's clock with the file server's through a probe file made and removed in the root")
	} else if f, err := os.CreateTemp(root, ".doctor-clock-"); err == nil {
		f.Close()
		if fi, err := os.Stat(f.Name()); err == nil {
			skew := time.Since(fi.ModTime())
			if skew < -time.Minute || skew > time.Minute {
				add("clock", "warn", "this host's clock differs from the file server's by %s (depcache never compares them for safety; LRU order and TTLs are skewed)", skew.Round(time.Second))
			} else {
				add("clock", "ok", "within %s of the file server's", skew.Abs().Round(time.Millisecond))
			}
		}
		os.Remove(f.Name())
	}

	free, size := m.cfg.Disk.Space(root)
	if size > 0 {
		status := "ok"
		if free*20 < size {
			status = "warn"
		}
		add("free space", status, "%s free of %s", humanize.IBytes(uint64(free)), humanize.IBytes(uint64(size)))
	}
	m.namedLockChecks(add)

	st, err := m.store.View(ctx)
	switch {
	case errors.Is(err, state.ErrCorrupt):
		add("state", "fail", "%v (depcache doctor --rebuild rebuilds it from the published metadata)", err)
		return out
	case err != nil:
		// Unreachable, unreadable or refused: not a state to rebuild.
		add("state", "fail", "%v (the state could not be read; nothing was changed)", err)
		return out
	}
	add("state", "ok", "%s parses: %d entries", m.store, len(st.Entries))

	named := map[string]bool{}
	missing := 0
	for _, e := range st.Entries {
		if e.Path == "" {
			continue
		}
		named[filepath.Base(filepath.Dir(e.Path))] = true
		if abs, err := state.AbsIn(m.root, e.Path); err != nil || !exists(abs) {
			missing++
			dir := filepath.Base(filepath.Dir(e.Path))
			if held, _ := filepath.Glob(filepath.Join(root, trashDir, "*", dir)); len(held) > 0 {
				rel, _ := filepath.Rel(root, held[0])
				add("content", "fail", "READY entry %s: content %s is missing: it is waiting in %s (moved by a sweep that did not commit; the next sweep or start puts it back)", e.Key.Source, e.Path, rel)
				continue
			}
			add("content", "fail", "READY entry %s: content %s is missing", e.Key.Source, e.Path)
		}
	}
	if missing == 0 {
		add("content", "ok", "every READY entry's content exists")
	}
	m.imageChecks(ctx, st, add)
	var orphans, foreign, unreadable []string
	if ents, err := os.ReadDir(filepath.Join(root, entriesDir)); err == nil {
		publishing := namedOrPublishing(st)
		for _, d := range ents {
			switch {
			case !isEntryDirName(d.Name()):
				foreign = append(foreign, d.Name())
			case !named[d.Name()] && !publishing[d.Name()]:
				if err := metaUnreadable(filepath.Join(root, entriesDir, d.Name())); err != nil {
					// Start-up leaves these in place (reconcile), and
					// a rebuild cannot name them: say why.
					unreadable = append(unreadable, fmt.Sprintf("%s (%v)", d.Name(), err))
					continue
				}
				orphans = append(orphans, d.Name())
			}
		}
	}
	switch {
	case len(orphans) > 0:
		add("orphans", "warn", "content without an entry (start-up moves it aside): %s", strings.Join(orphans, ", "))
	case len(foreign) == 0 && len(unreadable) == 0:
		add("orphans", "ok", "no content without an entry")
	}
	if len(unreadable) > 0 {
		add("orphans", "warn", "content without an entry whose metadata cannot be read, left in place by every command (a rebuild cannot name it): %s; repair or remove its meta.json, then depcache doctor --rebuild", strings.Join(unreadable, "; "))
	}
	if len(foreign) > 0 {
		add("orphans", "warn", "not depcache's (names not KEYID-gGENERATION), left alone by every command: %s in %s; move them out of the cache root", strings.Join(foreign, ", "), filepath.Join(root, entriesDir))
	}

	var litter []string
	if ents, err := os.ReadDir(filepath.Join(root, stagingDir)); err == nil {
		for _, d := range ents {
			p := filepath.Join(root, stagingDir, d.Name())
			if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
				continue // listed by a mount's stale directory cache (sshfs), removed since
			}
			litter = append(litter, d.Name()+" ("+m.stagingWriter(p, st)+")")
		}
	}
	if len(litter) > 0 {
		add("staging", "warn", "%s", strings.Join(litter, "; "))
	} else {
		add("staging", "ok", "no staging data")
	}
	m.trashCheck(add)

	return out
}

// imageChecks checks, on a root that holds image entries, that this
// host's Docker engine answers ("docker engine") and that the image of
// each READY image entry of its daemon is in it ("images"). A root without
// images does not contact the engine. Asking for the engine's ID has the
// engine's bound (10 s), and so have all the inspections together: an
// engine that stops answering midway leaves the rest unchecked.
func (m *Manager) imageChecks(ctx context.Context, st *state.State, add func(name, status, format string, args ...any)) {
	if !hasImages(st) {
		return
	}
	var images int
	for _, e := range st.Entries {
		if e.Key.Kind == state.Image {
			images++
		}
	}
	if m.cfg.Docker == nil {
		add("docker engine", "warn", "%s, and no Docker engine here (DOCKER_HOST, or /var/run/docker.sock): not checked; gets and removals of this host's images fail until one answers",
			plural(images, "image entry", "image entries"))
		return
	}
	name := engineName(m.cfg.Docker)
	daemon, err := m.daemon(ctx)
	if err != nil {
		add("docker engine", "fail", "%s does not answer: %v (%s not checked; gets and removals of its images fail until it answers)",
			name, err, plural(images, "image entry", "image entries"))
		return
	}
	add("docker engine", "ok", "%s answers: daemon %s", name, daemon)
	ectx, cancel := engineContext(ctx)
	defer cancel()
	var gone, unchecked []string
	checked, others := 0, 0
	for _, e := range st.Sorted() {
		switch {
		case e.Key.Kind != state.Image || e.Stage != state.Ready || e.ImageID == "":
			continue
		case e.Key.Daemon != daemon:
			others++
			continue
		case ectx.Err() != nil:
			unchecked = append(unchecked, e.Key.Source)
			continue
		}
		_, ok, err := m.cfg.Docker.Inspect(ectx, e.ImageID)
		switch {
		case err != nil:
			unchecked = append(unchecked, fmt.Sprintf("%s (%v)", e.Key.Source, engineErr(ctx, ectx, err)))
		case !ok:
			gone = append(gone, fmt.Sprintf("%s (%s)", e.Key.Source, e.ImageID))
		default:
			checked++
		}
	}
	elsewhere := ""
	if others > 0 {
		elsewhere = fmt.Sprintf("; %s of other daemons not checked here", plural(others, "READY image entry", "READY image entries"))
	}
	if len(unchecked) > 0 {
		add("images", "fail", "%s did not answer for %s: %s%s", name, plural(len(unchecked), "READY image entry", "READY image entries"), strings.Join(unchecked, "; "), elsewhere)
	}
	if len(gone) > 0 {
		add("images", "warn", "READY image entries whose image is gone from the daemon (removed by hand?): %s; the next get of each pulls it again", strings.Join(gone, ", "))
	}
	if len(unchecked) == 0 && len(gone) == 0 {
		add("images", "ok", "the image of every READY image entry of this daemon is present (%d)%s", checked, elsewhere)
	}
}

// plural is "1 thing" or "N things".
func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

// trashCheck reports what trash/ holds, directory by directory, and who
// will delete it: evicted content waits there for its manager to delete
// it, and space it takes is not free. A directory nobody will ever empty
// (an owner note that does not parse, a file planted in trash/) is a
// warning: only an operator can tell whether it is still needed.
func (m *Manager) trashCheck(add func(name, status, format string, args ...any)) {
	root := filepath.Join(m.Root(), trashDir)
	dirs, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		add("trash", "ok", "empty")
		return
	} else if err != nil {
		add("trash", "warn", "not checked: %v", err)
		return
	}
	status := "ok"
	var lines []string
	var total int64
	now := m.cfg.Clock.Now()
	for _, d := range dirs {
		dir := filepath.Join(root, d.Name())
		if !d.IsDir() {
			status = "warn"
			lines = append(lines, fmt.Sprintf("%s: not a directory, left alone by every command (never followed); remove it by hand", d.Name()))
			continue
		}
		items, _ := os.ReadDir(dir)
		n, size := 0, int64(0)
		for _, it := range items {
			if it.Name() == ownerName {
				continue
			}
			n++
			size += treeBytes(filepath.Join(dir, it.Name()))
		}
		if n == 0 {
			continue // a manager's own, emptied
		}
		total += size
		var rec struct {
			Owner state.Owner `json:"owner"`
		}
		var who string
		b, rerr := readNote(filepath.Join(dir, ownerName))
		switch {
		case rerr == nil && json.Unmarshal(b, &rec) == nil:
			p := rec.Owner.Process
			switch alive, aerr := m.cfg.Processes.Alive(p); {
			case !m.self.SameMachine(p) && staleTrash(dir, now):
				// Its owner empties it right after the move: an hour on, that
				// host is likely gone, and a host that reboots is another
				// machine, whose sweeps never adopt it.
				status = "warn"
				who = fmt.Sprintf("of %s on another host, unchanged for over %s: if that host died or rebooted, no command deletes it; remove %s by hand once you know it is gone", p, staleTrashAfter, dir)
			case !m.self.SameMachine(p):
				who = "of " + p.String() + " on another host, which deletes it (or a sweep there, once it is gone)"
			case aerr == nil && !alive:
				who = "of " + p.String() + ", which is gone: the next sweep here adopts and deletes it"
			default:
				who = "of " + p.String() + ", which deletes it"
			}
		case noteNeverWritten(dir, now):
			who = "with no owner note (a full disk cut it short): the next sweep adopts and deletes it"
		case errors.Is(rerr, fs.ErrNotExist) || (rerr == nil && len(b) == 0):
			who = fmt.Sprintf("with no owner note yet: adopted by a sweep once it stays so for %s", unwrittenTrashNote)
		default:
			status = "warn"
			who = "whose owner note does not parse: left alone by every command; remove it by hand once no run needs it"
		}
		lines = append(lines, fmt.Sprintf("%s: %d item(s), %s, %s", d.Name(), n, humanize.IBytes(uint64(size)), who))
	}
	if len(lines) == 0 {
		add("trash", "ok", "empty")
		return
	}
	add("trash", status, "%s of evicted content waiting to be deleted: %s", humanize.IBytes(uint64(total)), strings.Join(lines, "; "))
}

// staleTrashAfter is how long another host's trash may stay unchanged
// before doctor says it may never be deleted.
const staleTrashAfter = time.Hour

// staleTrash reports whether trash directory dir is unchanged (by its
// modification time) for staleTrashAfter.
func staleTrash(dir string, now time.Time) bool {
	fi, err := os.Lstat(dir)
	return err == nil && now.Sub(fi.ModTime()) > staleTrashAfter
}

// treeBytes is the size of the files under p (p itself if a file), never
// following a symlink.
func treeBytes(p string) int64 {
	var n int64
	_ = filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// stagingWriter describes who wrote a staging directory and whether it is
// still at work.
func (m *Manager) stagingWriter(dir string, st *state.State) string {
	var rec struct {
		Owner      state.Owner `json:"owner"`
		Generation uint64      `json:"generation"`
	}
	b, err := readNote(filepath.Join(dir, ownerName))
	if err != nil || json.Unmarshal(b, &rec) != nil {
		return "writer unknown"
	}
	who := rec.Owner.Process.String()
	if m.self.SameMachine(rec.Owner.Process) {
		if alive, err := m.cfg.Processes.Alive(rec.Owner.Process); err == nil && !alive {
			if _, err := os.Stat(filepath.Join(dir, checkpointName)); err == nil {
				return "written by " + who + ", which is gone; it holds a checkpoint, kept for the next owner of its entry to resume from (start-up removes it once nothing can; of an entry that is gone, 10 minutes after the checkpoint)"
			}
			return "written by " + who + ", which is gone: start-up removes it"
		}
	}
	for _, e := range st.Entries {
		if e.Owner != nil && e.Owner.Same(&rec.Owner) && e.Generation == rec.Generation {
			return fmt.Sprintf("download in progress by %s, generation %d", who, rec.Generation)
		}
	}
	return "written by " + who + ", superseded"
}

// LockHolder returns who holds the state store's lock, or "" if it is free
// (or the store has no lock of its own).
func (m *Manager) LockHolder() string {
	if in, ok := m.store.(state.Inspector); ok {
		return in.Holder()
	}
	return ""
}

// BreakLock breaks the state store's lock if its holder is still holder
// (what the operator was shown) and is stale as a waiter judges it (see
// state.Inspector): another host's holder only after watching its lock
// unchanged for the lease.
func (m *Manager) BreakLock(ctx context.Context, holder string) error {
	in, ok := m.store.(state.Inspector)
	if !ok {
		return fmt.Errorf("%s has no lock to break", m.store)
	}
	return in.BreakHolder(ctx, holder)
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// namedLockChecks reports the named locks of depcache lock (ROOT/locks)
// that a dead process of this machine still holds, which the next waiter
// or locks --break removes, and the files of interrupted attempts.
func (m *Manager) namedLockChecks(add func(name, status, format string, args ...any)) {
	dir := filepath.Join(m.Root(), state.LocksDir)
	if fi, err := os.Lstat(dir); err != nil || !fi.IsDir() {
		return // none, or not ours to look into (the layout checks say so)
	}
	locks, _ := filepath.Glob(filepath.Join(dir, "*.lock"))
	tmps, _ := filepath.Glob(filepath.Join(dir, "*.lock.tmp-*"))
	breaks, _ := filepath.Glob(filepath.Join(dir, "*.lock.break-*"))
	litter := append(tmps, breaks...)
	var dead []string
	for _, p := range locks {
		info, ok, err := state.ReadLockInfo(p)
		if err != nil || !ok || !m.self.SameMachine(info.Process) {
			continue
		}
		if alive, err := m.cfg.Processes.Alive(info.Process); err == nil && !alive {
			name, _ := readNote(strings.TrimSuffix(p, ".lock") + ".name")
			dead = append(dead, fmt.Sprintf("%q (pid %d)", string(name), info.PID))
		}
	}
	switch {
	case len(dead) > 0:
		add("named locks", "warn", "%d of %d held by a process of this machine that is gone: %s (the next waiter breaks it, or depcache locks --break NAME)", len(dead), len(locks), strings.Join(dead, ", "))
	default:
		add("named locks", "ok", "%d held, none by a dead process of this machine", len(locks))
	}
	if n := len(litter); n > 0 {
		add("named lock litter", "warn", "%d files of interrupted lock attempts in %s (the break links of dead breakers are broken by the next waiter; a sweep, such as depcache gc, removes the temporary files of dead processes of this host, and empty ones an hour older than the last commit)", n, dir)
	}
}
