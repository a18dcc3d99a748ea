package state_test

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/storetest"
)

// TestFileStoreConformance runs the Backend conformance suite on the file
// store, each name a root of its own.
func TestFileStoreConformance(t *testing.T) {
	var mu sync.Mutex
	roots := map[string]string{}
	base := t.TempDir()
	storetest.Run(t, func(t *testing.T, name string) state.Backend {
		mu.Lock()
		root, ok := roots[t.Name()+"/"+name]
		if !ok {
			root = filepath.Join(base, fmt.Sprint(len(roots)))
			roots[t.Name()+"/"+name] = root
		}
		mu.Unlock()
		s, err := state.Open(root, state.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}
