package state

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestCheckRepeatedKeys(t *testing.T) {
	for _, tc := range []struct {
		doc, field string
		want       string // "" for none
	}{
		{`{"entries":{"a":1,"b":{"a":2}}}`, "entries", ""},
		{`{"entries":{"3f":{},"3f":{}}}`, "entries", `"3f" repeated in "entries"`},
		{`{"serial":1,"shards":{"00":{"f":1},"01":{},"00":[]}}`, "shards", `"00" repeated in "shards"`},
		// Read alike by the line-by-line readers: not this check's.
		{`{"serial":1,"serial":2,"shards":{}}`, "shards", ""},
		{`{"entries":{"3f":{"stage":"A","stage":"B"}}}`, "entries", ""},
		{`[1,2]`, "entries", ""},
		{`{"entries":`, "entries", ""},
	} {
		err := checkRepeatedKeys([]byte(tc.doc), tc.field)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("checkRepeatedKeys(%s, %s) = %v, want %q", tc.doc, tc.field, err, tc.want)
		}
	}
}

// A shard holding one entry on two lines, and a manifest naming one shard
// twice, are corrupt: decoded whole, the later line silently replaced the
// earlier one (with its dependents).
func TestRepeatedKeysAreCorrupt(t *testing.T) {
	k1 := Key{Kind: Bundle, Source: "https://example.com/1"}
	p := k1.ID()[:2]
	b, _, err := encodeShard(p, []idEntry{{k1.ID(), &Entry{Key: k1, Stage: Ready, Dependents: map[string]Dependent{"job": {}}}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	hdr := shardHeader(p) + "\n"
	line, _, _ := bytes.Cut(b[len(hdr):], []byte("\n"))
	line = bytes.TrimSuffix(line, []byte(","))
	other := bytes.Replace(line, []byte(`"job"`), []byte(`"later"`), 1)
	twice := []byte(hdr + string(line) + ",\n" + string(other) + "\n" + layoutEnd + "\n")
	if _, err := decodeShard(p, twice, nil, nil); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "repeated") {
		t.Errorf("a shard with an entry on two lines: %v; want ErrCorrupt saying it is repeated", err)
	}

	man := []byte(`{"version":4,"serial":3,"shards":{` + "\n" +
		`"3f":{"file":"3f-0000000000000001-00000000.json","bytes":10,"entries":1,"sha256":"0011223344556677"},` + "\n" +
		`"3f":{"file":"3f-0000000000000002-00000000.json","bytes":10,"entries":1,"sha256":"0011223344556677"}` + "\n" + `}}` + "\n")
	if _, err := decodeManifest(man); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "repeated") {
		t.Errorf("a manifest naming shard 3f twice: %v; want ErrCorrupt saying it is repeated", err)
	}
}
