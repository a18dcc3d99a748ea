package state

import "context"

// Evictor is the optional interface of a Backend whose sweeps remove their
// victims in commits of their own, each fenced on the victim, rather than
// in the sweep's whole-state commit: the etcd store, whose transactions
// are bounded (128 operations) far below what a sweep may evict.
//
// The use is: m := e.Mark(); read the state and choose victims; then
// e.Evict(ctx, ids, m).
type Evictor interface {
	// Mark is as for Watcher: a point no later than any read started
	// after the call.
	Mark() Mark
	// Evict removes each entry of ids that exists, that no commit changed
	// after since, and that has no dependent, in as many commits as the
	// store's limits need. It returns the IDs it removed, sorted; the
	// others were changed, taken or removed meanwhile, and stay as they
	// are.
	Evict(ctx context.Context, ids []string, since Mark) ([]string, error)
}

// SweepElector is the optional interface of a Backend that elects one
// sweeper among the managers that share it, so that they do not all
// sweep the same entries: the etcd store, with an election on its
// session's lease. Being elected only saves work; every eviction is still
// fenced by its own commit.
type SweepElector interface {
	// MaySweep reports whether this store's manager is the elected
	// sweeper, campaigning when nobody is. It blocks for no longer than
	// one request of the store.
	MaySweep(ctx context.Context) (bool, error)
}
