package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
)

// The state file is one JSON document of the schema of State, written with
// one entry per line and the entries last:
//
//	{"version":1,"policy":{...},"max_generation":7,"entries":{
//	"0c1f...":{"key":{...},"stage":"READY",...},
//	"a7d2...":{"key":{...},"stage":"DOWNLOADING",...}
//	}}
//
// json.Marshal escapes every newline inside a string, so a line break
// separates entries and nothing else. A reader splits the file at line
// breaks and decodes only the lines it has not seen in the file it last read
// or wrote; a writer re-encodes only the entries that changed. Decoding and
// encoding the whole document on every operation cost several times the
// durable commit itself (issue 7: 11.5 ms against 1.35 ms at 1,000 entries).
//
// The layout is an optimisation, never a second format: any file that does
// not follow it exactly (a hand edit, lines out of ID order, a file written
// by an older depcache) is decoded whole by [Decode], which stays the one
// definition of a valid state file, and the line path accepts only what
// Decode accepts, with the same result, whatever file its cache came from
// (FuzzDecodeLines checks both). The cache holds only what decoding a line
// gave, never a writer's in-memory values, so a hit returns exactly what
// decoding the line again would.

const (
	entriesOpen = `"entries":{`
	layoutEnd   = "}}"
)

// lineCache holds the entry lines of a state file the store read through
// the line path or wrote, decoded and validated, strictly in ID order (a
// file with lines out of order is not read through the line path). The
// cached entries are handed out as they are, shared, and never modified
// (see State); a writer knows an entry it was handed unchanged by its
// pointer. A slice walked in step with the file, rather than a map,
// because hashing every line and building a map per read cost more than
// the rest of a read.
//
// The lines' text is not kept in memory, only a hash of each line: it was
// 370 bytes of the 900 a cached entry cost. The text is where src holds it
// (a format 1 document, read only until its first write converts it, and a
// shard just encoded), or else in file, the shard file the lines were read
// from, which a write that reuses them reads again: shard files never
// change.
//
// A line may be held undecoded (e nil, lazy): a read of named entries
// (UpdateEntries) decodes only their lines and the lines it finds decoded
// in its cache, and a write carries the others over as their bytes. At
// 100,000 entries a shard holds about 400 lines, and decoding all of them
// to change one was half the CPU of an operation. The shard's hash in the
// manifest vouches for the undecoded lines: what a writer wrote, each line
// validated when it was encoded. A later read that needs them decodes
// them then, with the same checks, reading only their bytes again when
// the file is one it saw (decodeMore).
type lineCache struct {
	lines []cachedLine
	src   []byte
	file  string // an absolute path, when src is nil
	// off and size place the shard in file when it is a pack (packed).
	off    int64
	size   int
	packed bool
	lazy   int // how many lines are held undecoded
}

type cachedLine struct {
	id     string
	off, n int     // the line's place in the source, without the separating comma
	sum    lineSum // of the line's bytes
	e      *Entry  // nil: not decoded (see lineCache)
	// pristine is a deep copy of e, kept only under DEPCACHE_CHECK_SHARED
	// to catch a caller that modified a shared entry.
	pristine *Entry
}

// cursor walks a lineCache in step with a file's lines, both in ID order.
type cursor struct {
	c *lineCache
	i int
}

// find returns the cached line for id. ids must be asked in increasing order
// to be found; any other order only misses. The caller compares the bytes.
func (k *cursor) find(id string) (cachedLine, bool) {
	if k.c == nil {
		return cachedLine{}, false
	}
	// Equality first: most lines are found where the cursor stands, and ==
	// is much cheaper than an ordering comparison (a tenth of a hold at
	// 1,000 entries went to comparing IDs).
	for ; k.i < len(k.c.lines); k.i++ {
		cur := k.c.lines[k.i].id
		if cur == id {
			return k.c.lines[k.i], true
		}
		if cur > id {
			break
		}
	}
	return cachedLine{}, false
}

// has reports whether id is cached (c is sorted by ID, see lineCache).
func (c *lineCache) has(id string) bool {
	_, found := c.line(id)
	return found
}

// line returns the cached line of id.
func (c *lineCache) line(id string) (cachedLine, bool) {
	if c == nil {
		return cachedLine{}, false
	}
	i, found := slices.BinarySearchFunc(c.lines, id, func(l cachedLine, id string) int { return strings.Compare(l.id, id) })
	if !found {
		return cachedLine{}, false
	}
	return c.lines[i], true
}

// decodedFor reports whether every line that need asks for is decoded
// (need nil: every line).
func (c *lineCache) decodedFor(need needFn) bool {
	if c == nil || c.lazy == 0 {
		return true
	}
	if need == nil {
		return false
	}
	for _, cl := range c.lines {
		if cl.e == nil && need(cl.id) {
			return false
		}
	}
	return true
}

// needFn says which entry lines a read must decode; nil: all of them.
type needFn func(id string) bool

// decodeMore returns a copy of c with the lines that need asks for decoded
// too, reading only those lines: from src, or from file at their places. A
// shard file never changes, and each line's hash, taken when the whole
// file was checked against its manifest, vouches for the bytes read back,
// so a read of named entries in a shard it saw before reads a line, not
// 140 KB and their hash (at 100,000 entries, where a base stays while many
// deltas over it come and go). ok is false when a line cannot be had that
// way (its file gone, its bytes not those hashed): the caller reads the
// file whole, with the checks and errors of a first read.
func (c *lineCache) decodeMore(need needFn) (next *lineCache, ok bool) {
	if c == nil || need == nil || (c.src == nil && c.file == "") {
		return nil, false
	}
	next = &lineCache{src: c.src, file: c.file, off: c.off, size: c.size, packed: c.packed, lazy: c.lazy}
	var f *os.File
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	var buf []byte
	for i, cl := range c.lines {
		if cl.e != nil || !need(cl.id) {
			continue
		}
		if next.lines == nil {
			next.lines = slices.Clone(c.lines)
		}
		var line []byte
		if c.src != nil {
			line = cl.bytesIn(c.src)
		} else {
			if f == nil {
				var err error
				if f, err = openShard(c.file); err != nil {
					return nil, false
				}
			}
			buf = slices.Grow(buf[:0], cl.n)[:cl.n]
			if _, err := f.ReadAt(buf, c.off+int64(cl.off)); err != nil || sumLine(buf) != cl.sum {
				return nil, false
			}
			line = buf
		}
		if line == nil {
			return nil, false
		}
		dec, ok := decodeLineFor(line, cl.off, &cursor{}, nil, false)
		if !ok || dec.id != cl.id || dec.e == nil {
			return nil, false
		}
		next.lines[i] = dec
		next.lazy--
	}
	if next.lines == nil {
		return c, true
	}
	return next, true
}

// errUndecodedUnreadable: a write carries a line over undecoded, and the
// shard file it is in could not be read again for its bytes.
var errUndecodedUnreadable = errors.New("its line, not decoded, could not be read again from its shard")

// header is the state without its entries, for the first line.
type header struct {
	Version       int     `json:"version"`
	Policy        *Policy `json:"policy,omitempty"`
	MaxGeneration uint64  `json:"max_generation,omitempty"`
}

// Encode returns st as one self-contained document of format 1 (the
// layout above, "version":1), after validating it: the form of the copies
// that doctor keeps aside, which Decode and DecodeFile read back.
func Encode(st *State) ([]byte, error) {
	b, _, err := encodeLines(nil, st, nil)
	return b, err
}

// encodeLines appends st to dst in the line layout of format 1, reusing the line of every entry
// equal to the one prev decoded from it. It validates what it encodes anew
// (prev's entries were validated when decoded) and returns the cache of the
// lines it wrote.
func encodeLines(dst []byte, st *State, prev *lineCache) ([]byte, *lineCache, error) {
	if st.Entries == nil {
		return nil, nil, errors.New(`no "entries" object`)
	}
	if st.Policy != nil {
		if err := st.Policy.Validate(); err != nil {
			return nil, nil, fmt.Errorf("policy: %w", err)
		}
	}
	h, err := json.Marshal(header{Version: 1, Policy: st.Policy, MaxGeneration: st.MaxGeneration})
	if err != nil {
		return nil, nil, err
	}
	buf := append(dst, h[:len(h)-1]...)
	if len(h) > 2 {
		buf = append(buf, ',')
	}
	buf = append(buf, entriesOpen...)
	return appendEntries(buf, sortedEntries(st, prev), prev)
}

// appendEntries appends the entry lines of sorted (in ID order) to buf,
// then the end of the document, reusing the line of every entry equal to
// the one prev decoded from it, and returns the lines with buf as their
// source. It validates what it encodes anew.
func appendEntries(buf []byte, sorted []idEntry, prev *lineCache) ([]byte, *lineCache, error) {
	next := &lineCache{lines: make([]cachedLine, len(sorted))}
	var old []byte // prev's source
	if prev != nil {
		var done func()
		old, done = prev.source()
		defer done()
	}
	buf = append(buf, '\n')
	k := cursor{c: prev}
	for i, ie := range sorted {
		id, e := ie.id, ie.e
		cl, ok := k.find(id)
		var line []byte
		// The same pointer: handed out and kept, or both undecoded (a
		// line carried over by a write of named entries).
		if ok && (cl.e == e || (cl.e != nil && e != nil && cl.e.Equal(e))) {
			line = cl.bytesIn(old)
		}
		if line == nil && e == nil {
			return nil, nil, fmt.Errorf("entry %s: %w", id, errUndecodedUnreadable)
		}
		if e == nil {
			next.lazy++
		}
		if line == nil {
			if err := e.validate(id); err != nil {
				return nil, nil, err
			}
			enc, err := encodeLine(id, e)
			if err != nil {
				return nil, nil, err
			}
			// Cache what a reader decodes from the line, not e: its times
			// carry a monotonic reading and a location, its strings may
			// hold invalid UTF-8, none of which survive the file.
			decoded, ok := decodeLine([]byte(enc), 0, &cursor{})
			if !ok || decoded.id != id {
				return nil, nil, fmt.Errorf("entry %s: its encoding does not decode back", id)
			}
			cl, line = decoded, []byte(enc)
		}
		cl.off, cl.n = len(buf), len(line)
		buf = append(buf, line...)
		if i < len(sorted)-1 {
			buf = append(buf, ',')
		}
		buf = append(buf, '\n')
		next.lines[i] = cl
	}
	buf = append(buf, layoutEnd...)
	buf = append(buf, '\n')
	next.src = buf
	return buf, next, nil
}

// source returns the bytes the lines of c are in, nil if they cannot be
// read (a write then encodes the entries again), and a function to call
// once they are no longer used.
func (c *lineCache) source() ([]byte, func()) {
	if c.src != nil || c.file == "" {
		return c.src, func() {}
	}
	b, err := readShardBytes(getShardBuf(), c.file, c.packed, c.off, c.size)
	if err == nil && len(b) != c.size {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		putShardBuf(b)
		return nil, func() {}
	}
	return b, func() { putShardBuf(b) }
}

// bytesIn returns the line of cl in src, nil if src does not hold it.
func (cl cachedLine) bytesIn(src []byte) []byte {
	if cl.off < 0 || cl.off+cl.n > len(src) {
		return nil
	}
	line := src[cl.off : cl.off+cl.n]
	if sumLine(line) != cl.sum {
		return nil
	}
	return line
}

// lineSum is a hash of a line, by which a read knows a line it decoded
// before. Two independent 64-bit hashes with seeds of this process: a
// collision would take a chosen file, and whoever can write the state
// file can write any state.
type lineSum [2]uint64

var lineSeeds = [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}

func sumLine(b []byte) lineSum {
	return lineSum{maphash.Bytes(lineSeeds[0], b), maphash.Bytes(lineSeeds[1], b)}
}

type idEntry struct {
	id string
	e  *Entry
}

// sortedEntries returns the entries of st in ID order. Most are usually in
// prev, already in order: only the others are sorted.
func sortedEntries(st *State, prev *lineCache) []idEntry {
	out := make([]idEntry, 0, len(st.Entries))
	if prev != nil {
		for _, cl := range prev.lines {
			if e, ok := st.Entries[cl.id]; ok {
				out = append(out, idEntry{cl.id, e})
			}
		}
	}
	if len(out) == len(st.Entries) {
		return out
	}
	var added []idEntry
	for id, e := range st.Entries {
		if !prev.has(id) {
			added = append(added, idEntry{id, e})
		}
	}
	slices.SortFunc(added, func(a, b idEntry) int { return strings.Compare(a.id, b.id) })
	merged := make([]idEntry, 0, len(st.Entries))
	i, j := 0, 0
	for i < len(out) || j < len(added) {
		if j == len(added) || (i < len(out) && out[i].id < added[j].id) {
			merged = append(merged, out[i])
			i++
		} else {
			merged = append(merged, added[j])
			j++
		}
	}
	return merged
}

func encodeLine(id string, e *Entry) (string, error) {
	k, err := json.Marshal(id)
	if err != nil {
		return "", err
	}
	v, err := json.Marshal(e)
	if err != nil {
		return "", fmt.Errorf("entry %s: %w", id, err)
	}
	return string(k) + ":" + string(v), nil
}

// decodeLines decodes b if it follows the line layout, decoding only the
// lines prev does not hold. ok is false when b does not follow the layout
// or does not decode; the caller then decodes it whole with Decode, which
// gives the error.
func decodeLines(b []byte, prev *lineCache) (st *State, next *lineCache, ok bool) {
	b, hasNL := bytes.CutSuffix(b, []byte("\n"))
	if !hasNL {
		return nil, nil, false
	}
	first, rest, found := bytes.Cut(b, []byte("\n"))
	if !found {
		return nil, nil, false
	}
	hdr, ok := decodeHeader(first)
	if !ok {
		return nil, nil, false
	}
	body, isEnd := bytes.CutSuffix(rest, []byte(layoutEnd))
	if !isEnd || (len(body) > 0 && body[len(body)-1] != '\n') {
		return nil, nil, false
	}
	lines, ok := decodeBody(b, len(first)+1, len(first)+1+len(body), prev, nil, false)
	if !ok {
		return nil, nil, false
	}
	if checkGeneration("max_generation", hdr.MaxGeneration) != nil {
		return nil, nil, false // the strict decode says what is wrong
	}
	st = &State{Version: FormatVersion, Policy: hdr.Policy, MaxGeneration: hdr.MaxGeneration, Entries: make(map[string]*Entry, len(lines.lines))}
	for _, cl := range lines.lines {
		st.Entries[cl.id] = cl.e
	}
	return st, lines, true
}

// decodeBody decodes the entry lines of a document, src[start:end] (each
// line ends with a newline, and all but the last with a comma before it),
// in increasing ID order, decoding only the lines prev does not hold and
// of those only the ones need asks for (nil: all). The lines it returns
// have src as their source.
func decodeBody(src []byte, start, end int, prev *lineCache, need needFn, trust bool) (*lineCache, bool) {
	body := src[start:end]
	n := bytes.Count(body, []byte("\n"))
	lines := make([]cachedLine, 0, n)
	lazy := 0
	k := cursor{c: prev}
	at := start
	for len(body) > 0 {
		line, after, found := bytes.Cut(body, []byte("\n"))
		if !found {
			return nil, false
		}
		body = after
		next := at + len(line) + 1
		line, comma := bytes.CutSuffix(line, []byte(","))
		if comma == (len(body) == 0) {
			return nil, false // a comma after every entry but the last
		}
		cl, ok := decodeLineFor(line, at, &k, need, trust)
		if !ok {
			return nil, false
		}
		if len(lines) > 0 && cl.id <= lines[len(lines)-1].id {
			return nil, false // out of order or repeated: the whole decode reads it
		}
		if cl.e == nil {
			lazy++
		}
		lines = append(lines, cl)
		at = next
	}
	return &lineCache{lines: lines, src: src, lazy: lazy}, true
}

func decodeHeader(line []byte) (header, bool) {
	var hdr header
	fields, ok := bytes.CutSuffix(line, []byte(entriesOpen))
	if !ok || len(fields) == 0 || fields[0] != '{' {
		return hdr, false
	}
	obj := []byte("{}")
	if len(fields) > 1 {
		if fields[len(fields)-1] != ',' {
			return hdr, false
		}
		obj = append(bytes.Clone(fields[:len(fields)-1]), '}')
	}
	if strictUnmarshal(obj, &hdr) != nil || hdr.Version != 1 {
		return hdr, false
	}
	if hdr.Policy != nil && hdr.Policy.Validate() != nil {
		return hdr, false
	}
	return hdr, true
}

// decodeLine returns the entry of one line, found at offset at of its
// source, from the cache when it holds the same bytes.
func decodeLine(line []byte, at int, k *cursor) (cachedLine, bool) {
	return decodeLineFor(line, at, k, nil, false)
}

// idLen is the length of a key ID (Key.ID): 32 lowercase hex digits.
const idLen = 32

// decodeLineFor is decodeLine that leaves a line undecoded when need does
// not ask for it and its key is a plain key ID (`"ID":` with no escape
// that a decode would read differently).
func decodeLineFor(line []byte, at int, k *cursor, need needFn, trust bool) (cachedLine, bool) {
	sum := sumLine(line)
	if len(line) > 2 && line[0] == '"' {
		if end := bytes.IndexByte(line[1:], '"'); end >= 0 {
			id := string(line[1 : 1+end])
			if cl, ok := k.find(id); ok && cl.sum == sum && (cl.e != nil || (need != nil && !need(id))) {
				cl.off, cl.n = at, len(line)
				return cl, true
			}
			// One JSON object after the key, and nothing else: a line
			// holding two members (a hand edit) is decoded, so that the
			// lines are the entries, as a whole decode counts them.
			// (json.Valid scans without building anything.) trust skips
			// that scan, for the lines of a shard that are never carried
			// into another file undecoded (see deltaMinBase): it was
			// most of a read of named entries at 100,000 entries.
			if need != nil && !need(id) && end == idLen && isHexN(id, idLen) && len(line) > idLen+3 && line[idLen+2] == ':' && line[idLen+3] == '{' && line[len(line)-1] == '}' && (trust || json.Valid(line[idLen+3:])) {
				return cachedLine{id: id, off: at, n: len(line), sum: sum}, true
			}
		}
	}
	obj := make([]byte, 0, len(line)+2)
	obj = append(append(append(obj, '{'), line...), '}')
	var m map[string]*Entry
	if strictUnmarshal(obj, &m) != nil || len(m) != 1 {
		return cachedLine{}, false
	}
	for id, e := range m {
		if e == nil || e.validate(id) != nil {
			return cachedLine{}, false
		}
		cl := cachedLine{id: id, off: at, n: len(line), sum: sum, e: e}
		if checkShared() {
			cl.pristine = e.Clone()
		}
		return cl, true
	}
	panic("unreachable")
}

// strictUnmarshal decodes one JSON value, refusing unknown fields and
// trailing data, as Decode does.
func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if len(bytes.TrimSpace(b[dec.InputOffset():])) > 0 {
		return errTrailing
	}
	return nil
}

// errTrailing is also what a torn read gives: on sshfs, a file replaced by
// a rename from another mount can read as the new file's start followed by
// the old one's cached pages, until the kernel's cache (1 s) expires.
var errTrailing = errors.New("trailing data after the JSON document")

// checkShared reports whether DEPCACHE_CHECK_SHARED=1 turns on the check
// that no caller modified a shared entry (see State). The tests of state,
// manager and cmd/depcache set it (not their benchmarks): it costs a deep
// copy per cached line and two comparisons of every line per Update. Read
// at first use, so that a TestMain can set it.
var checkShared = sync.OnceValue(func() bool { return os.Getenv("DEPCACHE_CHECK_SHARED") == "1" })

// verifyShared panics if an entry of c was modified since it was cached: a
// caller broke the sharing rule of State, and the next write would silently
// keep the old line.
func (c *lineCache) verifyShared(when string) {
	if c == nil || !checkShared() {
		return
	}
	for _, cl := range c.lines {
		if cl.pristine != nil && !cl.pristine.Equal(cl.e) {
			panic(fmt.Sprintf("state: shared entry %s (%s) was modified in place %s; Put a modified Clone instead", cl.id, cl.e.Key.Source, when))
		}
	}
}
