package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
)

// Get and Release are written as proposals (state.Proposal): data that any
// process of this machine holding the file store's lock can apply in its own
// commit, with the same pure code as here. The op names carry a version:
// change it whenever what an applier does changes, so that a process of
// another build declines the proposal instead of applying it differently.
const (
	opRequest = "depcache.request/3" // 2: refuses a fingerprint-only docker-build key with no entry; 3: drops a FAILED entry's kept content that no dependent holds
	opRelease = "depcache.release/1"
)

// appliers are the proposals a manager serves, by op name.
var appliers = map[string]state.Applier{
	opRequest: applyRequest,
	opRelease: applyRelease,
}

// requestArgs is a Get as data.
type requestArgs struct {
	Key       state.Key          `json:"key"`
	Dependent string             `json:"dependent"`
	Dep       state.Dependent    `json:"dep"`
	Policy    transitions.Policy `json:"policy"`
	Now       time.Time          `json:"now"`
	Retry     bool               `json:"retry,omitempty"`
}

// requestOutcome is what a Get's commit tells its caller.
type requestOutcome struct {
	Entry  *state.Entry `json:"entry"`
	Result string       `json:"result"` // requestResult of the entry found
	// Drop is the content the commit dropped (transitions.DropContent),
	// for the proposer to move to trash; "" for none.
	Drop string `json:"drop,omitempty"`
}

// applyRequest registers the dependent (transitions.Request). Applied again
// after an unanswered claim, it sets the same dependent again: the outcome
// is the same.
func applyRequest(tx *state.Txn, p state.Proposal) (bool, []byte, error) {
	var a requestArgs
	if err := json.Unmarshal(p.Args, &a); err != nil {
		return false, nil, fmt.Errorf("manager: proposal %s: %w", p.Op, err)
	}
	cur := tx.Get(a.Key)
	if cur == nil && isBuildRef(a.Key) {
		return false, nil, fmt.Errorf("%s: no such built image here to hold, and this source names it only by its fingerprint: get it by its context (docker-build:///path/to/context?...): %w", a.Key.Source, ErrBadSource)
	}
	result := requestResult(cur)
	var drop string
	if a.Retry && cur != nil {
		rr := transitions.RetryNow(cur)
		cur, drop = rr.Entry, dropped(rr.Actions, drop)
	}
	r, err := transitions.Request(cur, a.Key, a.Dependent, a.Dep, a.Policy, a.Now)
	if err != nil {
		return false, nil, err
	}
	if tx.Get(a.Key) == nil {
		r.Entry.Generation = tx.MaxGeneration() // never reuse a generation of an earlier incarnation
	}
	tx.Put(r.Entry)
	b, err := json.Marshal(requestOutcome{Entry: r.Entry, Result: result, Drop: dropped(r.Actions, drop)})
	return r.Changed, b, err
}

// dropped returns the path of the DropContent among acts, else def.
func dropped(acts []transitions.Action, def string) string {
	for _, a := range acts {
		if d, ok := a.(transitions.DropContent); ok {
			return d.Path
		}
	}
	return def
}

// releaseArgs is a Release as data.
type releaseArgs struct {
	Key       state.Key `json:"key"`
	Dependent string    `json:"dependent"`
}

// applyRelease removes the dependent (transitions.Release). Applied again
// after an unanswered claim, a dependent already gone is the first
// application's doing.
func applyRelease(tx *state.Txn, p state.Proposal) (bool, []byte, error) {
	var a releaseArgs
	if err := json.Unmarshal(p.Args, &a); err != nil {
		return false, nil, fmt.Errorf("manager: proposal %s: %w", p.Op, err)
	}
	r, err := transitions.Release(tx.Get(a.Key), a.Dependent)
	if errors.Is(err, transitions.ErrNotRegistered) && p.Again {
		return false, []byte("{}"), nil
	}
	if err != nil {
		return false, nil, err
	}
	applyResult(tx, a.Key, r)
	return r.Changed, []byte("{}"), nil
}

// serveProposals registers the appliers with a store that combines.
func serveProposals(store state.Backend) {
	if c, ok := store.(state.Combiner); ok {
		for op, apply := range appliers {
			c.Serve(op, apply)
		}
	}
}

// lockLostTries is how many times propose applies an operation whose
// hold of the state lock was broken before it could commit.
const lockLostTries = 3

// propose applies op on ids with args, through the store's combining where
// it has it, and decodes the applier's result into out.
//
// A hold that lost the lock before its commit (this process was stopped
// past the lock's lease, and another broke it) committed nothing, so the
// operation is applied again, on the state as it is now: a get or release
// of a process that was stopped must not fail for it.
func (m *Manager) propose(ctx context.Context, op string, ids []string, args func() any, out any) error {
	var res []byte
	var err error
	for try := 1; ; try++ {
		// Built again for each try: a Get's times are those of the try
		// that commits, not of one before a stop.
		var b []byte
		if b, err = json.Marshal(args()); err != nil {
			return err
		}
		// A try after the first is told Again: an earlier one may have
		// been applied by a holder that died before it answered.
		p := state.Proposal{Op: op, IDs: ids, Args: b, Again: try > 1}
		if c, ok := m.store.(state.Combiner); ok {
			res, err = c.Propose(ctx, p)
		} else {
			apply := appliers[op]
			err = m.store.UpdateEntries(ctx, ids, func(tx *state.Txn) (bool, error) {
				changed, r, err := apply(tx, p)
				res = r
				return changed, err
			})
		}
		if !errors.Is(err, state.ErrLockLost) || try == lockLostTries || ctx.Err() != nil {
			break
		}
		m.log.WithError(err).WithField("op", op).Warn("the state lock was broken while this process held it, before its commit (was it stopped past the lock's lease?): nothing was written; applying it again")
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(res, out); err != nil {
		return fmt.Errorf("manager: the result of %s: %w", op, err)
	}
	return nil
}
