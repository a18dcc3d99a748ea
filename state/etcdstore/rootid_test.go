package etcdstore

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/state"
)

// TestRootIDNotFollowed: a root's ID file that is a symlink (to another
// root's ID) or a directory is refused as the root's layout, not followed
// or read.
func TestRootIDNotFollowed(t *testing.T) {
	other := t.TempDir()
	id := strings.Repeat("ab", 16)
	if err := os.WriteFile(filepath.Join(other, RootIDFile), []byte(id+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"symlink", "directory"} {
		root := t.TempDir()
		p := filepath.Join(root, RootIDFile)
		var err error
		if kind == "symlink" {
			err = os.Symlink(filepath.Join(other, RootIDFile), p)
		} else {
			err = os.Mkdir(p, 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
		got, err := readRootID(root)
		if !errors.Is(err, state.ErrLayout) || !strings.Contains(err.Error(), p) {
			t.Errorf("root ID as a %s: %q, %v; want ErrLayout naming %s", kind, got, err, p)
		}
		if err := state.CheckUnbound(root); !errors.Is(err, state.ErrLayout) {
			t.Errorf("CheckUnbound with the root ID as a %s: %v, want ErrLayout", kind, err)
		}
	}
	if got, err := readRootID(other); err != nil || got != id {
		t.Errorf("a regular ID file: %q, %v", got, err)
	}
}
