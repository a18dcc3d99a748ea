package manager

import (
	"context"
	"errors"
	"fmt"

	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
)

// ErrDiskFull is wrapped by the error of a sweep, a removal or a release
// whose commit found no room on the root's filesystem, with the disk
// reserve given up or not there to give: space must be freed by other
// means. A Get whose commit finds no room wraps it too, without touching
// the reserve, and so do Start, Run and Settle when the reconcile they
// begin with finds none.
var ErrDiskFull = errors.New("the cache root's filesystem is full")

// DiskFull reports whether err is what a write to the root's full
// filesystem returns (see state.DiskFull): ENOSPC, EDQUOT, or sshfs's EIO
// with no room left.
func (m *Manager) DiskFull(err error) bool { return state.DiskFull(m.Root(), err) }

// freeing runs commit, the commit of a removal, a sweep or a release. On a
// full disk, if frees says that the commit would free space or let it be
// freed, it gives up part of the store's disk reserve (state.Reserver) and
// runs commit again, while the disk is full and there is reserve left.
// frees plans again, on a snapshot (the failed commit may have failed
// before its callback ran), and its error is the answer the commit would
// have given. Both may run the store callback again, as a store may.
func (m *Manager) freeing(ctx context.Context, what string, commit func() error, frees func() (bool, error)) error {
	err := commit()
	if err == nil || !m.DiskFull(err) {
		return err
	}
	if ok, perr := frees(); perr != nil {
		return perr // what the commit would have answered: in use, not found
	} else if !ok {
		// A commit that frees nothing (a sweep that only reaps) would
		// spend the reserve that a removal needs.
		return fmt.Errorf("%w: %w (this %s would free nothing, so it leaves the disk reserve alone: free space on it by other means)", ErrDiskFull, err, what)
	}
	r, ok := m.store.(state.Reserver)
	if !ok {
		return fmt.Errorf("%w: %w", ErrDiskFull, err)
	}
	var spent int64
	for m.DiskFull(err) {
		freed, rerr := r.ReleaseReserve(ctx)
		switch {
		case rerr != nil:
			return fmt.Errorf("%w: %w (and the disk reserve could not be given up: %w)", ErrDiskFull, err, rerr)
		case freed == 0 && spent == 0:
			return fmt.Errorf("%w: %w (no disk reserve was left to give up: free some space on it by other means)", ErrDiskFull, err)
		case freed == 0:
			return fmt.Errorf("%w: %w (even with the last %s of the disk reserve given up: free some space on it by other means)", ErrDiskFull, err, humanize.IBytes(uint64(spent)))
		}
		spent += freed
		err = commit()
	}
	if err == nil {
		m.log.WithField("reserve", humanize.IBytes(uint64(spent))).Warn("the disk is full: gave up the disk reserve, in part, to commit the " + what)
	}
	return err
}

// keepReserve makes the store's disk reserve whole when there is room: at
// this manager's first Get, and after content was deleted.
func (m *Manager) keepReserve(ctx context.Context) {
	r, ok := m.store.(state.Reserver)
	if !ok {
		return
	}
	if err := r.KeepReserve(ctx); err != nil {
		m.log.WithError(err).Warn("could not make the disk reserve")
	}
}
