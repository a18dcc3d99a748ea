package transitions

import (
	"time"

	"github.com/depcache/depcache/state"
)

// Request registers dependent name on the entry for key (e is nil when the
// state has none). A missing entry is created DOWNLOADING without an owner;
// a FAILED entry past its cool-down becomes DOWNLOADING again (unless it
// still names content kept for dependents that are still there, see
// retryable: content none holds any more is dropped, DropContent);
// otherwise the stage is kept and the caller reports it.
func Request(e *state.Entry, key state.Key, name string, dep state.Dependent, p Policy, now time.Time) (Result, error) {
	p = p.WithDefaults()
	var n *state.Entry
	var acts []Action
	if e == nil {
		n = &state.Entry{Key: key, Stage: state.Downloading, Created: now}
	} else {
		if !e.Stage.Valid() {
			return Result{}, invalid(e, "request")
		}
		switch {
		case e.Stage == state.Failed && retryable(e, p, now):
			n = retry(e)
		case e.Stage == state.Failed && e.Path != "" && len(e.Dependents) == 0 && cooledDown(e, p, now):
			// What a loop's prune would do, had it run before this
			// request: nobody holds the kept content. Without it, every
			// get registered itself first and kept it for ever.
			r := retryDropping(e)
			n, acts = r.Entry, r.Actions
		default:
			n = clone(e)
		}
	}
	if n.Dependents == nil {
		n.Dependents = map[string]state.Dependent{}
	}
	n.Dependents[name] = dep
	n.LastUsed = now
	return Result{Entry: n, Changed: true, Actions: acts}, nil
}

// Release removes dependent name. A DOWNLOADING entry left without
// dependents is removed, which cancels its download wherever it runs.
func Release(e *state.Entry, name string) (Result, error) {
	if e == nil {
		return Result{}, ErrNotRegistered
	}
	if _, ok := e.Dependents[name]; !ok {
		return keep(e), ErrNotRegistered
	}
	n := clone(e)
	delete(n.Dependents, name)
	if n.Stage == state.Downloading && len(n.Dependents) == 0 {
		return Result{Changed: true, Actions: []Action{CancelDownload{Reason: "last dependent released"}, Removed{Reason: "last dependent released"}}}, nil
	}
	return Result{Entry: n, Changed: true}, nil
}
