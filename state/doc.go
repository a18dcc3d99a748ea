// Package state reads and writes depcache's state: every entry, its stage,
// its owner and its dependents. It defines the store interface a manager
// uses ([Backend], with its contracts) and implements the file store in
// the cache root ([Store]): in format 3, a manifest (state.json) naming
// immutable shard files and packs in state.d/ (see v2.go); formats 1 (one
// document) and 2 (no packs) are read and converted at the first write.
//
// Guarantees:
//
//   - Every change is a read-modify-write under a lock (see [Lock]) that is
//     safe between goroutines, processes, pid namespaces and hosts sharing the
//     root over an NFS-like filesystem. [Store.Update], [Store.UpdateBatched]
//     and [Store.Reset] are the only mutating calls.
//   - No reader ever sees a half-written state: changed shards are written
//     under names no file had before and fsynced, then the manifest is
//     written to a temporary name, fsynced, renamed over the old one (the
//     one commit point), and the directory is fsynced. The previous
//     manifest is kept as state.json.prev, and no shard either manifest
//     names is ever deleted. Only what changed is written: an operation on
//     named entries (UpdateEntries) reads and writes the shards holding
//     them, and the manifest.
//   - A state file or shard that cannot be read or parsed, or a shard that
//     is missing or not of the size and hash its manifest records, is an
//     error that names the path and the reason ([ErrCorrupt],
//     [ErrUnsupportedVersion]). The bad bytes are copied aside, the file
//     itself is left in place, and nothing is ever deleted or rewritten
//     because of it.
//   - Entry paths recorded in the state are relative to the root and are
//     rejected when they would leave it.
//   - An operation proposed as data ([Combiner], combine.go) is applied
//     under the lock and inside a fenced commit, with the Applier
//     registered for its op name: by its proposer, or by at most one other
//     live process of its machine. It is applied a second time only by its
//     proposer, told Again, when that holder vanished without answering;
//     the Applier settles from the state whether the first one landed.
//
// What the lock rests on: link(2) being atomic on the server (it is on NFS
// and on sshfs), reading back our own random nonce from the lock's content
// (link counts and inode numbers are not trusted), and judging a holder on
// another host or pid namespace stale only when the lock's content stayed
// unchanged for the lease on this process's own monotonic clock. Host clocks
// are never compared.
//
// What is not promised: a holder that stalls (SIGSTOP, a frozen VM) for
// longer than the lease while on another host may be broken and then write
// once more when it resumes; [Store.Update] re-reads the lock right before it
// commits to make that window small, not to close it. The lock therefore must
// be held far shorter than the lease, which is why depcache never holds it
// across a download, an unpack or a delete.
//
// This package never downloads, unpacks or deletes cache content, and it
// starts no goroutines.
package state
