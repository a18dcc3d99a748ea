package etcdstore

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/depcache/depcache/state"
)

// FormatVersion is the version of the key layout this package writes under
// a prefix (in PREFIX/format). A prefix with a higher version is refused
// with state.ErrUnsupportedVersion rather than misread.
const FormatVersion = 1

// layout names the keys of one prefix. p has no trailing slash.
//
//	p/format            {"version":1}: written by the first commit; Exists looks at it
//	p/h                 header: the policy
//	p/g                 the highest generation: apart from the policy, so
//	                    that a commit that does not raise it need not
//	                    compare it, and new entries do not conflict with
//	                    every Get
//	p/e/<keyID>         one entry, without its dependents
//	p/e/<keyID>/owner   the generation of its owner, on the owner's lease
//	                    (DOWNLOADING entries, after LeaseOwners)
//	p/d/<keyID>/<hex>   one dependent of that entry, named by the hex of its name;
//	                    on a lease if it is bound to a process or has a TTL
//	p/x                 bumped (blindly) by every commit that removes an entry
//	p/n/<nonce>         one per commit, to settle a lost answer; on a 10-minute lease
//	p/root-id           the ID of the root whose content this prefix describes
//	p/sweeper/<lease>   the sweeper election's candidates, on their sessions' leases
//
// Every commit that changes an entry or any of its dependents also puts
// p/e/<keyID> (the same bytes if only dependents changed), so that the
// entry key's mod revision versions the entry with its dependents: one
// compare covers both. The one exception is a dependent on a lease
// (p/d/... of a process-bound or TTL dependent): etcd deletes it when the
// lease ends, without a commit of ours.
type layout struct{ p string }

func (l layout) format() string         { return l.p + "/format" }
func (l layout) header() string         { return l.p + "/h" }
func (l layout) generation() string     { return l.p + "/g" }
func (l layout) removals() string       { return l.p + "/x" }
func (l layout) rootID() string         { return l.p + "/root-id" }
func (l layout) entry(id string) string { return l.p + "/e/" + id }
func (l layout) deps(id string) string  { return l.p + "/d/" + id + "/" }
func (l layout) depsAll() string        { return l.p + "/d/" }
func (l layout) dep(id, name string) string {
	return l.deps(id) + hex.EncodeToString([]byte(name))
}
func (l layout) nonce(n string) string  { return l.p + "/n/" + n }
func (l layout) owner(id string) string { return l.entry(id) + "/owner" }
func (l layout) sweeper() string        { return l.p + "/sweeper/" }

// parseOwnerKey returns the entry ID of an owner key.
func (l layout) parseOwnerKey(k string) (string, bool) {
	rest, ok := strings.CutPrefix(k, l.p+"/e/")
	if !ok {
		return "", false
	}
	id, ok := strings.CutSuffix(rest, "/owner")
	return id, ok && id != "" && !strings.Contains(id, "/")
}
func (l layout) noncePrefix() string { return l.p + "/n/" }

// stateRange is [start, end) of the entry and dependent keys: p/d/ ... p/e/.
func (l layout) stateRange() (string, string) { return l.p + "/d/", l.p + "/e0" }

// parseStateKey splits a key of stateRange: an entry (id, "", false) or a
// dependent (id, name, true).
func (l layout) parseStateKey(k string) (id, name string, dep bool, err error) {
	switch {
	case strings.HasPrefix(k, l.p+"/e/"):
		id = k[len(l.p)+3:]
		if id == "" || strings.Contains(id, "/") {
			return "", "", false, fmt.Errorf("key %q: not an entry key", k)
		}
		return id, "", false, nil
	case strings.HasPrefix(k, l.p+"/d/"):
		rest := k[len(l.p)+3:]
		i := strings.IndexByte(rest, '/')
		if i <= 0 {
			return "", "", false, fmt.Errorf("key %q: not a dependent key", k)
		}
		b, herr := hex.DecodeString(rest[i+1:])
		if herr != nil || len(b) == 0 {
			return "", "", false, fmt.Errorf("key %q: dependent name is not hex", k)
		}
		return rest[:i], string(b), true, nil
	}
	return "", "", false, fmt.Errorf("key %q: outside the state's keys", k)
}

// checkID refuses an ID that would reach into another entry's keys.
func checkID(id string) error {
	if id == "" || strings.ContainsAny(id, "/\x00") {
		return fmt.Errorf("entry ID %q: %w", id, state.ErrBadKey)
	}
	return nil
}

// header is the value of p/h (the policy) and of p/g (the generation).
type header struct {
	Policy        *state.Policy `json:"policy,omitempty"`
	MaxGeneration uint64        `json:"max_generation,omitempty"`
}

// format is the value of p/format.
type format struct {
	Version int `json:"version"`
}

// strict decodes one JSON value, refusing unknown fields and trailing data.
func strict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if _, err := d.Token(); err != io.EOF {
		return fmt.Errorf("data after the JSON value")
	}
	return nil
}

// encodeEntry is an entry's value: its JSON without the dependents.
func encodeEntry(e *state.Entry) ([]byte, error) {
	c := *e
	c.Dependents = nil
	return json.Marshal(&c)
}

func decodeEntry(b []byte) (*state.Entry, error) {
	var e state.Entry
	if err := strict(b, &e); err != nil {
		return nil, err
	}
	if e.Dependents != nil {
		return nil, fmt.Errorf("dependents inside the entry's value")
	}
	return &e, nil
}

func decodeFormat(b []byte) (int, error) {
	var f format
	if err := json.Unmarshal(b, &f); err != nil {
		return 0, fmt.Errorf("%w: format key: %w", state.ErrCorrupt, err)
	}
	switch {
	case f.Version > FormatVersion:
		return 0, fmt.Errorf("%w: layout version %d, this depcache reads up to %d", state.ErrUnsupportedVersion, f.Version, FormatVersion)
	case f.Version < 1:
		return 0, fmt.Errorf("%w: format key: no or bad version (%d)", state.ErrCorrupt, f.Version)
	}
	return f.Version, nil
}

func encodeHeader(st *state.State) (policy, gen []byte, err error) {
	if policy, err = json.Marshal(header{Policy: st.Policy}); err != nil {
		return nil, nil, err
	}
	gen, err = json.Marshal(header{MaxGeneration: st.MaxGeneration})
	return policy, gen, err
}

func decodeHeader(policy, gen []byte, st *state.State) error {
	var h, g header
	if policy != nil {
		if err := strict(policy, &h); err != nil || h.MaxGeneration != 0 {
			return fmt.Errorf("%w: header: %v", state.ErrCorrupt, err)
		}
	}
	if gen != nil {
		if err := strict(gen, &g); err != nil || g.Policy != nil {
			return fmt.Errorf("%w: generation key: %v", state.ErrCorrupt, err)
		}
	}
	st.Policy, st.MaxGeneration = h.Policy, g.MaxGeneration
	return nil
}
