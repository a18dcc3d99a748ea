package manager_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
)

// TestMinAgeOnASkewedClock: an entry fetched by a host whose clock runs 3
// minutes behind is not evicted early under min-age 2m by a sweeper with a
// correct clock, neither by a one-shot sweep nor by a sweeper that just
// started watching it; the sweeper evicts it once it has watched it for
// min-age on its own clock.
func TestMinAgeOnASkewedClock(t *testing.T) {
	root := t.TempDir()
	t0 := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	behind := &fakeClock{now: t0.Add(-3 * time.Minute)}
	fetcher := newManager(t, root, func(c *manager.Config) { c.Clock = behind })
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
	oneShot := manager.PolicyChange{MaxSizeBytes: ptr[int64](1), MinAge: ptr(2 * time.Minute)}
	sweep := func() int {
		t.Helper()
		rep, err := sweeper.SweepWith(context.Background(), false, oneShot)
		if err != nil {
			t.Fatal(err)
		}
		return len(rep.Victims)
	}
	if n := sweep(); n != 0 {
		t.Fatalf("evicted %d entries 1 s after they were fetched, under min-age 2m", n)
	}
	correct.advance(time.Minute)
	if n := sweep(); n != 0 {
		t.Fatalf("evicted %d entries 61 s after they were fetched, under min-age 2m", n)
	}
	correct.advance(time.Minute)
	if n := sweep(); n != 1 {
		t.Fatalf("evicted %d entries after watching them for min-age 2m, want 1", n)
	}
}
