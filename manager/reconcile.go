package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/sirupsen/logrus"
)

// reconcile makes the root agree with its state, at start-up. It runs only
// on a state that was read successfully (the store refuses a corrupt one):
//   - content that an older depcache's interrupted sweep left in trash
//     while its entry still names it goes back (settleTrash);
//   - a READY entry whose content is missing is fetched again under a new
//     generation when it has dependents, which it keeps (as an image
//     removed from its daemon is), and dropped when it has none;
//   - a published directory that no entry names is moved to trash after
//     the commit. A directory of a generation still DOWNLOADING is named:
//     its publisher renamed it into place and is about to commit;
//   - staging data is removed only when its writer is provably gone;
//   - trash is emptied, outside the lock.
//
// The disk is looked at before the commit, and the commit decides from
// what it saw and the state as it is then: the callback does no I/O.
//
// On a full disk it fails wrapping ErrDiskFull: its commit takes the lock,
// which writes a file, and it frees nothing that would earn it the disk
// reserve.
func (m *Manager) reconcile(ctx context.Context) error {
	err := m.reconcileRoot(ctx)
	if err != nil && m.DiskFull(err) && !errors.Is(err, ErrDiskFull) {
		err = fmt.Errorf("%w: reconciling the root at start takes the state lock, which writes a file: free space on the root's filesystem and try again: %w", ErrDiskFull, err)
	}
	return err
}

func (m *Manager) reconcileRoot(ctx context.Context) error {
	root := m.Root()
	if err := checkLayout(root); err != nil {
		return err
	}
	// A root with published content but no state lost its state (deleted,
	// or restored without it): reconciling would move every entry aside as
	// an orphan. Refuse; doctor --rebuild recovers it.
	if exists, err := m.store.Exists(ctx); err != nil {
		return err
	} else if !exists {
		names, _ := readDirNames(filepath.Join(root, entriesDir))
		if n := len(slices.DeleteFunc(names, func(name string) bool { return !isEntryDirName(name) })); n > 0 {
			return fmt.Errorf("%s is missing but %d published entries exist (run 'depcache doctor --rebuild'): %w",
				m.store, n, state.ErrCorrupt)
		}
	}
	if err := m.settleTrash(ctx); err != nil {
		return err
	}
	// What is on disk, looked at before the commit.
	snap, err := m.store.View(ctx)
	if err != nil {
		return err
	}
	if m.cfg.Docker != nil && hasImages(snap) {
		// Only for a root with images: a wedged engine must not hold up
		// a command about bundles (each engine call is bounded too).
		if _, err := m.daemon(ctx); err != nil {
			m.log.WithError(err).Warn("Docker engine unavailable: image entries are not driven")
		}
	}
	missing := map[string]string{} // key ID -> the path found missing
	for id, e := range snap.Entries {
		if e.Stage != state.Ready || e.Path == "" {
			continue
		}
		abs, err := state.AbsIn(m.root, e.Path)
		if err != nil {
			return err
		}
		if _, err := os.Lstat(abs); errors.Is(err, fs.ErrNotExist) {
			missing[id] = e.Path
		}
	}
	// Names only: a root of 100,000 entries holds as many directories,
	// and their names cost half what os.ReadDir's entries do.
	ents, err := readDirNames(filepath.Join(root, entriesDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	var dropped, refetched, orphans []string
	err = m.store.Update(ctx, func(st *state.State) (bool, error) {
		dropped, refetched, orphans = dropped[:0], refetched[:0], orphans[:0]
		changed, err := m.settlePolicy(st)
		if err != nil {
			return false, err
		}
		for id, e := range st.Entries {
			// Only if it is still the entry whose content was found missing.
			if p, ok := missing[id]; ok && e.Stage == state.Ready && e.Path == p {
				if len(e.Dependents) > 0 {
					st.Entries[id] = transitions.Refetch(e, "its content "+p+" was missing: fetching it again").Entry
					refetched = append(refetched, e.Key.String())
				} else {
					delete(st.Entries, id)
					dropped = append(dropped, e.Key.String())
				}
				changed = true
			}
		}
		named := namedOrPublishing(st)
		for _, name := range ents {
			if !named[name] && isEntryDirName(name) {
				orphans = append(orphans, filepath.Join(entriesDir, name))
			}
		}
		return changed, nil
	})
	if err != nil {
		return err
	}
	for _, k := range dropped {
		m.log.WithField("key", k).Warn("dropped a READY entry whose content is missing")
	}
	for _, k := range refetched {
		m.log.WithField("key", k).Warn("a READY entry's content is missing: it is fetched again, for the dependents it keeps")
	}
	for _, name := range ents {
		if !isEntryDirName(name) {
			m.log.WithField("path", filepath.Join(root, entriesDir, name)).Warn("not depcache's (its name is not KEYID-gGENERATION): left alone; move it out of the cache root")
		}
	}
	kept := orphans[:0]
	for _, o := range orphans {
		if err := metaUnreadable(filepath.Join(m.Root(), o)); err != nil {
			// Not an eviction's leftover (that has its metadata): content
			// whose metadata does not parse, so that no rebuild could name
			// it. It is left in place, never deleted for that.
			m.log.WithError(err).WithField("dir", o).Warn("published content that no entry names has metadata that cannot be read: left in place (repair or remove its meta.json, then depcache doctor --rebuild)")
			continue
		}
		// Not a problem, and common: an eviction commits before it moves
		// its content (another process's may be between the two), and a
		// crash between them leaves exactly this.
		m.log.WithField("dir", filepath.Base(o)).Info("moving aside published content that no entry names")
		kept = append(kept, o)
	}
	m.moveToTrash(kept, "an orphaned")
	m.removeDeadStaging(ctx)
	m.emptyTrash()
	return nil
}

// isEntryDirName reports whether name is one that depcache gives the
// directory of a generation (stagingName: a key ID, "-g", a generation).
// Anything else under entries/ is not depcache's (a --root pointed at a
// directory that had an entries/ of its own): it is never moved or
// deleted, and no rebuild is asked for because of it.
func isEntryDirName(name string) bool {
	id, g, ok := strings.Cut(name, "-g")
	if !ok || len(id) != 32 {
		return false
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	n, err := strconv.ParseUint(g, 10, 64)
	return err == nil && strconv.FormatUint(n, 10) == g // as stagingName writes it: no sign, no leading zero
}

// readDirNames returns the names in dir, in no particular order.
func readDirNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Readdirnames(-1)
}

// removeDeadStaging removes staging directories whose writer, on this
// machine, is gone: at start-up and after every sweep, so that a
// long-running serve does not keep them until it restarts. A writer on
// another host may still be alive: its data stays (doctor reports it)
// until a later generation of its entry is READY or FAILED, which fences
// it. A dead writer's checkpointed data stays while its entry is
// DOWNLOADING, whichever generation it is of: an owner, in this process
// or another, may be about to copy its prefix, and may already hold a
// checkpoint of its own when it does (CI once fetched from 0 when a sweep
// kept only the newest). The owner that copies a prefix removes what it
// copied. Abandoned (the entry is READY or FAILED), it is removed. An
// entry that is gone (an interrupted get's, removed with its last
// dependent when that get's process was reaped, as the next get's first
// pass may do before that get registers) leaves its checkpointed data for
// abandonedResume after the last checkpoint: the next get of the source
// makes an entry of a later generation, which resumes from it.
func (m *Manager) removeDeadStaging(ctx context.Context) {
	dir := filepath.Join(m.Root(), stagingDir)
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) == 0 {
		return // most sweeps: no read of the state
	}
	st, err := m.store.View(ctx)
	if err != nil {
		return
	}
	// The checkpointed staging data of each DOWNLOADING entry, and the
	// recently checkpointed data of entries that are gone.
	checkpointed := map[string]bool{}
	now := m.cfg.Clock.Now()
	var pol state.Policy
	if st.Policy != nil {
		pol = *st.Policy
	}
	roomy := sync.OnceValue(func() bool { return m.roomForResume(dir, pol) }) // statfs only for a gone entry's data
	for _, d := range ents {
		id, _, ok := strings.Cut(d.Name(), "-g")
		e := st.Entries[id]
		if ok && e == nil && recentCheckpoint(filepath.Join(dir, d.Name()), now) && roomy() {
			checkpointed[d.Name()] = true
			continue
		}
		if !ok || e == nil || e.Stage != state.Downloading {
			continue
		}
		if g, ok := stagingGen(e.Key, d.Name()); !ok || g == 0 {
			continue
		}
		if _, ok := readCheckpoint(filepath.Join(dir, d.Name()), e.Key); ok {
			checkpointed[d.Name()] = true
		}
	}
	for _, d := range ents {
		p := filepath.Join(dir, d.Name())
		var rec struct {
			Owner state.Owner `json:"owner"`
		}
		b, err := readNote(filepath.Join(p, ownerName))
		if err != nil || json.Unmarshal(b, &rec) != nil {
			continue
		}
		if !m.self.SameMachine(rec.Owner.Process) {
			// Its writer's liveness cannot be told from here, but a
			// generation that a later one settled (READY or FAILED) can
			// never be published or resumed from: its writer, if it
			// lives, is fenced, and fails when it finds its data gone.
			id, _, _ := strings.Cut(d.Name(), "-g")
			e := st.Entries[id]
			if e == nil || e.Stage == state.Downloading {
				continue
			}
			if g, ok := stagingGen(e.Key, d.Name()); !ok || g >= e.Generation {
				continue
			}
			if err := os.RemoveAll(p); err != nil {
				m.log.WithError(err).WithField("dir", p).Warn("removing superseded staging data")
				continue
			}
			m.log.WithFields(logrus.Fields{"dir": d.Name(), "writer_host": rec.Owner.Host, "writer_pid": rec.Owner.PID}).Info("removed the staging data of a generation written on another host that a later one settled")
			continue
		}
		if alive, err := m.cfg.Processes.Alive(rec.Owner.Process); err != nil || alive {
			continue
		}
		if checkpointed[d.Name()] {
			m.log.WithFields(logrus.Fields{"dir": d.Name(), "writer_pid": rec.Owner.PID}).Info("keeping the checkpointed staging data of a dead writer for the next owner to resume from")
			continue
		}
		if cp := filepath.Join(p, checkpointName); exists(cp) {
			if id, _, _ := strings.Cut(d.Name(), "-g"); st.Entries[id] != nil {
				if _, ok := readCheckpoint(p, st.Entries[id].Key); !ok {
					// Said, not silent: a checkpoint that does not read
					// back loses its prefix (it cannot be trusted to say
					// how much of it is good).
					m.log.WithField("checkpoint", cp).Warn("a dead writer's checkpoint cannot be read or does not match its entry: its staging data cannot be resumed from and is removed")
				}
			}
		}
		if err := os.RemoveAll(p); err != nil {
			m.log.WithError(err).WithField("dir", p).Warn("removing dead staging data")
			continue
		}
		m.log.WithFields(logrus.Fields{"dir": d.Name(), "writer_pid": rec.Owner.PID}).Info("removed staging data of a dead writer")
	}
}

// Settle reconciles the root and settles the cleanup policy without
// starting the loop, for one-shot commands such as gc.
func (m *Manager) Settle(ctx context.Context) error {
	return m.reconcile(ctx)
}

// namedOrPublishing returns the names of the entry directories that st
// names, and those of the generations still DOWNLOADING under an owner: a
// publisher renames its directory into entries/ before the commit that
// names it, so until its generation is superseded the directory is not an
// orphan.
func namedOrPublishing(st *state.State) map[string]bool {
	named := namedDirs(st)
	for _, e := range st.Entries {
		if e.Stage == state.Downloading && e.Owner != nil {
			named[stagingName(e.Key, e.Generation)] = true
		}
	}
	return named
}

// metaUnreadable reports why the metadata published in the entry
// directory dir cannot be read, or nil when it can (or when there is none,
// as in the directory of a publish cut short).
func metaUnreadable(dir string) error {
	b, err := readNote(filepath.Join(dir, metaName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var meta Meta
	if err := json.Unmarshal(b, &meta); err != nil {
		return fmt.Errorf("%s: %w", filepath.Join(dir, metaName), err)
	}
	return nil
}

// abandonedResume is how long the checkpointed staging data of an entry
// that is gone is kept for a later get of its source to resume from.
const abandonedResume = 10 * time.Minute

// roomForResume reports whether dir's filesystem has room to spare for
// the data of downloads whose entries are gone: 1 GiB and 5 % of it free,
// beyond the policy's free-disk floor. On a fuller one, room beats a
// resume: kept, that data (which no budget counts) would make sweeps evict
// READY entries to meet the floor.
func (m *Manager) roomForResume(dir string, p state.Policy) bool {
	f, s := m.cfg.Disk.Space(dir)
	if f <= 0 || s <= 0 {
		return false
	}
	free, size := uint64(f), uint64(s)
	floor := max(uint64(max(p.MinFreeDiskBytes, 0)), size/100*uint64(max(p.MinFreeDiskPercent, 0)))
	return free >= floor+1<<30 && (free-floor)*20 >= size
}

// recentCheckpoint reports whether dir holds a checkpoint that a resume of
// the source it names would accept (checkpoint.usable), written within
// abandonedResume of now. Its source is the one it names: the key ID in
// dir's name is checked by the owner that resumes, which knows the key.
func recentCheckpoint(dir string, now time.Time) bool {
	fi, err := os.Lstat(filepath.Join(dir, checkpointName))
	// The mtime is the file server's clock: a skew of up to the grace
	// either way still ends the keeping.
	if err != nil || now.Sub(fi.ModTime()) > abandonedResume || fi.ModTime().Sub(now) > abandonedResume {
		return false
	}
	c, err := loadCheckpoint(dir)
	return err == nil && c.usable(dir, state.Key{Source: c.Source})
}
