package state

import "testing"

// SetBreakHooks makes breakStale call won after it won the break link of
// the lock name (before re-reading the lock) and rename after the re-read
// matched (before moving the lock aside), until t ends. Either may be nil.
// The hooks are package variables: tests that set them must not run in
// parallel.
func SetBreakHooks(t testing.TB, won, rename func(name string)) {
	t.Helper()
	breakWonHook, breakRenameHook = won, rename
	t.Cleanup(func() { breakWonHook, breakRenameHook = nil, nil })
}

// SetMissingHook makes an unlocked read that found the state file missing
// beside its previous version call hook before it looks again, until t
// ends.
func SetMissingHook(t testing.TB, hook func(path string)) {
	t.Helper()
	missingHook = hook
	t.Cleanup(func() { missingHook = nil })
}

// UnnamedShards returns the shard files of root's state.d that neither
// state.json nor state.json.prev names.
func UnnamedShards(root string) ([]string, error) {
	s, err := Open(root, Options{})
	if err != nil {
		return nil, err
	}
	m, _, err := s.unnamedShards()
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(m))
	for n := range m {
		out = append(out, n)
	}
	return out, nil
}

// SetLockReadHook makes a lock's holder see hook(name, b) for every read
// of its lock name that found b, when it checks or releases the lock,
// until t ends.
func SetLockReadHook(t testing.TB, hook func(name string, b []byte) []byte) {
	t.Helper()
	lockReadHook = hook
	t.Cleanup(func() { lockReadHook = nil })
}

// SetBreakAsideHook makes breakStale call aside after it moved the lock
// name aside (before reading back what it moved), and a holder call
// vanished each time it finds its lock name missing, until t ends. Either
// may be nil.
func SetBreakAsideHook(t testing.TB, aside, vanished func(name string)) {
	t.Helper()
	breakAsideHook, vanishedHook = aside, vanished
	t.Cleanup(func() { breakAsideHook, vanishedHook = nil, nil })
}

// SetLockedViewHook makes a View whose unlocked tries all found a shard
// missing or cut call hook, under the lock, before it reads again, until t
// ends.
func SetLockedViewHook(t testing.TB, hook func()) {
	t.Helper()
	lockedViewHook = hook
	t.Cleanup(func() { lockedViewHook = nil })
}

// UndecodedLines returns how many entry lines s holds in its cache without
// having decoded them (a read of named entries decodes only theirs).
func UndecodedLines(s *Store) int {
	n := 0
	for _, c := range s.cachedShards() {
		if c.lines != nil {
			n += c.lines.lazy
		}
	}
	return n
}

// DeltaMinBase is the size from which a shard's base gets deltas.
const DeltaMinBase = deltaMinBase

// SetPrevTempHook makes every commit call hook with the temporary name it
// is about to link the previous version to, until t ends.
func SetPrevTempHook(t testing.TB, hook func(name string)) {
	t.Helper()
	prevTempHook = hook
	t.Cleanup(func() { prevTempHook = nil })
}

// CommitStep is a point in a commit before its last lock check.
type CommitStep = commitStep

// The steps of a commit that SetCommitStepHook's hook sees.
const (
	StepFlushed     = stepFlushed
	StepPrevLinked  = stepPrevLinked
	StepPrevRenamed = stepPrevRenamed
)

// SetCommitStepHook makes every commit call hook at each step before its
// last lock check, until t ends.
func SetCommitStepHook(t testing.TB, hook func(CommitStep)) {
	t.Helper()
	commitStepHook = hook
	t.Cleanup(func() { commitStepHook = nil })
}

// SetLockRemoveHook makes every release of a lock remove it through
// remove instead of os.Remove, until t ends.
func SetLockRemoveHook(t testing.TB, remove func(name string) error) {
	t.Helper()
	lockRemoveHook = remove
	t.Cleanup(func() { lockRemoveHook = nil })
}
