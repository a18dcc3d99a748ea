package state_test

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/depcache/depcache/state"
)

// FuzzDecode: no input makes Decode panic or accept a path outside the
// root, and what it accepts survives a round trip unchanged.
func FuzzDecode(f *testing.F) {
	files, _ := filepath.Glob("../testdata/state/*.json")
	for _, fx := range files {
		b, _ := os.ReadFile(fx)
		f.Add(b)
	}
	good := state.New()
	good.Put(&state.Entry{Key: bundleKey(1), Stage: state.Ready, Path: "entries/x/content", SizeBytes: 3})
	b, _ := state.Encode(good)
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := state.Decode(data)
		if err != nil {
			return
		}
		for _, e := range st.Entries {
			if e.Path != "" && !filepath.IsLocal(e.Path) {
				t.Fatalf("accepted a path outside the root: %q", e.Path)
			}
		}
		again, err := state.Encode(st)
		if err != nil {
			t.Fatal(err)
		}
		st2, err := state.Decode(again)
		if err != nil {
			t.Fatalf("re-encoded state does not decode: %v", err)
		}
		if !reflect.DeepEqual(st.Clone(), st2.Clone()) {
			t.Fatal("round trip changed the state")
		}
	})
}
