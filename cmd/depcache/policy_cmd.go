package main

import (
	"fmt"

	"github.com/depcache/depcache/manager"
	"github.com/spf13/cobra"
)

func newPolicy(g *globals) *cobra.Command {
	var (
		lf loopFlags
		pf policyFlags
	)
	cmd := &cobra.Command{
		Use:   "policy [flags]",
		Short: "Print the root's cleanup policy; with policy flags, store them (every worker of the root applies it)",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := g.config(&lf, &pf)
			if err != nil {
				return err
			}
			cfg.SetPolicy = true
			m, err := manager.New(cfg)
			if err != nil {
				return err
			}
			if err := m.Settle(cmd.Context()); err != nil {
				return err
			}
			st, err := m.Entries(cmd.Context())
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(g.stdout, st.Policy)
			}
			p := st.Policy
			fmt.Fprintf(g.stdout, "max-size %s, watermarks %d%%/%d%%, min-free-disk %d bytes or %d%%, min-age %s, max-age %s, pins %v\n",
				budget(p.MaxSizeBytes), p.HighWatermark, p.LowWatermark, p.MinFreeDiskBytes, p.MinFreeDiskPercent, p.MinAge, p.MaxAge, p.Pins)
			return nil
		},
	}
	lf.register(cmd.Flags())
	pf.register(cmd.Flags())
	cmd.Flags().MarkHidden("set-policy")
	return cmd
}
