package transitions

import "github.com/depcache/depcache/state"

// RetryNow turns a FAILED entry into an unowned download at once, skipping
// what is left of its cool-down (a user asked for it: get --retry). It
// keeps the failure count for the next back-off. An entry that is not
// FAILED, or that still names content kept for the dependents that held it
// when verify failed it while any dependent is left (see retryable), is
// returned unchanged; one whose dependents are all gone drops that content
// (DropContent), as a prune would.
func RetryNow(e *state.Entry) Result {
	if e == nil || e.Stage != state.Failed || (e.Path != "" && len(e.Dependents) > 0) {
		return keep(e)
	}
	return retryDropping(e)
}

// retryDropping is retry, and for an entry that still names content (no
// dependent holds it: the callers check), the drop of that content.
func retryDropping(e *state.Entry) Result {
	n := retry(e)
	r := Result{Entry: n, Changed: true}
	if e.Path != "" {
		n.Path, n.SizeBytes = "", 0
		r.Actions = []Action{DropContent{Path: e.Path}}
	}
	return r
}
