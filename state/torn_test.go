package state

import (
	"testing"
)

// TestTornReadsAreReadAgain: a read of the state file that ran on past the
// document (sshfs: the new file's start, then the old one's cached pages)
// or stopped short is one that read retries before calling the file
// corrupt; a document that is wrong in itself is not.
func TestTornReadsAreReadAgain(t *testing.T) {
	st := New()
	st.Put(&Entry{Key: Key{Kind: Bundle, Source: "https://example.com/torn"}, Stage: Downloading})
	good, err := Encode(st)
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		b    string
		torn bool
	}{
		"old pages after the new document": {string(good) + `"a7d2...":{"key":{}}}}` + "\n", true},
		"cut short":                        {string(good[:len(good)/2]), true},
		"an unknown field":                 {`{"version":1,"entries":{},"bogus":1}`, false},
		"not JSON":                         {"garbage", false},
	} {
		_, err := Decode([]byte(tc.b))
		if err == nil {
			t.Fatalf("%s: decoded", name)
		}
		if looksCut(err) != tc.torn {
			t.Errorf("%s: looksCut(%v) = %v, want %v", name, err, !tc.torn, tc.torn)
		}
	}
}
