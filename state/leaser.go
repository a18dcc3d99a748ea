package state

import "time"

// DependentLeaser is the optional interface of a Backend that can hold
// dependents on leases it times itself, so that they end without anyone
// judging them from another host: the etcd store, on leases of the
// cluster, timed by its leader's clock.
//
// After LeaseDependents, the store puts each dependent bound to a process
// that a commit writes on the one lease of its session, of ttl, which it
// keeps alive while the process runs and reaches it; and each named
// dependent with a TTL on a lease of its own, of that TTL (Expires -
// Since, a duration free of clock skew). When a lease ends, the store
// removes the dependents on it: late, never early (it may be renewed once
// more, never cut short). A commit never puts a dependent on a lease that
// has ended: it fails, and the commit run again gets a new lease.
//
// So the manager does not renew the lease counters of its dependents
// (Dependent.Lease), and no manager reaps a dependent of another host by
// its counter. A manager learns that its session's dependents are gone
// when a pass no longer finds them, and its waiters get ErrDependentLost.
// Every manager of one store must call it: a process-bound dependent that
// a store put on no lease would be reaped only by a manager of its own
// machine, once its process is gone.
type DependentLeaser interface {
	// LeaseDependents turns the leases on; ttl is the session's (the
	// store's default when 0).
	LeaseDependents(ttl time.Duration)
}

// OwnerLeaser is the optional interface of a Backend that can hold the
// owner of each DOWNLOADING entry on a lease it times itself: granted by
// the commit that claims the entry, renewed by each commit of that owner
// that reports progress, ended by the store's clock when the reports stop
// for its TTL. A waiter then takes over when the store says the lease
// ended, with no clock of its own timing the stall. The lease proves
// nothing about exclusion: the takeover is a claim like any other, and the
// old owner's publish is fenced by its generation at the commit.
type OwnerLeaser interface {
	// LeaseOwners turns owner leases on, of ttl (the download timeout).
	LeaseOwners(ttl time.Duration)
	// OwnerLapsed reports whether the owner lease of entry id at
	// generation gen ended, as this store's reads have seen so far. It
	// does no I/O: a callback may call it. Once true for (id, gen), it
	// stays true.
	OwnerLapsed(id string, gen uint64) bool
}
