package state

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestCheckDuplicateKeys(t *testing.T) {
	for _, tc := range []struct {
		doc  string
		want string // "" for none
	}{
		{`{"a":1,"b":{"a":2}}`, ""},
		{`{"a":1,"a":2}`, `"a" repeated in the object at $`},
		{`{"x":{"k":1,"j":[{"k":1,"k":2}]}}`, `"k" repeated in the object at $.x.j[0]`},
		{`[{"a":1},{"a":1}]`, ""},
		{`{"entries":{"3f":{},"3f":{}}}`, `"3f" repeated in the object at $.entries`},
	} {
		err := checkDuplicateKeys([]byte(tc.doc))
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("checkDuplicateKeys(%s) = %v, want %q", tc.doc, err, tc.want)
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
