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
	"github.com/depcache/depcache/manager/docker"
	"github.com/depcache/depcache/state"
	"github.com/spf13/cobra"
)

// releaseJSON is `release --json`.
type releaseJSON struct {
	Dependent string         `json:"dependent"`
	Released  []releasedJSON `json:"released"`
}

// releasedJSON is one entry a release took the dependent from.
type releasedJSON struct {
	Key    string `json:"key"`
	Kind   string `json:"kind"`
	Source string `json:"source"`
	Daemon string `json:"daemon,omitempty"`
}

func newRelease(g *globals) *cobra.Command {
	var dependent string
	var ignoreMissing bool
	cmd := &cobra.Command{
		Use:   "release --dependent NAME SOURCE",
		Short: "Remove a dependent of SOURCE; a download left without dependents is cancelled",
		Long: `release removes the named dependent from SOURCE's entries (whatever --sha256
the get named). A download left without dependents is cancelled wherever it
runs. A SOURCE with no entry fails with "no entry for SOURCE", a dependent
the entry does not have with "not registered"; --ignore-missing makes both
succeed, for cleanup scripts that release what may be gone.`,
		Example: `  depcache get --dependent job-42 https://example.com/data.tar.gz
  depcache release --dependent job-42 https://example.com/data.tar.gz
  depcache release --ignore-missing --dependent job-42 https://example.com/data.tar.gz   # in a trap/finally`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dependent == "" {
				if cmd.Flags().Changed("dependent") {
					return usageErrorf("--dependent '': empty (want the name given to get --dependent, 1 to 256 bytes)")
				}
				return usageErrorf("--dependent is required (an anonymous get's dependent ends with its process)")
			}
			if err := manager.CheckDependent(dependent); err != nil {
				return err
			}
			key, err := manager.ParseKey(args[0], "")
			if err != nil {
				return err
			}
			if err := existingRoot(g); err != nil {
				if ignoreMissing && errors.Is(err, errNoCache) {
					return printReleased(g, dependent, key, nil)
				}
				return err
			}
			m, err := manager.New(g.plainConfig())
			if err != nil {
				return err
			}
			released, err := releaseAny(cmd, m, dependent, key)
			if err != nil && (!ignoreMissing || !(errors.Is(err, manager.ErrNotFound) || errors.Is(err, manager.ErrNotRegistered))) {
				return err
			}
			return printReleased(g, dependent, key, released)
		},
	}
	newOnceString(cmd.Flags(), &dependent, "dependent", "", "name of the dependent to remove",
		"one release removes one dependent (run a release for each)")
	cmd.Flags().BoolVar(&ignoreMissing, "ignore-missing", false, "succeed when SOURCE has no entry or the dependent is not registered on it")
	return cmd
}

func printReleased(g *globals, dependent string, key state.Key, released []state.Key) error {
	if g.json {
		out := releaseJSON{Dependent: dependent, Released: []releasedJSON{}}
		for _, k := range released {
			out.Released = append(out.Released, releasedJSON{Key: k.ID(), Kind: string(k.Kind), Source: k.Source, Daemon: k.Daemon})
		}
		return printJSON(g.stdout, out)
	}
	if len(released) == 0 {
		fmt.Fprintf(g.stdout, "nothing to release: %s does not hold %s\n", dependent, key.Source)
		return nil
	}
	fmt.Fprintf(g.stdout, "released %s from %s\n", dependent, key.Source)
	return nil
}

// releaseAny releases dependent from every entry of key's source, whatever
// sha256 the get named. An image's entries belong to daemons: when the
// dependent holds the image in several, only this host's daemon's entry is
// released, and without a daemon to ask the release is refused as
// ambiguous rather than guessed.
func releaseAny(cmd *cobra.Command, m *manager.Manager, dependent string, key state.Key) ([]state.Key, error) {
	st, err := m.Entries(cmd.Context())
	if err != nil {
		return nil, err
	}
	var matches []*state.Entry
	daemons := map[string]bool{}
	found := false
	for _, e := range st.Sorted() {
		if e.Key.Kind != key.Kind || e.Key.Source != key.Source {
			continue
		}
		found = true
		if _, ok := e.Dependents[dependent]; !ok {
			continue
		}
		matches = append(matches, e)
		daemons[e.Key.Daemon] = true
	}
	if !found {
		return nil, fmt.Errorf("no entry for %s: %w", key.Source, manager.ErrNotFound)
	}
	if len(matches) == 0 {
		return nil, fmt.Errorf("%s: dependent %q: %w", key.Source, dependent, manager.ErrNotRegistered)
	}
	if len(daemons) > 1 {
		local, err := localDaemon(cmd.Context())
		if err == nil && !daemons[local] {
			err = fmt.Errorf("this host's daemon %s holds none of them", local)
		}
		if err != nil {
			ids := slices.Sorted(maps.Keys(daemons))
			return nil, fmt.Errorf("%s: dependent %q holds the image in %d daemons (%s), and %v: release it on the host of the daemon meant: %w",
				key.Source, dependent, len(ids), strings.Join(ids, ", "), err, errUsage)
		}
		matches = slices.DeleteFunc(matches, func(e *state.Entry) bool { return e.Key.Daemon != local })
	}
	var released []state.Key
	for _, e := range matches {
		if err := m.Release(cmd.Context(), dependent, e.Key); err != nil {
			return released, err
		}
		released = append(released, e.Key)
	}
	return released, nil
}

// localDaemon returns the ID of the Docker daemon this host's commands use.
func localDaemon(ctx context.Context) (string, error) {
	if os.Getenv("DOCKER_HOST") == "" && !fileExists("/var/run/docker.sock") {
		return "", errors.New("no Docker engine here (DOCKER_HOST is not set)")
	}
	eng, err := docker.New()
	if err != nil {
		return "", err
	}
	return eng.DaemonID(ctx)
}
