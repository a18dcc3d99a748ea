package state

import "errors"

var (
	// ErrCorrupt means the state file could not be parsed. The error names
	// the file and the reason; the file is left in place and a copy of its
	// bytes is kept aside. Nothing is deleted because of it. A file that
	// cannot be read at all (permissions, I/O) gives the operating system's
	// error instead.
	ErrCorrupt = errors.New("state file is corrupt")
	// ErrUnsupportedVersion means the state file was written by a newer
	// depcache with a format this one does not know.
	ErrUnsupportedVersion = errors.New("state file has an unsupported format version")
	// ErrOutsideRoot means a path would leave the cache root.
	ErrOutsideRoot = errors.New("path leaves the cache root")
	// ErrBadKey means a key is malformed.
	ErrBadKey = errors.New("bad key")
	// ErrInvalidText means a string is not valid UTF-8, so the state could
	// not store it byte for byte.
	ErrInvalidText = errors.New("not valid UTF-8")
	// ErrLockLost means the lock was no longer ours when we went to use or
	// release it: another process judged us stale and broke it.
	ErrLockLost = errors.New("lock lost")
	// ErrBoundElsewhere means the root's content is described by another
	// state store (an etcd prefix, recorded by the root's ID file): the
	// file store refuses it, since it would take that store's entries for
	// orphans and move them aside.
	ErrBoundElsewhere = errors.New("the root is bound to another state store")
	// ErrUnavailable means the state store did not answer in time, and may
	// again: an outage, not a state that is wrong (etcd's
	// etcdstore.ErrUnavailable is one). Waiting out such a failure is
	// sound; a retry of a commit is settled by the store.
	ErrUnavailable = errors.New("state store unavailable")
)

// RootIDFile is the name of a root's ID file: a random ID written once by
// a state store other than the file store (etcd), which records it too.
// The file store refuses a root that has one.
const RootIDFile = "root-id"
