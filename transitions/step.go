package transitions

import (
	"fmt"
	"time"

	"github.com/depcache/depcache/state"
)

// Step applies the periodic rules to one entry.
//
// Dependents that no longer hold the entry are reaped first (see Reap), so
// a crashed run stops pinning its entries at the next pass.
func Step(e *state.Entry, v View, p Policy, now time.Time) (Result, error) {
	p = p.WithDefaults()
	if !e.Stage.Valid() {
		return Result{}, invalid(e, "step")
	}
	reaped, dead := Reap(e, v.Dependents, p, now)
	var r Result
	var err error
	switch reaped.Entry.Stage {
	case state.Downloading:
		r, err = stepDownloading(reaped.Entry, v, p)
	case state.Ready:
		r = keep(reaped.Entry)
	case state.Failed:
		r, err = stepFailed(reaped.Entry, v, p, now)
	}
	if err != nil {
		return Result{}, err
	}
	if len(dead) > 0 {
		r.Changed = true
		r.Actions = append([]Action{Reaped{Dependents: dead}}, r.Actions...)
	}
	return r, nil
}

// Abandoned reports whether e is a download that no dependent waits for:
// it is removed, which cancels it wherever it runs (a pass, a sweep, rm).
func Abandoned(e *state.Entry) bool {
	return e != nil && e.Stage == state.Downloading && len(e.Dependents) == 0
}

func stepDownloading(e *state.Entry, v View, p Policy) (Result, error) {
	if Abandoned(e) {
		return Result{Changed: true, Actions: []Action{CancelDownload{Reason: "no dependent left"}, Removed{Reason: "no dependent left"}}}, nil
	}
	if !v.Drive {
		return keep(e), nil
	}
	switch {
	case e.Owner == nil:
		return claim(e, v.Self), nil
	case e.Owner.Same(&v.Self):
		if v.Running {
			return keep(e), nil
		}
		// Ours by the record, but no download runs here: it ended without
		// publishing or failing (or this manager lost track of it).
		return claim(e, v.Self), nil
	case v.OwnerDead:
		r := claim(e, v.Self)
		r.Actions = append(r.Actions,
			TakeOver{From: *e.Owner, Dead: true, Reason: "owner process is gone"},
			RemoveStaging{Generation: e.Generation})
		return r, nil
	case v.OwnerLeaseEnded:
		// As for a stall: the old owner may still be alive (stopped,
		// partitioned), so its staging stays and its publish is fenced.
		r := claim(e, v.Self)
		r.Actions = append(r.Actions, TakeOver{From: *e.Owner,
			Reason: "the owner's lease ended: no progress reported for its TTL, timed by the state store"})
		return r, nil
	case v.Unchanged >= p.DownloadTimeout:
		// The old owner may still be alive (stopped, partitioned): its
		// staging data stays until it is proven gone, and its publish will be
		// fenced.
		r := claim(e, v.Self)
		r.Actions = append(r.Actions, TakeOver{From: *e.Owner,
			Reason: fmt.Sprintf("no progress for %s (timeout %s)", v.Unchanged.Round(time.Second), p.DownloadTimeout)})
		return r, nil
	}
	return keep(e), nil
}

// claim makes self the owner with the next generation.
func claim(e *state.Entry, self state.Owner) Result {
	n := clone(e)
	o := self
	n.Owner = &o
	n.Generation++
	n.Progress = state.Progress{}
	n.SizeBytes = 0 // counted again by the new owner's reports
	return Result{Entry: n, Changed: true, Actions: []Action{StartDownload{Generation: n.Generation}}}
}

func stepFailed(e *state.Entry, v View, p Policy, now time.Time) (Result, error) {
	if !cooledDown(e, p, now) {
		return keep(e), nil
	}
	if len(e.Dependents) > 0 && v.Drive && retryable(e, p, now) {
		r, err := stepDownloading(retry(e), v, p)
		r.Changed = true
		return r, err
	}
	if len(e.Dependents) == 0 {
		return Result{Changed: true, Actions: []Action{Removed{Reason: "failed entry pruned after its cool-down"}}}, nil
	}
	return keep(e), nil
}

// retryable reports whether a FAILED entry may be downloaded again: its
// cool-down is over, and it no longer names content. Content kept for the
// runs that held it when verify failed it stays named by the entry until
// they are all gone (then the entry is pruned): a retry would publish under
// a new path, and the old one, named by nothing, would be deleted under
// them at the next start-up.
func retryable(e *state.Entry, p Policy, now time.Time) bool {
	return cooledDown(e, p, now) && e.Path == ""
}

func cooledDown(e *state.Entry, p Policy, now time.Time) bool {
	return now.Sub(e.FailedAt) >= p.Cooldown(e.Failures)
}

// retry turns a FAILED entry into an unowned download, keeping its failure
// count for the next back-off.
func retry(e *state.Entry) *state.Entry {
	n := clone(e)
	n.Stage = state.Downloading
	n.Owner = nil
	n.Progress = state.Progress{}
	return n
}
