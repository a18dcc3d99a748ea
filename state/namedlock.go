package state

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// LocksDir is the directory of the root that holds the named locks of
// `depcache lock`.
const LocksDir = "locks"

// NamedLockID is the file name stem of the named lock NAME: the first 32
// hex digits of its sha256, so that no name becomes a path.
func NamedLockID(name string) string {
	s := sha256.Sum256([]byte(name))
	return hex.EncodeToString(s[:])[:32]
}

// NamedLockPaths returns, for the named lock NAME in root, the lock file,
// the file of its fencing token and the file that records NAME itself.
func NamedLockPaths(root, name string) (lock, token, nameFile string) {
	base := filepath.Join(root, LocksDir, NamedLockID(name))
	return base + ".lock", base + ".token", base + ".name"
}

// Lease is a hold of a [Lock] that its holder keeps alive for as long as it
// needs: every [Lease.Renew] changes the lock's content, so a waiter on
// another host, which breaks a holder only once the content stayed
// unchanged for the lease on its own clock, never breaks a holder that
// renews in time.
//
// Renewing, drawing a token and releasing each first take the breaker lock
// of the hold's nonce (the lock a waiter must win before breaking this
// hold), so that no waiter can break the lock between the holder's check of
// its nonce and its write. Only a holder stalled past the lease inside that
// short window can still be overtaken unknowingly; a fencing token
// ([Lease.NextToken]) lets downstream systems refuse such a late holder.
type Lease struct {
	l       *Lock
	nonce   string
	unlock  func() error
	renewal uint64
	w       waiter // judges a breaker that holds our own breaker lock
}

// renewedHolder is the content of a lock that its holder renewed.
type renewedHolder struct {
	holder
	// Renewal counts the renewals in fixed width, so that the file keeps
	// its size: an sshfs client may cut the first read after a file grew.
	Renewal string `json:"renewal"`
}

// Acquire blocks like [Lock.Lock] until the lock is held or ctx is done,
// and returns the hold as a Lease.
func (l *Lock) Acquire(ctx context.Context) (*Lease, error) {
	unlock, err := l.Lock(ctx)
	if err != nil {
		return nil, err
	}
	return &Lease{l: l, nonce: l.nonce, unlock: unlock,
		w: waiter{l: l, seen: map[string]observation{}}}, nil
}

// Nonce returns the hold's nonce, as recorded in the lock file.
func (s *Lease) Nonce() string { return s.nonce }

// Check reports whether the lock still holds this lease's nonce; an error
// wrapping [ErrLockLost] says who holds it now.
func (s *Lease) Check() error {
	// A torn or cut read (sshfs may cut the first read after a file
	// grew) is read again before it is judged.
	b, err := readOwn(s.l.path, s.nonce, s.l.opts.Lease)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lock %s vanished: %w", s.l.path, ErrLockLost)
	}
	if err != nil {
		return fmt.Errorf("lock %s: %w", s.l.path, err)
	}
	if h := parseHolder(b); h.Nonce != s.nonce {
		return fmt.Errorf("lock %s now held by %s: %w", s.l.path, h.describe(), ErrLockLost)
	}
	return nil
}

// guard runs f holding the breaker lock of this lease's nonce, after
// checking that the lock is still ours. It returns an error wrapping
// [ErrLockLost] when the lock was broken, and another error (retry later)
// when the breaker lock is taken by a waiter that is judging this hold.
func (s *Lease) guard(f func() error) error {
	nonce, err := s.l.newNonce()
	if err != nil {
		return err
	}
	rec, err := json.Marshal(holder{Process: s.l.opts.Processes.Self(), Nonce: nonce, Acquired: time.Now()})
	if err != nil {
		return err
	}
	tmp := s.l.path + ".tmp-" + nonce
	if err := writeExcl(tmp, rec, s.l.opts.Perm, &s.l.modes); err != nil {
		return fmt.Errorf("lock %s: %w", s.l.path, err)
	}
	defer os.Remove(tmp)
	s.w.tmp, s.w.nonce = tmp, nonce
	defer s.w.bury() // what breaking a stale breaker below left behind
	breaker := s.l.path + ".break-" + s.nonce
	won, content, err := s.w.tryLink(breaker)
	if err != nil {
		return fmt.Errorf("lock %s: %w", s.l.path, err)
	}
	if !won {
		if content != nil {
			// A waiter judges us stale, or one died doing so: break a
			// dead one, as any waiter would, and try again next time.
			bh := parseHolder(content)
			if stale, why := s.w.judge(breaker, bh, content); stale {
				if err := s.w.breakStale(breaker, bh, content, why, 1); err != nil {
					return fmt.Errorf("lock %s: breaking a stale breaker: %w", s.l.path, err)
				}
			}
		}
		if err := s.Check(); err != nil {
			return err
		}
		return fmt.Errorf("lock %s: a waiter is judging whether this hold is stale; try again", s.l.path)
	}
	defer func() {
		if err := s.l.releaseDead(breaker, nonce); err != nil {
			s.l.opts.Log.WithError(err).WithField("lock", breaker).Warn("releasing the breaker lock")
		}
	}()
	if err := s.Check(); err != nil {
		return err
	}
	return f()
}

// Renew changes the lock's content (a renewal counter), if the lock is
// still ours. It returns an error wrapping [ErrLockLost] when the lock was
// broken; any other error means this renewal did not happen and may be
// retried.
//
// The lock is rewritten in place, through a descriptor whose content we
// checked, never replaced by a rename: on a FUSE filesystem such as sshfs a
// rename over a file that another process of the same mount has open (a
// waiter of this host reading the lock) is done as two renames on the
// server, the old file to a hidden name and then ours to the lock's name,
// and in between the lock's name does not exist, so a waiter on another
// mount could link its own file there and hold the lock beside us. In
// place, the name always exists, and a renewal that comes late, after the
// lock was broken, lands in the file that was renamed aside, never in the
// next holder's.
func (s *Lease) Renew() error {
	return s.guard(func() error {
		f, err := os.OpenFile(s.l.path, os.O_RDWR, 0)
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("lock %s vanished: %w", s.l.path, ErrLockLost)
		}
		if err != nil {
			return fmt.Errorf("lock %s: %w", s.l.path, err)
		}
		werr := s.renewIn(f)
		if err := f.Close(); err != nil && werr == nil { // sshfs reports a failed write at close
			werr = fmt.Errorf("lock %s: %w", s.l.path, err)
		}
		return werr
	})
}

// renewIn rewrites the open lock f with the next renewal count, if it
// holds our nonce.
func (s *Lease) renewIn(f *os.File) error {
	b, err := io.ReadAll(f)
	if err != nil {
		return fmt.Errorf("lock %s: %w", s.l.path, err)
	}
	var r renewedHolder
	if err := json.Unmarshal(b, &r); err != nil || r.Nonce != s.nonce {
		return fmt.Errorf("lock %s: unreadable while held: %w", s.l.path, ErrLockLost)
	}
	s.renewal++
	r.Renewal = fmt.Sprintf("%020d", s.renewal)
	out, err := json.Marshal(r)
	if err != nil {
		return err
	}
	// The same size as before from the second renewal on (the counter has
	// a fixed width), so readers on other mounts see no cut read; the first
	// renewal adds the field.
	if _, err := f.WriteAt(out, 0); err != nil {
		return fmt.Errorf("lock %s: %w", s.l.path, err)
	}
	if len(out) < len(b) {
		if err := f.Truncate(int64(len(out))); err != nil {
			return fmt.Errorf("lock %s: %w", s.l.path, err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("lock %s: %w", s.l.path, err)
	}
	return nil
}

// replace writes data to name atomically: a private temporary file,
// fsynced, renamed over name.
func (s *Lease) replace(name string, data []byte) error {
	n, err := s.l.newNonce()
	if err != nil {
		return err
	}
	tmp := s.l.path + ".tmp-" + n
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, s.l.opts.Perm)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer os.Remove(tmp)
	if err := f.Chmod(s.l.opts.Perm); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", name, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := os.Rename(tmp, name); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if d, err := os.Open(filepath.Dir(name)); err == nil {
		d.Sync() // best effort: some filesystems (sshfs) refuse a directory fsync
		d.Close()
	}
	return nil
}

// NextToken draws the next fencing token of the lock from the counter file
// at path, while the lock is ours: it reads the counter (0 when the file is
// missing), writes it plus one (fsynced, by a rename) and returns the new
// value. Tokens of successive holds therefore strictly increase. A counter
// file that does not parse is an error, never a reset.
func (s *Lease) NextToken(path string) (uint64, error) {
	var tok uint64
	err := s.guard(func() error {
		n, err := ReadToken(path)
		if err != nil {
			return err
		}
		tok = n + 1
		return s.replace(path, []byte(fmt.Sprintf("%020d\n", tok)))
	})
	return tok, err
}

// ReadToken reads a fencing-token counter file: 0 when it does not exist.
func ReadToken(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("token %s: %w", path, err)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("token %s: %q does not parse: %w", path, b, err)
	}
	return n, nil
}

// Release releases the lock if it is still ours; the error wraps
// [ErrLockLost] if it was broken meanwhile. A Lease is released once.
func (s *Lease) Release() error {
	unlocked := false
	var uerr error
	unlock := func() error {
		unlocked = true
		uerr = s.unlock()
		return uerr
	}
	var err error
	for range 100 {
		err = s.guard(unlock)
		if unlocked || err == nil || errors.Is(err, ErrLockLost) {
			break
		}
		// The breaker lock is busy: a waiter is judging this hold, and
		// will find the content changed or not. Try again shortly; after
		// a second, release without it.
		if sleep(context.Background(), maxPoll) != nil {
			break
		}
	}
	if !unlocked {
		unlock()
	}
	if errors.Is(err, ErrLockLost) {
		return err
	}
	return uerr
}

// LockInfo describes the holder of a lock file, for humans.
type LockInfo struct {
	Process
	Nonce string `json:"nonce"`
	// Acquired is by the holder's clock.
	Acquired time.Time `json:"acquired"`
	// Renewals is how often the holder renewed its lease.
	Renewals uint64 `json:"renewals"`
}

// ReadLockInfo reads the lock file at path; ok is false when it is free
// or its content is unreadable.
func ReadLockInfo(path string) (info LockInfo, ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return LockInfo{}, false, nil
	}
	if err != nil {
		return LockInfo{}, false, err
	}
	var r renewedHolder
	if json.Unmarshal(b, &r) != nil || !isHex(r.Nonce) {
		return LockInfo{}, false, nil
	}
	n, _ := strconv.ParseUint(r.Renewal, 10, 64)
	return LockInfo{Process: r.Process, Nonce: r.Nonce, Acquired: r.Acquired, Renewals: n}, true, nil
}

// BreakStale breaks the lock at l's path if its holder is stale, judged as
// any waiter judges it: a holder on this machine at once when its process
// is gone, any other holder once the lock's content stayed unchanged for
// the lease on our clock (so this watches for up to the lease; up to twice
// that when the break link of a breaker that died at it is in the way). It
// returns broken false, with a reason, when the holder is alive (or
// renewed its lease meanwhile), the lock is free, or another breaker's
// link stayed until ctx ended.
func (l *Lock) BreakStale(ctx context.Context) (broken bool, why string, err error) {
	w := waiter{l: l, seen: map[string]observation{}}
	defer w.bury()
	var first []byte
	breaking := false // another breaker's link was in the way
	for {
		b, err := os.ReadFile(l.path)
		if errors.Is(err, fs.ErrNotExist) {
			return false, "the lock is free", nil
		}
		if err != nil {
			return false, "", err
		}
		if first == nil {
			first = b
		} else if string(b) != string(first) {
			return false, "its holder renewed it or it changed hands: not stale", nil
		}
		h := parseHolder(b)
		self := l.opts.Processes.Self()
		// judge breaks a dead holder of this machine at once, and any
		// other, a live one of this machine included (stopped, stuck),
		// once it left the lock unchanged for the lease: what a waiter
		// does.
		stale, reason := w.judge(l.path, h, b)
		if stale {
			// breakStale links a private file: make one.
			nonce, err := l.newNonce()
			if err != nil {
				return false, "", err
			}
			rec, _ := json.Marshal(holder{Process: self, Nonce: nonce, Acquired: time.Now()})
			tmp := l.path + ".tmp-" + nonce
			if err := writeExcl(tmp, rec, l.opts.Perm, &l.modes); err != nil {
				return false, "", err
			}
			w.tmp, w.nonce = tmp, nonce
			err = w.breakStale(l.path, h, b, reason, 0)
			os.Remove(tmp)
			if err != nil {
				return false, "", err
			}
			cur, _ := os.ReadFile(l.path)
			if string(cur) != string(b) {
				return true, reason, nil
			}
			// Another breaker's link is in the way. It may be at it
			// now, or it may have died at it (a holder killed while
			// breaking leaves its link): watch that link as a waiter
			// would, and break it once it stayed for the lease.
			breaking = true
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			if breaking {
				return false, "another process is breaking it (its break link stayed while this watched)", nil
			}
			return false, "", fmt.Errorf("lock %s held by %s, watched unchanged for less than the lease (%s): %w", l.path, h.describe(), l.opts.Lease, err)
		}
	}
}
