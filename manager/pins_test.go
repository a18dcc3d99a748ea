package manager_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// sharedPrefixKeys returns two bundle keys whose IDs start with the same
// n hex digits (found by trying sources in order: the same pair every
// run).
func sharedPrefixKeys(t *testing.T, n int) (state.Key, state.Key) {
	t.Helper()
	seen := map[string]state.Key{}
	for i := range 1 << 22 {
		k := state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://example.com/pin/%d.tar.gz", i)}
		p := k.ID()[:n]
		if o, ok := seen[p]; ok {
			return o, k
		}
		seen[p] = k
	}
	t.Fatalf("no two of %d keys share an ID prefix of %d digits", 1<<22, n)
	return state.Key{}, state.Key{}
}

// storedPins returns the pins of root's stored policy (nil without one).
func storedPins(t *testing.T, root string) []string {
	t.Helper()
	st, err := state.DecodeFile(root, state.StateFile)
	if err != nil {
		t.Fatal(err)
	}
	if st.Policy == nil {
		return nil
	}
	return st.Policy.Pins
}

// TestPinsResolved: a pin given as a key ID as ls shows it (a prefix of 8
// or more hex digits, in either case) is stored as the full ID of the one
// entry it names, a full ID in any case as that ID in lower case, and a
// source or a pattern as it is. A prefix that names no entry, or more
// than one, fails with ErrBadPolicy and stores nothing: as a pattern it
// would silently pin nothing.
func TestPinsResolved(t *testing.T) {
	ctx := context.Background()
	a, b := sharedPrefixKeys(t, 8)
	c := state.Key{Kind: state.Bundle, Source: "https://example.com/pin/other.tar.gz"}
	root := t.TempDir()
	now := time.Now()
	behind(t, root, func(st *state.State) {
		for _, k := range []state.Key{a, b, c} {
			st.Put(&state.Entry{Key: k, Stage: state.Downloading, Generation: 1, Created: now, LastUsed: now,
				Dependents: map[string]state.Dependent{"job": {Since: now}}})
		}
	})
	// The shortest prefix of a's ID that b's does not share.
	n := 8
	for a.ID()[:n] == b.ID()[:n] {
		n++
	}
	if strings.HasPrefix(c.ID(), a.ID()[:n]) {
		t.Fatalf("setup: %s starts with %s too", c.ID(), a.ID()[:n])
	}
	settle := func(pins ...string) error {
		m, err := manager.New(manager.Config{Root: root, Log: quietLog(), SetPolicy: true,
			Cleanup: manager.PolicyChange{Pins: pins}})
		if err != nil {
			return err
		}
		return m.Settle(ctx)
	}
	pattern := "https://example.com/pin/*"
	// Given twice, or as a prefix and the full ID of one entry: stored once.
	if err := settle(strings.ToUpper(a.ID()[:n]), strings.ToUpper(c.ID()), pattern, "cafe", a.ID(), pattern); err != nil {
		t.Fatal(err)
	}
	want := []string{a.ID(), c.ID(), pattern, "cafe"}
	if got := storedPins(t, root); !slices.Equal(got, want) {
		t.Errorf("stored pins %q, want %q", got, want)
	}

	// An unknown prefix (none of the IDs starts with it), and one that
	// names both a and b.
	var unknown string
	for _, d := range "0123456789abcdef" {
		p := strings.Repeat(string(d), 8)
		if !slices.ContainsFunc([]state.Key{a, b, c}, func(k state.Key) bool { return strings.HasPrefix(k.ID(), p) }) {
			unknown = p
			break
		}
	}
	for _, tc := range []struct {
		pin  string
		says []string
	}{
		{unknown, []string{"no entry's key ID starts with it"}},
		{strings.ToUpper(a.ID()[:8]), []string{"ambiguous, 2 key IDs start with it", a.ID(), b.ID()}},
	} {
		err := settle(tc.pin)
		if !errors.Is(err, manager.ErrBadPolicy) {
			t.Errorf("pin %q: %v, want ErrBadPolicy", tc.pin, err)
		}
		for _, says := range tc.says {
			if err != nil && !strings.Contains(err.Error(), says) {
				t.Errorf("pin %q: %v, want it to say %q", tc.pin, err, says)
			}
		}
		if got := storedPins(t, root); !slices.Equal(got, want) {
			t.Errorf("pin %q: stored pins became %q, want %q kept", tc.pin, got, want)
		}
	}
}

// TestPolicyMismatchReported: a manager whose configured policy differs
// from the root's stored one, without SetPolicy, leaves the stored one
// and reports each difference; one that agrees, or that sets it, reports
// none.
func TestPolicyMismatchReported(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	// Nothing stored yet: the loops use the defaults, and the differences
	// say so (they said "stored 0").
	size := int64(5 << 30)
	fresh, err := manager.New(manager.Config{Root: t.TempDir(), Log: quietLog(), Cleanup: manager.PolicyChange{MaxSizeBytes: &size}})
	if err != nil {
		t.Fatal(err)
	}
	if err := fresh.Settle(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := fresh.PolicyMismatch(), []string{fmt.Sprintf("max-size: default %d, given %d", state.DefaultPolicy().MaxSizeBytes, size)}; !slices.Equal(got, want) {
		t.Errorf("differences on a root with no stored policy: %q, want %q", got, want)
	}
	stored := int64(1 << 30)
	set, err := manager.New(manager.Config{Root: root, Log: quietLog(), SetPolicy: true,
		Cleanup: manager.PolicyChange{MaxSizeBytes: &stored}})
	if err != nil {
		t.Fatal(err)
	}
	if err := set.Settle(ctx); err != nil {
		t.Fatal(err)
	}
	if d := set.PolicyMismatch(); len(d) != 0 {
		t.Errorf("the manager that set the policy reports differences: %q", d)
	}
	given, high := int64(2<<30), 90
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(),
		Cleanup: manager.PolicyChange{MaxSizeBytes: &given, HighWatermark: &high}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Settle(ctx); err != nil {
		t.Fatal(err)
	}
	want := []string{
		fmt.Sprintf("max-size: stored %d, given %d", stored, given),
		fmt.Sprintf("high-watermark: stored %d, given %d", state.DefaultPolicy().HighWatermark, high),
	}
	if got := m.PolicyMismatch(); !slices.Equal(got, want) {
		t.Errorf("differences %q, want %q", got, want)
	}
	st, err := state.DecodeFile(root, state.StateFile)
	if err != nil {
		t.Fatal(err)
	}
	if st.Policy == nil || st.Policy.MaxSizeBytes != stored || st.Policy.HighWatermark != state.DefaultPolicy().HighWatermark {
		t.Errorf("stored policy %+v, want the one set (max-size %d) kept", st.Policy, stored)
	}
	same, err := manager.New(manager.Config{Root: root, Log: quietLog(), Cleanup: manager.PolicyChange{MaxSizeBytes: &stored}})
	if err != nil {
		t.Fatal(err)
	}
	if err := same.Settle(ctx); err != nil {
		t.Fatal(err)
	}
	if d := same.PolicyMismatch(); len(d) != 0 {
		t.Errorf("a manager that agrees reports differences: %q", d)
	}
}
