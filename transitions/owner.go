package transitions

import (
	"fmt"
	"time"

	"github.com/depcache/depcache/state"
)

// fence checks that self still owns e at generation gen.
func fence(e *state.Entry, self state.Owner, gen uint64) error {
	switch {
	case e == nil:
		return fmt.Errorf("entry removed: %w", ErrFenced)
	case e.Stage != state.Downloading:
		return fmt.Errorf("entry %s is %s: %w", e.Key, e.Stage, ErrFenced)
	case !e.Owner.Same(&self):
		return fmt.Errorf("entry %s is owned by %s: %w", e.Key, ownerString(e.Owner), ErrFenced)
	case e.Generation != gen:
		return fmt.Errorf("entry %s is at generation %d, ours is %d: %w", e.Key, e.Generation, gen, ErrFenced)
	}
	return nil
}

func ownerString(o *state.Owner) string {
	if o == nil {
		return "nobody"
	}
	return o.Process.String()
}

// Report records the owner's progress and bumps the heartbeat. disk is what
// the download has on disk so far (its tree and the raw bytes it keeps),
// recorded as the entry's size, which is what the budget counts of a
// download in flight: a compressed archive's bytes fetched say nothing of
// the tree it unpacks to. A negative disk leaves the size as it is.
func Report(e *state.Entry, self state.Owner, gen uint64, bytes, total, disk int64) (Result, error) {
	if err := fence(e, self, gen); err != nil {
		return Result{}, err
	}
	n := clone(e)
	n.Progress.Bytes = bytes
	n.Progress.Total = total
	n.Progress.Heartbeat++
	if disk >= 0 {
		n.SizeBytes = disk
	}
	return Result{Entry: n, Changed: true}, nil
}

// Published describes content that is in place.
type Published struct {
	Path      string
	SizeBytes int64
	ImageID   string
	// Fetched is the number of bytes downloaded; it becomes the final
	// progress.
	Fetched int64
	// RepoDigest of an image, and External when depcache did not fetch it.
	RepoDigest string
	External   bool
}

// Publish makes the entry READY and clears its owner, in one step.
func Publish(e *state.Entry, self state.Owner, gen uint64, pub Published, now time.Time) (Result, error) {
	if err := fence(e, self, gen); err != nil {
		return Result{}, err
	}
	n := clone(e)
	n.Stage = state.Ready
	n.Owner = nil
	n.Path = pub.Path
	n.SizeBytes = pub.SizeBytes
	n.ImageID = pub.ImageID
	n.RepoDigest = pub.RepoDigest
	n.External = pub.External
	n.Progress.Bytes = pub.Fetched
	n.Progress.Total = pub.Fetched
	n.Failures = 0
	n.FailedAt = time.Time{}
	n.Permanent = false
	n.Message = ""
	n.LastUsed = now
	return Result{Entry: n, Changed: true}, nil
}

// Fail makes the entry FAILED with reason, after the owner's last retry.
func Fail(e *state.Entry, self state.Owner, gen uint64, reason string, now time.Time) (Result, error) {
	if err := fence(e, self, gen); err != nil {
		return Result{}, err
	}
	n := clone(e)
	n.Stage = state.Failed
	n.Owner = nil
	n.SizeBytes = 0 // what its reports counted on disk: its staging goes with it
	n.Failures++
	n.FailedAt = now
	n.Message = reason
	return Result{Entry: n, Changed: true}, nil
}

// Abandon hands an entry back unowned, when its owner stops without
// finishing (shutdown), so that another manager claims it at once instead
// of waiting until the owner is known to be dead.
func Abandon(e *state.Entry, self state.Owner, gen uint64) (Result, error) {
	if err := fence(e, self, gen); err != nil {
		return Result{}, err
	}
	n := clone(e)
	n.Owner = nil
	n.SizeBytes = 0 // the next owner counts its own
	return Result{Entry: n, Changed: true}, nil
}

// Refetch turns a READY entry whose content is gone (its image removed from
// the daemon under it) into an unowned download that keeps its dependents,
// so that the loop fetches it again under the next generation.
func Refetch(e *state.Entry, reason string) Result {
	n := clone(e)
	n.Stage = state.Downloading
	n.Owner = nil
	n.Path, n.ImageID, n.RepoDigest, n.External, n.SizeBytes = "", "", "", false, 0
	n.Progress = state.Progress{}
	n.Message = reason
	return Result{Entry: n, Changed: true}
}
