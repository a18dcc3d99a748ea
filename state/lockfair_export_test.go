package state

// SetTurnHook makes a Lock call hook, in the waiting goroutine, right after
// it linked the turn marker and read its own nonce back. It is for the
// child processes of the fairness tests (which have no testing.T and end
// with the process), so it is never undone; tests in the parent process
// must not use it.
func SetTurnHook(hook func(name string)) { turnHook = hook }
