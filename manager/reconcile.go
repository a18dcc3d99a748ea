package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/depcache/depcache/state"
	"github.com/sirupsen/logrus"
)

// reconcile makes the root agree with its state, at start-up. It runs only
// on a state that was read successfully (Update refuses a corrupt one), and
// decides under the lock, where every publish also happens, so it cannot
// race a live publisher:
//   - a READY entry whose content is missing is dropped;
//   - a published directory that no entry names (a publish whose commit was
//     interrupted) is moved to trash;
//   - staging data is removed only when its writer is provably gone;
//   - trash is emptied, outside the lock.
func (m *Manager) reconcile(ctx context.Context) error {
	root := m.Root()
	if err := checkLayout(root); err != nil {
		return err
	}
	if m.cfg.Docker != nil {
		if _, err := m.daemon(ctx); err != nil {
			m.log.WithError(err).Warn("Docker engine unavailable: image entries are not driven")
		}
	}
	var dropped []string
	// A root with published content but no state file lost its state
	// (deleted, or restored without it): reconciling would move every
	// entry aside as an orphan. Refuse; doctor --rebuild recovers it.
	if _, err := os.Stat(m.store.Path()); errors.Is(err, fs.ErrNotExist) {
		if ents, _ := os.ReadDir(filepath.Join(root, entriesDir)); len(ents) > 0 {
			return fmt.Errorf("state file %s is missing but %d published entries exist (run 'depcache doctor --rebuild'): %w",
				m.store.Path(), len(ents), state.ErrCorrupt)
		}
	}
	m.trashMu.RLock()
	err := m.store.Update(ctx, func(st *state.State) (bool, error) {
		changed, err := m.settlePolicy(st)
		if err != nil {
			return false, err
		}
		// First put back what interrupted sweeps moved aside, so that their
		// entries are not taken for entries whose content is missing.
		m.settleTrashLocked(st)
		named := map[string]bool{}
		for id, e := range st.Entries {
			if e.Path == "" {
				continue
			}
			abs, err := m.store.Abs(e.Path)
			if err != nil {
				return false, err
			}
			if _, err := os.Lstat(abs); errors.Is(err, fs.ErrNotExist) && e.Stage == state.Ready {
				delete(st.Entries, id)
				dropped = append(dropped, e.Key.String())
				changed = true
				continue
			}
			if parts := strings.Split(e.Path, string(filepath.Separator)); len(parts) >= 2 {
				named[parts[1]] = true
			}
		}
		ents, err := os.ReadDir(filepath.Join(root, entriesDir))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, err
		}
		for _, d := range ents {
			if named[d.Name()] {
				continue
			}
			if err := m.intoTrash(filepath.Join(entriesDir, d.Name())); err != nil {
				return false, err
			}
			m.log.WithField("dir", d.Name()).Warn("moved aside published content that no entry names")
		}
		return changed, nil
	})
	m.trashMu.RUnlock()
	if err != nil {
		return err
	}
	for _, k := range dropped {
		m.log.WithField("key", k).Warn("dropped a READY entry whose content is missing")
	}
	m.removeDeadStaging()
	m.emptyTrash()
	return nil
}

// removeDeadStaging removes staging directories whose writer, on this
// machine, is gone. A writer on another host may still be alive: its data
// stays (doctor reports it).
func (m *Manager) removeDeadStaging() {
	dir := filepath.Join(m.Root(), stagingDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, d := range ents {
		p := filepath.Join(dir, d.Name())
		var rec struct {
			Owner state.Owner `json:"owner"`
		}
		b, err := os.ReadFile(filepath.Join(p, ownerName))
		if err != nil || json.Unmarshal(b, &rec) != nil {
			continue
		}
		if !m.self.SameMachine(rec.Owner.Process) {
			continue
		}
		if alive, err := m.cfg.Processes.Alive(rec.Owner.Process); err != nil || alive {
			continue
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
