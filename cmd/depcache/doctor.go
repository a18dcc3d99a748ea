package main

import (
	"bufio"
	"errors"
	"fmt"
	"strings"

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
				n, err := m.Rebuild(ctx, force)
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "rebuilt the state from %d published entries; the unreadable file is kept aside\n", n)
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
