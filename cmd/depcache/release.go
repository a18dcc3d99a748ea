package main

import (
	"fmt"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/spf13/cobra"
)

func newRelease(g *globals) *cobra.Command {
	var dependent string
	cmd := &cobra.Command{
		Use:   "release --dependent NAME SOURCE",
		Short: "Remove a dependent of SOURCE; a download left without dependents is cancelled",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dependent == "" {
				return usageErrorf("--dependent is required (an anonymous get's dependent ends with its process)")
			}
			key, err := manager.ParseKey(args[0], "")
			if err != nil {
				return err
			}
			m, err := manager.New(g.plainConfig())
			if err != nil {
				return err
			}
			if err := releaseAny(cmd, m, dependent, key); err != nil {
				return err
			}
			if !g.json {
				fmt.Fprintf(g.stdout, "released %s from %s\n", dependent, key.Source)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dependent, "dependent", "", "name of the dependent to remove")
	return cmd
}

// releaseAny releases dependent from every entry of key's source, whatever
// sha256 the get named.
func releaseAny(cmd *cobra.Command, m *manager.Manager, dependent string, key state.Key) error {
	st, err := m.Entries(cmd.Context())
	if err != nil {
		return err
	}
	released := 0
	for _, e := range st.Sorted() {
		if e.Key.Kind != key.Kind || e.Key.Source != key.Source {
			continue
		}
		if _, ok := e.Dependents[dependent]; !ok {
			continue
		}
		if err := m.Release(cmd.Context(), dependent, e.Key); err != nil {
			return err
		}
		released++
	}
	if released == 0 {
		return fmt.Errorf("%s: dependent %q: %w", key.Source, dependent, manager.ErrNotRegistered)
	}
	return nil
}
