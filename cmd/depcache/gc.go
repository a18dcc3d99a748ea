package main

import (
	"fmt"
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
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := g.config(&lf, &pf)
			if err != nil {
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
					return err
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
				return printJSON(g.stdout, rep)
			}
			verb, reaped := "evicted", "reaped"
			if dryRun {
				verb, reaped = "would evict", "would reap"
			}
			srcs := make([]string, 0, len(rep.Reaped))
			for s := range rep.Reaped {
				srcs = append(srcs, s)
			}
			sort.Strings(srcs)
			for _, s := range srcs {
				fmt.Fprintf(g.stdout, "%s %v from %s\n", reaped, rep.Reaped[s], s)
			}
			for _, v := range rep.Victims {
				fmt.Fprintf(g.stdout, "%s %s (%s, %s)\n", verb, v.Key.Source, humanize.IBytes(uint64(v.Bytes)), v.Reason)
			}
			fmt.Fprintf(g.stdout, "%s %d, freed %s; usage %s of budget %s\n", verb, len(rep.Victims),
				humanize.IBytes(uint64(rep.Freed)), humanize.IBytes(uint64(rep.Usage.Bytes-rep.Freed)), budget(rep.Policy.MaxSizeBytes))
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
