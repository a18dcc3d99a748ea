package state

import (
	"maps"
	"time"
)

// Equal reports whether e and f hold the same values, so that they encode
// to the same JSON. It is conservative where that is cheaper: times compare
// with ==, so the same instant in two locations is unequal. A writer reuses
// the encoded line of an entry that is Equal to the one decoded from it;
// TestEqualCoversEveryField fails when a field is added to Entry and not
// here.
func (e *Entry) Equal(f *Entry) bool {
	if e == nil || f == nil {
		return e == f
	}
	return e.Key.equal(f.Key) &&
		e.Stage == f.Stage &&
		e.Path == f.Path &&
		e.SizeBytes == f.SizeBytes &&
		maps.EqualFunc(e.Dependents, f.Dependents, Dependent.equal) &&
		(e.Dependents == nil) == (f.Dependents == nil) &&
		ownersEqual(e.Owner, f.Owner) &&
		e.Generation == f.Generation &&
		e.Progress == f.Progress &&
		e.LastUsed == f.LastUsed &&
		e.Created == f.Created &&
		e.Failures == f.Failures &&
		e.FailedAt == f.FailedAt &&
		e.Permanent == f.Permanent &&
		e.Message == f.Message &&
		e.ImageID == f.ImageID &&
		e.RepoDigest == f.RepoDigest &&
		e.External == f.External
}

func (k Key) equal(l Key) bool {
	if k.Kind != l.Kind || k.Source != l.Source || k.SHA256 != l.SHA256 || k.Daemon != l.Daemon {
		return false
	}
	if k.Build == nil || l.Build == nil {
		return k.Build == l.Build
	}
	a, b := k.Build, l.Build
	return a.Context == b.Context && a.Dockerfile == b.Dockerfile && a.Tag == b.Tag &&
		maps.Equal(a.Args, b.Args) && (a.Args == nil) == (b.Args == nil)
}

func (d Dependent) equal(o Dependent) bool {
	return d.Since == o.Since && d.Lease == o.Lease &&
		ptrEqual(d.Process, o.Process) && ptrEqual(d.Expires, o.Expires)
}

func ownersEqual(a, b *Owner) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

func ptrEqual[T Process | time.Time](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}
