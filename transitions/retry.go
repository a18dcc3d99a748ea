package transitions

import "github.com/depcache/depcache/state"

// RetryNow turns a FAILED entry into an unowned download at once, skipping
// what is left of its cool-down (a user asked for it: get --retry). It
// keeps the failure count for the next back-off. An entry that is not
// FAILED, or that still names content kept for the runs that held it when
// verify failed it (see retryable), is returned unchanged.
func RetryNow(e *state.Entry) Result {
	if e == nil || e.Stage != state.Failed || e.Path != "" {
		return keep(e)
	}
	return Result{Entry: retry(e), Changed: true}
}
