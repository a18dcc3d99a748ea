package state

import (
	"bytes"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// shardOfState returns the file of the shard of st's first entry (in ID
// order) holding every entry of st with that prefix, and the prefix.
func shardOfState(t testing.TB, st *State) (string, []byte) {
	t.Helper()
	var ids []string
	for id := range st.Entries {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	p := "3f"
	if len(ids) > 0 {
		p = ids[0][:2]
	}
	var es []idEntry
	for _, id := range ids {
		if strings.HasPrefix(id, p) {
			es = append(es, idEntry{id, st.Entries[id]})
		}
	}
	b, _, err := encodeShard(p, es, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p, b
}

// FuzzDecodeShard: no input makes the shard decoder panic or accept an entry
// that fails validation or belongs to another shard; the line path with any
// cache agrees with a decode from scratch, and what it accepts round-trips
// through encodeShard byte for byte.
func FuzzDecodeShard(f *testing.F) {
	for _, n := range []int{1, 3, 20} {
		_, b := shardOfState(f, richState(n))
		f.Add(b)
	}
	f.Add([]byte(`{"shard":"3f","entries":{` + "\n}}\n"))
	{
		// The second and third entries on one line: only the whole
		// decode reads it, and checkLazyDecode does not need the second.
		_, b := shardOfState(f, richState(2000))
		first := bytes.Index(b, []byte(",\n"))
		if i := bytes.Index(b[first+2:], []byte(",\n")); first >= 0 && i >= 0 {
			i += first + 2
			f.Add(append(bytes.Clone(b[:i+1]), b[i+2:]...))
		}
	}
	f.Add([]byte(`{"shard":"3f","entries":{}}`))
	{
		// Repeated keys: an entry on two lines (refused by both readers),
		// a field twice in one line (read alike by both).
		_, b := shardOfState(f, richState(3))
		hdr, rest, _ := bytes.Cut(b, []byte("\n"))
		line, _, _ := bytes.Cut(rest, []byte("\n"))
		line = bytes.TrimSuffix(line, []byte(","))
		f.Add([]byte(string(hdr) + "\n" + string(line) + ",\n" + string(line) + "\n" + layoutEnd + "\n"))
		f.Add(bytes.Replace(b, []byte(`"stage":`), []byte(`"stage":"FAILED","stage":`), 1))
	}
	_, seed := shardOfState(f, richState(20))
	p0 := string(seed[10:12])
	seedCache, err := decodeShard(p0, seed, nil, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p := "3f"
		if len(data) >= 12 && bytes.HasPrefix(data, []byte(`{"shard":"`)) {
			p = string(data[10:12])
		}
		if _, ok := shardOf(p); !ok {
			return
		}
		fresh, err := decodeShard(p, data, nil, nil)
		for _, c := range []*lineCache{nil, seedCache} {
			got, cerr := decodeShard(p, data, c, nil)
			if (cerr == nil) != (err == nil) {
				t.Fatalf("with a cache: %v, without: %v", cerr, err)
			}
			if err != nil {
				continue
			}
			if len(got.lines) != len(fresh.lines) {
				t.Fatalf("with a cache %d entries, without %d", len(got.lines), len(fresh.lines))
			}
			for i, cl := range got.lines {
				if cl.id != fresh.lines[i].id || !reflect.DeepEqual(cl.e, fresh.lines[i].e) {
					t.Fatalf("entry %s differs with a cache", cl.id)
				}
			}
		}
		if err != nil {
			return
		}
		es := make([]idEntry, 0, len(fresh.lines))
		for _, cl := range fresh.lines {
			if !strings.HasPrefix(cl.id, p) {
				t.Fatalf("shard %s accepted entry %s", p, cl.id)
			}
			if err := cl.e.validate(cl.id); err != nil {
				t.Fatalf("accepted an invalid entry: %v", err)
			}
			es = append(es, idEntry{cl.id, cl.e})
		}
		again, _, err := encodeShard(p, es, nil)
		if err != nil {
			t.Fatalf("accepted shard does not encode: %v", err)
		}
		checkLazyDecode(t, p, data, fresh)
		back, err := decodeShard(p, again, nil, nil)
		if err != nil {
			t.Fatalf("encodeShard wrote what decodeShard refuses: %v\n%s", err, again)
		}
		es2 := make([]idEntry, 0, len(back.lines))
		for _, cl := range back.lines {
			es2 = append(es2, idEntry{cl.id, cl.e})
		}
		if third, _, _ := encodeShard(p, es2, nil); !bytes.Equal(third, again) {
			t.Fatalf("shard does not round-trip:\n%s\n%s", again, third)
		}
	})
}

// checkLazyDecode checks a decode that needs only every other line of
// data, a shard that decodes whole as fresh: it accepts it, with the same
// lines, the needed ones decoded as fresh has them; and a write that
// carries the others over undecoded writes the bytes that a write of the
// decoded lines would.
func checkLazyDecode(t *testing.T, p string, data []byte, fresh *lineCache) {
	t.Helper()
	need := map[string]bool{}
	for i, cl := range fresh.lines {
		if i%2 == 0 {
			need[cl.id] = true
		}
	}
	lazy, err := decodeShard(p, data, nil, func(id string) bool { return need[id] })
	if err != nil {
		t.Fatalf("a decode of some lines refuses what a whole decode accepts: %v", err)
	}
	if len(lazy.lines) != len(fresh.lines) {
		t.Fatalf("a decode of some lines has %d lines, a whole one %d", len(lazy.lines), len(fresh.lines))
	}
	var esLazy, esFresh []idEntry
	for i, cl := range lazy.lines {
		if cl.id != fresh.lines[i].id || (need[cl.id] && !reflect.DeepEqual(cl.e, fresh.lines[i].e)) {
			t.Fatalf("line %d (%s) differs in a decode of some lines", i, cl.id)
		}
		if need[cl.id] && cl.e == nil {
			t.Fatalf("line %s was needed and not decoded", cl.id)
		}
		esLazy = append(esLazy, idEntry{cl.id, cl.e})
		esFresh = append(esFresh, idEntry{cl.id, fresh.lines[i].e})
	}
	a, _, errA := encodeShard(p, esLazy, lazy)
	b, _, errB := encodeShard(p, esFresh, fresh)
	if errA != nil || errB != nil || !bytes.Equal(a, b) {
		t.Fatalf("carrying lines over undecoded wrote other bytes (%v, %v):\n%s\n%s", errA, errB, a, b)
	}
	// Trusting the lines it does not need (a large base, see
	// deltaMinBase), it reads the same lines and entries, or other lines
	// than the whole decode counts: readShardFile then decodes it whole,
	// as it does when the count is not the manifest's.
	trusted, err := decodeShardFor(p, data, nil, func(id string) bool { return need[id] }, true)
	if err != nil {
		t.Fatalf("a trusting decode of some lines refuses what a whole decode accepts: %v", err)
	}
	if len(trusted.lines) != len(lazy.lines) {
		return
	}
	for i, cl := range trusted.lines {
		if cl.id != lazy.lines[i].id || !reflect.DeepEqual(cl.e, lazy.lines[i].e) {
			t.Fatalf("line %d (%s) differs in a trusting decode", i, cl.id)
		}
	}
}

// FuzzDecodeManifest: no input makes the manifest decoder panic or accept a
// shard file name that could leave state.d, and what it accepts
// round-trips through encodeManifest.
func FuzzDecodeManifest(f *testing.F) {
	m := &manifest{Version: FormatVersion, Serial: 41, MaxGeneration: 7, Policy: richState(0).Policy,
		Retired: []string{"3f-0000000000000028-00000001.json"},
		Shards: map[string]shardRef{
			"00": {File: "00-0000000000000029-9c1e5b7d.json", Bytes: 1432, Entries: 4, SHA256: "0123456789abcdef"},
			"3f": {File: "3f-0000000000000029-0000002a.json", Bytes: 99, Entries: 1, SHA256: "fedcba9876543210"},
			"a1": {File: "pk-0000000000000029-0000002b.json", Bytes: 120, Entries: 1, SHA256: "00112233445566ff"},
			"a2": {File: "pk-0000000000000029-0000002b.json", Offset: 120, Bytes: 80, Entries: 1, SHA256: "00112233445566ee"},
			"c4": {File: "c4-0000000000000020-0000000c.json", Bytes: 9000, Entries: 30, SHA256: "00112233445566dd",
				Delta: deltaRef{File: "pk-0000000000000029-0000002b.json", Offset: 200, Bytes: 350, Entries: 1, SHA256: "00112233445566cc"}},
			"c5": {File: "pk-0000000000000021-0000000d.json", Offset: 3, Bytes: 9000, Entries: 30, SHA256: "00112233445566bb",
				Delta: deltaRef{File: "c5-0000000000000029-0000002e.json", Bytes: 350, Entries: 1, SHA256: "00112233445566aa"}},
		}}
	b, seedLines, err := encodeManifest(m, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	if _, rest, ok := bytes.Cut(b, []byte("\n")); ok {
		// A shard named twice, a header field twice.
		line, _, _ := bytes.Cut(rest, []byte("\n"))
		f.Add(bytes.Replace(b, line, []byte(string(line)+"\n"+string(line)), 1))
		f.Add(bytes.Replace(b, []byte(`"serial":41`), []byte(`"serial":40,"serial":41`), 1))
		// The seed's own lines under earlier versions: a line checked at
		// version 4 (a delta, a pack) is checked again at 2 and 3.
		for _, v := range []string{`"version":2`, `"version":3`} {
			f.Add(bytes.Replace(b, []byte(fmt.Sprintf(`"version":%d`, FormatVersion)), []byte(v), 1))
		}
	}
	f.Add([]byte(`{"version":2,"serial":1,"shards":{}}`))
	f.Add([]byte(`{"version":5,"serial":1,"shards":{},"new":1}`))
	f.Add([]byte(`{"version":3,"serial":1,"shards":{"00":{"file":"00-0000000000000001-00000001.json","bytes":5,"entries":1,"sha256":"0123456789abcdef","delta":{"file":"00-0000000000000002-00000001.json","bytes":5,"entries":1,"sha256":"0123456789abcdef"}}}}`))
	f.Add([]byte(`{"version":2,"serial":1,"shards":{"00":{"file":"pk-0000000000000001-00000001.json","bytes":5,"entries":1,"sha256":"0123456789abcdef"}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := decodeManifest(data)
		for _, c := range []*manifestLines{nil, seedLines} {
			fast, _, ok := decodeManifestLines(data, c)
			if !ok {
				continue
			}
			if err != nil {
				t.Fatalf("the line path accepts what decodeManifest refuses: %v", err)
			}
			if !reflect.DeepEqual(fast, m) {
				t.Fatalf("the line path and decodeManifest disagree:\n%+v\n%+v", fast, m)
			}
		}
		if err != nil {
			return
		}
		for p, r := range m.Shards {
			for _, f := range []string{r.File, r.Delta.File} {
				if f == "" && r.Delta == (deltaRef{}) {
					continue
				}
				if strings.ContainsAny(f, `/\`) || CheckRelPath(f) != nil || !strings.HasPrefix(f, p+"-") && !strings.HasPrefix(f, packPrefix+"-") {
					t.Fatalf("accepted shard file %q for shard %q", f, p)
				}
			}
		}
		again, _, err := encodeManifest(m, nil)
		if err != nil {
			t.Fatalf("accepted manifest does not encode: %v", err)
		}
		m2, err := decodeManifest(again)
		if err != nil {
			t.Fatalf("encodeManifest wrote what decodeManifest refuses: %v\n%s", err, again)
		}
		if len(m.Retired) == 0 {
			m.Retired = nil // none and an empty list encode alike
		}
		if m.Policy != nil && len(m.Policy.Pins) == 0 {
			p := *m.Policy
			p.Pins = nil // "pins": [] and no pins encode alike (omitempty)
			m.Policy = &p
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("manifest does not round-trip:\n%+v\n%+v", m, m2)
		}
		if back, _, ok := decodeManifestLines(again, nil); !ok || !reflect.DeepEqual(back, m2) {
			t.Fatalf("the line path refuses or misreads what encodeManifest wrote:\n%s", again)
		}
		if third, _, _ := encodeManifest(m2, seedLines); !bytes.Equal(third, again) {
			t.Fatalf("manifest bytes do not round-trip:\n%s\n%s", again, third)
		}
	})
}
