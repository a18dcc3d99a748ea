package state

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// A Tidier is the optional interface of a Backend whose processes leave
// files behind when they die: the file store's attempts at its locks.
// The manager's sweeps call it.
type Tidier interface {
	// Tidy removes what interrupted attempts of processes that are gone
	// left behind, and returns how many files it removed. It never
	// removes a file that a live process may still use.
	Tidy(ctx context.Context) (removed int, err error)
}

// maxHolderRecord bounds the files Tidy reads: a holder record is a few
// hundred bytes, and a larger file is not one.
const maxHolderRecord = 64 << 10

// emptyAttemptAge is how long before the last commit an empty attempt's
// file must have been made for Tidy to remove it. An attempt writes its
// record into the file right after creating it, so only a process killed
// (or stopped that long) between the two leaves it empty, on any host.
const emptyAttemptAge = time.Hour

// Tidy removes the files of lock attempts (the state lock's and the named
// locks' LOCK.tmp-NONCE) whose process was of this machine and is gone. An
// attempt's file is its holder record, linked to the lock to take it; a
// process killed while it waited leaves it behind. A live waiter's file,
// one of another host, whose liveness no process here can judge, and one
// that does not parse (a read on sshfs can come back cut, and the file may
// be a live waiter's) are left alone: doctor reports those. An empty file,
// of whatever host, is removed once it is older than emptyAttemptAge
// before the last commit (both by the file server's clock).
func (s *Store) Tidy(ctx context.Context) (int, error) {
	removed := 0
	var errs []error
	var committed time.Time
	if fi, err := os.Stat(s.path); err == nil {
		committed = fi.ModTime()
	}
	for _, pattern := range []string{s.lock.path + ".tmp-*", filepath.Join(s.root, LocksDir, "*.lock.tmp-*")} {
		files, err := filepath.Glob(pattern)
		if err != nil {
			return removed, err
		}
		for _, f := range files {
			if err := ctx.Err(); err != nil {
				return removed, err
			}
			gone, err := s.deadAttempt(f, committed)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if !gone {
				continue
			}
			if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("removing a dead lock attempt's file: %w", err))
				continue
			}
			removed++
		}
	}
	return removed, errors.Join(errs...)
}

// deadAttempt reports whether the lock attempt's file f belongs to a
// process of this machine that is gone, or is empty and older than
// emptyAttemptAge before committed.
func (s *Store) deadAttempt(f string, committed time.Time) (bool, error) {
	fi, err := os.Lstat(f)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil // its attempt ended meanwhile
	}
	if err != nil {
		return false, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxHolderRecord {
		return false, nil // not one of ours: never removed
	}
	if fi.Size() == 0 {
		return olderThan(f, committed, emptyAttemptAge), nil
	}
	b, err := os.ReadFile(f)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	_, nonce, _ := strings.Cut(filepath.Base(f), ".tmp-")
	h := parseHolder(b)
	if h.Nonce == "" || h.Nonce != nonce {
		return false, nil
	}
	procs := s.lock.opts.Processes
	if !procs.Self().SameMachine(h.Process) {
		return false, nil
	}
	alive, err := procs.Alive(h.Process)
	return err == nil && !alive, nil
}

var _ Tidier = (*Store)(nil)
