package state

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 25, 10, 0, 0, 123, time.UTC)

// richEntry sets every field of an entry, nested ones included.
func richEntry(i int) *Entry {
	exp := t0.Add(time.Hour)
	return &Entry{
		Key: Key{Kind: Image, Source: fmt.Sprintf("docker-build:///ctx/%d", i), SHA256: strings.Repeat("a", 64), Daemon: "D",
			Build: &BuildSpec{Context: "/ctx", Dockerfile: "Dockerfile", Tag: "t:1", Args: map[string]string{"A": "1"}}},
		Stage: Ready, Path: fmt.Sprintf("entries/%d-g1/content", i), SizeBytes: 10,
		Dependents: map[string]Dependent{"run": {Since: t0, Process: &Process{Host: "h", BootID: "b", PIDNS: "p", PID: 7, StartTime: 9}, Expires: &exp, Lease: 3}},
		Owner:      &Owner{Process: Process{Host: "h", BootID: "b", PIDNS: "p", PID: 8, StartTime: 1}, ManagerID: "m"},
		Generation: 4, Progress: Progress{Bytes: 5, Total: 10, Heartbeat: 2},
		LastUsed: t0, Created: t0, Failures: 1, FailedAt: t0, Permanent: true, Message: "m", ImageID: "sha256:1", RepoDigest: "r@sha256:2", External: true,
	}
}

func richState(n int) *State {
	st := New()
	st.Policy = &Policy{MaxSizeBytes: 100, HighWatermark: 90, LowWatermark: 80, MinAge: Duration(time.Minute), Pins: []string{"x"}}
	for i := range n {
		st.Put(richEntry(i))
	}
	st.NoteGenerations()
	return st
}

func TestLayoutRoundTrip(t *testing.T) {
	for _, n := range []int{0, 1, 3} {
		st := richState(n)
		b, err := Encode(st)
		if err != nil {
			t.Fatal(err)
		}
		if got := bytes.Count(b, []byte("\n")); got != n+2 {
			t.Errorf("%d entries: %d lines, want one per entry plus two:\n%s", n, got, b)
		}
		fast, _, ok := decodeLines(b, nil)
		if !ok {
			t.Fatalf("%d entries: the line path refuses what Encode wrote:\n%s", n, b)
		}
		slow, err := Decode(b)
		if err != nil {
			t.Fatalf("%d entries: Decode refuses what Encode wrote: %v\n%s", n, err, b)
		}
		if !reflect.DeepEqual(fast, slow) || !reflect.DeepEqual(slow, st) {
			t.Errorf("%d entries: round trip differs:\nwrote %+v\nline path %+v\nDecode %+v", n, st, fast, slow)
		}
	}
}

// A write after a change re-encodes the changed entry only, and a reader
// with an older cache decodes the result as Decode does.
func TestLayoutIncremental(t *testing.T) {
	b1, c1, err := encodeLines(nil, richState(50), nil)
	if err != nil {
		t.Fatal(err)
	}
	st, c2, ok := decodeLines(b1, c1)
	if !ok {
		t.Fatal("refused its own file")
	}
	for i, cl := range c2.lines {
		if cl.e != c1.lines[i].e {
			t.Fatalf("reading the file just written decoded entry %s again", cl.id)
		}
	}
	changed := richEntry(7)
	e := st.Get(changed.Key).Clone() // shared with the cache: never modified in place
	d := e.Dependents["run"]
	d.Lease++
	e.Dependents["run"] = d
	st.Put(e)
	b2, c3, err := encodeLines(nil, st, c2)
	if err != nil {
		t.Fatal(err)
	}
	l1, l2 := strings.Split(string(b1), "\n"), strings.Split(string(b2), "\n")
	var diff []string
	for i := range l1 {
		if l1[i] != l2[i] {
			diff = append(diff, l2[i])
		}
	}
	if len(diff) != 1 || !strings.HasPrefix(diff[0], `"`+changed.Key.ID()+`"`) || !strings.Contains(diff[0], `"lease":4`) {
		t.Fatalf("changed lines %q, want only entry %s with lease 4", diff, changed.Key.ID())
	}
	if cachedEntry(c3, changed.Key.ID()).Dependents["run"].Lease != 4 {
		t.Error("cache of the written file holds the old entry")
	}
	fast, _, ok := decodeLines(b2, c1)
	slow, err := Decode(b2)
	if !ok || err != nil || !reflect.DeepEqual(fast, slow) {
		t.Fatalf("stale cache: line path ok=%v, Decode err=%v, equal=%v", ok, err, reflect.DeepEqual(fast, slow))
	}
	// Readers share the cached entries of unchanged lines (see State), and
	// a shared entry modified in place is caught.
	var shared *Entry
	for id, e := range fast.Entries {
		if id != changed.Key.ID() && e == cachedEntry(c1, id) {
			shared = e
		}
	}
	if shared == nil {
		t.Fatal("no unchanged entry is shared with the cache")
	}
	shared.Message = "mutated"
	defer func() {
		if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "modified in place") {
			t.Errorf("modifying a shared entry: recovered %v, want the sharing check's panic", r)
		}
	}()
	c1.verifyShared("in this test")
}

func cachedEntry(c *lineCache, id string) *Entry {
	for _, cl := range c.lines {
		if cl.id == id {
			return cl.e
		}
	}
	return nil
}

// Files in the layout's shape that Decode refuses must not pass the line
// path, and those it accepts must give the same state.
func TestLayoutAcceptsOnlyWhatDecodeAccepts(t *testing.T) {
	good, err := Encode(richState(2))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(good), "\n"), "\n")
	e0, e1 := strings.TrimSuffix(lines[1], ","), lines[2]
	cases := map[string]string{
		"good":                string(good),
		"no final newline":    strings.TrimSuffix(string(good), "\n"),
		"duplicate id":        lines[0] + "\n" + e0 + ",\n" + e0 + "\n}}\n",
		"missing comma":       lines[0] + "\n" + e0 + "\n" + e1 + "\n}}\n",
		"comma after last":    lines[0] + "\n" + e0 + ",\n" + e1 + ",\n}}\n",
		"two entries a line":  lines[0] + "\n" + e0 + "," + e1 + "\n}}\n",
		"trailing braces":     lines[0] + "\n" + e0 + ",\n" + e1 + "}}\n}}\n",
		"trailing data":       string(good) + "x\n",
		"cut short":           string(good[:len(good)/2]),
		"empty line":          lines[0] + "\n" + e0 + ",\n\n" + e1 + "\n}}\n",
		"unknown field":       lines[0] + "\n" + e0 + ",\n" + strings.Replace(e1, `"stage"`, `"bogus":1,"stage"`, 1) + "\n}}\n",
		"unknown header":      strings.Replace(lines[0], `{"version"`, `{"bogus":1,"version"`, 1) + "\n" + e0 + "\n}}\n",
		"entries in header":   strings.Replace(lines[0], `{"version"`, `{"entries":{},"version"`, 1) + "\n" + e0 + "\n}}\n",
		"future version":      strings.Replace(lines[0], `"version":1`, `"version":2`, 1) + "\n" + e0 + "\n}}\n",
		"wrong id":            lines[0] + "\n" + strings.Replace(e0, e0[1:9], "00000000", 1) + "\n}}\n",
		"path outside":        lines[0] + "\n" + strings.Replace(e0, `"entries/`, `"../`, 1) + "\n}}\n",
		"bad policy":          strings.Replace(lines[0], `"high_watermark_percent":90`, `"high_watermark_percent":900`, 1) + "\n" + e0 + "\n}}\n",
		"null entry":          lines[0] + "\n" + e0[:strings.Index(e0, ":")] + ":null\n}}\n",
		"crlf":                strings.ReplaceAll(string(good), "\n", "\r\n"),
		"no entries":          lines[0] + "\n}}\n",
		"out of order":        lines[0] + "\n" + e1 + ",\n" + e0 + "\n}}\n",
		"header only version": `{"version":1,"entries":{` + "\n}}\n",
		"header no version":   `{"entries":{` + "\n}}\n",
	}
	for name, in := range cases {
		fast, _, ok := decodeLines([]byte(in), nil)
		slow, err := Decode([]byte(in))
		switch {
		case ok && err != nil:
			t.Errorf("%s: the line path accepts what Decode refuses (%v)", name, err)
		case ok && !reflect.DeepEqual(fast, slow):
			t.Errorf("%s: the line path and Decode disagree", name)
		case name == "good" && !ok:
			t.Errorf("good: the line path refuses it")
		case name == "out of order" && ok:
			t.Errorf("out of order: the line path accepts it (its cache must stay sorted)")
		}
	}
}

// Equal must notice a change in every field, or a writer would keep an
// entry's old line. The test changes each leaf of the JSON of a fully set
// entry and checks that the decoded result is unequal.
func TestEqualCoversEveryField(t *testing.T) {
	base := richEntry(1)
	checkAllSet(t, reflect.ValueOf(*base), "Entry")
	var tree any
	b, _ := json.Marshal(base)
	if err := json.Unmarshal(b, &tree); err != nil {
		t.Fatal(err)
	}
	if !base.Equal(base.Clone()) {
		t.Fatal("an entry is not Equal to its clone")
	}
	leaves := 0
	eachLeaf(tree, "", func(path string, set func(any)) {
		leaves++
		orig := getLeaf(tree, path)
		set(changeLeaf(path, orig))
		b, _ := json.Marshal(tree)
		set(orig)
		var e Entry
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if base.Equal(&e) {
			t.Errorf("Equal misses a change of %s", path)
		}
	})
	if leaves < 30 {
		t.Fatalf("only %d leaves visited", leaves)
	}
}

func checkAllSet(t *testing.T, v reflect.Value, path string) {
	t.Helper()
	switch v.Kind() {
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			if v.IsZero() {
				t.Errorf("richEntry leaves %s zero: set it so that Equal is tested on it", path)
			}
			return
		}
		for i := range v.NumField() {
			checkAllSet(t, v.Field(i), path+"."+v.Type().Field(i).Name)
		}
	case reflect.Pointer:
		if v.IsNil() {
			t.Errorf("richEntry leaves %s nil", path)
			return
		}
		checkAllSet(t, v.Elem(), path)
	case reflect.Map:
		if v.Len() == 0 {
			t.Errorf("richEntry leaves %s empty", path)
		}
		for _, k := range v.MapKeys() {
			checkAllSet(t, v.MapIndex(k), path+"["+k.String()+"]")
		}
	default:
		if v.IsZero() {
			t.Errorf("richEntry leaves %s zero", path)
		}
	}
}

// eachLeaf calls f with every leaf of a decoded JSON tree and a setter.
func eachLeaf(node any, path string, f func(path string, set func(any))) {
	m, ok := node.(map[string]any)
	if !ok {
		return
	}
	for k, v := range m {
		p := path + "/" + k
		if _, isMap := v.(map[string]any); isMap {
			eachLeaf(v, p, f)
			continue
		}
		f(p, func(nv any) { m[k] = nv })
	}
}

func getLeaf(tree any, path string) any {
	node := tree
	for _, k := range strings.Split(path, "/")[1:] {
		node = node.(map[string]any)[k]
	}
	return node
}

func changeLeaf(path string, v any) any {
	switch x := v.(type) {
	case bool:
		return !x
	case float64:
		return x + 1
	case string:
		if tm, err := time.Parse(time.RFC3339Nano, x); err == nil {
			return tm.Add(time.Second).Format(time.RFC3339Nano)
		}
		if strings.HasSuffix(path, "/stage") {
			return string(Failed)
		}
		return x + "x"
	}
	panic(fmt.Sprintf("%s: leaf of type %T", path, v))
}

// liveState is richState with times as a running process has them: with a
// monotonic reading, in the local zone, and a message that is not UTF-8.
func liveState(n int) *State {
	st := richState(n)
	now := time.Now().In(time.FixedZone("X", 3600))
	for _, e := range st.Entries {
		e.LastUsed, e.Created, e.Message = now, now, "bad \xff byte"
	}
	return st
}

// A reader whose cache was filled by its own write gets what Decode gives,
// not the writer's in-memory values.
func TestLayoutCacheFromWrite(t *testing.T) {
	b, c, err := encodeLines(nil, liveState(3), nil)
	if err != nil {
		t.Fatal(err)
	}
	fast, _, ok := decodeLines(b, c)
	slow, err := Decode(b)
	if !ok || err != nil {
		t.Fatalf("line path ok=%v, Decode: %v", ok, err)
	}
	if !reflect.DeepEqual(fast, slow) {
		t.Fatalf("a cache filled by a write gives other values than Decode:\n%+v\n%+v", fast.Sorted()[0], slow.Sorted()[0])
	}
}

// A hand edit of a format 1 file that puts lines out of order is read
// whole, and writers that follow convert it and add entries without losing
// any.
func TestLayoutOutOfOrderFile(t *testing.T) {
	dir := t.TempDir()
	var holds atomic.Int32
	s := batchStore(t, dir, &holds)
	ctx := context.Background()
	v1 := New()
	for i := range 4 {
		if _, err := putKey(i)(v1); err != nil {
			t.Fatal(err)
		}
	}
	b, err := Encode(v1) // format 1, which an upgrade reads
	if err != nil {
		t.Fatal(err)
	}
	ls := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	ls[1], ls[2] = ls[2], ls[1] // both end with a comma
	if err := os.WriteFile(s.Path(), []byte(strings.Join(ls, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Decode([]byte(strings.Join(ls, "\n") + "\n")); err != nil {
		t.Fatalf("the hand edit is not a valid state: %v", err)
	}
	other := batchStore(t, dir, &holds) // a fresh cache, as another process has
	for i := 4; i < 7; i++ {
		if err := other.Update(ctx, putKey(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := other.Update(ctx, func(st *State) (bool, error) {
		putKey(7)(st)
		return putKey(8)(st)
	}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*Store{s, other} {
		st, err := r.View(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Entries) != 9 {
			t.Errorf("%d entries after adding 9, want 9", len(st.Entries))
		}
	}
	if b, _ := os.ReadFile(s.Path()); versionOf(b) != FormatVersion {
		t.Errorf("the first write did not convert the state to format %d:\n%s", FormatVersion, b)
	}
}

// FuzzDecodeLines: whatever the line path accepts, with or without a cache
// of another file, Decode accepts with the same result.
func FuzzDecodeLines(f *testing.F) {
	files, _ := filepath.Glob("../testdata/state/*.json")
	for _, fx := range files {
		b, _ := os.ReadFile(fx)
		f.Add(b)
	}
	for _, n := range []int{0, 1, 3} {
		b, _ := Encode(richState(n))
		f.Add(b)
	}
	seed, _ := Encode(richState(3))
	if hdr, rest, ok := bytes.Cut(seed, []byte("\n")); ok {
		// One entry on two lines; a field twice in one line.
		line, _, _ := bytes.Cut(rest, []byte("\n"))
		line = bytes.TrimSuffix(line, []byte(","))
		f.Add([]byte(string(hdr) + "\n" + string(line) + ",\n" + string(line) + "\n" + layoutEnd + "\n"))
		f.Add(bytes.Replace(seed, []byte(`"stage":`), []byte(`"stage":"FAILED","stage":`), 1))
	}
	_, readCache, _ := decodeLines(seed, nil)
	_, writeCache, _ := encodeLines(nil, liveState(3), nil)
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, c := range []*lineCache{nil, readCache, writeCache} {
			fast, _, ok := decodeLines(data, c)
			if !ok {
				continue
			}
			slow, err := Decode(data)
			if err != nil {
				t.Fatalf("the line path accepts what Decode refuses: %v", err)
			}
			if !reflect.DeepEqual(fast, slow) {
				t.Fatalf("the line path and Decode disagree:\n%+v\n%+v", fast, slow)
			}
			again, err := Encode(fast)
			if err != nil {
				t.Fatalf("accepted state does not encode: %v", err)
			}
			st, _, ok := decodeLines(again, nil)
			if !ok {
				t.Fatalf("the line path refuses what Encode wrote:\n%s", again)
			}
			// Compared as bytes: an empty list and none encode alike.
			if third, _ := Encode(st); !bytes.Equal(third, again) {
				t.Fatalf("re-encoded state does not round-trip:\n%s\n%s", again, third)
			}
		}
	})
}
