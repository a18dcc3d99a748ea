package state

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"time"
)

// Backend is everything a manager needs from a state store. The file store
// in the cache root ([Store], from [Open]) is one; a store on etcd is
// another. Every implementation passes the conformance suite in
// state/storetest.
//
// Contracts, for every read-modify-write (Update, UpdateBatched,
// UpdateEntries, Reset):
//
//   - fn may run more than once (a compare-and-swap store retries it on a
//     conflict), and does no I/O and no blocking: file moves that go with a
//     commit happen before it (publish renames, then commits) or after it
//     (eviction commits, then renames). Per-generation paths make both
//     orders safe.
//   - An error from fn, or changed == false, leaves the state unchanged and
//     writes nothing.
//   - Every commit is fenced: it applies only to the state fn saw. A writer
//     that lost its right to commit (a lost lock, a conflicting revision)
//     commits nothing and returns an error.
//   - Entries handed out (by View, and to fn) are shared with the store's
//     cache and with other callers: never change one in place; put a
//     modified Clone.
//   - A state that cannot be read or parsed is an error wrapping
//     [ErrCorrupt] (or [ErrUnsupportedVersion]): fn is not called, and
//     nothing is deleted.
type Backend interface {
	// View returns a consistent snapshot of the whole state, possibly
	// already outdated.
	View(ctx context.Context) (*State, error)
	// Update is a read-modify-write of the whole state: sweeps,
	// reconcile, verify, lease renewal.
	Update(ctx context.Context, fn func(*State) (changed bool, err error)) error
	// UpdateBatched is Update with group commit: concurrent callers of one
	// process may be applied, in order, in one commit. fn must leave the
	// state unchanged when it returns an error (the pure transitions do):
	// the others of its batch still commit.
	UpdateBatched(ctx context.Context, fn func(*State) (changed bool, err error)) error
	// UpdateEntries is a read-modify-write of the named entries (by key
	// ID) and the header: the hot path of Get, Release, owner reports and
	// publish. fn sees only those entries; its cost need not grow with the
	// number of entries in the store. It is group-committed like
	// UpdateBatched.
	UpdateEntries(ctx context.Context, ids []string, fn func(*Txn) (changed bool, err error)) error
	// Reset replaces the state with what fn builds, even when the current
	// one cannot be read: doctor --rebuild. fn gets an empty state to fill
	// and the last state that parses, or the part of it that still reads
	// (nil if none: see Replaced). Nothing that held the old state is
	// deleted.
	Reset(ctx context.Context, fn func(st, last *State) error) (Replaced, error)
	// Exists reports whether a state was ever committed here (a missing
	// state beside published content means the state was lost).
	Exists(ctx context.Context) (bool, error)
	// String names the store for messages: "state file /root/state.json".
	String() string
}

// Inspector is the optional interface of a Backend with checks and repairs
// of its own, which doctor runs: the file store's lock, its holder, and the
// litter of interrupted lock attempts.
type Inspector interface {
	// Checks reports on the store; it writes nothing.
	Checks(ctx context.Context) []Check
	// Holder describes who holds the store's lock now, "" if nobody.
	Holder() string
	// BreakHolder breaks the lock if its holder is still holder (what an
	// operator was shown) and is stale as a waiter judges it: a dead
	// process of this machine at once, another host's holder once its
	// lock stayed unchanged for the lease (so this may watch for that
	// long). A holder it will not break is an error wrapping ErrLockHeld.
	BreakHolder(ctx context.Context, holder string) error
}

// Prober is the optional interface of a Backend with checks that must
// write to look (a probe file): doctor runs them only when asked.
type Prober interface {
	Probe(ctx context.Context) []Check
}

// Check is one finding of an Inspector.
type Check struct {
	Name   string `json:"name"`
	Status string `json:"status"` // ok, warn or fail
	Detail string `json:"detail"`
}

// Txn is what an UpdateEntries callback sees: the header and the entries it
// named. Its writes are applied only when the callback returns changed and
// no error, so that an error leaves the state unchanged whatever the
// callback did before it. Reaching for an entry it did not name is a bug in
// the caller, and panics: a store that fetched only the named entries would
// not have it.
type Txn struct {
	st     *State
	named  []string          // sorted
	writes map[string]*Entry // key ID -> entry put, or nil: deleted
}

// newTxn returns a Txn over st restricted to ids.
func newTxn(st *State, ids []string) *Txn {
	named := slices.Clone(ids)
	slices.Sort(named)
	return &Txn{st: st, named: slices.Compact(named)}
}

func (t *Txn) check(id string) {
	if _, ok := slices.BinarySearch(t.named, id); !ok {
		panic(fmt.Sprintf("state: entry %s was not named in this UpdateEntries (named: %v)", id, t.named))
	}
}

// Get returns the entry for k, or nil. k must be named.
func (t *Txn) Get(k Key) *Entry {
	id := k.ID()
	t.check(id)
	if e, ok := t.writes[id]; ok {
		return e
	}
	return t.st.Entries[id]
}

// Put stores e under its key's ID. Its key must be named.
func (t *Txn) Put(e *Entry) { t.write(e.Key.ID(), e) }

// Delete removes the entry for k. k must be named.
func (t *Txn) Delete(k Key) { t.write(k.ID(), nil) }

func (t *Txn) write(id string, e *Entry) {
	t.check(id)
	if t.writes == nil {
		t.writes = map[string]*Entry{}
	}
	t.writes[id] = e
}

// Policy returns the stored cleanup policy, nil while none is stored.
func (t *Txn) Policy() *Policy { return t.st.Policy }

// MaxGeneration is the highest generation any entry of the store ever had:
// a new entry starts from it, so that no generation is reused.
func (t *Txn) MaxGeneration() uint64 { return t.st.MaxGeneration }

// apply puts the Txn's writes into its state.
func (t *Txn) apply() {
	for id, e := range t.writes {
		if e == nil {
			delete(t.st.Entries, id)
		} else {
			t.st.Entries[id] = e
		}
	}
}

// EntriesFunc turns an UpdateEntries callback into a whole-state one, for
// stores that keep the whole state at hand: fn sees a Txn over st
// restricted to ids, whose writes reach st only if fn returns changed and
// no error.
func EntriesFunc(ids []string, fn func(*Txn) (bool, error)) func(*State) (bool, error) {
	return func(st *State) (bool, error) {
		tx := newTxn(st, ids)
		changed, err := fn(tx)
		if err != nil || !changed {
			return false, err
		}
		tx.apply()
		return true, nil
	}
}

// Exists reports whether the state file exists. Missing beside its
// previous version, it is looked at again for a moment first: a commit's
// rename on a shared filesystem can hide it briefly (see read).
func (s *Store) Exists(ctx context.Context) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	for _, d := range rereadDelays {
		time.Sleep(d)
		_, err := os.Lstat(s.path)
		if err == nil || !errors.Is(err, fs.ErrNotExist) {
			return err == nil, err
		}
		// Missing beside a previous version: maybe only for the moment
		// of a commit's rename on a shared filesystem (see read). Look
		// again before saying no state was ever committed.
		if !s.hasPrev() {
			return false, nil
		}
	}
	return false, nil
}

// String names the store for messages.
func (s *Store) String() string { return "state file " + s.path }

var _ Backend = (*Store)(nil)
