package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"

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
// sha256 the get named. An image's entries belong to daemons: when the
// dependent holds the image in several, only this host's daemon's entry is
// released, and without a daemon to ask the release is refused as
// ambiguous rather than guessed.
func releaseAny(cmd *cobra.Command, m *manager.Manager, dependent string, key state.Key) error {
	st, err := m.Entries(cmd.Context())
	if err != nil {
		return err
	}
	var matches []*state.Entry
	daemons := map[string]bool{}
	for _, e := range st.Sorted() {
		if e.Key.Kind != key.Kind || e.Key.Source != key.Source {
			continue
		}
		if _, ok := e.Dependents[dependent]; !ok {
			continue
		}
		matches = append(matches, e)
		daemons[e.Key.Daemon] = true
	}
	if len(matches) == 0 {
		return fmt.Errorf("%s: dependent %q: %w", key.Source, dependent, manager.ErrNotRegistered)
	}
	if len(daemons) > 1 {
		local, err := localDaemon(cmd.Context())
		if err == nil && !daemons[local] {
			err = fmt.Errorf("this host's daemon %s holds none of them", local)
		}
		if err != nil {
			ids := slices.Sorted(maps.Keys(daemons))
			return fmt.Errorf("%s: dependent %q holds the image in %d daemons (%s), and %v: release it on the host of the daemon meant: %w",
				key.Source, dependent, len(ids), strings.Join(ids, ", "), err, errUsage)
		}
		matches = slices.DeleteFunc(matches, func(e *state.Entry) bool { return e.Key.Daemon != local })
	}
	for _, e := range matches {
		if err := m.Release(cmd.Context(), dependent, e.Key); err != nil {
			return err
		}
	}
	return nil
}

// localDaemon returns the ID of the Docker daemon this host's commands use.
func localDaemon(ctx context.Context) (string, error) {
	if os.Getenv("DOCKER_HOST") == "" && !fileExists("/var/run/docker.sock") {
		return "", errors.New("no Docker engine here (DOCKER_HOST is not set)")
	}
	eng, err := manager.DockerEngine()
	if err != nil {
		return "", err
	}
	return eng.DaemonID(ctx)
}
