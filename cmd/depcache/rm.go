package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// minIDPrefix is the shortest key ID prefix rm (and ls) accept.
const minIDPrefix = 8

// removedJSON is one element of `rm --json`'s "removed".
type removedJSON struct {
	Key       string `json:"key"`
	Kind      string `json:"kind"`
	Source    string `json:"source"`
	Stage     string `json:"stage"`
	SizeBytes int64  `json:"size_bytes"`
}

// rmJSON is `rm --json`.
type rmJSON struct {
	DryRun     bool          `json:"dry_run"`
	Removed    []removedJSON `json:"removed"`
	FreedBytes int64         `json:"freed_bytes"`
}

func newRm(g *globals) *cobra.Command {
	var dryRun, yes, ignoreMissing bool
	cmd := &cobra.Command{
		Use:   "rm [--dry-run] [-y] SOURCE|ID...",
		Short: "Remove entries that nobody uses; refuse one in use, naming its dependents",
		Long: `rm removes the named entries: a SOURCE (every entry of that source, whatever
--sha256 it was fetched with) or a key ID, in full or a unique prefix of at
least 8 hex characters (the KEY column of 'depcache ls').

All or nothing: if any of them is in use (a live dependent holds it; the
dependents are named), downloading, or not in the cache, nothing is removed.
Dependents whose process is gone or whose TTL passed do not count, as in a
sweep. Pins do not protect an entry from rm: they protect it from cleanup.

rm asks before removing when stdin is a terminal; otherwise it refuses
unless -y is given (as 'apt-get remove' does), so that a script never
removes by accident. --dry-run says what would go and asks nothing.`,
		Example: `  depcache rm https://example.com/model.tar.gz
  depcache rm 3f2a9c1b7d0e
  depcache ls -q --filter unused=30d | xargs -r depcache rm --dry-run
  depcache ls -q --filter stage=FAILED --filter in-use=false | xargs -r depcache rm -y`,
		Args: minArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := existingRoot(g); err != nil {
				return err
			}
			// Image entries are removed with their images: rm needs this
			// host's engine to tell which daemon's they are.
			cfg, err := g.engineConfig()
			if err != nil {
				return err
			}
			m, err := manager.New(cfg)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			st, err := m.Entries(ctx)
			if err != nil {
				return err
			}
			keys, err := resolveEntries(st, args, ignoreMissing)
			if err != nil {
				return err
			}
			// Refusals first, before asking anything.
			rep, err := m.Remove(ctx, keys, true)
			if err != nil {
				return fmt.Errorf("nothing removed: %w", err)
			}
			if !dryRun && !yes && len(rep.Removed) > 0 {
				ok, err := confirm(cmd.InOrStdin(), g.stderr, removeQuestion(rep))
				if err != nil {
					return err
				}
				if !ok {
					fmt.Fprintln(g.stderr, "nothing removed")
					return nil
				}
			}
			var kept error // images the engine refused after the commit: their entries stay
			if !dryRun {
				if rep, err = m.Remove(ctx, keys, false); err != nil && len(rep.Removed) == 0 {
					return fmt.Errorf("nothing removed: %w", err)
				}
				kept = err
			}
			if g.json {
				out := rmJSON{DryRun: dryRun, Removed: []removedJSON{}, FreedBytes: rep.Freed}
				for _, r := range rep.Removed {
					out.Removed = append(out.Removed, removedJSON{Key: r.Key.ID(), Kind: string(r.Key.Kind), Source: r.Key.Source,
						Stage: string(r.Stage), SizeBytes: r.Bytes})
				}
				if err := printJSON(g.stdout, out); err != nil {
					return err
				}
				return kept
			}
			verb, freed := "removed", "freed"
			if dryRun {
				verb, freed = "would remove", "would free"
			}
			for _, r := range rep.Removed {
				fmt.Fprintf(g.stdout, "%s %s (%s, %s, %s)\n", verb, r.Key.Source, shortID(r.Key.ID()), r.Stage, humanize.IBytes(uint64(r.Bytes)))
			}
			fmt.Fprintf(g.stdout, "%s %d, %s %s\n", verb, len(rep.Removed), freed, humanize.IBytes(uint64(rep.Freed)))
			return kept
		},
	}
	f := cmd.Flags()
	f.BoolVar(&dryRun, "dry-run", false, "say what would be removed; remove nothing")
	f.BoolVarP(&yes, "yes", "y", false, "do not ask (needed when stdin is not a terminal)")
	f.BoolVar(&ignoreMissing, "ignore-missing", false, "skip arguments that name no entry instead of failing")
	return cmd
}

// removeQuestion is what rm asks before it removes rep's entries.
func removeQuestion(rep manager.RemoveReport) string {
	return fmt.Sprintf("remove %s (%s)?", count(len(rep.Removed), "entry", "entries"), humanize.IBytes(uint64(rep.Freed)))
}

// confirm asks question on w and reads the answer from r. When r is not a
// terminal there is nobody to ask: the answer is a refusal to go on.
func confirm(r io.Reader, w io.Writer, question string) (bool, error) {
	if f, ok := r.(*os.File); !ok || !term.IsTerminal(int(f.Fd())) {
		return false, usageErrorf("refusing to remove without confirmation: stdin is not a terminal; pass -y (or --dry-run to see what would go)")
	}
	fmt.Fprintf(w, "%s [y/N] ", question)
	answer, _ := bufio.NewReader(r).ReadString('\n')
	a := strings.ToLower(strings.TrimSpace(answer))
	return a == "y" || a == "yes", nil
}

// shortID is the KEY column: the first 12 hex characters of a key ID.
func shortID(id string) string { return id[:min(len(id), 12)] }

// isIDPrefix reports whether s looks like a key ID or a prefix of one, in
// either case (IDs are lower case: compare strings.ToLower(s)).
func isIDPrefix(s string) bool {
	if s == "" || len(s) > 32 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}

// resolveEntries turns arguments (sources, key IDs or unique prefixes of
// at least minIDPrefix hex characters) into the keys of st's entries.
func resolveEntries(st *state.State, args []string, ignoreMissing bool) ([]state.Key, error) {
	var keys []state.Key
	var errs []error
	for _, a := range args {
		if isIDPrefix(a) {
			a := strings.ToLower(a)
			if len(a) < minIDPrefix {
				return nil, usageErrorf("key ID prefix %q: want at least %d hex characters", a, minIDPrefix)
			}
			var found []*state.Entry
			for _, e := range st.Sorted() {
				if strings.HasPrefix(e.Key.ID(), a) {
					found = append(found, e)
				}
			}
			switch {
			case len(found) == 1:
				keys = append(keys, found[0].Key)
			case len(found) > 1:
				var srcs []string
				for _, e := range found {
					srcs = append(srcs, shortID(e.Key.ID())+" "+e.Key.Source)
				}
				return nil, usageErrorf("key ID prefix %s is ambiguous: %s", a, strings.Join(srcs, ", "))
			case !ignoreMissing:
				errs = append(errs, fmt.Errorf("no entry with key ID %s: %w", a, manager.ErrNotFound))
			}
			continue
		}
		k, err := manager.ParseKey(a, "")
		if err != nil {
			return nil, err
		}
		n := 0
		for _, e := range st.Sorted() {
			if e.Key.Kind == k.Kind && e.Key.Source == k.Source {
				keys = append(keys, e.Key)
				n++
			}
		}
		if n == 0 && !ignoreMissing {
			errs = append(errs, fmt.Errorf("no entry for %s: %w", k.Source, manager.ErrNotFound))
		}
	}
	return keys, errors.Join(errs...)
}
