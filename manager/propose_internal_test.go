package manager

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
)

// The appliers of Get and Release, applied as a holder applies another
// process's proposal, and again after an unanswered claim.
func TestAppliersApplyAgain(t *testing.T) {
	s, err := state.Open(t.TempDir(), state.Options{NoCombine: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	key := state.Key{Kind: state.Bundle, Source: "https://example.com/a.tar.gz"}
	now := time.Unix(1700000000, 0).UTC()
	req, _ := json.Marshal(requestArgs{Key: key, Dependent: "d", Dep: state.Dependent{Since: now}, Now: now})
	rel, _ := json.Marshal(releaseArgs{Key: key, Dependent: "d"})
	apply := func(op string, args []byte, again bool) ([]byte, error) {
		var res []byte
		err := s.UpdateEntries(ctx, []string{key.ID()}, func(tx *state.Txn) (bool, error) {
			changed, r, err := appliers[op](tx, state.Proposal{Op: op, IDs: []string{key.ID()}, Args: args, Again: again})
			res = r
			return changed, err
		})
		return res, err
	}
	for _, again := range []bool{false, true} {
		res, err := apply(opRequest, req, again)
		if err != nil {
			t.Fatal(err)
		}
		var out requestOutcome
		if err := json.Unmarshal(res, &out); err != nil || out.Entry == nil || out.Entry.Dependents["d"].Since != now {
			t.Fatalf("request (again=%v): %s, %v", again, res, err)
		}
		want := "miss"
		if again {
			want = "wait" // the entry the first application made
		}
		if out.Result != want {
			t.Fatalf("request (again=%v): result %q, want %q", again, out.Result, want)
		}
	}
	if _, err := apply(opRelease, rel, false); err != nil {
		t.Fatal(err)
	}
	// Gone already: the first application's doing when told Again, and
	// not registered otherwise.
	if _, err := apply(opRelease, rel, true); err != nil {
		t.Fatalf("release again: %v, want nil", err)
	}
	if _, err := apply(opRelease, rel, false); !errors.Is(err, transitions.ErrNotRegistered) {
		t.Fatalf("release of a dependent never registered: %v, want ErrNotRegistered", err)
	}
	if _, err := apply(opRequest, []byte(`{"key":`), false); err == nil {
		t.Fatal("a proposal whose args do not parse was applied")
	}
}
