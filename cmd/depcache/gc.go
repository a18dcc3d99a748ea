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
		Use:   "gc [--dry-run]",
		Short: "Run one cleanup sweep now and print what it removed (or would remove) and why",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := g.config(&lf, &pf)
			if err != nil {
				return err
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
			rep, err := m.Sweep(cmd.Context(), dryRun)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(g.stdout, rep)
			}
			verb := "evicted"
			if dryRun {
				verb = "would evict"
			}
			srcs := make([]string, 0, len(rep.Reaped))
			for s := range rep.Reaped {
				srcs = append(srcs, s)
			}
			sort.Strings(srcs)
			for _, s := range srcs {
				fmt.Fprintf(g.stdout, "reaped %v from %s\n", rep.Reaped[s], s)
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
