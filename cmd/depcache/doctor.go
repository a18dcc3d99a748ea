package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/spf13/cobra"
)

// errUnhealthy: doctor found a failing check.
var errUnhealthy = errors.New("doctor found problems")

func newDoctor(g *globals) *cobra.Command {
	var rebuild, force, breakLock, yes bool
	cmd := &cobra.Command{
		Use:   "doctor [--rebuild [--force]] [--break-lock [--yes]]",
		Short: "Check the root and say what is wrong; rebuild an unreadable state; break a stale lock",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := manager.New(g.plainConfig())
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			switch {
			case rebuild:
				rep, err := m.Rebuild(ctx, force)
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(g.stdout, rep)
				}
				printRebuild(g.stdout, rep)
				return nil
			case breakLock:
				holder := m.LockHolder()
				if holder == "" {
					fmt.Fprintln(g.stdout, "the state lock is free")
					return nil
				}
				fmt.Fprintf(g.stdout, "the state lock is held by: %s\n", holder)
				if !yes {
					fmt.Fprint(g.stdout, "break it? only if that process is gone [y/N] ")
					answer, _ := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
					if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
						fmt.Fprintln(g.stdout, "left alone")
						return nil
					}
				}
				if err := m.BreakLock(holder); err != nil {
					return err
				}
				fmt.Fprintln(g.stdout, "broke the state lock")
				return nil
			}
			checks := m.Doctor(ctx)
			if g.json {
				return printJSON(g.stdout, checks)
			}
			failed := 0
			for _, c := range checks {
				fmt.Fprintf(g.stdout, "%-4s %-12s %s\n", c.Status, c.Name, c.Detail)
				if c.Status == "fail" {
					failed++
				}
			}
			if failed > 0 {
				return fmt.Errorf("%d check(s) failed: %w", failed, errUnhealthy)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&rebuild, "rebuild", false, "rebuild the state from the metadata published next to each entry (after a corrupt state file)")
	f.BoolVar(&force, "force", false, "with --rebuild: rebuild even a state file that parses, dropping its dependents and downloads in flight")
	f.BoolVar(&breakLock, "break-lock", false, "show the state lock's holder and remove the lock if you confirm")
	f.BoolVar(&yes, "yes", false, "with --break-lock: do not ask")
	return cmd
}

// printRebuild says what a rebuild built and, from the last state that
// parses, what it dropped.
func printRebuild(w io.Writer, rep manager.RebuildReport) {
	fmt.Fprintf(w, "rebuilt the state from %d published entries", rep.Entries)
	if len(rep.Failed) > 0 {
		fmt.Fprintf(w, ", %d of them FAILED (verify had failed their content)", len(rep.Failed))
	}
	fmt.Fprintln(w)
	for _, f := range rep.Failed {
		fmt.Fprintf(w, "  FAILED %s (generation %d): %s\n", f.Key.Source, f.Generation, f.Reason)
	}
	if rep.Unreadable != "" {
		fmt.Fprintf(w, "the state file did not parse (%s); it is kept aside at %s\n", rep.UnreadableReason, rep.Unreadable)
	} else if rep.UnreadableReason != "" {
		fmt.Fprintf(w, "the state file could not be read: %s\n", rep.UnreadableReason)
	}
	if rep.LastState == "" {
		fmt.Fprintln(w, "no earlier state parses: what the rebuild dropped (dependents, downloads in flight, the policy) is unknown")
	} else {
		fmt.Fprintf(w, "dropped, as %s had it (a copy is kept at %s):\n", rep.LastState, rep.LastStateCopy)
		if len(rep.DroppedDependents)+len(rep.DroppedDownloads)+len(rep.DroppedEntries) == 0 {
			fmt.Fprintln(w, "  nothing: no dependents, no downloads in flight")
		}
		for _, d := range rep.DroppedDependents {
			var names []string
			for _, dep := range d.Dependents {
				n := dep.Name
				switch {
				case dep.Process != "":
					n += " (process " + dep.Process + ")"
				case dep.Expires != nil:
					n += " (until " + dep.Expires.Format(time.RFC3339) + ")"
				}
				names = append(names, n)
			}
			fmt.Fprintf(w, "  dependents of %s: %s\n", d.Key.Source, strings.Join(names, ", "))
		}
		for _, d := range rep.DroppedDownloads {
			by := "not claimed yet"
			if d.Owner != "" {
				by = fmt.Sprintf("by %s, %d bytes fetched", d.Owner, d.Bytes)
				if d.Total > 0 {
					by += fmt.Sprintf(" of %d", d.Total)
				}
			}
			fmt.Fprintf(w, "  download in flight: %s (generation %d, %s)\n", d.Key.Source, d.Generation, by)
		}
		for _, d := range rep.DroppedEntries {
			fmt.Fprintf(w, "  %s entry without content: %s (generation %d) %s\n", d.Stage, d.Key.Source, d.Generation, d.Message)
		}
		if len(rep.DroppedDependents) > 0 {
			fmt.Fprintln(w, "  re-register the dependents that still run (depcache get --dependent NAME SOURCE): until then a sweep may evict what they use")
		}
	}
	if rep.Policy.Carried {
		fmt.Fprintf(w, "policy: carried over from %s\n", rep.LastState)
	} else {
		fmt.Fprintln(w, "policy: none found to carry over; the defaults are stored (depcache policy --max-size ... sets it)")
	}
}

func newVerify(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "verify [SOURCE...]",
		Short: "Re-hash READY bundles against the digest recorded at publish; mismatches become FAILED",
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := manager.New(g.plainConfig())
			if err != nil {
				return err
			}
			var sources []string
			for _, a := range args {
				k, err := manager.ParseKey(a, "")
				if err != nil {
					return err
				}
				sources = append(sources, k.Source)
			}
			res, err := m.Verify(cmd.Context(), sources)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(g.stdout, res)
			}
			failed, unchecked := 0, 0
			for _, r := range res {
				verdict := "ok"
				switch {
				case r.Failed:
					verdict, failed = "FAILED", failed+1
				case !r.OK:
					verdict, unchecked = "ERROR", unchecked+1
				}
				fmt.Fprintf(g.stdout, "%-6s %s: %s\n", verdict, r.Key.Source, r.Detail)
			}
			switch {
			case failed > 0 && unchecked > 0:
				return fmt.Errorf("%d entries did not verify and are now FAILED; %d could not be checked and were left alone: %w", failed, unchecked, manager.ErrFailed)
			case failed > 0:
				return fmt.Errorf("%d entries did not verify and are now FAILED: %w", failed, manager.ErrFailed)
			case unchecked > 0:
				return fmt.Errorf("%d entries could not be checked (see the ERROR lines) and were left alone", unchecked)
			}
			return nil
		},
	}
}
