// Package state reads and writes depcache's state file: one JSON document in
// the cache root that names every entry, its stage, its owner and its
// dependents.
//
// Guarantees:
//
//   - Every change is a read-modify-write under a lock (see [Lock]) that is
//     safe between goroutines, processes, pid namespaces and hosts sharing the
//     root over an NFS-like filesystem. [Store.Update], [Store.UpdateBatched]
//     and [Store.Reset] are the only mutating calls.
//   - No reader ever sees a half-written file: the file is written to a
//     temporary name in the same directory, fsynced, renamed over the old one,
//     and the directory is fsynced. The previous version is kept as
//     state.json.prev. The file is written only when its content changed.
//   - A state file that cannot be read or parsed is an error that names the
//     path and the reason ([ErrCorrupt], [ErrUnsupportedVersion]). The bad
//     bytes are copied aside, the file itself is left in place, and nothing
//     is ever deleted or rewritten because of it.
//   - Entry paths recorded in the state are relative to the root and are
//     rejected when they would leave it.
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
