package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/dustin/go-humanize"
	"github.com/spf13/pflag"
)

// policyFlags are the cleanup flags of the commands that run the loops.
// Only the flags given (on the command line or through their DEPCACHE_*
// twin) reach the policy: the root's stored policy keeps the others.
type policyFlags struct {
	fs        *pflag.FlagSet
	maxSize   sizeValue
	maxImage  sizeValue
	minFree   sizeValue
	high, low int
	minAge    time.Duration
	maxAge    time.Duration
	pins      []string
	setPolicy bool
	interval  time.Duration
	lease     time.Duration
}

func (p *policyFlags) register(fs *pflag.FlagSet) {
	p.fs = fs
	fs.Var(&p.maxSize, "max-size", "byte budget of the cache, with units (10GiB, 500MB); 0 means none")
	fs.Var(&p.maxImage, "max-image-size", "fail an image whose registry size exceeds this before pulling it (0: no limit)")
	fs.IntVar(&p.high, "high-watermark", 95, "percent of max-size above which a sweep starts")
	fs.IntVar(&p.low, "low-watermark", 85, "percent of max-size a sweep frees down to")
	p.minFree.percentOK = true
	fs.Var(&p.minFree, "min-free-disk", "keep this much of the filesystem free: bytes with units, or a percent (10%)")
	fs.DurationVar(&p.minAge, "min-age", 2*time.Minute, "never evict entries younger than this")
	fs.DurationVar(&p.maxAge, "max-age", 0, "evict unused entries not used for this long, even under budget (0: off)")
	fs.StringSliceVar(&p.pins, "pin", nil, "key ID, source or pattern (path.Match) of entries never evicted; repeatable")
	fs.BoolVar(&p.setPolicy, "set-policy", false, "store the given cleanup settings in the root, replacing the stored ones")
	fs.DurationVar(&p.interval, "cleanup-interval", time.Minute, "how often the loop sweeps")
	fs.DurationVar(&p.lease, "dependent-lease", time.Minute, "how long a dependent on another host stays without its lease renewed before it is reaped")
}

// change returns the settings given, checked.
func (p *policyFlags) change() (manager.PolicyChange, error) {
	var c manager.PolicyChange
	given := func(name string) bool { return p.fs.Changed(name) }
	if given("max-size") {
		c.MaxSizeBytes = &p.maxSize.bytes
	}
	if given("high-watermark") {
		c.HighWatermark = &p.high
	}
	if given("low-watermark") {
		c.LowWatermark = &p.low
	}
	if given("min-free-disk") {
		if p.minFree.percent > 0 {
			c.MinFreeDiskPercent = &p.minFree.percent
		} else {
			c.MinFreeDiskBytes = &p.minFree.bytes
		}
	}
	if given("min-age") {
		c.MinAge = &p.minAge
	}
	if given("max-age") {
		c.MaxAge = &p.maxAge
	}
	if given("pin") {
		c.Pins = p.pins
	}
	// The ranges state.Policy.Validate holds a stored policy to: a high
	// watermark of 0 would make every sweep evict everything.
	for _, b := range []struct {
		name string
		v    int
		min  int
	}{{"high-watermark", p.high, 1}, {"low-watermark", p.low, 0}} {
		if b.v < b.min || b.v > 100 {
			return c, fmt.Errorf("--%s %d: %w: must be in [%d, 100]", b.name, b.v, errBadFlag, b.min)
		}
	}
	// Only two values both given conflict: the stored policy (or the
	// default) of the one not given scales to fit (PolicyChange.Apply).
	if given("low-watermark") && given("high-watermark") && p.low > p.high {
		return c, fmt.Errorf("--low-watermark %d: %w: must not exceed --high-watermark %d", p.low, errBadFlag, p.high)
	}
	if given("max-age") && given("min-age") && p.maxAge > 0 && p.maxAge < p.minAge {
		return c, fmt.Errorf("--max-age %s: %w: must be 0 (off) or at least --min-age %s", p.maxAge, errBadFlag, p.minAge)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"min-age", p.minAge}, {"max-age", p.maxAge}} {
		if d.v < 0 {
			return c, fmt.Errorf("--%s %s: %w: must not be negative", d.name, d.v, errBadFlag)
		}
	}
	if p.interval < minCleanupInterval {
		return c, fmt.Errorf("--cleanup-interval %s: %w: must be at least %s (every pass reads the state and may take its lock)", p.interval, errBadFlag, minCleanupInterval)
	}
	if p.lease < manager.MinDependentLease {
		// Every manager renews at least every MaxRenewInterval, whatever
		// its own lease; a shorter lease here would reap their live
		// dependents.
		return c, fmt.Errorf("--dependent-lease %s: %w: must be at least %s (leases are renewed every %s)", p.lease, errBadFlag, manager.MinDependentLease, manager.MaxRenewInterval)
	}
	return c, nil
}

// minCleanupInterval is the shortest --cleanup-interval: every pass of the
// loop reads the state, and a sweep takes the lock that every get and
// release of the root waits for. A loop of nanoseconds (1ns was accepted)
// spins on it.
const minCleanupInterval = 100 * time.Millisecond

// sizeValue is a byte count with units, or (when percentOK) a percent.
type sizeValue struct {
	bytes     int64
	percent   int
	percentOK bool
	text      string
}

func (s *sizeValue) String() string { return s.text }
func (s *sizeValue) Type() string   { return "size" }

func (s *sizeValue) Set(v string) error {
	s.text = v
	if p, ok := strings.CutSuffix(v, "%"); ok {
		if !s.percentOK {
			return fmt.Errorf("%q: a percent is not allowed here", v)
		}
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 99 {
			return fmt.Errorf("%q: want a percent from 0%% to 99%%", v)
		}
		s.percent, s.bytes = n, 0
		return nil
	}
	if strings.HasPrefix(strings.TrimSpace(v), "-") {
		return fmt.Errorf("%q: a size must not be negative", v)
	}
	if num := strings.TrimSuffix(strings.TrimSpace(strings.ToLower(v)), "b"); strings.Contains(num, ".") && strings.Trim(num, "0123456789. ") == "" {
		// A fraction of a byte: 0.5 read as 0, which is no budget at all.
		return fmt.Errorf("%q: want a whole number of bytes, or a unit (1.5GiB, 500MB)", v)
	}
	n, err := humanize.ParseBytes(v)
	if err != nil {
		return fmt.Errorf("%q: want a size such as 10GiB, 500MB or 1048576", v)
	}
	if n > 1<<62 {
		return fmt.Errorf("%q: at most 4EiB (4611686018427387904 bytes)", v)
	}
	s.bytes, s.percent = int64(n), 0
	return nil
}

// notePolicyMismatch tells, in one line on stderr, which of the settings
// given the root's stored policy overrides in the loops.
func (g *globals) notePolicyMismatch(m *manager.Manager) {
	d := m.PolicyMismatch()
	if len(d) == 0 {
		return
	}
	msg := "the root's stored cleanup policy applies to the loops, not the flags given (" + strings.Join(d, "; ") + "); 'depcache policy set' changes it"
	if strings.Contains(d[0], ": default ") {
		msg = "the root stores no cleanup policy, so the loops use the defaults, not the flags given (" + strings.Join(d, "; ") + "); 'depcache policy set' stores one"
	}
	if g.json {
		// stderr carries JSON records and the error object only.
		g.log.WithField("differences", d).Warn(msg)
		return
	}
	fmt.Fprintln(g.stderr, "depcache: "+msg)
}
