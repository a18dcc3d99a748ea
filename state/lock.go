package state

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// Clock is this process's monotonic clock. Readings are compared only with
// other readings of the same clock, never with a time written by another
// host.
type Clock interface {
	Now() time.Time
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

// RealClock returns the clock production code uses.
func RealClock() Clock { return realClock{} }

// LockOptions configures a [Lock]. Zero fields take the defaults.
type LockOptions struct {
	// Lease is how long a lock held from another host or pid namespace must
	// stay unchanged, on our clock, before it is judged stale. It must be far
	// longer than any hold. Default 30s.
	Lease time.Duration
	// WarnAfter is how long a wait goes on before it is logged with the
	// holder's identity, and then again every WarnAfter. Default 5s.
	WarnAfter time.Duration
	// Perm is the permission of the lock file. Default 0644.
	Perm fs.FileMode
	// Processes tells who we are and whether a local holder is alive.
	// Default: System().
	Processes Processes
	// Clock is our monotonic clock. Default: time.Now.
	Clock Clock
	// Rand is the source of nonces. Default: crypto/rand.
	Rand io.Reader
	// Log receives the wait and break messages. Default: logrus's standard
	// logger.
	Log logrus.FieldLogger
	// TurnAfter is how long a wait goes on before the waiter leaves the turn
	// marker that others honour (see lockfair.go). Default 10ms.
	TurnAfter time.Duration
	// TurnGrace is how long the lock may be seen free while another's turn
	// marker stays unchanged before the marker is judged stale and broken.
	// Default 100ms.
	TurnGrace time.Duration
	// What names the lock in messages ("waiting for the ..."). Default
	// "state lock".
	What string
}

// Lock is a mutual-exclusion lock on a file name, safe between goroutines,
// processes, pid namespaces and hosts that share the directory over NFS or a
// weaker filesystem such as sshfs.
//
// Acquiring links a private file holding our identity and a random nonce to
// the lock name; link(2) fails with EEXIST when the name is taken, atomically
// on the server. Success is confirmed by reading our nonce back, never by
// link counts or inode numbers (sshfs gets both wrong), and an EEXIST whose
// content is our nonce is a success whose reply was lost.
//
// A holder on our machine (same boot and pid namespace) whose process is
// gone is broken at once. Any other holder is broken only after the lock's
// content stayed unchanged for the lease on our own clock. Breaking goes
// through a second lock named after the stale nonce, so of two waiters that
// judge the same holder stale only one breaks it, and neither can remove a
// lock taken after it.
type Lock struct {
	path  string
	opts  LockOptions
	mu    chan struct{} // in-process mutex: link() cannot tell our goroutines apart
	nonce string        // the nonce of the current hold; guarded by mu
	// staleTurn is the content of a turn marker judged stale, ignored by
	// later calls too; guarded by mu.
	staleTurn string
	// passed says the last hold was taken past another's marker, and
	// released when it ended (wall time, for pacing only); guarded by mu.
	passed   bool
	released time.Time
	modes    modeCheck // of the files it creates
}

// maxBreakDepth bounds the recursion when breakers themselves die while
// breaking; beyond it an operator must look (doctor --break-lock).
const maxBreakDepth = 3

// holder is the content of a lock file.
type holder struct {
	Process
	Nonce string `json:"nonce"`
	// Acquired is the holder's wall clock, shown to humans only.
	Acquired time.Time `json:"acquired"`
}

// NewLock returns a lock on the file at path. It does not touch the disk.
func NewLock(path string, opts LockOptions) (*Lock, error) {
	if opts.Lease <= 0 {
		opts.Lease = 30 * time.Second
	}
	if opts.WarnAfter <= 0 {
		opts.WarnAfter = 5 * time.Second
	}
	if opts.Perm == 0 {
		opts.Perm = 0o644
	}
	if opts.Processes == nil {
		p, err := System()
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		opts.Processes = p
	}
	if opts.Clock == nil {
		opts.Clock = realClock{}
	}
	if opts.Rand == nil {
		opts.Rand = rand.Reader
	}
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	if opts.TurnAfter <= 0 {
		opts.TurnAfter = defaultTurnAfter
	}
	if opts.TurnGrace <= 0 {
		opts.TurnGrace = defaultTurnGrace
	}
	return &Lock{path: path, opts: opts, mu: make(chan struct{}, 1)}, nil
}

// Path returns the lock file's name.
func (l *Lock) Path() string { return l.path }

// Lock blocks until the lock is held or ctx is done. On success it returns
// the function that releases the lock; that function reports [ErrLockLost] if
// the lock was broken meanwhile. On ctx's end the error wraps ctx.Err() and
// names the holder.
func (l *Lock) Lock(ctx context.Context) (unlock func() error, err error) {
	return l.lockOr(ctx, nil)
}

// waitFunc sleeps between lock attempts, for up to d, unless something
// else makes the lock unneeded first (answered: a holder applied the
// caller's proposal; see combine.go).
type waitFunc func(ctx context.Context, d time.Duration) (answered bool, err error)

// errAnswered ends a Lock whose waitFunc reported an answer.
var errAnswered = errors.New("state: answered while waiting for the lock")

// lockOr is Lock whose waits between attempts go through wait (nil: plain
// sleeps). It returns errAnswered, unwrapped, when wait reports an answer.
func (l *Lock) lockOr(ctx context.Context, wait waitFunc) (unlock func() error, err error) {
	if err := l.lockHere(ctx, wait); err != nil {
		return nil, err
	}
	unlock, err = l.lock(ctx, wait)
	if err != nil {
		<-l.mu
		return nil, err
	}
	return unlock, nil
}

// lockHere takes the in-process mutex. With a wait, it polls the mutex
// and waits through wait between polls, so that a caller queued behind
// another goroutine of its process (a manager's pass, waiting for the
// lock itself) can be answered meanwhile too.
func (l *Lock) lockHere(ctx context.Context, wait waitFunc) error {
	if wait == nil {
		select {
		case l.mu <- struct{}{}:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("lock %s: waiting for another goroutine of this process: %w", l.path, ctx.Err())
		}
	}
	for delay := minPoll; ; delay = min(delay*2, maxHerePoll) {
		select {
		case l.mu <- struct{}{}:
			return nil
		default:
		}
		answered, err := wait(ctx, delay)
		switch {
		case err != nil:
			return fmt.Errorf("lock %s: waiting for another goroutine of this process: %w", l.path, err)
		case answered:
			return errAnswered
		}
	}
}

// maxHerePoll bounds the polls of the in-process mutex: a goroutine of
// this process releases it without a word, and it costs no I/O to look.
const maxHerePoll = 2 * time.Millisecond

func (l *Lock) lock(ctx context.Context, wait waitFunc) (func() error, error) {
	nonce, err := l.newNonce()
	if err != nil {
		return nil, err
	}
	rec, err := json.Marshal(holder{Process: l.opts.Processes.Self(), Nonce: nonce, Acquired: time.Now()})
	if err != nil {
		return nil, err
	}
	tmp := l.path + ".tmp-" + nonce
	if err := writeExcl(tmp, rec, l.opts.Perm, &l.modes); err != nil {
		return nil, fmt.Errorf("lock %s: %w", l.path, err)
	}
	defer os.Remove(tmp)

	w := waiter{l: l, tmp: tmp, nonce: nonce, seen: map[string]observation{}, turn: turn{name: l.path + turnSuffix}}
	defer w.bury()
	defer w.dropTurn() // gave up (won: dropped already)
	start := l.opts.Clock.Now()
	nextWarn := start.Add(l.opts.WarnAfter)
	delay := minPoll
	waited := time.Duration(0)
	for {
		won, content, err := w.attempt(l.path, waited)
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w", l.path, err)
		}
		if won {
			w.dropTurn()
			l.nonce = nonce
			return l.unlockOnce(), nil
		}
		if content != nil {
			h := parseHolder(content)
			stale, why := w.judge(l.path, h, content)
			if o := w.seen[l.path]; h.Nonce == "" && !stale && (!w.toldUnreadable || w.unreadable != o.content) && l.opts.Clock.Now().Sub(o.since) >= unreadableAfter {
				// Told long before the lease's end: nothing else would say
				// why every writer waits.
				w.unreadable, w.toldUnreadable = o.content, true
				l.opts.Log.WithFields(logrus.Fields{"lock": l.path, "bytes": len(content), "begins": string(content[:min(len(content), 40)])}).
					Warnf("the %s does not parse as a holder record (damaged, or not written by depcache): nobody can tell whether its writer lives, so it is broken only once it stays unchanged for the lease (%s)", l.what(), l.opts.Lease)
			}
			if stale {
				if err := w.breakStale(l.path, h, content, why, 0); err != nil {
					return nil, fmt.Errorf("lock %s: breaking stale lock: %w", l.path, err)
				}
				// Broken, or left to a live breaker, or changed meanwhile:
				// try again soon, but through the sleep, which also
				// honours ctx. A plain continue spun at full speed, deaf to
				// ctx, while another breaker held the break link.
				delay = minPoll
			}
			if now := l.opts.Clock.Now(); !stale && now.After(nextWarn) {
				nextWarn = now.Add(l.opts.WarnAfter)
				log := l.logHolder(h, w.seen[l.path], now).WithField("waited", now.Sub(start).Round(time.Millisecond))
				if slowHold(now, start, w.seen[l.path], l.opts) {
					log.Warn("waiting for the " + l.what())
				} else {
					log.Info("waiting for the " + l.what() + " behind other holders")
				}
			}
		}
		if err := w.pause(ctx, delay, wait); err != nil {
			if err == errAnswered {
				return nil, err
			}
			if content == nil {
				// Free at the last look: what kept us was another's turn.
				if w.turn.seen != nil {
					return nil, fmt.Errorf("lock %s free, but standing back for the turn of %s (its marker %s): %w",
						l.path, w.turn.seenOwner.describe(), w.turn.name, err)
				}
				return nil, fmt.Errorf("lock %s: %w", l.path, err)
			}
			h := parseHolder(content)
			return nil, fmt.Errorf("lock %s held by %s (acquired %s by its clock, unchanged for %s by ours): %w",
				l.path, h.describe(), h.Acquired.Format(time.RFC3339), l.opts.Clock.Now().Sub(w.seen[l.path].since).Round(time.Millisecond), err)
		}
		delay = min(delay*2, maxPoll)
		waited = l.opts.Clock.Now().Sub(start)
	}
}

// slowHold says whether a wait is worth a warning: one holder kept the
// lock unchanged for WarnAfter (a hold that long is stuck or starved), or
// the wait outlasted a lease. A wait as long behind a queue of short holds
// that keep changing is load, not a fault: on a shared filesystem beside a
// busy host it happens every few thousand operations, and a warning for it
// would teach operators to ignore the one that matters.
func slowHold(now, start time.Time, o observation, opts LockOptions) bool {
	return now.Sub(o.since) >= opts.WarnAfter || now.Sub(start) >= opts.Lease
}

// Polling bounds: short enough that a released lock is noticed within a few
// milliseconds locally, long enough that waiters do not hammer a shared
// filesystem.
const (
	minPoll = 200 * time.Microsecond
	maxPoll = 10 * time.Millisecond
)

func (l *Lock) unlockOnce() func() error {
	done := false
	return func() error {
		if done {
			return fmt.Errorf("lock %s: unlocked twice", l.path)
		}
		done = true
		defer func() { <-l.mu }()
		err := l.releaseDead(l.path, l.nonce)
		l.nonce = ""
		l.released = time.Now()
		return err
	}
}

// Check reports whether the lock is still ours. The caller must hold it.
// Store.Update calls it right before committing.
func (l *Lock) Check() error {
	b, err := readOwn(l.path, l.nonce, l.opts.Lease)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("lock %s vanished: %w", l.path, ErrLockLost)
		}
		return fmt.Errorf("lock %s: %w", l.path, err)
	}
	if h := parseHolder(b); h.Nonce != l.nonce {
		return fmt.Errorf("lock %s now held by %s: %w", l.path, h.describe(), ErrLockLost)
	}
	return nil
}

// release removes name if it still holds nonce. A remove that fails (an
// NFS server's EIO, say) is tried again after removeRetries: a lock left in
// place makes every other process of the root wait out a lease for it.
// Each try reads the name again first, and one that finds it gone, or
// another's, ends the release as done: the failed remove may have gone
// through with only its reply lost, and a later holder's lock is never
// removed. A try whose read fails leaves the lock as the failed remove
// did, as far as anyone can tell: the release stays a failed remove.
func (l *Lock) release(name, nonce string) error {
	err := l.releaseOnce(name, nonce)
	removeErr := err // the last failed remove, which a failed read leaves standing
	for _, d := range removeRetries {
		if !isRemoveError(err) {
			break
		}
		time.Sleep(d)
		switch next := l.releaseOnce(name, nonce); {
		case errors.Is(next, ErrLockLost):
			return nil
		case next == nil || isRemoveError(next):
			err, removeErr = next, next
		default:
			err = fmt.Errorf("%w (reading it again: %v)", removeErr, next)
		}
	}
	return err
}

// removeRetries are the pauses before release tries a failed remove again.
var removeRetries = []time.Duration{10 * time.Millisecond, 100 * time.Millisecond}

// removeError is a release whose remove of the lock failed: the lock may
// still be there, with our nonce in it (or the reply alone was lost).
type removeError struct{ err error }

func (e *removeError) Error() string { return e.err.Error() }
func (e *removeError) Unwrap() error { return e.err }

// isRemoveError reports whether err is, or wraps, a failed remove.
func isRemoveError(err error) bool {
	var rerr *removeError
	return errors.As(err, &rerr)
}

// lockRemoveHook, nil outside tests, stands in for the remove of a
// released lock (export_test.go): a test cannot make unlink(2) fail on a
// file its own process just made, not as root.
var lockRemoveHook func(name string) error

func (l *Lock) releaseOnce(name, nonce string) error {
	b, err := readOwn(name, nonce, l.opts.Lease)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lock %s vanished while held: %w", name, ErrLockLost)
	}
	if err != nil {
		return fmt.Errorf("lock %s: %w", name, err)
	}
	if h := parseHolder(b); h.Nonce != nonce {
		return fmt.Errorf("lock %s taken over by %s while held: %w", name, h.describe(), ErrLockLost)
	}
	remove := os.Remove
	if lockRemoveHook != nil {
		remove = lockRemoveHook
	}
	if err := remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lock %s: %w", name, &removeError{err})
	}
	return nil
}

// releaseDead is release for a nonce that is never linked to name again,
// as that of a hold that ends: a lock it leaves behind, its remove having
// failed, is recorded in leftovers.
func (l *Lock) releaseDead(name, nonce string) error {
	return l.recordLeft(name, nonce, l.release(name, nonce))
}

// recordLeft records name and nonce in leftovers when err is a failed
// remove, and returns err.
func (l *Lock) recordLeft(name, nonce string, err error) error {
	if isRemoveError(err) {
		leftovers.Store(leftover{name, nonce}, struct{}{})
	}
	return err
}

// leftovers are the lock files this process released but could not
// remove, by name and nonce. Their holds are over and their nonces never
// linked to those names again, so a waiter of this process that finds one
// breaks it at once, where it would wait out a lease for a live holder
// that is its own process (a second Store on the same root included).
// Other processes of this machine break it once this one has exited, or
// after the lease.
var leftovers sync.Map

type leftover struct{ name, nonce string }

// leave records, for a release of the waiter's nonce that failed, the
// name left behind. bury moves them to leftovers once the nonce is dead:
// within a Lock call, the waiter may link the same break link again.
func (w *waiter) leave(name string, err error) {
	if isRemoveError(err) {
		w.left = append(w.left, leftover{name, w.nonce})
	}
}

func (w *waiter) bury() {
	for _, k := range w.left {
		leftovers.Store(k, struct{}{})
	}
	w.left = nil
}

// readHeld reads a lock that its holder checks or releases. A content
// that does not parse as a holder is read again, spaced as the state
// file's rereads are (rereadDelays), before it is returned: a lock name
// always points to a whole record (it is linked to a file written in
// full), but on sshfs the first read after the name was linked to a file
// of another size may be cut to the old size, or run on into the old
// file's cached pages. Taken at its word, such a read made the holder
// report its lock lost and leave it in place: every process of the root
// then waited for the lease to run out (30 s) before breaking it. The
// rereads end by deadline (see readOwn).
func readHeld(name string, deadline time.Time) ([]byte, error) {
	var b []byte
	var err error
	for i, d := range rereadDelays {
		if i > 0 && time.Now().Add(d).After(deadline) {
			break
		}
		time.Sleep(d)
		b, err = readFile(name)
		if err == nil && lockReadHook != nil {
			b = lockReadHook(name, b)
		}
		if err != nil || parseHolder(b).Nonce != "" {
			break
		}
	}
	return b, err
}

// readOwn is readHeld for a lock we hold with nonce. A name found missing
// may be only in a breaker's hands: one that judged the holder before us
// stale and moved the name aside (NAME.stale-ID, ID the stale holder's)
// just after we took it, in the gap between its re-read and its rename,
// links it back at once when it reads that the content it moved is ours,
// and only then removes the aside name and its break link. So while an
// aside name of another ID holds our nonce and that breaker's break link
// is still there, we wait for the return instead of reporting the lock
// lost, for at most restoreWait. An aside named after our own nonce means
// that we were the holder judged stale: lost. So is one whose breaker is
// gone without linking it back: the name was free meanwhile, another may
// have held it, and linking it back ourselves could undo that holder's
// work.
//
// The wait for a breaker, the rereads of a cut record (readHeld) and those
// of another holder's record (readOwnAgain) all end within a quarter of
// the lease as well (and within restoreWait): a holder that
// waits longer than its lease without changing its lock is judged stale
// by the others, and a wait meant to spare it a false "lost" would then
// make it a true one, with its work still running beside the next
// holder's.
func readOwn(name, nonce string, lease time.Duration) ([]byte, error) {
	budget := min(restoreWait, lease/4)
	deadline := time.Now().Add(budget)
	for {
		b, err := readHeld(name, deadline)
		if err == nil && parseHolder(b).Nonce != nonce {
			return readOwnAgain(name, nonce, b, deadline), nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return b, err
		}
		if vanishedHook != nil {
			vanishedHook(name)
		}
		breaker := asideHolding(name, nonce)
		if breaker == "" || time.Now().After(deadline) {
			// The breaker links the name back before it removes the
			// aside name: read once more after finding none.
			return readHeld(name, deadline)
		}
		if _, err := os.Lstat(breaker); err != nil {
			return readHeld(name, deadline) // its breaker is gone without linking it back
		}
		time.Sleep(maxPoll)
	}
}

// readOwnAgain reads the lock at name again, spaced as the state file's
// rereads are and until deadline, when a holder found another holder's
// record b there: it returns the first read that shows nonce, else the
// last. A hold is taken over only by a breaker that waited out a whole
// lease, so a holder that checks within its hold and finds another's
// record has most likely read stale bytes: on sshfs, a read of the lock name just after it was linked
// to our file once returned the previous holder's record, which has the
// same size. Taken at its word, the holder reported its lock lost and left
// it in place, and every process of the root waited the lease (30 s)
// before breaking it. A real takeover is reported a few seconds late.
func readOwnAgain(name, nonce string, b []byte, deadline time.Time) []byte {
	for _, d := range rereadDelays[1:] {
		if time.Now().Add(d).After(deadline) {
			return b
		}
		time.Sleep(d)
		again, err := readHeld(name, deadline)
		if err != nil {
			return b
		}
		if b = again; parseHolder(b).Nonce == nonce {
			return b
		}
	}
	return b
}

// restoreWait bounds how long a holder waits for a breaker to link back a
// lock it moved aside by mistake: far longer than the few system calls
// between the breaker's rename and its link, even on sshfs.
const restoreWait = 5 * time.Second

// asideHolding returns the break link of a breaker that moved aside, by
// mistake, a lock holding nonce (one judging another holder stale), or ""
// if there is no such aside name.
func asideHolding(name, nonce string) string {
	dir, base := filepath.Split(name)
	if dir == "" {
		dir = "."
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return ""
	}
	for _, e := range ents {
		id, ok := strings.CutPrefix(e.Name(), base+".stale-")
		if !ok || id == nonce {
			continue // ours: we were the one judged stale
		}
		if b, err := os.ReadFile(filepath.Join(dir, e.Name())); err == nil && parseHolder(b).Nonce == nonce {
			return name + ".break-" + id
		}
	}
	return ""
}

// vanishedHook, nil outside tests (set through export_test.go), runs each
// time a holder finds its lock's name missing.
var vanishedHook func(name string)

// lockReadHook, nil outside tests (set through export_test.go), stands
// for the filesystem in readHeld: it returns what a read of name that
// found b gives.
var lockReadHook func(name string, b []byte) []byte

// waiter is the state of one Lock call: our nonce and the lock contents we
// have seen, with when we first saw each on our clock, and the turn marker.
type waiter struct {
	l     *Lock
	tmp   string
	nonce string
	seen  map[string]observation
	eperm int
	turn  turn
	// unreadable is the lock content that did not parse, once told
	// (toldUnreadable: an empty file is content too).
	unreadable     string
	toldUnreadable bool
	// left are the names whose release with nonce failed (see bury).
	left []leftover
	// alive is the holder record last found alive on this machine, and
	// when (see aliveRecheck).
	alive        string
	aliveChecked time.Time
}

// aliveRecheck is how long a waiter takes a holder of this machine that it
// found alive for alive still, without reading /proc again. A waiter polls
// every 0.2 ms at first, and the kernel's rendering of /proc/PID/stat was
// the largest part of each poll; a holder killed meanwhile is broken at
// most this and one poll later. It is wall time, not Clock's: a test's
// clock that stands still must not stop a waiter from looking again.
const aliveRecheck = 2 * time.Millisecond

// unreadableAfter is how long a lock's content must stay unparseable
// before a waiter says so: on sshfs a read can come back cut for a moment.
const unreadableAfter = time.Second

// maxEPERM bounds how often a link may fail with EPERM while the name does
// not exist before the EPERM is taken for a real permission error.
const maxEPERM = 100

// LinkExists reports whether err from link(2) means that the new name may
// already exist. sshfs reports EEXIST only when the kernel already knew the
// name; when the server finds it, the SFTP status carries no errno and sshfs
// answers EPERM, so EPERM is "maybe exists" there, to be settled by reading
// the name.
func LinkExists(err error) bool {
	return errors.Is(err, fs.ErrExist) || errors.Is(err, syscall.EPERM)
}

type observation struct {
	content string
	since   time.Time
}

// tryLink tries to take name. It returns won, or the current content of the
// lock (nil when the name vanished between the link and the read: retry).
func (w *waiter) tryLink(name string) (won bool, content []byte, err error) {
	return w.try(name, true)
}

// try is tryLink, or with link false only its read: a waiter that leaves
// the lock to the turn marker's owner still watches the holder, to judge it
// and to see the lock free.
func (w *waiter) try(name string, link bool) (won bool, content []byte, err error) {
	if link {
		err = os.Link(w.tmp, name)
	}
	if err != nil && !LinkExists(err) {
		return false, nil, err
	}
	// Read back in both cases: after success to confirm (the name may have
	// been broken at once by someone judging an earlier holder), after
	// EEXIST because a lost reply makes a successful link look failed.
	// Opening also refreshes a stale name that sshfs still caches.
	b, rerr := readFile(name)
	if errors.Is(rerr, fs.ErrNotExist) {
		if errors.Is(err, syscall.EPERM) {
			// EPERM with no file: either a race with a release, or a real
			// permission problem; do not spin on the latter forever.
			w.eperm++
			if w.eperm > maxEPERM {
				return false, nil, err
			}
		}
		return false, nil, nil
	}
	if rerr != nil {
		return false, nil, rerr
	}
	if parseHolder(b).Nonce == w.nonce {
		return true, nil, nil
	}
	return false, b, nil
}

// judge decides whether the holder recorded in content is stale.
func (w *waiter) judge(name string, h holder, content []byte) (bool, string) {
	if _, ok := leftovers.Load(leftover{name, h.Nonce}); ok && h.Nonce != "" {
		return true, "released by this process, which could not remove it"
	}
	self := w.l.opts.Processes.Self()
	if h.Nonce != "" && self.SameMachine(h.Process) && (w.alive != string(content) || time.Since(w.aliveChecked) >= aliveRecheck) {
		alive, err := w.l.opts.Processes.Alive(h.Process)
		if err != nil {
			w.l.opts.Log.WithError(err).WithField("lock", name).Warn("cannot tell whether the lock holder is alive")
			return false, ""
		}
		if !alive {
			return true, "holder process is gone"
		}
		w.alive, w.aliveChecked = string(content), time.Now()
		// Alive here, it is judged as another host would judge it: one
		// stopped (SIGSTOP) or stuck past the lease would otherwise block
		// every process of this host while other hosts break it. The
		// fence at its commit stops it from writing if it resumes.
	}
	now := w.l.opts.Clock.Now()
	o, ok := w.seen[name]
	if !ok || o.content != string(content) {
		w.seen[name] = observation{content: string(content), since: now}
		return false, ""
	}
	if d := now.Sub(o.since); d >= w.l.opts.Lease {
		return true, fmt.Sprintf("unchanged for %s (lease %s)", d.Round(time.Millisecond), w.l.opts.Lease)
	}
	return false, ""
}

// Test seams, nil outside tests (set through export_test.go). What another
// process does in the gaps of breakStale decides which re-check runs, and a
// test cannot hit a gap of microseconds by timing: breakWonHook runs after
// the break link is won and before the lock is re-read, breakRenameHook
// after the re-read matched and before the rename.
// breakAsideHook runs after the rename, before the breaker reads back what
// it moved.
var breakWonHook, breakRenameHook, breakAsideHook func(name string)

// breakStale removes the lock at name whose content we judged stale. Only
// the winner of the link on name+".break-"+ID(content) may do it, so two
// waiters that judged the same holder never both break; and the winner
// breaks only if the lock still has that content.
func (w *waiter) breakStale(name string, h holder, content []byte, why string, depth int) error {
	id := h.Nonce
	if !isHex(id) {
		sum := sha256.Sum256(content)
		id = hex.EncodeToString(sum[:8])
	}
	breaker := name + ".break-" + id
	won, bcontent, err := w.tryLink(breaker)
	if err != nil {
		return err
	}
	if !won {
		if bcontent == nil {
			return nil
		}
		// Someone else is breaking it. If that breaker died at it, break
		// the breaker.
		bh := parseHolder(bcontent)
		if stale, bwhy := w.judge(breaker, bh, bcontent); stale && depth < maxBreakDepth {
			return w.breakStale(breaker, bh, bcontent, bwhy, depth+1)
		}
		return nil
	}
	defer func() {
		if err := w.l.release(breaker, w.nonce); err != nil {
			w.leave(breaker, err)
			w.l.opts.Log.WithError(err).WithField("lock", breaker).Warn("releasing the breaker lock")
		}
	}()

	if breakWonHook != nil {
		breakWonHook(name)
	}
	cur, err := readFile(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !bytes.Equal(cur, content) {
		return nil // it changed: someone else broke or released it
	}
	if breakRenameHook != nil {
		breakRenameHook(name)
	}
	aside := name + ".stale-" + id
	if err := os.Rename(name, aside); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	if breakAsideHook != nil {
		breakAsideHook(name)
	}
	got, err := readFile(aside)
	if err == nil && !bytes.Equal(got, content) {
		// Only a stale holder that resumed and released between our read and
		// the rename can get us here; give the new holder its lock back.
		if lerr := os.Link(aside, name); lerr != nil {
			w.l.opts.Log.WithError(lerr).WithField("lock", name).Error("removed a live lock while breaking a stale one and could not restore it")
		}
	}
	_ = os.Remove(aside)
	leftovers.Delete(leftover{name, h.Nonce})
	if name == w.turn.name {
		// A marker grants nothing: breaking one is routine, not a warning.
		w.l.logHolder(h, w.seen[name], w.l.opts.Clock.Now()).WithField("reason", why).Info("broke a stale turn marker")
		return nil
	}
	w.l.logHolder(h, w.seen[name], w.l.opts.Clock.Now()).WithField("reason", why).Warn("broke a stale lock")
	return nil
}

// what names the lock in messages.
func (l *Lock) what() string { return cmp.Or(l.opts.What, "state lock") }

func (l *Lock) logHolder(h holder, o observation, now time.Time) logrus.FieldLogger {
	f := logrus.Fields{"lock": l.path, "holder_host": h.Host, "holder_pid": h.PID,
		"holder_acquired": h.Acquired.Format(time.RFC3339Nano)}
	if !o.since.IsZero() {
		f["unchanged_for"] = now.Sub(o.since).Round(time.Millisecond)
	}
	return l.opts.Log.WithFields(f)
}

// parseHolder decodes a holder record; an unreadable one gives the zero
// holder. The last few records decoded are kept: a waiter reads the same
// ones (the lock's, the turn marker's) on every poll until the hold ends,
// and decoding them each time was a tenth of the waiters' CPU.
func parseHolder(b []byte) holder {
	for i := range parsedHolders {
		if last := parsedHolders[i].Load(); last != nil && last.content == string(b) {
			return last.h
		}
	}
	var h holder
	if json.Unmarshal(b, &h) != nil || !isHex(h.Nonce) {
		h = holder{}
	}
	slot := nextParsed.Add(1) % uint32(len(parsedHolders))
	parsedHolders[slot].Store(&parsedHolder{content: string(b), h: h})
	return h
}

// parsedHolder is a holder record and what parseHolder made of it,
// immutable once stored.
type parsedHolder struct {
	content string
	h       holder
}

// parsedHolders are the records parseHolder decoded last, replaced in turn:
// enough for a lock, its marker and a break link, or a few locks waited on
// at once.
var (
	parsedHolders [4]atomic.Pointer[parsedHolder]
	nextParsed    atomic.Uint32
)

func (h holder) describe() string {
	if h.Nonce == "" {
		return "an unreadable holder"
	}
	return h.Process.String()
}

func (l *Lock) newNonce() (string, error) {
	b := make([]byte, 16)
	if _, err := io.ReadFull(l.opts.Rand, b); err != nil {
		return "", fmt.Errorf("nonce: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// jitter spreads waiters so that they do not poll in step.
func (l *Lock) jitter(d time.Duration) time.Duration {
	n, err := rand.Int(l.opts.Rand, big.NewInt(int64(d)))
	if err != nil {
		return d
	}
	return d/2 + time.Duration(n.Int64())/2
}

func isHex(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// writeExcl creates the file name holding data, with the mode perm past
// the umask (a shared root's group must read it), as modes says.
func writeExcl(name string, data []byte, perm fs.FileMode, modes *modeCheck) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if err := modes.give(f, perm); err != nil {
		f.Close()
		os.Remove(name)
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(name)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(name)
		return err
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
