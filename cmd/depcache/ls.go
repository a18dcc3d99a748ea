package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
)

// entryJSON is one element of `ls --json` (and `get --json`). Its fields
// are a contract: add, never rename or drop.
type entryJSON struct {
	Key        string         `json:"key"`
	Kind       string         `json:"kind"`
	Source     string         `json:"source"`
	SHA256     string         `json:"sha256,omitempty"`
	Stage      string         `json:"stage"`
	Path       string         `json:"path"`
	ImageID    string         `json:"image_id"`
	RepoDigest string         `json:"repo_digest,omitempty"`
	Daemon     string         `json:"daemon,omitempty"`
	SizeBytes  int64          `json:"size_bytes"`
	Dependents []string       `json:"dependents"`
	LastUsed   string         `json:"last_used"`
	Created    string         `json:"created"`
	Owner      *ownerJSON     `json:"owner"`
	Generation uint64         `json:"generation"`
	Progress   state.Progress `json:"progress"`
	Failures   int            `json:"failures"`
	Message    string         `json:"message"`
	manager.Description
}

type ownerJSON struct {
	Host string `json:"host"`
	PID  int    `json:"pid"`
}

func toJSON(m *manager.Manager, e state.Entry) entryJSON {
	j := entryJSON{
		Key: e.Key.ID(), Kind: string(e.Key.Kind), Source: e.Key.Source, SHA256: e.Key.SHA256,
		Stage: string(e.Stage), ImageID: e.ImageID, RepoDigest: e.RepoDigest, Daemon: e.Key.Daemon, SizeBytes: e.SizeBytes, Dependents: []string{},
		LastUsed: rfc3339(e.LastUsed), Created: rfc3339(e.Created), Generation: e.Generation,
		Progress: e.Progress, Failures: e.Failures, Message: e.Message,
	}
	if e.Path != "" {
		j.Path, _ = m.Abs(e)
	}
	for name := range e.Dependents {
		j.Dependents = append(j.Dependents, name)
	}
	sort.Strings(j.Dependents)
	if e.Owner != nil {
		j.Owner = &ownerJSON{Host: e.Owner.Host, PID: e.Owner.PID}
	}
	return j
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newLs(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List the cache's entries",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := manager.New(g.plainConfig())
			if err != nil {
				return err
			}
			out, err := describeEntries(cmd.Context(), m)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(g.stdout, out)
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "STAGE\tSIZE\tDEPENDENTS\tLAST USED\tKEPT\tSOURCE\tDETAIL")
			for _, e := range out {
				detail := e.Path
				switch {
				case e.Stage == string(state.Downloading) && e.Owner != nil:
					detail = fmt.Sprintf("gen %d by pid %d on %s, %s", e.Generation, e.Owner.PID, e.Owner.Host, humanize.IBytes(uint64(e.Progress.Bytes)))
				case e.Stage == string(state.Failed):
					detail = e.Message
				case e.Kind == string(state.Image):
					detail = fmt.Sprintf("%s on daemon %.12s", e.ImageID, e.Daemon)
				}
				kept := e.Kept
				if kept == "" {
					kept = "-"
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", e.Stage, humanize.IBytes(uint64(e.SizeBytes)), len(e.Dependents), e.LastUsed, kept, e.Source, detail)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, e := range out {
				for _, d := range e.Description.Dependents {
					fmt.Fprintf(g.stdout, "  %s: dependent %s: %s\n", e.Source, d.Name, d.Liveness)
				}
			}
			return nil
		},
	}
}

// describeEntries is the content of ls --json and of serve's /v1/entries.
func describeEntries(ctx context.Context, m *manager.Manager) ([]entryJSON, error) {
	st, desc, err := m.Describe(ctx)
	if err != nil {
		return nil, err
	}
	out := []entryJSON{}
	for _, e := range st.Sorted() {
		j := toJSON(m, *e)
		j.Description = desc[e.Key.ID()]
		out = append(out, j)
	}
	return out, nil
}
