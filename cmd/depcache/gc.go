package main

import (
	"fmt"
	"slices"
	"sort"

	"github.com/depcache/depcache/manager"
	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
)

func newGC(g *globals) *cobra.Command {
	var (
		dryRun bool
		lf     loopFlags
		pf     policyFlags
	)
	cmd := &cobra.Command{
		Use:   "gc [--dry-run] [policy flags]",
		Short: "Run one cleanup sweep now and print what it removed (or would remove) and why",
		Long: `gc runs one cleanup sweep now. Policy flags given to it (--max-size, --min-age,
--max-age, ...) apply to this sweep only, over the root's stored policy, which
they do not change: 'gc --max-size 1 --min-age 0s' frees everything unused.
'depcache policy set' (or --set-policy) changes the stored policy that every
worker's loop applies.`,
		Example: `  depcache gc --dry-run
  depcache gc --max-size 1 --min-age 0s        # free everything nobody uses
  depcache gc --max-age 168h                   # and what was not used for a week
  depcache gc --json | jq '.victims[].source'`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := g.config(&lf, &pf)
			if err != nil {
				return err
			}
			if err := existingRoot(g); err != nil {
				return err
			}
			given := cfg.Cleanup
			if !cfg.SetPolicy {
				// A one-shot sweep's flags are its own, not the root's
				// policy: nothing to store, nothing to report.
				cfg.Cleanup = manager.PolicyChange{}
			}
			m, err := manager.New(cfg)
			if err != nil {
				return err
			}
			if !dryRun { // a dry run writes nothing, not even the policy
				if err := m.Settle(cmd.Context()); err != nil {
					// On a full disk, reconciling (which commits even
					// when it changes nothing: it takes the lock) must
					// not stop the sweep that frees it; a policy to
					// store first must.
					if !m.DiskFull(err) || cfg.SetPolicy {
						return err
					}
					g.log.WithError(err).Warn("the disk is full: sweeping without reconciling the root first")
				}
			}
			var rep manager.SweepReport
			if cfg.SetPolicy {
				rep, err = m.Sweep(cmd.Context(), dryRun) // under the policy just stored
			} else {
				rep, err = m.SweepWith(cmd.Context(), dryRun, given)
			}
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(g.stdout, toGCJSON(rep))
			}
			verb, reaped, freed, usage := "evicted", "reaped", "freed", "usage"
			if dryRun {
				verb, reaped, freed, usage = "would evict", "would reap", "would free", "usage would be"
			}
			srcs := make([]string, 0, len(rep.Reaped))
			for s := range rep.Reaped {
				srcs = append(srcs, s)
			}
			sort.Strings(srcs)
			for _, s := range srcs {
				fmt.Fprintf(g.stdout, "%s %v from %s\n", reaped, slices.Sorted(slices.Values(rep.Reaped[s])), s)
			}
			for _, v := range rep.Victims {
				fmt.Fprintf(g.stdout, "%s %s (%s, %s)\n", verb, v.Key.Source, humanize.IBytes(uint64(v.Bytes)), v.Reason)
			}
			fmt.Fprintf(g.stdout, "%s %d, %s %s; %s %s of budget %s\n", verb, len(rep.Victims), freed,
				humanize.IBytes(uint64(rep.Freed)), usage, humanize.IBytes(uint64(rep.Usage.Bytes-rep.Freed)), budget(rep.Policy.MaxSizeBytes))
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&dryRun, "dry-run", false, "print what would be removed; remove nothing")
	lf.register(f)
	pf.register(f)
	return cmd
}

func budget(n int64) string {
	if n <= 0 {
		return "none"
	}
	return humanize.IBytes(uint64(n))
}

// gcJSON is `gc --json`: the CLI's own snake_case view of
// manager.SweepReport (whose Go field names are not a contract).
type gcJSON struct {
	DryRun  bool         `json:"dry_run"`
	Victims []victimJSON `json:"victims"`
	// FreedBytes is what the victims took.
	FreedBytes int64 `json:"freed_bytes"`
	// Reaped: dependents removed (or that would be) by entry source.
	Reaped map[string][]string `json:"reaped"`
	// UsageBytes is the cache's usage before the sweep; UsageAfterBytes
	// after it.
	UsageBytes      int64 `json:"usage_bytes"`
	UsageAfterBytes int64 `json:"usage_after_bytes"`
	// BudgetBytes is the sweep's --max-size (0: none).
	BudgetBytes   int64 `json:"budget_bytes"`
	DiskFreeBytes int64 `json:"disk_free_bytes"`
	DiskSizeBytes int64 `json:"disk_size_bytes"`
}

type victimJSON struct {
	Key       string `json:"key"`
	Kind      string `json:"kind"`
	Source    string `json:"source"`
	SizeBytes int64  `json:"size_bytes"`
	Reason    string `json:"reason"`
}

func toGCJSON(rep manager.SweepReport) gcJSON {
	out := gcJSON{DryRun: rep.DryRun, Victims: []victimJSON{}, FreedBytes: rep.Freed, Reaped: map[string][]string{},
		UsageBytes: rep.Usage.Bytes, UsageAfterBytes: rep.Usage.Bytes - rep.Freed, BudgetBytes: rep.Policy.MaxSizeBytes,
		DiskFreeBytes: rep.Usage.DiskFree, DiskSizeBytes: rep.Usage.DiskSize}
	for _, v := range rep.Victims {
		out.Victims = append(out.Victims, victimJSON{Key: v.Key.ID(), Kind: string(v.Key.Kind), Source: v.Key.Source, SizeBytes: v.Bytes, Reason: v.Reason})
	}
	for src, names := range rep.Reaped {
		sorted := append([]string{}, names...)
		sort.Strings(sorted)
		out.Reaped[src] = sorted
	}
	return out
}
