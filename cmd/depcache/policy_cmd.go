package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func newPolicy(g *globals) *cobra.Command {
	var (
		lf loopFlags
		pf policyFlags
	)
	cmd := &cobra.Command{
		Use: "policy [set] [policy flags]",
		Example: `  depcache policy
  depcache policy --json
  depcache policy set --max-size 20GiB`,
		Short: "Print the root's cleanup policy; 'policy set' stores the flags given (every worker of the root applies it)",
		Long: `policy prints the cleanup policy stored in the root, which the loops of every
worker apply (the defaults while none is stored). It only looks: it writes
nothing, whatever DEPCACHE_* variables are set.

'policy set --max-size 10GiB ...' stores the flags given. 'policy' with
policy flags on its command line stores them too, as it always has.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			// Only policy flags typed on this command line make it write:
			// their DEPCACHE_* twins, and global flags, do not.
			own := pflag.NewFlagSet("policy", pflag.ContinueOnError)
			(&loopFlags{}).register(own)
			(&policyFlags{}).register(own)
			onCommandLine := false
			cmd.Flags().Visit(func(f *pflag.Flag) {
				onCommandLine = onCommandLine || own.Lookup(f.Name) != nil && !g.fromEnv[f.Name]
			})
			if !onCommandLine {
				return showPolicy(cmd, g)
			}
			return setPolicy(cmd, g, &lf, &pf)
		},
	}
	lf.register(cmd.Flags())
	pf.register(cmd.Flags())
	cmd.Flags().MarkHidden("set-policy")
	var (
		slf loopFlags
		spf policyFlags
	)
	set := &cobra.Command{
		Use:   "set [policy flags]",
		Short: "Store the given cleanup settings in the root's policy; the others keep their stored values",
		Example: `  depcache policy set --max-size 20GiB --min-age 10m
  depcache policy set --pin 'https://models.example.com/*'`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			_, statErr := os.Stat(g.root)
			err := setPolicy(cmd, g, &slf, &spf)
			if err != nil && errors.Is(statErr, fs.ErrNotExist) {
				// Refused (a pin of no entry, a value out of range): the
				// root it made to store the policy in goes again. Remove
				// takes only an empty directory.
				os.Remove(g.root)
			}
			return err
		},
	}
	slf.register(set.Flags())
	spf.register(set.Flags())
	set.Flags().MarkHidden("set-policy")
	cmd.AddCommand(set)
	return cmd
}

// showPolicy prints the stored policy without writing anything: on a root
// that does not exist yet (file store), the defaults, which a root created
// now would apply; creating it would be a write.
func showPolicy(cmd *cobra.Command, g *globals) error {
	err := existingRoot(g)
	switch {
	case errors.Is(err, errNoCache) && (g.state.url == "" || g.state.url == "file"):
		return printPolicy(g, state.DefaultPolicy())
	case errors.Is(err, errNoCache):
		// The policy is the prefix's: read it there, unbound to a root
		// that is not here (a manager would create the root).
		g.state.locksOnly = true
		st, err := g.stateStore()
		if err != nil {
			return err
		}
		v, err := st.View(cmd.Context())
		if err != nil {
			return err
		}
		p := state.DefaultPolicy()
		if v.Policy != nil {
			p = *v.Policy
		}
		return printPolicy(g, p)
	case err != nil:
		return err
	}
	m, err := manager.New(g.plainConfig())
	if err != nil {
		return err
	}
	st, err := m.Entries(cmd.Context())
	if err != nil {
		return err
	}
	p := state.DefaultPolicy()
	if st.Policy != nil {
		p = *st.Policy
	}
	return printPolicy(g, p)
}

func setPolicy(cmd *cobra.Command, g *globals, lf *loopFlags, pf *policyFlags) error {
	cfg, err := g.config(lf, pf)
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
	return printPolicy(g, *st.Policy)
}

// policyJSON is `policy --json`: state.Policy's fields, each always
// present (the stored form leaves zeros out), pins [] when none. Its
// fields are a contract: add, never rename or drop.
type policyJSON struct {
	MaxSizeBytes       int64          `json:"max_size_bytes"`
	HighWatermark      int            `json:"high_watermark_percent"`
	LowWatermark       int            `json:"low_watermark_percent"`
	MinFreeDiskBytes   int64          `json:"min_free_disk_bytes"`
	MinFreeDiskPercent int            `json:"min_free_disk_percent"`
	MinAge             state.Duration `json:"min_age"`
	MaxAge             state.Duration `json:"max_age"`
	Pins               []string       `json:"pins"`
}

func toPolicyJSON(p state.Policy) policyJSON {
	return policyJSON{MaxSizeBytes: p.MaxSizeBytes, HighWatermark: p.HighWatermark, LowWatermark: p.LowWatermark,
		MinFreeDiskBytes: p.MinFreeDiskBytes, MinFreeDiskPercent: p.MinFreeDiskPercent, MinAge: p.MinAge, MaxAge: p.MaxAge,
		Pins: append([]string{}, p.Pins...)}
}

func printPolicy(g *globals, p state.Policy) error {
	if g.json {
		return printJSON(g.stdout, toPolicyJSON(p))
	}
	fmt.Fprintf(g.stdout, "max-size %s, watermarks %d%%/%d%%, min-free-disk %d bytes or %d%%, min-age %s, max-age %s, pins %v\n",
		budget(p.MaxSizeBytes), p.HighWatermark, p.LowWatermark, p.MinFreeDiskBytes, p.MinFreeDiskPercent, p.MinAge, p.MaxAge, p.Pins)
	return nil
}
