package transitions

import (
	"fmt"
	"sort"
	"time"

	"github.com/depcache/depcache/state"
)

// Usage is what the cache takes.
type Usage struct {
	// Bytes is the size on disk of READY and FAILED entries plus the
	// expected size of downloads in flight.
	Bytes int64
	// DiskFree and DiskSize are the root filesystem's free and total bytes
	// (statfs); 0 when unknown.
	DiskFree, DiskSize int64
}

// Victim is an entry the sweep removes.
type Victim struct {
	Key  state.Key
	Path string
	// Bytes is the entry's size; Frees what its eviction frees: Bytes, but
	// 0 for an image entry whose image another entry still names (a tag
	// and a digest of one image), which the eviction leaves.
	Bytes, Frees int64
	Reason       string // "budget", "age", "free disk" or "failed"
}

// Measure returns the bytes the entries take, counting downloads in flight
// at their expected size so that concurrent downloads cannot overshoot.
// An image that several entries name (a tag and a digest of it, in one
// daemon) is counted once.
func Measure(entries map[string]*state.Entry) int64 {
	var n int64
	images := map[string]int64{}
	for _, e := range entries {
		if img := imageOf(e); img != "" {
			images[img] = max(images[img], held(e))
			continue
		}
		n += held(e)
	}
	for _, b := range images {
		n += b
	}
	return n
}

// imageOf names the image that e holds, as one daemon's image ID, or is
// "" for an entry that holds no image (a bundle, an image not pulled yet).
// Entries with the same name hold one image: it takes its bytes once, and
// goes only with the last of them.
func imageOf(e *state.Entry) string {
	if e.Key.Kind != state.Image || e.ImageID == "" {
		return ""
	}
	return e.Key.Daemon + "\x00" + e.ImageID
}

// holders counts, by imageOf, the entries that name each image.
func holders(entries map[string]*state.Entry) map[string]int {
	n := map[string]int{}
	for _, e := range entries {
		if img := imageOf(e); img != "" {
			n[img]++
		}
	}
	return n
}

// held is what e holds of the budget: a download what it announced or
// wrote, anything else its content (a FAILED entry holds none, unless it
// keeps content for the runs that used it).
func held(e *state.Entry) int64 {
	if e.Stage == state.Downloading {
		return max(e.SizeBytes, e.Progress.Total, e.Progress.Bytes)
	}
	return e.SizeBytes
}

// Watched is how long this sweeper has seen an entry's Created and
// LastUsed stay unchanged, on its own clock. Those times were written by
// whichever host's clock made or used the entry.
type Watched struct {
	Created, LastUsed time.Duration
}

// asRecorded judges e's ages by its recorded times alone, as if this
// sweeper had watched it from then on.
func asRecorded(e *state.Entry, now time.Time) Watched {
	return Watched{Created: max(now.Sub(e.Created), 0), LastUsed: max(now.Sub(e.LastUsed), 0)}
}

// aged reports whether t, written by some host's clock, is at least d in
// the past as this sweeper may judge it: watched unchanged for d on our own
// clock, or past by d plus ClockSkewTolerance on it. A sweeper whose clock
// runs ahead of the writer's by up to the tolerance never evicts early,
// even in a one-shot sweep that has watched nothing; one that runs behind
// still evicts once it has watched the entry for d.
func aged(t time.Time, d, watched time.Duration, now time.Time) bool {
	if d <= 0 {
		return true
	}
	// Watched for d: it has existed for at least d, whatever its stamp
	// says (a writer whose clock runs ahead must not keep it for ever).
	// Compared by parts: d + ClockSkewTolerance overflows for a d within
	// the tolerance of the longest Duration, which made every entry aged.
	age := now.Sub(t) // saturates
	return watched >= d || age >= d && age-d >= ClockSkewTolerance
}

// percentOf is n*p/100, rounded down, for 0 <= p <= 100, without the
// overflow of n*p for an n past math.MaxInt64/100 (a budget of 4 EiB is a
// valid one: usage*100 wrapped negative and evicted every unused entry).
func percentOf(n int64, p int) int64 {
	return n/100*int64(p) + n%100*int64(p)/100
}

// Kept says why the sweep may not evict e, or "" if it may. Dependents
// must already be reaped: any dependent left is live. w is what this
// sweeper watched of e (see aged).
func Kept(pol state.Policy, e *state.Entry, w Watched, now time.Time) string {
	switch {
	case e.Stage == state.Downloading:
		return "downloading"
	case len(e.Dependents) > 0:
		return fmt.Sprintf("in use by %d dependent(s)", len(e.Dependents))
	case pol.Pinned(e.Key):
		return "pinned"
	case e.External:
		return "not fetched by depcache"
	case !aged(e.Created, time.Duration(pol.MinAge), w.Created, now):
		if age := now.Sub(e.Created); age >= time.Duration(pol.MinAge) {
			// Old enough by its stamp: what keeps it is the allowance for
			// a writer's clock ahead of ours, which a listing should name.
			return fmt.Sprintf("younger than min-age %s plus %s for clock skew (created %s ago by its writer's clock)", pol.MinAge, ClockSkewTolerance, age.Round(time.Second))
		}
		return fmt.Sprintf("younger than min-age %s", pol.MinAge)
	}
	return ""
}

// PlanEviction chooses what a sweep removes: entries unused for max-age;
// then, when usage is above the high watermark (or free disk below its
// floor), FAILED entries first and READY entries least recently used first
// (ties by key) until usage is at the low watermark. It never picks an
// entry that Kept protects. Ages are judged with what the sweeper watched
// of each entry, by key ID (none: a one-shot sweep). The result is in
// eviction order.
func PlanEviction(pol state.Policy, entries map[string]*state.Entry, watched map[string]Watched, u Usage, now time.Time) []Victim {
	var cands []*state.Entry
	var ids []string // cands' key IDs: Key.ID hashes, too dear to call in a sort
	for id, e := range entries {
		if Kept(pol, e, watched[id], now) == "" {
			cands = append(cands, e)
			ids = append(ids, id)
		}
	}
	sort.Sort(byEviction{cands, ids})
	var out []Victim
	chosen := map[string]bool{}
	usage := u.Bytes
	left := holders(entries) // the entries not chosen yet that name each image
	pick := func(e *state.Entry, reason string) int64 {
		chosen[e.Key.ID()] = true
		frees := e.SizeBytes
		if img := imageOf(e); img != "" {
			if left[img]--; left[img] > 0 {
				frees = 0 // the image stays for the others
			}
		}
		usage -= frees
		u.DiskFree += frees
		out = append(out, Victim{Key: e.Key, Path: e.Path, Bytes: e.SizeBytes, Frees: frees, Reason: reason})
		return frees
	}
	if pol.MaxAge > 0 {
		for _, e := range cands {
			if aged(e.LastUsed, time.Duration(pol.MaxAge), watched[e.Key.ID()].LastUsed, now) {
				pick(e, "age")
			}
		}
	}
	reason, need := "", int64(0)
	if pol.MaxSizeBytes > 0 && usage > percentOf(pol.MaxSizeBytes, pol.HighWatermark) {
		reason, need = "budget", usage-percentOf(pol.MaxSizeBytes, pol.LowWatermark)
	}
	if floor := minFree(pol, u); u.DiskFree > 0 || u.DiskSize > 0 {
		if floor > u.DiskFree && floor-u.DiskFree > need {
			reason, need = "free disk", floor-u.DiskFree
		}
	}
	if need <= 0 {
		return out
	}
	freed := int64(0)
	for _, e := range cands {
		if freed >= need {
			break
		}
		if chosen[e.Key.ID()] {
			continue
		}
		r := reason
		if e.Stage == state.Failed {
			r = "failed"
		}
		freed += pick(e, r)
	}
	return out
}

func minFree(pol state.Policy, u Usage) int64 {
	floor := pol.MinFreeDiskBytes
	if pol.MinFreeDiskPercent > 0 && u.DiskSize > 0 {
		floor = max(floor, percentOf(u.DiskSize, pol.MinFreeDiskPercent))
	}
	return floor
}

// Room returns how many bytes a download of self can take: the budget
// less what the entries that no sweep may evict hold (fixed). ok is false
// when the policy sets no budget.
//
// Ages are judged as a sweeper that watched entries for watched would
// judge them (a missing entry: watched for no time, so only its recorded
// age past the clock skew tolerance counts), which is what the sweep that
// follows a publish can evict; with watched nil, as recorded: whether a
// sweep could ever make the room.
func Room(pol state.Policy, entries map[string]*state.Entry, self state.Key, watched map[string]Watched, now time.Time) (room, fixed int64, ok bool) {
	if pol.MaxSizeBytes <= 0 {
		return 0, 0, false
	}
	kept := map[string]*state.Entry{}
	for id, e := range entries {
		if id != self.ID() && Kept(pol, e, judged(e, id, watched, now), now) != "" {
			kept[id] = e
		}
	}
	// A download of unknown size holds what it wrote; an image that kept
	// entries share, its bytes once.
	fixed = Measure(kept)
	return max(pol.MaxSizeBytes-fixed, 0), fixed, true
}

// judged is how Room and RoomOnDisk judge e's ages (see Room).
func judged(e *state.Entry, id string, watched map[string]Watched, now time.Time) Watched {
	if watched == nil {
		return asRecorded(e, now)
	}
	return watched[id]
}

// RoomOnDisk returns how many bytes a download of self can take under the
// policy's free-disk floor: what is free now, plus what evicting everything
// evictable would free, less the floor. ok is false when the policy keeps
// no floor or the disk's size is unknown. watched is as for Room.
func RoomOnDisk(pol state.Policy, entries map[string]*state.Entry, self state.Key, u Usage, watched map[string]Watched, now time.Time) (room, floor int64, ok bool) {
	floor = minFree(pol, u)
	if floor <= 0 || u.DiskSize <= 0 {
		return 0, 0, false
	}
	var evictable int64
	// An image goes only when every entry that names it may be evicted:
	// its bytes count once, then.
	left := holders(entries)
	for id, e := range entries {
		if id == self.ID() || Kept(pol, e, judged(e, id, watched, now), now) != "" {
			continue
		}
		if img := imageOf(e); img != "" {
			if left[img]--; left[img] > 0 {
				continue
			}
		}
		evictable += e.SizeBytes
	}
	return max(u.DiskFree+evictable-floor, 0), floor, true
}

// Fits says whether a download of total bytes can fit in the budget after
// evicting everything evictable; if not, the error says why.
func Fits(pol state.Policy, entries map[string]*state.Entry, self state.Key, total int64, now time.Time) error {
	room, fixed, ok := Room(pol, entries, self, nil, now)
	if !ok || total <= 0 || total <= room {
		return nil
	}
	return fmt.Errorf("%d bytes cannot fit in the budget of %d bytes (%d bytes are held by entries that cannot be evicted): %w",
		total, pol.MaxSizeBytes, fixed, ErrTooLarge)
}

// byEviction orders entries FAILED first, then least recently used
// first, ties by key ID.
type byEviction struct {
	e   []*state.Entry
	ids []string
}

func (b byEviction) Len() int { return len(b.e) }
func (b byEviction) Swap(i, j int) {
	b.e[i], b.e[j] = b.e[j], b.e[i]
	b.ids[i], b.ids[j] = b.ids[j], b.ids[i]
}
func (b byEviction) Less(i, j int) bool {
	x, y := b.e[i], b.e[j]
	if (x.Stage == state.Failed) != (y.Stage == state.Failed) {
		return x.Stage == state.Failed
	}
	if !x.LastUsed.Equal(y.LastUsed) {
		return x.LastUsed.Before(y.LastUsed)
	}
	return b.ids[i] < b.ids[j]
}
