package transitions

import (
	"fmt"
	"sort"
	"time"

	"github.com/depcache/depcache/state"
)

// DependentView is what this manager observed about one dependent.
type DependentView struct {
	// Local: the dependent's process is on this machine (same boot and pid
	// namespace), so its liveness is provable.
	Local bool
	// Dead: Local, and the process is gone.
	Dead bool
	// LeaseUnchanged: how long this manager has watched the dependent's
	// lease stay unchanged, on its own clock (processes on other machines).
	LeaseUnchanged time.Duration
	// Registered: how long this manager has watched this registration (the
	// same Since and Expires), on its own clock. A TTL is a duration on the
	// registering host's clock; timing it here keeps a host whose clock runs
	// ahead from reaping early.
	Registered time.Duration
	// StoreLease: the state store holds the dependent on a lease it times
	// itself (state.DependentLeaser) and removes it when that lease ends:
	// its lease counter is not renewed, and nobody reaps it by that.
	StoreLease bool
}

// Liveness says whether a dependent still holds its entry, and why.
func Liveness(d state.Dependent, dv DependentView, p Policy, now time.Time) (live bool, why string) {
	p = p.WithDefaults()
	if d.Expires != nil && ttlOver(d, dv, now) {
		return false, "ttl expired"
	}
	switch {
	case d.Process == nil && d.Expires != nil:
		return true, fmt.Sprintf("until released or %s", d.Expires.UTC().Format(time.RFC3339))
	case d.Process == nil:
		return true, "until released"
	case dv.Local && dv.Dead:
		return false, fmt.Sprintf("process %d is gone", d.Process.PID)
	case dv.Local:
		return true, fmt.Sprintf("process %d is alive", d.Process.PID)
	case dv.StoreLease:
		return true, fmt.Sprintf("pid %d on %s holds it on the state store's lease", d.Process.PID, d.Process.Host)
	case dv.LeaseUnchanged >= p.LeaseDuration:
		return false, fmt.Sprintf("lease of pid %d on %s not renewed for %s", d.Process.PID, d.Process.Host, dv.LeaseUnchanged.Round(time.Second))
	}
	// Not "renewed": a process that has not watched the lease for its
	// length (a one-shot gc, rm or ls) cannot tell a live holder from a
	// host that died.
	return true, fmt.Sprintf("lease of pid %d on %s seen unchanged for %s, of the %s after which it is stale", d.Process.PID, d.Process.Host, dv.LeaseUnchanged.Round(time.Second), p.LeaseDuration)
}

// ClockSkewTolerance is how far ahead of the registering host's clock a
// host's clock may run without reaping a TTL dependent early, when it has
// not watched the registration for the whole TTL (a one-shot gc, a short
// get). Kerberos allows the same; doctor warns past a minute.
const ClockSkewTolerance = 5 * time.Minute

// ttlOver reports whether the TTL of d is over. Expires is on the
// registering host's clock, so passing it on ours is not enough alone: we
// must also have watched the registration for the TTL's length (Expires -
// Since, a duration free of skew) on our own clock, or be past the expiry
// by a margin that covers any sane skew. A clock running behind only reaps
// late, which is safe.
func ttlOver(d state.Dependent, dv DependentView, now time.Time) bool {
	if now.Before(*d.Expires) {
		return false
	}
	ttl := d.Expires.Sub(d.Since)
	return dv.Registered >= ttl || !now.Before(d.Expires.Add(min(max(ttl, 0), ClockSkewTolerance)))
}

// Reap removes the dependents that no longer hold the entry: TTL passed,
// process provably gone, or lease not renewed. It reports them by name.
func Reap(e *state.Entry, views map[string]DependentView, p Policy, now time.Time) (Result, []string) {
	var dead []string
	for name, d := range e.Dependents {
		if live, _ := Liveness(d, views[name], p, now); !live {
			dead = append(dead, name)
		}
	}
	if len(dead) == 0 {
		return keep(e), nil
	}
	sort.Strings(dead)
	n := clone(e)
	for _, name := range dead {
		delete(n.Dependents, name)
	}
	return Result{Entry: n, Changed: true}, dead
}

// Renew bumps the lease of every dependent bound to process self.
func Renew(e *state.Entry, self state.Process) Result {
	var n *state.Entry
	for name, d := range e.Dependents {
		if d.Process == nil || !d.Process.Same(self) {
			continue
		}
		if n == nil {
			n = clone(e)
		}
		d.Lease++
		n.Dependents[name] = d
	}
	if n == nil {
		return keep(e)
	}
	return Result{Entry: n, Changed: true}
}
