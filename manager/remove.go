package manager

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/sirupsen/logrus"
)

// ErrInUse means Remove was asked to remove an entry that a dependent
// holds, that is downloading, or whose image a container uses. Errors
// wrapping it are *InUseError.
var ErrInUse = errors.New("entry in use")

// InUseError says why one entry cannot be removed.
type InUseError struct {
	Key   state.Key
	Stage state.Stage
	// Dependents are the live dependents that hold the entry, sorted.
	Dependents []string
	// Reason says what holds it: "in use by [a b]", "downloading", "used
	// by a container", ...
	Reason string
}

func (e *InUseError) Error() string {
	return fmt.Sprintf("%s: %s", e.Key.Source, e.Reason)
}

// Unwrap makes errors.Is(err, ErrInUse) hold.
func (e *InUseError) Unwrap() error { return ErrInUse }

// Removed is one entry Remove removed (or, dry, would remove).
type Removed struct {
	Key   state.Key
	Stage state.Stage
	// Path is the content's path relative to the root ("" for images and
	// for FAILED entries without content).
	Path  string
	Bytes int64
}

// RemoveReport is what Remove did (or, dry, would do).
type RemoveReport struct {
	DryRun  bool
	Removed []Removed
	Freed   int64
}

// Remove removes the entries of keys from the cache, all of them or none:
// if any of them is missing ([ErrNotFound]), downloading or held by a live
// dependent ([ErrInUse], an *InUseError naming the dependents), nothing is
// removed and the error (an errors.Join of one error per refused key) says
// why for each. Dependents that no longer hold the entry (their process is
// gone, their TTL passed; the judgement of a sweep) do not keep it. A pin
// does not keep it either: pins protect entries from cleanup, and Remove
// is asked for by name.
//
// Like a sweep, the removal commits first and moves the content into
// trash after the commit, then deletes it outside the lock: a crash in
// between leaves content that no entry names, which reconcile moves aside.
// An image is removed from this host's daemon (never one the daemon had
// before depcache pulled it, nor one a container uses or another entry
// names). An image the engine refuses to remove after the commit (another
// tag of the user's names it) has its entry put back: it is left out of
// the report, and the error names it (an *InUseError), beside the others,
// which are removed. A dry run changes nothing.
func (m *Manager) Remove(ctx context.Context, keys []state.Key, dryRun bool) (RemoveReport, error) {
	rep := RemoveReport{DryRun: dryRun}
	if err := checkLayout(m.Root()); err != nil {
		return rep, err
	}
	var guards map[string]string
	var unavailable error // the engine could not be asked: no image entry goes
	var snapshot map[string]bool
	if snap, err := m.store.View(ctx); err == nil {
		snapshot = map[string]bool{}
		for id := range snap.Entries {
			snapshot[id] = true
		}
		guards, unavailable = m.imageGuards(ctx, snap) // engine calls stay outside the lock
	} else {
		return rep, err
	}
	seen := map[string]bool{}
	var unique []state.Key
	for _, k := range keys {
		if !seen[k.ID()] {
			seen[k.ID()] = true
			unique = append(unique, k)
		}
	}
	var dirs []string
	var images []*state.Entry
	var frees map[string]int64 // by key ID, what each removal frees
	remove := func(st *state.State) (bool, error) {
		rep.Removed, dirs, images = nil, nil, nil
		now := m.cfg.Clock.Now()
		var errs []error
		m.mu.Lock()
		for _, k := range unique {
			e := st.Get(k)
			if e == nil {
				errs = append(errs, fmt.Errorf("no entry for %s: %w", k.Source, ErrNotFound))
				continue
			}
			r, _ := transitions.Reap(e, m.dependentViewsLocked(e, now), m.cfg.Policy, now)
			var names []string // the live dependents, as the refusals name them
			if r.Entry != nil {
				names = slices.Sorted(maps.Keys(r.Entry.Dependents))
			}
			if e.Stage == state.Downloading && !transitions.Abandoned(r.Entry) {
				errs = append(errs, &InUseError{Key: e.Key, Stage: e.Stage, Dependents: names,
					Reason: fmt.Sprintf("downloading for %s (release them to cancel the download)", strings.Join(names, ", "))})
				continue
			}
			if len(names) > 0 {
				errs = append(errs, &InUseError{Key: e.Key, Stage: e.Stage, Dependents: names,
					Reason: fmt.Sprintf("in use by %s (release them first)", strings.Join(names, ", "))})
				continue
			}
			if e.Key.Kind == state.Image && !e.External {
				id := e.Key.ID()
				if why, guarded := guards[id]; guarded || !snapshot[id] {
					if guarded && unavailable != nil {
						// Not in use as far as anyone knows: the engine
						// did not say. Worth trying again, not releasing.
						errs = append(errs, fmt.Errorf("%s: %w (the entry is kept; try again once the engine answers)", e.Key.Source, unavailable))
						continue
					}
					if !guarded {
						why = "appeared while removing; try again"
					}
					errs = append(errs, &InUseError{Key: e.Key, Stage: e.Stage, Reason: why})
					continue
				}
			}
			rep.Removed = append(rep.Removed, Removed{Key: e.Key, Stage: e.Stage, Path: e.Path, Bytes: e.SizeBytes})
		}
		m.mu.Unlock()
		if len(errs) > 0 {
			return false, errors.Join(errs...)
		}
		frees = freesOf(st, rep.Removed)
		if dryRun {
			return false, nil
		}
		for _, r := range rep.Removed {
			e := st.Get(r.Key)
			if e.Key.Kind == state.Image && !e.External && e.Stage != state.Downloading {
				images = append(images, e.Clone())
			}
			delete(st.Entries, r.Key.ID())
			if r.Path != "" {
				dirs = append(dirs, filepath.Dir(r.Path))
			}
		}
		return len(rep.Removed) > 0, nil
	}
	var err error
	if dryRun {
		err = m.planOnly(ctx, remove)
	} else {
		m.trashMu.RLock()
		err = m.freeing(ctx, "removal", func() error { return m.store.Update(ctx, remove) }, func() (bool, error) {
			err := m.planOnly(ctx, remove)
			return len(rep.Removed) > 0, err
		})
		m.trashMu.RUnlock()
	}
	if err != nil {
		rep.Removed = nil
		return rep, err
	}
	if dryRun {
		for _, r := range rep.Removed {
			rep.Freed += frees[r.Key.ID()]
		}
		return rep, nil
	}
	// Committed first, moved after (see sweep).
	m.moveToTrash(dirs, "removed")
	m.emptyTrash()
	if len(dirs) > 0 {
		m.keepReserve(ctx)
	}
	var refused []error
	if len(images) > 0 {
		// An image the engine refused to remove has its entry back: it was
		// not removed, and the all-or-nothing of the others is past.
		kept, removed := m.removeImages(ctx, images)
		// An image frees its bytes when it is removed, once.
		for _, e := range images {
			frees[e.Key.ID()] = 0
			if removed[e.Key.ID()] {
				frees[e.Key.ID()] = e.SizeBytes
			}
		}
		rep.Removed = slices.DeleteFunc(rep.Removed, func(r Removed) bool {
			if err, ok := kept[r.Key.ID()]; ok {
				if !errors.Is(err, ErrImageInUse) {
					// Not a refusal: the engine did not answer (or failed).
					refused = append(refused, fmt.Errorf("%s: %w: %s did not remove its image: %v (the entry is kept; try again once the engine answers)",
						r.Key.Source, ErrEngineUnavailable, engineName(m.cfg.Docker), err))
					return true
				}
				refused = append(refused, &InUseError{Key: r.Key, Stage: r.Stage,
					Reason: fmt.Sprintf("the Docker engine refused to remove its image (%v): the entry is kept", err)})
				return true
			}
			return false
		})
	}
	for _, r := range rep.Removed {
		rep.Freed += frees[r.Key.ID()]
		m.log.WithFields(logrus.Fields{"source": r.Key.Source, "bytes": r.Bytes}).Info("removed an entry on request")
	}
	return rep, errors.Join(refused...)
}

// freesOf says, by key ID, what removing each of removed (entries of st)
// frees: an entry's bytes, but an image's once, and only when no entry
// left names it; nothing for an image the daemon had before depcache
// (External), which stays.
func freesOf(st *state.State, removed []Removed) map[string]int64 {
	gone := make(map[string]bool, len(removed))
	for _, r := range removed {
		gone[r.Key.ID()] = true
	}
	out := make(map[string]int64, len(removed))
	counted := map[string]bool{}
	for _, r := range removed {
		id := r.Key.ID()
		e := st.Get(r.Key)
		switch {
		case e.Key.Kind != state.Image || e.ImageID == "" || e.Stage == state.Downloading:
			out[id] = r.Bytes
			continue
		case e.External:
			continue
		}
		img := e.Key.Daemon + "\x00" + e.ImageID
		if counted[img] {
			continue
		}
		counted[img] = true
		left := false
		for oid, o := range st.Entries {
			if !gone[oid] && o.Key.Kind == state.Image && o.Key.Daemon == e.Key.Daemon && o.ImageID == e.ImageID {
				left = true
				break
			}
		}
		if !left {
			out[id] = r.Bytes
		}
	}
	return out
}
