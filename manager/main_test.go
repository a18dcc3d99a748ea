package manager_test

import (
	"os"
	"testing"
)

// Every store of these tests checks that no shared entry is modified in
// place (see state.State).
func TestMain(m *testing.M) {
	os.Setenv("DEPCACHE_CHECK_SHARED", "1")
	os.Exit(m.Run())
}
