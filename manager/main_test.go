package manager_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// Every store of these tests checks that no shared entry is modified in
// place (see state.State).
func TestMain(m *testing.M) {
	os.Setenv("DEPCACHE_CHECK_SHARED", "1")
	os.Exit(m.Run())
}

// waitFor polls cond until it holds, failing the test with what (a
// function, so that it can say what it last saw) after within.
func waitFor(t testing.TB, within time.Duration, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", within, what())
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, not synchronising
	}
}

// viewEntry reads key's entry from the state of root, as another process
// would; nil when there is none.
func viewEntry(t testing.TB, root string, key state.Key) *state.Entry {
	t.Helper()
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st.Get(key)
}
