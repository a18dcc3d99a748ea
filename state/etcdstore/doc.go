// Package etcdstore is a state.Backend on an etcd cluster, for caches
// whose hosts do not share a filesystem that a lock can rest on, or that
// outgrow one state file: depcache --state etcd://HOST:PORT,.../PREFIX.
//
// Layout, under PREFIX: one key per entry (PREFIX/e/<keyID>, the entry's
// JSON without its dependents), one key per dependent
// (PREFIX/d/<keyID>/<hex of its name>, on a lease when it is bound to a
// process or has a TTL), one owner key per DOWNLOADING entry
// (PREFIX/e/<keyID>/owner, on the owner's lease), a header (PREFIX/h: the policy), the
// highest generation (PREFIX/g), a format key (PREFIX/format), a removal counter
// (PREFIX/x), commit records (PREFIX/n/<nonce>, which expire with a
// lease after 10 minutes) and the root's ID
// (PREFIX/root-id). Content stays in the cache root; one prefix is one
// content domain, and Open refuses a root whose ID file does not match the
// prefix's.
//
// Guarantees:
//
//   - Every read is one etcd revision: View and the reads of Update and
//     UpdateEntries see a consistent snapshot.
//   - Every commit is one transaction, applied only if nothing it read
//     changed since that revision: a compare on the mod revision of each
//     entry key read (UpdateEntries), or on every entry and dependent key
//     plus the removal counter (Update), and on the header and format keys;
//     on the generation key when the commit raises it, or reads the whole
//     state.
//     Every commit that touches an entry or its dependents puts the entry
//     key, so its mod revision versions the entry with its dependents. On a
//     failed compare the callback runs again on a fresh read, as the
//     state.Backend contract allows.
//   - A commit is atomic and never split: one that exceeds etcd's limits
//     of one transaction (128 operations, 1.5 MiB) is refused with
//     ErrTooBig and writes nothing.
//   - A state that fails state.State.Validate is never committed
//     (ErrInvalidState); a stored one that does not parse is an error
//     wrapping state.ErrCorrupt, the callback is not called, and nothing is
//     deleted (only Reset replaces it).
//   - A commit whose answer was lost (a timeout after the request was
//     sent, a lost connection, a leader change) is settled by reading back
//     its commit record; a commit that did not apply is fenced (its record
//     is created as aborted, which fails its compare) before the callback
//     runs again, so it can never apply later. If that cannot be settled
//     within the settle timeout, the error wraps ErrOutcomeUnknown.
//   - Every request has its own timeout and requires a leader; a timeout
//     of the store is ErrUnavailable, never context.DeadlineExceeded,
//     which stays the caller's own deadline.
//   - Waiters watch (state.Watcher): WaitEntries returns once a named
//     entry's key, which every change of the entry or its dependents puts,
//     changed after the caller's mark, or its owner key or one of its
//     dependent keys was deleted (the end of a lease puts no entry key), or
//     the header, which holds the policy, changed. The watch starts at the current
//     revision (etcd delivers a watch that starts in the past only at its
//     next resync, up to 100 ms late) and what came between the mark and
//     its start is listed instead; a watch that cannot resume after a
//     compaction lists again too. No history is required (a compacted
//     mark only counts as a change), so a compaction can delay no waiter
//     and make none miss a change. A watch
//     requires a leader: without one it fails (ErrUnavailable) and the
//     manager polls.
//   - After LeaseDependents (state.DependentLeaser; every manager calls
//     it), dependents bound to a process and named ones with a TTL are on
//     etcd leases, so that they end without anyone judging them, timed by
//     the leader's clock: one bound to a process on the lease of the
//     store's session (concurrency.Session, of the manager's dependent
//     lease, kept alive by the client while the process runs and reaches
//     the cluster), one with a TTL on a lease of its own granted at the
//     commit that writes it (one bound to a process with a TTL stays on
//     the session; the managers judge its TTL). When a lease ends, etcd deletes its dependent
//     keys; Close revokes the session's lease (the process is done with
//     its dependents). A lease never ends early: a leader change renews
//     every lease to its full TTL, so reaping is late, never early.
//     Nothing rests on believing a lease is held: a commit that puts a
//     dependent on a lease that has ended fails as a whole (the callback
//     runs again, with a new session), and the manager learns that its
//     dependents are gone when a pass no longer finds them
//     (ErrDependentLost: it never hands out the path of an entry it lost).
//     The deletion of an ended lease's keys does not put the entry key: a
//     commit that read such a dependent still applies (it can only have
//     kept the entry for it). Waiters watch those deletions apart, so they
//     learn of it at once.
//   - After LeaseOwners (state.OwnerLeaser; every manager calls it, with
//     its download timeout), the owner of a DOWNLOADING entry is on a
//     lease: the commit that claims the entry puts its owner key on a new
//     lease, each progress report of that owner renews it first, and the
//     commit that publishes, fails, hands back or removes the entry
//     deletes the key. A reader that finds an owned entry without its
//     owner key says so (OwnerLapsed), and the manager takes over then,
//     instead of timing the owner's progress on its own clock. A lease that
//     ended is never renewed nor the key put again by the old owner; the
//     takeover is a claim like any other, and the old owner's publish is
//     fenced by the entry's revision and generation, never by a lease.
//   - Sweeps evict each victim by a transaction of its own (state.Evictor;
//     batched 30 to a transaction, retried one by one when a batch
//     conflicts): it applies only if the entry key exists, was not changed
//     after the sweep's mark, and no key exists under the entry's
//     dependents' prefix, so that a dependent registered since, even one
//     whose lease later ended, keeps the entry; and it bumps the removal
//     counter. A sweep of any number of victims stays within etcd's limits
//     of one transaction. The loops of the managers sharing a prefix sweep
//     only while elected (state.SweepElector: an election in
//     concurrency.Election's layout under PREFIX/sweeper/ on the session's
//     lease, campaigned without waiting); the election saves work,
//     it fences nothing: two sweepers at once (a leader change) evict
//     safely, each victim by its compares.
//
// What a client cannot see: whether the members run with auto-compaction
// (a server flag). Doctor infers it from the oldest revision the cluster
// still serves, and warns about a long history never compacted.
//
// The package starts no goroutines of its own beyond the etcd client's
// (its watches, and the keep-alive of the session's lease).
package etcdstore
