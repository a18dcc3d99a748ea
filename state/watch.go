package state

import "context"

// Mark is a point in a store's history: for the etcd store, a revision.
// Marks of one store are ordered; 0 means none is known yet.
type Mark int64

// Watcher is the optional interface of a Backend that tells a waiter when
// entries change, so that it need not read the state again and again: the
// etcd store watches its keys. The file store has no such means, and its
// waiters poll.
//
// The use is: m := w.Mark(); read the state (View, Update...); act on what
// was read; w.WaitEntries(ctx, ids, m). No change committed after the read
// can be missed, since the mark precedes the read; a change committed
// between the mark and the read only wakes the waiter once more than
// needed.
type Watcher interface {
	// Mark returns a point in the store's history that no read started
	// after the call precedes. It does no I/O.
	Mark() Mark
	// WaitEntries blocks until one of the entries named by ids (key IDs)
	// was created, changed (the entry, its owner or any of its dependents,
	// also when a lease ended them without a commit) or removed after
	// since, or the stored policy changed (with no ids too), or ctx ends,
	// whose error it returns then. It also
	// returns nil, at once, when it cannot tell what happened after since
	// (a zero mark, or history it could not recover): the caller reads the
	// state again, as after a change. An error other than ctx's means the
	// store cannot watch now (no leader, a watch refused): the caller falls
	// back to polling.
	WaitEntries(ctx context.Context, ids []string, since Mark) error
}
