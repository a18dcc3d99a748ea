package state

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
)

// Format 2 splits the state into a small manifest and immutable shards, so
// that an operation reads and writes what it changes, not the whole cache
// (issue 14: at 10,000 entries, one durable commit of the whole 3.5 MB file
// took 6.7 ms).
//
//   - state.json is the manifest: the header (policy, highest generation),
//     a commit serial, and for each of the 256 shards that holds entries
//     (entries are sharded by the first byte of their key ID) the name of
//     its file under state.d/, with its size, entry count and a hash of its
//     content.
//   - A shard file is written once, under a name no other file ever had
//     (the prefix, the manifest's serial, and a random nonce), fsynced, and
//     never changed. A reader that has a shard's name cached has its
//     content: on sshfs, a stale attribute cache cannot cut a file it never
//     saw before.
//   - A commit writes the changed shards, fsyncs them and state.d/, then
//     replaces the manifest as format 1 replaced the whole file (the
//     previous manifest kept as state.json.prev). The manifest's rename is
//     the one commit point, so a commit touching many shards is atomic
//     with no log.
//   - Format 3 adds packs: a commit of a few shards (packs) writes them
//     into one file, pk-SERIAL-NONCE.json, one after another, and the
//     manifest names each one's offset; one fsync for all of them, where a
//     file each cost a device flush each. A pack is retired, like a shard
//     file, once no shard of the manifest names it. Format 2 manifests are
//     read as they are (no packs, no offsets) and become format 3 at the
//     next commit.
//   - Format 4 adds deltas: a write of named entries in a large shard
//     writes only the entries it changed since the shard's base, and the
//     manifest names both (see deltaMinBase). Format 3 manifests are read
//     as they are and become format 4 at the next commit.
//   - Each manifest lists as retired the shard files of the manifest before
//     it that it no longer names. The commit after it deletes them: at
//     that point neither state.json nor state.json.prev names them. A
//     holder also deletes, after a grace period, files of state.d/ that
//     neither names (the litter of a commit killed before its rename, or of
//     one killed before it deleted the retired shards).
//
// A manifest is JSON with one shard per line:
//
//	{"version":2,"policy":{...},"max_generation":7,"serial":41,"retired":["3f-...json"],"shards":{
//	"00":{"file":"00-0000000000000029-9c1e5b7d.json","bytes":1432,"entries":4,"sha256":"0123456789abcdef"},
//	...
//	}}
//
// and a shard file is format 1's entry lines under a shard header:
//
//	{"shard":"3f","entries":{
//	"3f0c...":{"key":{...},"stage":"READY",...},
//	"3fa7...":{...}
//	}}

// ShardDir is the directory of the root that holds format 2's shard files.
const ShardDir = "state.d"

// numShards is the number of shards: entries are sharded by the first byte
// of their key ID (two hex digits). At 100,000 entries a shard holds about
// 400 of them (140 KB).
const numShards = 256

// manifest is the content of a format 2 state.json.
type manifest struct {
	Version       int     `json:"version"`
	Policy        *Policy `json:"policy,omitempty"`
	MaxGeneration uint64  `json:"max_generation,omitempty"`
	// Serial counts commits; it is part of every shard name it writes.
	Serial uint64 `json:"serial"`
	// Retired are the shard files the manifest before this one named and
	// this one does not: the next commit deletes them.
	Retired []string `json:"retired,omitempty"`
	// Shards maps a shard's prefix to its file; a shard without entries
	// has none.
	Shards map[string]shardRef `json:"shards"`
}

// shardRef names a shard's file and what it must hold.
type shardRef struct {
	File string `json:"file"`
	// Offset is where the shard starts in File when File is a pack
	// (format 3), which holds the shards of one commit one after another.
	Offset  int64  `json:"offset,omitempty"`
	Bytes   int    `json:"bytes"`
	Entries int    `json:"entries"` // in File, the base, without Delta
	SHA256  string `json:"sha256"`  // the first 8 bytes, in hex
	// Delta (format 4) names a second file of the shard's layout holding
	// the entries that a write of named entries changed or added since
	// the base was written: the shard is the base with each of them put
	// over it. See deltaMinBase.
	Delta deltaRef `json:"delta,omitzero"`
}

// deltaRef names a shard's delta: a file like a shard's, whose Entries
// are its lines, not the shard's.
type deltaRef struct {
	File    string `json:"file"`
	Offset  int64  `json:"offset,omitempty"`
	Bytes   int    `json:"bytes"`
	Entries int    `json:"entries"`
	SHA256  string `json:"sha256"`
}

// fileRefs returns the records of the shard's files: its base, then its
// delta if it has one.
func (r shardRef) fileRefs() []shardRef {
	if !r.hasDelta() {
		return []shardRef{r}
	}
	return []shardRef{r, r.delta()}
}

// largeBase reports whether the shard's base is large enough for deltas,
// and so is never carried into another file undecoded (see deltaMinBase).
func (r shardRef) largeBase() bool { return r.Bytes >= deltaMinBase }

// hasDelta reports whether the shard has a delta over its base.
func (r shardRef) hasDelta() bool { return r.Delta.File != "" }

// delta returns the delta's file as a shardRef, for the readers of one.
func (r shardRef) delta() shardRef {
	d := r.Delta
	return shardRef{File: d.File, Offset: d.Offset, Bytes: d.Bytes, Entries: d.Entries, SHA256: d.SHA256}
}

// Deltas (format 4) are for the shards a write of named entries would
// rewrite at a cost that grows with the cache: at 100,000 entries a shard
// is 140 KB, and a get+release rewrote, and read, five of them per lock
// hold (BENCHMARKS.md). A write of named entries in a shard of at least
// deltaMinBase bytes writes only a delta, the shard's changed entries
// since its base, until the delta outgrows a quarter of the base
// (deltaMaxFraction, at most deltaMaxBytes); the write after that merges
// both into a new base.
//
// A base that large is never carried into another file undecoded: a merge
// and a whole write decode it whole. So a read of named entries need not
// validate its other lines; the shard's hash vouches for them, as for any
// line it does not decode.
//
// Below deltaMinBase a delta saves less than it costs: a second file to
// read, a merge every few writes, and a manifest twice the size, written
// at every commit. At 10,000 entries (14 KB shards) get+release with
// deltas reached 0.31-0.40 of the floor measured in the same runs,
// against 0.36-0.51 without (BENCHMARKS.md).
const (
	deltaMinBase     = 32 << 10
	deltaMaxFraction = 4
	deltaMaxBytes    = 64 << 10
)

// deltaFits reports whether a delta of n bytes may stand over a base of
// base bytes, or the shard must be merged into a new base.
func deltaFits(n, base int) bool {
	return n <= base/deltaMaxFraction && n <= deltaMaxBytes
}

// shardOf returns the shard index of a key ID, false if it is not one.
func shardOf(id string) (int, bool) {
	if len(id) < 2 {
		return 0, false
	}
	b, err := hex.DecodeString(id[:2])
	if err != nil || strings.ToLower(id[:2]) != id[:2] {
		return 0, false
	}
	return int(b[0]), true
}

func shardPrefix(i int) string { return hex.EncodeToString([]byte{byte(i)}) }

func shortHash(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// versionOf returns the "version" of a state file's bytes, 0 if it has
// none that parses.
func versionOf(b []byte) int {
	var probe struct {
		Version int `json:"version"`
	}
	if json.Unmarshal(b, &probe) != nil {
		return 0
	}
	return probe.Version
}

// isManifest reports whether b is a format 2 state file. The manifest's
// encoder writes the version first, so a prefix tells most files without
// parsing them: every read asks.
func isManifest(b []byte) bool {
	for _, v := range []string{`{"version":4,`, `{"version":3,`, `{"version":2,`} {
		if bytes.HasPrefix(b, []byte(v)) {
			return true
		}
	}
	return versionOf(b) >= 2
}

// errNewer is the refusal of a state file of a later format.
func errNewer(v int) error {
	return fmt.Errorf("%w: version %d, and this depcache reads versions 1 to %d: upgrade depcache to one that reads version %d", ErrUnsupportedVersion, v, FormatVersion, v)
}

// decodeManifest parses a format 2 manifest. Errors wrap ErrCorrupt or
// ErrUnsupportedVersion and say what is wrong.
func decodeManifest(b []byte) (*manifest, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, fmt.Errorf("%w: file is empty", ErrCorrupt)
	}
	var m manifest
	if err := strictUnmarshal(b, &m); err != nil {
		if v := versionOf(b); v > FormatVersion {
			return nil, errNewer(v)
		}
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if err := checkRepeatedKeys(b, "shards"); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if m.Version > FormatVersion {
		return nil, errNewer(m.Version)
	}
	if m.Version < 2 {
		return nil, fmt.Errorf("%w: not a manifest of format 2 or later (version %d)", ErrCorrupt, m.Version)
	}
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return &m, nil
}

func (m *manifest) validate() error {
	return m.validateExcept(nil)
}

// validateExcept is validate, which does not check again the shard lines
// of checked that hold the record m has (see manifestLines.checked): a
// line's checks depend on the line and the version alone, and a later
// version accepts every line an earlier one does. At 100,000 entries
// checking the 256 lines of every manifest read and written was a tenth
// of a lock hold's CPU.
func (m *manifest) validateExcept(checked *manifestLines) error {
	if m.Shards == nil {
		return errors.New(`no "shards" object`)
	}
	if err := checkGeneration("max_generation", m.MaxGeneration); err != nil {
		return err
	}
	if m.Policy != nil {
		if err := m.Policy.Validate(); err != nil {
			return fmt.Errorf("policy: %w", err)
		}
	}
	for p, r := range m.Shards {
		if checked != nil {
			if i, ok := shardOf(p); ok && shardPrefix(i) == p && checked[i].version != 0 && checked[i].version <= m.Version && checked[i].ref == r {
				continue
			}
		}
		if !isHexN(p, 2) {
			return fmt.Errorf("shard %q: not two lowercase hex digits", p)
		}
		if isPackName(r.File) && m.Version < 3 {
			return fmt.Errorf("shard %s: pack %q in a version %d manifest (packs are format 3)", p, r.File, m.Version)
		}
		if err := checkFileRef(p, "", "a shard without entries has no file", r); err != nil {
			return err
		}
		if r.Delta == (deltaRef{}) {
			continue
		}
		switch d := r.Delta; {
		case m.Version < 4:
			return fmt.Errorf("shard %s: a delta in a version %d manifest (deltas are format 4)", p, m.Version)
		case d.File == r.File && d.Offset == r.Offset:
			return fmt.Errorf("shard %s: the delta is the base %q", p, d.File)
		}
		if err := checkFileRef(p, "delta ", "an empty delta is not written", r.delta()); err != nil {
			return err
		}
	}
	for _, f := range m.Retired {
		if !isShardFile(f) {
			return fmt.Errorf("retired shard: bad file name %q", f)
		}
		if m.names(f) {
			return fmt.Errorf("shard file %s is both named and retired", f)
		}
	}
	return nil
}

// checkFileRef checks the record r of a file of shard p, its base or
// (what "delta ") its delta: its name, offset, size, count and hash.
// empty says why a record of no bytes or entries is wrong.
func checkFileRef(p, what, empty string, r shardRef) error {
	fp, ok := shardFilePrefix(r.File)
	if isPackName(r.File) {
		fp, ok = p, true
	}
	switch {
	case r.Offset < 0 || (r.Offset > 0 && !isPackName(r.File)):
		return fmt.Errorf("shard %s: %soffset %d in file %q (only a pack has offsets)", p, what, r.Offset, r.File)
	case !ok:
		return fmt.Errorf("shard %s: bad %sfile name %q", p, what, r.File)
	case fp != p:
		return fmt.Errorf("shard %s: %sfile %q is another shard's", p, what, r.File)
	case r.Bytes <= 0 || r.Entries <= 0:
		return fmt.Errorf("shard %s: %s%d bytes, %d entries: %s", p, what, r.Bytes, r.Entries, empty)
	case !isHexN(r.SHA256, 16):
		return fmt.Errorf("shard %s: bad %ssha256 %q", p, what, r.SHA256)
	}
	return nil
}

// isHexN reports whether s is n lowercase hex digits.
func isHexN(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < n; i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// shardFilePrefix returns the shard of a shard file name, PP-SERIAL-NONCE.json
// (2, 16 and 8 lowercase hex digits), false for any other name. (A regular
// expression cost a tenth of a hot-path operation.)
func shardFilePrefix(name string) (string, bool) {
	if len(name) != 2+1+16+1+8+5 || name[2] != '-' || name[19] != '-' || name[28:] != ".json" ||
		!isHexN(name[:2], 2) || !isHexN(name[3:19], 16) || !isHexN(name[20:28], 8) {
		return "", false
	}
	return name[:2], true
}

// manifestLines holds each shard line of a manifest (without its comma)
// and what it decodes to, by shard: the next manifest, which differs from
// it in the lines of the shards a commit changed, decodes only those, and
// a commit encodes only those.
type manifestLines [numShards]struct {
	line string
	ref  shardRef
	// version is that of a manifest whose validate accepted ref, 0 for
	// none yet: validateExcept need not check the line again.
	version int
}

// decodeManifestLines decodes b if it follows the manifest's layout,
// decoding only the shard lines prev (which may be nil) does not hold, and
// returns the lines of b. ok is false when b does not follow the layout or
// does not decode: decodeManifest then reads it whole and says what is
// wrong. It accepts only what decodeManifest accepts, with the same result
// (FuzzDecodeManifest checks both).
func decodeManifestLines(b []byte, prev *manifestLines) (*manifest, *manifestLines, bool) {
	b, ok := bytes.CutSuffix(b, []byte("\n}}\n"))
	if !ok {
		return nil, nil, false
	}
	first, rest, _ := bytes.Cut(b, []byte("\n"))
	hdr, ok := bytes.CutSuffix(first, []byte(`,"shards":{`))
	if !ok || len(hdr) < 2 || hdr[0] != '{' {
		return nil, nil, false
	}
	var m manifest
	if strictUnmarshal(append(bytes.Clone(hdr), '}'), &m) != nil || m.Shards != nil || m.Version < 2 || m.Version > FormatVersion {
		return nil, nil, false
	}
	m.Shards = make(map[string]shardRef, bytes.Count(rest, []byte("\n"))+1)
	lines := new(manifestLines)
	for len(rest) > 0 {
		line, after, found := bytes.Cut(rest, []byte("\n"))
		if found && len(after) == 0 {
			return nil, nil, false // an empty line before the end
		}
		rest = after
		line, comma := bytes.CutSuffix(line, []byte(","))
		if comma == !found {
			return nil, nil, false // a comma after every shard but the last
		}
		if len(line) < 6 || line[0] != '"' || line[3] != '"' || line[4] != ':' {
			return nil, nil, false
		}
		i, ok := shardOf(string(line[1:3]))
		if !ok || lines[i].line != "" {
			return nil, nil, false // not a shard, or one named twice
		}
		if prev != nil && prev[i].line == string(line) {
			lines[i] = prev[i]
		} else {
			lines[i].line = string(line)
			if strictUnmarshal(line[5:], &lines[i].ref) != nil {
				return nil, nil, false
			}
		}
		m.Shards[string(line[1:3])] = lines[i].ref
	}
	if m.validateExcept(lines) != nil {
		return nil, nil, false
	}
	lines.checked(m.Version)
	return &m, lines, true
}

// files returns the shard files m names.
func (m *manifest) files() []string {
	if m == nil {
		return nil
	}
	out := make([]string, 0, len(m.Shards))
	for _, r := range m.Shards {
		out = append(out, r.File)
		if r.hasDelta() {
			out = append(out, r.Delta.File)
		}
	}
	slices.Sort(out)
	return slices.Compact(out) // a pack is named once per shard in it
}

// retiredFrom returns the files old named that m does not: a pack stays
// until none of its shards is named. Only the files of the shards whose
// records changed can be retired: the others are named by both.
func (m *manifest) retiredFrom(old *manifest) []string {
	if old == nil {
		return nil
	}
	var maybe []string
	for p, r := range old.Shards {
		if m.Shards[p] != r {
			maybe = append(maybe, r.File)
			if r.hasDelta() {
				maybe = append(maybe, r.Delta.File)
			}
		}
	}
	slices.Sort(maybe)
	maybe = slices.Compact(maybe)
	var out []string
	for _, f := range maybe {
		if !m.names(f) {
			out = append(out, f)
		}
	}
	return out
}

// names reports whether m names the file f, as a base or a delta.
func (m *manifest) names(f string) bool {
	for _, r := range m.Shards {
		if r.File == f || r.Delta.File == f {
			return true
		}
	}
	return false
}

// packPrefix begins the name of a pack, pk-SERIAL-NONCE.json: the shards
// of one commit in one file (format 3).
const packPrefix = "pk"

// isPackName reports whether name is a pack's.
func isPackName(name string) bool {
	return len(name) == 2+1+16+1+8+5 && name[:3] == packPrefix+"-" && name[19] == '-' && name[28:] == ".json" &&
		isHexN(name[3:19], 16) && isHexN(name[20:28], 8)
}

// encodeManifest returns the bytes of m, one shard per line, and its
// lines, reusing those of prev (which may be nil) for the shards that did
// not change.
func encodeManifest(m *manifest, prev *manifestLines) ([]byte, *manifestLines, error) {
	if err := m.validateExcept(prev); err != nil {
		return nil, nil, err
	}
	h, err := json.Marshal(struct {
		Version       int      `json:"version"`
		Policy        *Policy  `json:"policy,omitempty"`
		MaxGeneration uint64   `json:"max_generation,omitempty"`
		Serial        uint64   `json:"serial"`
		Retired       []string `json:"retired,omitempty"`
	}{m.Version, m.Policy, m.MaxGeneration, m.Serial, m.Retired})
	if err != nil {
		return nil, nil, err
	}
	// A line with a delta is about 230 bytes: growing a smaller buffer
	// was a quarter of the encoding at 100,000 entries.
	buf := make([]byte, 0, len(h)+16+len(m.Shards)*256)
	buf = append(buf, h[:len(h)-1]...)
	buf = append(buf, `,"shards":{`...)
	buf = append(buf, '\n')
	lines := new(manifestLines)
	left := len(m.Shards)
	for i := range numShards {
		ref, ok := m.Shards[shardPrefix(i)]
		if !ok {
			continue
		}
		if prev != nil && prev[i].line != "" && prev[i].ref == ref {
			lines[i] = prev[i]
		} else {
			r, err := json.Marshal(ref)
			if err != nil {
				return nil, nil, err
			}
			lines[i].line, lines[i].ref = `"`+shardPrefix(i)+`":`+string(r), ref
		}
		buf = append(buf, lines[i].line...)
		if left--; left > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, '\n')
	}
	buf = append(buf, "}}\n"...)
	lines.checked(m.Version)
	return buf, lines, nil
}

// checked records that a manifest of version v with these lines passed
// validate.
func (l *manifestLines) checked(v int) {
	for i := range l {
		if l[i].line != "" && (l[i].version == 0 || l[i].version > v) {
			l[i].version = v
		}
	}
}

// shardHeader is the first line of shard p's file.
func shardHeader(p string) string { return `{"shard":"` + p + `",` + entriesOpen }

// encodeShard returns the file of shard p holding entries (in ID order),
// reusing the line of every entry equal to the one prev decoded, and the
// cache of its lines, whose source it is.
func encodeShard(p string, entries []idEntry, prev *lineCache) ([]byte, *lineCache, error) {
	return appendEntries(append(getShardBuf(), shardHeader(p)...), entries, prev)
}

// Buffers of shard files: at 100,000 entries a shard is 140 KB, read and
// written on every operation, and allocating them anew made the garbage
// collector's work (which grows with the entries cached) a third of an
// operation.
var shardBufs sync.Pool

func getShardBuf() []byte {
	if p, ok := shardBufs.Get().(*[]byte); ok {
		return (*p)[:0]
	}
	return nil
}

// putShardBuf returns b to the pool; nothing may use it afterwards.
func putShardBuf(b []byte) {
	if cap(b) > 0 {
		shardBufs.Put(&b)
	}
}

// readShardBytes reads a shard: n bytes at off of a pack, or of a whole
// shard file (off 0) n bytes and one more, so that a longer file shows as
// one; fewer if the file is shorter. It reads no further: a file that
// never ends (a link to /dev/zero) cannot fill the memory.
func readShardBytes(buf []byte, name string, packed bool, off int64, n int) ([]byte, error) {
	f, err := openShard(name)
	if err != nil {
		return buf, err
	}
	defer f.Close()
	if !packed {
		off, n = 0, n+1
	}
	buf = slices.Grow(buf[:0], n)[:n]
	got, err := f.ReadAt(buf, off)
	if err == io.EOF {
		err = nil
	}
	return buf[:got], err
}

// errNotShardFile: a name of state.d that is a FIFO, a device, a
// directory or a symbolic link, where depcache writes only regular files.
var errNotShardFile = errors.New("not a shard file")

// openShard opens a file of state.d for reading, and refuses one that is
// not a regular file, without following a link or waiting: a FIFO put in a
// shard's place made every command wait in open(2), deaf to --timeout and
// to the first signal.
func openShard(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("it is a symlink, %w: %w (depcache writes only regular files there; move it away)", errNotShardFile, ErrLayout)
	}
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("it is %s, %w: %w (depcache writes only regular files there; move it away)", describeType(fi.Mode()), errNotShardFile, ErrLayout)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// decodeShard parses the file of shard p, decoding only the lines prev does
// not hold, and of those only the ones need asks for (nil: all). Errors
// wrap ErrCorrupt.
func decodeShard(p string, b []byte, prev *lineCache, need needFn) (*lineCache, error) {
	return decodeShardFor(p, b, prev, need, false)
}

// decodeShardFor is decodeShard, which with trust does not check that the
// lines need does not ask for are JSON (see deltaMinBase).
func decodeShardFor(p string, b []byte, prev *lineCache, need needFn, trust bool) (*lineCache, error) {
	hdr := shardHeader(p) + "\n"
	if bytes.HasPrefix(b, []byte(hdr)) && bytes.HasSuffix(b[len(hdr):], []byte(layoutEnd+"\n")) {
		if lines, ok := decodeBody(b, len(hdr), len(b)-len(layoutEnd)-1, prev, need, trust); ok && inShard(p, lines) {
			return lines, nil
		}
	}
	// Not in the layout, or a line does not decode: decode it whole, which
	// says what is wrong.
	var doc struct {
		Shard   string            `json:"shard"`
		Entries map[string]*Entry `json:"entries"`
	}
	if err := strictUnmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if err := checkRepeatedKeys(b, "entries"); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if doc.Shard != p {
		return nil, fmt.Errorf("%w: shard %q where shard %s belongs", ErrCorrupt, doc.Shard, p)
	}
	if doc.Entries == nil {
		return nil, fmt.Errorf("%w: no \"entries\" object", ErrCorrupt)
	}
	sorted := make([]idEntry, 0, len(doc.Entries))
	for id, e := range doc.Entries {
		if err := e.validate(id); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		if !strings.HasPrefix(id, p) {
			return nil, fmt.Errorf("%w: entry %s is not of shard %s", ErrCorrupt, id, p)
		}
		sorted = append(sorted, idEntry{id, e})
	}
	slices.SortFunc(sorted, func(a, b idEntry) int { return strings.Compare(a.id, b.id) })
	// Its lines as this layout writes them: their source is not the file.
	_, lines, err := encodeShard(p, sorted, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return lines, nil
}

func inShard(p string, c *lineCache) bool {
	for _, cl := range c.lines {
		if !strings.HasPrefix(cl.id, p) {
			return false
		}
	}
	return true
}

// shardChanged reports whether the n entries of shard i in entries differ
// from what sn read of it (its delta over its base): the same count, and
// each entry read still there, the same or Equal, is the same set.
func shardChanged(sn *snapshot, i, n int, entries map[string]*Entry) bool {
	base, d := sn.lines[i], sn.deltas[i]
	same := func(cl cachedLine) bool {
		e, ok := entries[cl.id]
		return ok && (e == cl.e || (e != nil && cl.e != nil && e.Equal(cl.e)))
	}
	read := 0
	if d != nil {
		for _, cl := range d.lines {
			if read++; !same(cl) {
				return true
			}
		}
	}
	if base != nil {
		for _, cl := range base.lines {
			if d.has(cl.id) {
				continue
			}
			if read++; !same(cl) {
				return true
			}
		}
	}
	return read != n
}

// namedChanged reports whether any of the entries named (all of them in
// shard i) differs in entries from what sn read: a write of named entries
// changes no other line.
func namedChanged(sn *snapshot, i int, named []string, entries map[string]*Entry) bool {
	for _, id := range named {
		e, now := entries[id]
		cl, was := sn.lineOf(i, id)
		switch {
		case now != was:
			return true
		case now && e != cl.e && (cl.e == nil || !e.Equal(cl.e)):
			return true
		}
	}
	return false
}

// errShardMismatch is a shard file whose size or hash is not what its
// manifest records.
var errShardMismatch = errors.New("does not match its manifest")

// readShardFile reads the file of shard p that ref names, in root's
// state.d, and decodes it (only the lines prev does not hold, of those
// only the ones need asks for), checking it against ref. Its bytes come back for a copy kept aside. A missing file
// wraps fs.ErrNotExist; a bad one wraps ErrCorrupt, and errShardMismatch
// when its size or hash differ.
//
// A base (not a delta) of deltaMinBase bytes or more is read trusting the
// lines need does not ask for: no write carries them over undecoded.
func readShardFile(root, p string, ref shardRef, base bool, prev *lineCache, need needFn) ([]byte, *lineCache, error) {
	name := filepath.Join(root, ShardDir, ref.File)
	b, err := readShardBytes(getShardBuf(), name, isPackName(ref.File), ref.Offset, ref.Bytes)
	if err != nil {
		return nil, nil, err
	}
	if len(b) != ref.Bytes || shortHash(b) != ref.SHA256 {
		return b, nil, fmt.Errorf("%w: %w: %d bytes with sha256 %s, recorded %d bytes with sha256 %s", ErrCorrupt, errShardMismatch, len(b), shortHash(b), ref.Bytes, ref.SHA256)
	}
	lines, err := decodeShardFor(p, b, prev, need, base && ref.largeBase())
	if need != nil && (err != nil || len(lines.lines) != ref.Entries) {
		// Whatever a decode of some lines finds wrong, the whole decode
		// judges, with the errors it gives.
		lines, err = decodeShard(p, b, prev, nil)
	}
	if err == nil && len(lines.lines) != ref.Entries {
		err = fmt.Errorf("%w: %d entries, recorded %d", ErrCorrupt, len(lines.lines), ref.Entries)
	}
	if err != nil {
		return b, nil, err
	}
	lines.detach(b, name, ref.Offset, isPackName(ref.File))
	putShardBuf(b) // nothing refers to it: the caller gets no bytes
	return nil, lines, nil
}

// keepShardBytes is the size up to which a shard keeps its text in memory:
// writing it again then needs no read of its file (three round trips on
// sshfs), and 256 of them cost at most 4 MB. At 100,000 entries a shard is
// 140 KB, and only its lines' hashes are kept.
const keepShardBytes = 16 << 10

// detach makes c independent of src, the bytes of file (an absolute path)
// that it was decoded from or encoded into, a pooled buffer: a small shard
// keeps a copy, a large one reads file again when a write reuses its
// lines.
func (c *lineCache) detach(src []byte, file string, off int64, packed bool) {
	if len(c.src) == 0 || len(src) == 0 || &c.src[0] != &src[0] {
		return
	}
	c.file, c.off, c.size, c.packed = file, off, len(src), packed
	if len(src) <= keepShardBytes {
		c.src = bytes.Clone(src)
	} else {
		c.src = nil
	}
}
