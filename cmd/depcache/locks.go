package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	"github.com/spf13/cobra"
)

// lockJSON is one named lock in `locks --json`.
type lockJSON struct {
	Name string `json:"name"`
	ID   string `json:"id"`
	Host string `json:"host"`
	PID  int    `json:"pid"`
	// Acquired is by the holder's clock; AgeSeconds compares it with ours,
	// for humans only.
	Acquired   time.Time `json:"acquired"`
	AgeSeconds float64   `json:"age_seconds"`
	Renewals   uint64    `json:"renewals"`
	// Token is the last fencing token drawn: the holder's.
	Token uint64 `json:"token"`
}

// namedLockLease is the default lease of a named lock, as lock takes it.
const namedLockLease = 30 * time.Second

func newLocks(g *globals) *cobra.Command {
	var breakName string
	var yes bool
	var lease time.Duration
	cmd := &cobra.Command{
		Use: "locks [--break NAME [--yes] [--lease DUR]]",
		Example: `  depcache locks
  depcache locks --json | jq -r '.[].name'
  depcache locks --break docker-cleanup --yes`,
		Short: "List the holders of the locks of `depcache lock`; break a stale one",
		Long: `locks lists the named locks held in the root: NAME, the holder's host and pid,
its age (by the holder's clock against ours: a hint, not a judgement), how
often it renewed its lease, and the last fencing token drawn.

--break NAME breaks that lock if its holder is stale, judged as any waiter
judges it: a holder on this machine whose process is gone at once; a holder
on another host only after watching the lock unchanged for --lease (so this
may take that long). A live holder, or one that renews, is left alone
(exit 1).`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if breakName != "" {
				return breakNamedLock(cmd, g, breakName, lease, yes)
			}
			if yes || cmd.Flags().Changed("lease") {
				if cmd.Flags().Changed("break") {
					// Alone, --break '' is no --break (a listing).
					return usageErrorf("--break '': empty, and --yes and --lease go with --break NAME (want the NAME of a lock, as locks lists them)")
				}
				return usageErrorf("--yes and --lease go with --break NAME (depcache locks --break NAME --yes)")
			}
			return listLocks(g)
		},
	}
	f := cmd.Flags()
	f.StringVar(&breakName, "break", "", "break the lock NAME if its holder is stale")
	f.BoolVar(&yes, "yes", false, "with --break: do not ask")
	f.DurationVar(&lease, "lease", namedLockLease, "with --break: how long a holder on another host must leave the lock unchanged")
	return cmd
}

func listLocks(g *globals) error {
	if err := rootNotFile(g); err != nil {
		return err
	}
	g.state.locksOnly = true
	st, err := g.stateStore()
	if err != nil {
		return err
	}
	if es, ok := st.(*etcdstore.Store); ok {
		infos, err := es.NamedLocks(context.Background())
		if err != nil {
			return err
		}
		now := time.Now()
		out := []lockJSON{}
		for _, info := range infos {
			out = append(out, lockJSON{Name: info.Name, ID: state.NamedLockID(info.Name), Host: info.Host, PID: info.PID,
				Acquired: info.Acquired, AgeSeconds: now.Sub(info.Acquired).Seconds(), Token: info.Token})
		}
		return printLocks(g, out)
	}
	if err := state.CheckUnbound(g.rootPath()); err != nil {
		return err // its locks are on the etcd store
	}
	dir := filepath.Join(g.rootPath(), state.LocksDir)
	paths, err := filepath.Glob(filepath.Join(dir, "*.lock"))
	if err != nil {
		return err
	}
	sort.Strings(paths)
	now := time.Now()
	out := []lockJSON{}
	for _, p := range paths {
		info, ok, err := state.ReadLockInfo(p)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		base := strings.TrimSuffix(p, ".lock")
		name, _ := os.ReadFile(base + ".name")
		tok, _ := state.ReadToken(base + ".token")
		out = append(out, lockJSON{Name: string(name), ID: filepath.Base(base), Host: info.Host, PID: info.PID,
			Acquired: info.Acquired, AgeSeconds: now.Sub(info.Acquired).Seconds(), Renewals: info.Renewals, Token: tok})
	}
	return printLocks(g, out)
}

func printLocks(g *globals, out []lockJSON) error {
	if g.json {
		return printJSON(g.stdout, out)
	}
	if len(out) == 0 {
		fmt.Fprintln(g.stdout, "no lock is held")
		return nil
	}
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tHOST\tPID\tAGE\tRENEWALS\tTOKEN")
	for _, l := range out {
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%d\t%d\n", l.Name, l.Host, l.PID,
			time.Duration(l.AgeSeconds*float64(time.Second)).Round(time.Second), l.Renewals, l.Token)
	}
	return w.Flush()
}

func breakNamedLock(cmd *cobra.Command, g *globals, name string, lease time.Duration, yes bool) error {
	if err := checkLockName(name); err != nil {
		return err
	}
	if err := checkLockLease(lease); err != nil {
		return err
	}
	if err := rootNotFile(g); err != nil {
		return err
	}
	g.state.locksOnly = true
	st, err := g.stateStore()
	if err != nil {
		return err
	}
	if es, ok := st.(*etcdstore.Store); ok {
		info, held, err := es.NamedLockHolder(cmd.Context(), name)
		switch {
		case err != nil:
			return err
		case !held:
			return printBreak(g, name, false, false, "")
		}
		return fmt.Errorf("the lock %q, held by pid %d on %s since %s (its clock), was not broken: on %s a holder's lock ends with its lease, which etcd ends by itself when the holder stops renewing it; a live holder keeps it: %w",
			name, info.PID, info.Host, info.Acquired.Format(time.RFC3339), es, errLockHeld)
	}
	if err := state.CheckUnbound(g.rootPath()); err != nil {
		return err // its locks are on the etcd store
	}
	lockPath, _, _ := state.NamedLockPaths(g.rootPath(), name)
	info, ok, err := state.ReadLockInfo(lockPath)
	if err != nil {
		return err
	}
	if !ok {
		return printBreak(g, name, false, false, "")
	}
	say := narration(g, yes)
	fmt.Fprintf(say, "the lock %q is held by %s since %s (its clock), renewed %d times\n",
		name, info.Process, info.Acquired.Format(time.RFC3339), info.Renewals)
	if !yes {
		fmt.Fprint(say, "break it if it is stale? [y/N] ")
		answer, _ := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
		if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
			return printBreak(g, name, true, false, "left alone")
		}
	}
	l, _, err := openNamedLock(g, name, lease)
	if err != nil {
		return err
	}
	// Twice the lease and some: a breaker that died at it left its link,
	// which is judged stale only after a lease of its own.
	ctx, cancel := context.WithTimeout(cmd.Context(), 2*lease+lease/2)
	defer cancel()
	broken, why, err := l.BreakStale(ctx)
	if err != nil {
		return err
	}
	if !broken {
		return fmt.Errorf("the lock %q was not broken: %s: %w", name, why, errLockHeld)
	}
	return printBreak(g, name, true, true, why)
}

// narration is where a break command shows the holder and asks: stdout;
// with --json, whose stdout carries only the outcome's object and stderr
// only an error's, stderr when it must ask, nowhere with --yes.
func narration(g *globals, yes bool) io.Writer {
	switch {
	case g.json && yes:
		return io.Discard
	case g.json:
		return g.stderr
	}
	return g.stdout
}

// errLockHeld: locks --break left a lock alone, its holder being alive (or
// renewing, or another breaker at it). Its JSON kind is "in_use".
var errLockHeld = errors.New("its holder holds it")

// printBreak reports the outcome of locks --break: with --json one object
// {"name", "held", "broken", "reason"}.
func printBreak(g *globals, name string, held, broken bool, why string) error {
	if g.json {
		return printJSON(g.stdout, struct {
			Name   string `json:"name"`
			Held   bool   `json:"held"`
			Broken bool   `json:"broken"`
			Reason string `json:"reason"`
		}{name, held, broken, why})
	}
	switch {
	case !held:
		fmt.Fprintf(g.stdout, "the lock %q is free\n", name)
	case broken:
		fmt.Fprintf(g.stdout, "broke the lock %q: %s\n", name, why)
	default:
		fmt.Fprintln(g.stdout, why)
	}
	return nil
}
