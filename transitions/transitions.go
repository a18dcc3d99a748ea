package transitions

import (
	"errors"
	"fmt"
	"time"

	"github.com/depcache/depcache/state"
)

var (
	// ErrFenced means an owner's event arrived for an entry it no longer
	// owns: the entry was removed, finished, or claimed again with a newer
	// generation. The owner must discard its work.
	ErrFenced = errors.New("superseded: no longer the owner of this generation")
	// ErrInvalidTransition means the entry is in a stage the rule does not
	// apply to.
	ErrInvalidTransition = errors.New("invalid transition")
	// ErrNotRegistered means Release named a dependent the entry does not
	// have.
	ErrNotRegistered = errors.New("dependent not registered")
	// ErrTooLarge means a download cannot fit in the budget even after
	// evicting everything that may be evicted.
	ErrTooLarge = errors.New("does not fit in the cache (its budget, or the free disk the policy keeps)")
)

// Policy holds the timings the rules use.
type Policy struct {
	// DownloadTimeout is how long an owner's progress may stay unchanged,
	// as watched by a waiter, before the waiter takes over. Default 5m.
	DownloadTimeout time.Duration
	// FailureCooldown is how long a FAILED entry stays before it may be
	// retried; it doubles with each further failure of the key, up to
	// MaxCooldown. Default 1m.
	FailureCooldown time.Duration
	// MaxCooldown caps the back-off. Default 1h.
	MaxCooldown time.Duration
	// LeaseDuration is how long the lease of a dependent on another machine
	// may stay unrenewed before the dependent is reaped. Default 1m. The
	// manager renews at least every 10 s whatever this is, so any value of
	// 30 s or more (the CLI's floor) is safe between hosts that disagree;
	// shorter ones are for tests on one host.
	LeaseDuration time.Duration
}

// WithDefaults fills zero fields.
func (p Policy) WithDefaults() Policy {
	if p.DownloadTimeout <= 0 {
		p.DownloadTimeout = 5 * time.Minute
	}
	if p.FailureCooldown <= 0 {
		p.FailureCooldown = time.Minute
	}
	if p.MaxCooldown <= 0 {
		p.MaxCooldown = time.Hour
	}
	if p.LeaseDuration <= 0 {
		p.LeaseDuration = time.Minute
	}
	if p.MaxCooldown < p.FailureCooldown {
		p.MaxCooldown = p.FailureCooldown
	}
	return p
}

// Cooldown is the wait after the n-th failure in a row.
func (p Policy) Cooldown(n int) time.Duration {
	d := p.FailureCooldown
	for i := 1; i < n && d < p.MaxCooldown; i++ {
		if d > p.MaxCooldown/2 {
			return p.MaxCooldown // doubling would pass it (or overflow)
		}
		d *= 2
	}
	return min(d, p.MaxCooldown)
}

// View is what this manager observed about an entry, outside the state.
type View struct {
	// Self is this manager.
	Self state.Owner
	// Drive: this manager drives the entry (it has local dependents, or it
	// drives every entry, as serve does). Others are only cleaned up.
	Drive bool
	// Running: this manager has a live download of the entry's current
	// generation.
	Running bool
	// OwnerDead: the owner is on this machine (same boot and pid namespace)
	// and its process is provably gone.
	OwnerDead bool
	// Unchanged is how long this manager has watched the entry's owner,
	// generation and progress stay exactly the same, on its own clock.
	Unchanged time.Duration
	// OwnerLeaseEnded: the state store held the owner on a lease that its
	// progress reports renew (state.OwnerLeaser), and that lease ended:
	// the store's clock timed the stall, not this manager's.
	OwnerLeaseEnded bool
	// Dependents: what this manager observed of each dependent, by name.
	Dependents map[string]DependentView
}

// Result is the outcome of a rule.
type Result struct {
	// Entry is the new entry, or nil when the entry is to be removed.
	Entry *state.Entry
	// Changed says whether the state must be written.
	Changed bool
	// Actions are for the manager to carry out after the state is written.
	Actions []Action
}

func keep(e *state.Entry) Result { return Result{Entry: e} }

// clone copies e wholly: rules never modify their input, which may be
// shared with the store's cache (see state.State).
func clone(e *state.Entry) *state.Entry { return e.Clone() }

func invalid(e *state.Entry, rule string) error {
	return fmt.Errorf("%s on %s entry %s: %w", rule, e.Stage, e.Key, ErrInvalidTransition)
}
