package transitions

import "github.com/depcache/depcache/state"

// Action is something the manager must do after the state is written.
type Action interface{ action() }

// StartDownload: this manager now owns the entry at Generation and must
// fetch it into that generation's staging path.
type StartDownload struct {
	Generation uint64
}

// CancelDownload: stop this manager's download of the entry, if any.
type CancelDownload struct {
	Reason string
}

// TakeOver records that the entry was taken from another owner; the
// manager logs it and counts it.
type TakeOver struct {
	From state.Owner
	// Dead: the owner was provably gone; otherwise it was stalled.
	Dead   bool
	Reason string
}

// RemoveStaging: the staging data of Generation may be deleted, because its
// writer is proven gone.
type RemoveStaging struct {
	Generation uint64
}

// Removed: the entry was removed from the state.
type Removed struct {
	Reason string
}

// DropContent: the entry no longer names Path, content that verify failed
// and that no dependent holds any more; once the state is written, its
// directory goes to trash, as a pruned entry's does.
type DropContent struct {
	Path string
}

// Reaped: these dependents no longer held the entry and were removed.
type Reaped struct {
	Dependents []string
}

// Evict: the entry was removed by the sweep and its content must be moved
// aside under the same lock hold.
type Evict struct {
	Path   string
	Bytes  int64
	Reason string
}

func (Reaped) action()         {}
func (Evict) action()          {}
func (StartDownload) action()  {}
func (CancelDownload) action() {}
func (TakeOver) action()       {}
func (RemoveStaging) action()  {}
func (Removed) action()        {}
func (DropContent) action()    {}
