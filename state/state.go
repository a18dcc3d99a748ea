package state

import (
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// FormatVersion is the version of the state format this package writes: 4,
// a manifest and immutable shard files, packs and deltas (see v2.go). It
// reads formats 1 (one document), 2 and 3, and converts them at the first
// write. A state with a higher
// version is refused with [ErrUnsupportedVersion] rather than misread, so
// an older depcache never rewrites a newer one's state.
const FormatVersion = 4

// Stage is where an entry is in its life.
type Stage string

const (
	// Downloading means the content is being fetched. Owner names the one
	// process doing it; a Downloading entry without an owner is claimable.
	Downloading Stage = "DOWNLOADING"
	// Ready means the content is complete at Path and verified. It is left
	// only by eviction.
	Ready Stage = "READY"
	// Failed means the last attempt gave up; Message says why. The entry is
	// pruned after a cool-down so that a later request retries.
	Failed Stage = "FAILED"
)

// Valid reports whether s is one of the three stages.
func (s Stage) Valid() bool {
	return s == Downloading || s == Ready || s == Failed
}

// UnmarshalText refuses unknown stages so that a corrupt file is an error,
// not an entry in a stage nothing handles.
func (s *Stage) UnmarshalText(b []byte) error {
	v := Stage(b)
	if !v.Valid() {
		return fmt.Errorf("unknown stage %q", b)
	}
	*s = v
	return nil
}

// State is the whole content of the state file.
//
// The entries of a State that a [Store] hands out (to an Update's function,
// or from View) are shared with the store's cache of the file's lines, and
// must not be modified in place: to change one, Put a modified Clone (the
// transitions package returns a new entry whenever its Result says Changed,
// and its input otherwise). Copying them for every
// read cost a tenth of an operation under contention (issue 7). Tests run
// with DEPCACHE_CHECK_SHARED=1, which makes every Update check that no
// shared entry was changed.
type State struct {
	// Version is the file format version; see FormatVersion.
	Version int `json:"version"`
	// Entries maps Key.ID() to the entry. See State on sharing.
	Entries map[string]*Entry `json:"entries"`
	// Policy is the root's cleanup policy; nil until a manager stores one.
	Policy *Policy `json:"policy,omitempty"`
	// MaxGeneration is the highest generation any entry of this root ever
	// had. A new entry starts from it, so that a key removed and requested
	// again never reuses a generation (the fencing token, and part of the
	// staging and published paths) that an old owner may still hold.
	MaxGeneration uint64 `json:"max_generation,omitempty"`
}

// NoteGenerations raises MaxGeneration to the highest entry generation.
func (s *State) NoteGenerations() {
	for _, e := range s.Entries {
		s.MaxGeneration = max(s.MaxGeneration, e.Generation)
	}
}

// New returns an empty state of the current format version.
func New() *State {
	return &State{Version: FormatVersion, Entries: map[string]*Entry{}}
}

// Get returns the entry for k, or nil.
func (s *State) Get(k Key) *Entry {
	return s.Entries[k.ID()]
}

// Put stores e under its key's ID, replacing any entry with that key.
func (s *State) Put(e *Entry) {
	s.Entries[e.Key.ID()] = e
}

// Delete removes the entry for k.
func (s *State) Delete(k Key) {
	delete(s.Entries, k.ID())
}

// Sorted returns the entries ordered by key ID, for stable output.
func (s *State) Sorted() []*Entry {
	// By the map's keys, which are the entries' key IDs: Key.ID hashes,
	// and a sort that called it in each comparison cost 1.6 s at 100,000
	// entries, a third of a CLI command's time.
	ids := make([]string, 0, len(s.Entries))
	for id := range s.Entries {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	out := make([]*Entry, len(ids))
	for i, id := range ids {
		out[i] = s.Entries[id]
	}
	return out
}

// Entry is one cached dependency.
type Entry struct {
	Key   Key   `json:"key"`
	Stage Stage `json:"stage"`
	// Path is the content's location relative to the root ("" until READY).
	Path string `json:"path,omitempty"`
	// SizeBytes is the size on disk of the published content.
	SizeBytes int64 `json:"size_bytes"`
	// Dependents are the users of the entry, by name.
	Dependents map[string]Dependent `json:"dependents,omitempty"`
	// Owner is the process downloading the entry; nil when nobody is.
	Owner *Owner `json:"owner,omitempty"`
	// Generation is bumped on every claim. It is the fencing token: a
	// download may publish only with the generation it claimed.
	Generation uint64 `json:"generation"`
	// Progress is reported by the owner while downloading.
	Progress Progress `json:"progress"`
	// LastUsed and Created are wall-clock times of whoever wrote them; they
	// order entries for eviction, they never decide liveness.
	LastUsed time.Time `json:"last_used"`
	Created  time.Time `json:"created"`
	// Failures counts failed attempts in a row, for the cool-down back-off.
	Failures int `json:"failures"`
	// FailedAt is when the entry became FAILED (the failing host's clock);
	// it only times the cool-down.
	FailedAt time.Time `json:"failed_at,omitzero"`
	// Permanent says the last failure was one a retry would only repeat
	// (a 404, a missing file), as the source told it. Added in format 1
	// as an omitempty field: older versions read and rewrite the file,
	// dropping only this mark.
	Permanent bool `json:"permanent,omitempty"`
	// Message is the reason of the last failure, or a note.
	Message string `json:"message,omitempty"`
	// ImageID is the full image ID of a READY image entry.
	ImageID string `json:"image_id,omitempty"`
	// RepoDigest is the image's repository digest, when the engine knows it.
	RepoDigest string `json:"repo_digest,omitempty"`
	// External: the content was there before depcache fetched it (an image
	// the daemon already had); depcache never removes it.
	External bool `json:"external,omitempty"`
}

// Progress is what an owner reports while downloading. Waiters judge a stall
// by watching these values stay unchanged on their own clock, never by
// comparing a timestamp.
type Progress struct {
	Bytes int64 `json:"bytes"`
	// Total is the expected size, or 0 when unknown.
	Total int64 `json:"total,omitempty"`
	// Heartbeat is bumped by the owner on every report, even when no bytes
	// arrived, so that a slow but live download is not taken over.
	Heartbeat uint64 `json:"heartbeat"`
}

// Dependent is one named user of an entry.
type Dependent struct {
	// Since is when it registered (the registering host's clock).
	Since time.Time `json:"since"`
	// Process, when set, binds the dependent to a live process: it is
	// reaped once that process is provably gone.
	Process *Process `json:"process,omitempty"`
	// Expires, when set, is when a TTL-bound dependent lapses.
	Expires *time.Time `json:"expires,omitempty"`
	// Lease is bumped by the manager of a process-bound dependent while it
	// runs; another host reaps the dependent when it stayed unchanged for
	// the lease duration on that host's clock.
	Lease uint64 `json:"lease,omitempty"`
}

// Owner is the process that downloads an entry.
type Owner struct {
	Process
	// ManagerID tells apart two managers in one process.
	ManagerID string `json:"manager_id"`
}

// Same reports whether o and p denote the same manager of the same process.
func (o *Owner) Same(p *Owner) bool {
	return o != nil && p != nil && o.ManagerID == p.ManagerID && o.Process.Same(p.Process)
}

// Validate checks what a hand-edited or corrupt file could get wrong and
// what would make the rest of depcache unsafe: keys and paths.
func (s *State) Validate() error {
	if s.Entries == nil {
		return fmt.Errorf("no \"entries\" object")
	}
	if s.Policy != nil {
		if err := s.Policy.Validate(); err != nil {
			return fmt.Errorf("policy: %w", err)
		}
	}
	if err := checkGeneration("max_generation", s.MaxGeneration); err != nil {
		return err
	}
	for id, e := range s.Entries {
		if err := e.validate(id); err != nil {
			return err
		}
	}
	return nil
}

// GenerationLimit bounds every generation a state may hold. A root makes
// one per claim, so none reaches it (2^62 claims at a million a second
// take 146,000 years); a state past it is damaged or forged, and counting
// on from near 2^64 wrapped to 0, reusing the generation, and so the
// staging and published paths, of an earlier incarnation.
const GenerationLimit = 1 << 62

func checkGeneration(what string, g uint64) error {
	if g > GenerationLimit {
		return fmt.Errorf("%s %d: past %d, more than any root ever counts to", what, g, uint64(GenerationLimit))
	}
	return nil
}

// validate checks one entry filed under id.
func (e *Entry) validate(id string) error {
	if e == nil {
		return fmt.Errorf("entry %s: null", id)
	}
	if err := e.Key.Validate(); err != nil {
		return fmt.Errorf("entry %s: %w", id, err)
	}
	if e.Key.ID() != id {
		return fmt.Errorf("entry %s: filed under the wrong ID (its key's ID is %s)", id, e.Key.ID())
	}
	if !e.Stage.Valid() {
		return fmt.Errorf("entry %s: unknown stage %q", id, e.Stage)
	}
	if e.Path != "" {
		if err := CheckRelPath(e.Path); err != nil {
			return fmt.Errorf("entry %s: %w", id, err)
		}
	}
	if e.SizeBytes < 0 || e.Progress.Bytes < 0 || e.Progress.Total < 0 {
		return fmt.Errorf("entry %s: negative size", id)
	}
	if err := checkGeneration("generation", e.Generation); err != nil {
		return fmt.Errorf("entry %s: %w", id, err)
	}
	return nil
}

// CheckRelPath rejects a path that is absolute, not clean, or would leave the
// root, so that no value read from the state file can point outside it.
func CheckRelPath(p string) error {
	if !filepath.IsLocal(p) || filepath.Clean(p) != p || strings.ContainsRune(p, 0) {
		return fmt.Errorf("path %q: %w", p, ErrOutsideRoot)
	}
	return nil
}

// Clone returns a deep copy of s.
func (s *State) Clone() *State {
	c := &State{Version: s.Version, Entries: make(map[string]*Entry, len(s.Entries)), MaxGeneration: s.MaxGeneration}
	if s.Policy != nil {
		p := *s.Policy
		p.Pins = append([]string(nil), s.Policy.Pins...)
		c.Policy = &p
	}
	for id, e := range s.Entries {
		c.Entries[id] = e.Clone()
	}
	return c
}

// Clone returns a deep copy of e.
func (e *Entry) Clone() *Entry {
	c := new(Entry)
	*c = *e
	if e.Owner != nil {
		o := *e.Owner
		c.Owner = &o
	}
	if b := e.Key.Build; b != nil {
		cb := *b
		cb.Args = maps.Clone(b.Args)
		c.Key.Build = &cb
	}
	if e.Dependents != nil {
		c.Dependents = make(map[string]Dependent, len(e.Dependents))
		for name, d := range e.Dependents {
			if d.Process != nil {
				p := *d.Process
				d.Process = &p
			}
			if d.Expires != nil {
				t := *d.Expires
				d.Expires = &t
			}
			c.Dependents[name] = d
		}
	}
	return c
}
