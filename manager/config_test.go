package manager_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/prometheus/client_golang/prometheus"
)

// TestConfigRefusesWhatItCannotUse: a negative duration or bound and a nil
// source are refused by New, naming the field, where they were taken for
// defaults or crashed a download goroutine.
func TestConfigRefusesWhatItCannotUse(t *testing.T) {
	for _, tc := range []struct {
		field string
		set   func(*manager.Config)
	}{
		{"LockLease", func(c *manager.Config) { c.LockLease = -time.Second }},
		{"Policy.DownloadTimeout", func(c *manager.Config) { c.Policy.DownloadTimeout = -1 }},
		{"ProgressInterval", func(c *manager.Config) { c.ProgressInterval = -1 }},
		{"MaxBundleBytes", func(c *manager.Config) { c.MaxBundleBytes = -1 }},
		{`Sources["file"]`, func(c *manager.Config) { c.Sources = map[string]manager.Source{"file": nil} }},
	} {
		cfg := manager.Config{Root: t.TempDir(), Log: quietLog()}
		tc.set(&cfg)
		if _, err := manager.New(cfg); err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: New = %v, want an error naming it", tc.field, err)
		}
	}
}

// TestManagersShareARegistry: two managers given one registry (or one
// started again after its stop) share its collectors instead of panicking
// on the duplicate registration.
func TestManagersShareARegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	for range 3 {
		if _, err := manager.New(manager.Config{Root: t.TempDir(), Log: quietLog(), Metrics: reg}); err != nil {
			t.Fatal(err)
		}
	}
	fams, err := reg.Gather()
	if err != nil || len(fams) == 0 {
		t.Fatalf("gather: %d families, %v", len(fams), err)
	}
}

// TestFailedErrorMatchesTooLarge: a failure that did not fit the budget
// matches ErrTooLarge (its reason says so), one that did not, does not.
func TestFailedErrorMatchesTooLarge(t *testing.T) {
	m := newManager(t, t.TempDir())
	k := state.Key{Kind: state.Bundle, Source: "https://example.com/x"}
	big := m.Failed(state.Entry{Key: k, Stage: state.Failed, Message: "the content passed 10 bytes: the budget...: " + manager.ErrTooLarge.Error()})
	other := m.Failed(state.Entry{Key: k, Stage: state.Failed, Message: "GET https://example.com/x: HTTP 500"})
	if !errors.Is(big, manager.ErrTooLarge) || !errors.Is(big, manager.ErrFailed) {
		t.Errorf("a budget failure: Is(ErrTooLarge) %v, Is(ErrFailed) %v", errors.Is(big, manager.ErrTooLarge), errors.Is(big, manager.ErrFailed))
	}
	if errors.Is(other, manager.ErrTooLarge) {
		t.Error("an HTTP 500 matches ErrTooLarge")
	}
}

// TestCooldownDoesNotOverflow: doubling the cool-down stops at its bound,
// however large, instead of overflowing into the past.
func TestCooldownDoesNotOverflow(t *testing.T) {
	p := transitions.Policy{FailureCooldown: time.Minute, MaxCooldown: time.Duration(1<<63 - 1)}
	for _, n := range []int{1, 30, 70, 1000} {
		if d := p.Cooldown(n); d < time.Minute {
			t.Errorf("Cooldown(%d) = %s, want at least a minute", n, d)
		}
	}
}
