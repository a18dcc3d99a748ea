package state

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"time"
)

// Fair waiting: the turn marker.
//
// A released lock goes to whoever links first. Waiters sleep between polls
// (backing off to maxPoll, so that they neither hammer a shared filesystem
// nor take the CPU from the holder), while the process that just released
// comes straight back and links at once; left alone, a waiter can lose many
// handoffs in a row (BENCHMARKS.md: p99 167 × p50). Polling faster for all
// waiters, or waking them all with inotify, cost 15–50 % of throughput.
//
// So one waiter at a time gets to poll fast, and the others stand back for
// it: a waiter that has waited TurnAfter links its own holder record (the
// same private file as its lock attempt) to the lock's name + ".turn". While
// a marker of another live waiter exists, every Lock call — newcomers, other
// waiters and the releaser alike — only looks at the lock instead of linking
// it (but see passWindow). The marker's owner polls at the pace its own
// attempts allow, takes the lock at the next release, and removes its
// marker.
//
// The marker grants nothing: the owner still has to win the link of the lock
// file itself, which stays the only mutual exclusion, and a process that
// ignores markers (an older binary) is merely unfair. A marker costs others
// a wait only while the lock is free, so it is judged by that: it is stale
// when its owner is a process of our machine that is gone, or when we saw
// the lock free, with the marker unchanged, for TurnGrace on our own clock
// (an owner on another host that died, or any owner that stalled). A stale
// marker is ignored by this Lock from then on and broken like a stale lock
// (through its own break link, with the same re-checks), so that a dead
// owner delays each waiter by at most TurnGrace once.

// turnSuffix names the marker beside the lock file.
const turnSuffix = ".turn"

// passWindow: a Lock call that comes within passWindow of this Lock's own
// release, and whose last hold was not itself taken that way, does not
// yield to a marker at its first attempt. A process often takes the lock
// twice back to back (a get and then its release): letting the pair
// through halves the handoffs, each of which leaves the lock idle until
// the marker's owner is scheduled, which on a loaded machine can take
// longer than a hold (paired runs: 11–13 % less throughput without the
// pass, none with it). The owner waits at most one more hold per process.
const passWindow = time.Millisecond

// Defaults of LockOptions.TurnAfter and TurnGrace. TurnAfter is a few holds
// of a busy cache on local disk: shorter waits are the common case and need
// no help. TurnGrace is far above a live owner's poll (a few ms even on
// sshfs), and far below the lease.
const (
	defaultTurnAfter = 10 * time.Millisecond
	defaultTurnGrace = 100 * time.Millisecond
)

// turn is one Lock call's view of the marker.
type turn struct {
	name string
	mine bool // the marker holds our nonce: we poll fast, others stand back
	// absent: the last look found no marker (so we may claim it).
	absent bool
	// seen is another's marker as we last read it, and freeSince when we
	// first saw the lock free while that marker stayed unchanged (zero
	// while the lock was last seen held).
	seen      []byte
	seenOwner holder
	freeSince time.Time
	// cost is how long our last attempt took: the marker's owner sleeps at
	// least that long between attempts, so that it never keeps a slow
	// shared filesystem busy more than half the time.
	cost time.Duration
	// holder and heldSince (wall time, for pacing only) are the lock's
	// content as last seen and when it first was.
	holder    []byte
	heldSince time.Time
}

// turnHook, nil outside tests, runs when this process has linked the marker
// and read it back (set through export_test.go): a test can count the
// handoffs from there on without timing anything.
var turnHook func(name string)

// attempt is one try for the lock at name, honouring the marker: it links
// unless another live waiter holds the marker, in which case it only reads
// the lock. It returns like tryLink. waited is how long this Lock call has
// waited so far, on our clock.
func (w *waiter) attempt(name string, waited time.Duration) (won bool, content []byte, err error) {
	start := time.Now() // the cost of an attempt is wall time, whatever Clock says
	defer func() { w.turn.cost = time.Since(start) }()

	yield := w.lookAtTurn()
	// The releaser may come straight back once past another's marker (see
	// passWindow); a newcomer never does.
	pass := yield && waited == 0 && !w.l.passed && time.Since(w.l.released) < passWindow
	if pass {
		yield = false
	}
	won, content, err = w.try(name, !yield)
	if won {
		w.l.passed = pass
	}
	if err != nil || won {
		return won, content, err
	}
	if content == nil || string(content) != string(w.turn.holder) {
		w.turn.holder, w.turn.heldSince = content, start
	}
	if yield {
		if content != nil {
			w.turn.freeSince = time.Time{}
			return false, content, nil
		}
		if !w.turnStale() {
			return false, nil, nil
		}
		// The marker's owner is gone or stalled: the lock is free now,
		// so try it at once rather than after another sleep.
		won, content, err = w.try(name, true)
		if won {
			w.l.passed = false
		}
		return won, content, err
	}
	if !w.turn.mine && w.turn.absent && waited >= w.l.opts.TurnAfter {
		w.claimTurn()
	}
	return false, content, nil
}

// lookAtTurn reads the marker and reports whether this attempt must leave
// the lock to its owner.
func (w *waiter) lookAtTurn() bool {
	b, err := readFile(w.turn.name)
	w.turn.absent = errors.Is(err, fs.ErrNotExist)
	if err != nil {
		// Absent, or unreadable: nothing to honour. The marker only ever
		// delays; it must not turn an I/O error into a failed Lock.
		w.turn.mine, w.turn.seen, w.turn.freeSince = false, nil, time.Time{}
		return false
	}
	h := parseHolder(b)
	if h.Nonce != "" && h.Nonce == w.nonce {
		w.turn.mine = true
		return false
	}
	// Another's: ours, if we had it, was broken by a waiter that judged us
	// stalled. We go on as an ordinary waiter.
	w.turn.mine = false
	if string(b) == w.l.staleTurn {
		return false
	}
	if string(b) != string(w.turn.seen) {
		w.turn.seen, w.turn.seenOwner, w.turn.freeSince = b, h, time.Time{}
	}
	return true
}

// turnStale judges the marker last read, given that the lock is free now,
// and breaks it if it is stale.
func (w *waiter) turnStale() bool {
	h, b := w.turn.seenOwner, w.turn.seen
	why := ""
	if _, ok := leftovers.Load(leftover{w.turn.name, h.Nonce}); ok && h.Nonce != "" {
		why = "marker released by this process, which could not remove it"
	} else if self := w.l.opts.Processes.Self(); h.Nonce != "" && self.SameMachine(h.Process) {
		alive, err := w.l.opts.Processes.Alive(h.Process)
		if err == nil && !alive {
			why = "marker owner is gone"
		}
	}
	if why == "" {
		now := w.l.opts.Clock.Now()
		if w.turn.freeSince.IsZero() {
			w.turn.freeSince = now
			return false
		}
		d := now.Sub(w.turn.freeSince)
		if d < w.l.opts.TurnGrace {
			return false
		}
		why = fmt.Sprintf("lock free for %s with the marker unchanged (grace %s)", d.Round(time.Millisecond), w.l.opts.TurnGrace)
	}
	// Ignored from now on, even if the break below is left to another
	// breaker or fails: this Lock must not pay the grace again for it.
	w.l.staleTurn = string(b)
	w.turn.seen, w.turn.freeSince = nil, time.Time{}
	if err := w.breakStale(w.turn.name, h, b, why, 0); err != nil {
		w.l.opts.Log.WithError(err).WithField("lock", w.turn.name).Info("breaking a stale turn marker")
	}
	return true
}

// claimTurn links our record to the marker's name. Losing is fine: someone
// else has the turn, and we honour it at the next attempt.
func (w *waiter) claimTurn() {
	// An EPERM race on the marker must not count against the lock's own
	// bound on EPERMs (see maxEPERM).
	eperm := w.eperm
	won, _, err := w.try(w.turn.name, true)
	w.eperm = eperm
	if err != nil {
		w.l.opts.Log.WithError(err).WithField("lock", w.turn.name).Debug("cannot leave a turn marker")
		return
	}
	if won {
		w.turn.mine = true
		if turnHook != nil {
			turnHook(w.turn.name)
		}
	}
}

// dropTurn removes our marker, once we hold the lock or gave up waiting.
func (w *waiter) dropTurn() {
	if !w.turn.mine {
		return
	}
	w.turn.mine = false
	// Not tried again as the lock is: the holder (after a win) would wait,
	// and a marker left behind is ignored and broken by the next waiter
	// (turnStale).
	if err := w.l.recordLeft(w.turn.name, w.nonce, w.l.releaseOnce(w.turn.name, w.nonce)); err != nil && !errors.Is(err, ErrLockLost) {
		w.l.opts.Log.WithError(err).WithField("lock", w.turn.name).Debug("removing our turn marker")
	}
}

// pause sleeps between attempts. The marker's owner polls as fast as its
// own attempts allow (at most half the time busy, so that a slow shared
// filesystem is not flooded), and less often the longer the holder has
// held, down to the pace of any other waiter, so that a lock held for hours
// (`depcache lock`) does not keep it busy. Everyone else backs off as
// before.
func (w *waiter) pause(ctx context.Context, backoff time.Duration, wait waitFunc) error {
	d := w.l.jitter(backoff)
	if w.turn.mine {
		held := time.Since(w.turn.heldSince) / 8
		d = w.l.jitter(min(maxPoll, max(minPoll, w.turn.cost, held)))
	}
	if wait == nil {
		return sleep(ctx, d)
	}
	answered, err := wait(ctx, d)
	if err == nil && answered {
		return errAnswered
	}
	return err
}
