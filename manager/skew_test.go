package manager_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
)

// TestMinAgeOnASkewedClock: an entry fetched by a host whose clock runs 3
// minutes behind, or 3 minutes ahead, is not evicted early under min-age
// 2m (with a budget of 1 byte) or max-age 2m (with no budget) by a sweeper
// with a correct clock, neither by its first sweep nor a minute later; the
// sweeper evicts it once it has watched it for the age on its own clock.
func TestMinAgeOnASkewedClock(t *testing.T) {
	for _, tc := range []struct {
		name   string
		skew   time.Duration
		policy manager.PolicyChange
	}{
		{"writer behind, min-age", -3 * time.Minute, manager.PolicyChange{MaxSizeBytes: ptr[int64](1), MinAge: ptr(2 * time.Minute)}},
		{"writer ahead, min-age", 3 * time.Minute, manager.PolicyChange{MaxSizeBytes: ptr[int64](1), MinAge: ptr(2 * time.Minute)}},
		{"writer behind, max-age", -3 * time.Minute, manager.PolicyChange{MinAge: ptr(time.Duration(0)), MaxAge: ptr(2 * time.Minute)}},
		{"writer ahead, max-age", 3 * time.Minute, manager.PolicyChange{MinAge: ptr(time.Duration(0)), MaxAge: ptr(2 * time.Minute)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			t0 := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
			skewed := &fakeClock{now: t0.Add(tc.skew)}
			fetcher := newManager(t, root, func(c *manager.Config) { c.Clock = skewed })
			abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
			k := mustKey(t, "file://"+abs, "")
			if _, err := getWait(t, fetcher, "job", k); err != nil {
				t.Fatal(err)
			}
			if err := fetcher.Release(context.Background(), "job", k); err != nil {
				t.Fatal(err)
			}
			correct := &fakeClock{now: t0.Add(time.Second)}
			sweeper, err := manager.New(manager.Config{Root: root, Log: quietLog(), Clock: correct})
			if err != nil {
				t.Fatal(err)
			}
			sweep := func() int {
				t.Helper()
				rep, err := sweeper.SweepWith(context.Background(), false, tc.policy)
				if err != nil {
					t.Fatal(err)
				}
				return len(rep.Victims)
			}
			if n := sweep(); n != 0 {
				t.Fatalf("evicted %d entries 1 s after they were fetched, under an age of 2m", n)
			}
			correct.advance(time.Minute)
			if n := sweep(); n != 0 {
				t.Fatalf("evicted %d entries 61 s after they were fetched, under an age of 2m", n)
			}
			correct.advance(time.Minute)
			if n := sweep(); n != 1 {
				t.Fatalf("evicted %d entries after watching them for 2m, want 1", n)
			}
		})
	}
}
