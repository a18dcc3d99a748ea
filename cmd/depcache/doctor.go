package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	"github.com/spf13/cobra"
)

var (
	// errUnhealthy: doctor found a failing check.
	errUnhealthy = errors.New("doctor found problems")
	// errUnchecked: verify could not read some entries' content or
	// metadata, and left them alone.
	errUnchecked = errors.New("not checked")
)

func newDoctor(g *globals) *cobra.Command {
	var rebuild, force, breakLock, yes, probe bool
	cmd := &cobra.Command{
		Use:   "doctor [--probe] [--rebuild [--force]] [--break-lock [--yes] [NAME]]",
		Short: "Check the root and say what is wrong; rebuild an unreadable state; break a stale lock",
		Long: `doctor checks the root: the lock, free space, the state, the content,
orphans, staging data and stale locks. It writes nothing, and exits 1 when
a check fails (with --json too). --probe adds the two checks that must
write to look, each with a probe file made and removed in the root: that
link(2) excludes on its filesystem (the lock), and this host's clock
against the file server's; without it they say "skip".

--rebuild rebuilds an unreadable or lost state from the metadata published
next to each entry. A state that parses is refused unless --force is given
too: rebuilding drops every dependent and every download in flight.
--break-lock shows the state lock's holder and removes the lock if you
confirm (or --yes). --break-lock NAME does the same for the named lock of
'depcache lock NAME' (as 'depcache locks --break NAME' does).`,
		Example: `  depcache doctor
  depcache doctor --probe                # also test the lock and the clock (writes a probe)
  depcache doctor --json | jq '.[] | select(.status != "ok")'
  depcache doctor --rebuild              # after "state file ... does not parse"
  depcache doctor --rebuild --force      # replace a state that parses (drops dependents)
  depcache doctor --break-lock --yes
  depcache doctor --break-lock docker-cleanup`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 1 && breakLock {
				return nil // the named lock to break
			}
			return exactArgs(0)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			switch {
			case force && !rebuild:
				return usageErrorf("--force goes with --rebuild (doctor --rebuild --force)")
			case yes && !breakLock:
				return usageErrorf("--yes goes with --break-lock (doctor --break-lock --yes)")
			case rebuild && breakLock:
				return usageErrorf("--rebuild and --break-lock are separate repairs: run one, then the other")
			case probe && (rebuild || breakLock):
				return usageErrorf("--probe goes with the checks, not with a repair: run doctor --probe on its own")
			}
			if err := existingRoot(g); err != nil {
				return err
			}
			if len(args) == 1 {
				return breakNamedLock(cmd, g, args[0], namedLockLease, yes)
			}
			// A rebuild may bind a root that has an ID and content to an
			// unbound etcd prefix: the root moves there (its prefix was
			// lost, or an earlier move was cut short after the root got
			// its ID).
			g.state.adoptRoot = rebuild
			// On a root with images, the checks ask this host's engine;
			// one without never does.
			cfg, err := g.engineConfig()
			if err != nil {
				return err
			}
			m, err := manager.New(cfg)
			if errors.Is(err, state.ErrLayout) && !rebuild && !breakLock {
				// No check can look further into a root that a name of its
				// layout leads out of: report that one, as a check.
				return printChecks(g, []manager.Check{{Name: "layout", Status: "fail", Detail: err.Error()}})
			}
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			switch {
			case rebuild:
				rep, err := rebuildRoot(ctx, g, m, force)
				if errors.Is(err, manager.ErrStateReadable) {
					return fmt.Errorf("%w; to rebuild it anyway: depcache doctor --rebuild --force", err)
				}
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(g.stdout, toRebuildJSON(rep))
				}
				printRebuild(g.stdout, rep)
				return nil
			case breakLock:
				return breakStateLock(cmd, g, m, yes)
			}
			var opts []manager.DoctorOption
			if probe {
				opts = append(opts, manager.WithProbes())
			}
			return printChecks(g, m.Doctor(ctx, opts...))
		},
	}
	f := cmd.Flags()
	f.BoolVar(&rebuild, "rebuild", false, "rebuild the state from the metadata published next to each entry (after a corrupt state file)")
	f.BoolVar(&force, "force", false, "with --rebuild: rebuild even a state file that parses, dropping its dependents and downloads in flight")
	f.BoolVar(&breakLock, "break-lock", false, "show the state lock's holder and remove the lock if you confirm")
	f.BoolVar(&yes, "yes", false, "with --break-lock: do not ask")
	f.BoolVar(&probe, "probe", false, "also test that link(2) excludes on the root's filesystem and compare the clocks, each with a probe file made and removed in the root")
	return cmd
}

// printRebuild says what a rebuild built and, from the last state that
// parses, what it dropped.
// rebuildJSON is `doctor --rebuild --json`: the report, with its policies
// in policy --json's form, every field present (the stored form leaves
// zeros out). The outer Policy field stands in for the report's own.
type rebuildJSON struct {
	manager.RebuildReport
	Policy rebuiltPolicyJSON `json:"policy"`
}

type rebuiltPolicyJSON struct {
	Carried  bool        `json:"carried"`
	Previous *policyJSON `json:"previous"`
	Rebuilt  policyJSON  `json:"rebuilt"`
}

func toRebuildJSON(rep manager.RebuildReport) rebuildJSON {
	out := rebuildJSON{RebuildReport: rep, Policy: rebuiltPolicyJSON{Carried: rep.Policy.Carried, Rebuilt: toPolicyJSON(rep.Policy.Rebuilt)}}
	if rep.Policy.Previous != nil {
		prev := toPolicyJSON(*rep.Policy.Previous)
		out.Policy.Previous = &prev
	}
	return out
}

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
		if rep.LastStateCopy != "" {
			fmt.Fprintf(w, "dropped, as %s had it (a copy is kept at %s):\n", rep.LastState, rep.LastStateCopy)
		} else {
			fmt.Fprintf(w, "dropped, as %s had it:\n", rep.LastState)
		}
		for _, u := range rep.UnreadShards {
			kept := ""
			if u.Copy != "" {
				kept = "; its bytes are kept at " + u.Copy
			}
			if u.From != "" {
				fmt.Fprintf(w, "  (shard %s did not read: %s; taken from %s, one commit older%s)\n", u.Shard, u.Reason, u.From, kept)
			} else {
				fmt.Fprintf(w, "  (shard %s did not read: %s; what it held is unknown%s)\n", u.Shard, u.Reason, kept)
			}
		}
		unknown := false
		for _, u := range rep.UnreadShards {
			unknown = unknown || u.From == ""
		}
		switch {
		case len(rep.DroppedDependents)+len(rep.DroppedDownloads)+len(rep.DroppedEntries) > 0:
		case unknown:
			fmt.Fprintln(w, "  nothing from the shards that read; what the unread ones held is unknown")
		default:
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

// verifyJSON is one element of `verify --json`. Key is the key as the
// state holds it (an object; ls's "key" is key_id here).
type verifyJSON struct {
	Key     state.Key `json:"key"`
	KeyID   string    `json:"key_id"`
	Source  string    `json:"source"`
	Stage   string    `json:"stage"`
	OK      bool      `json:"ok"`
	Failed  bool      `json:"failed"`
	Verdict string    `json:"verdict"` // ok, FAILED, ERROR or SKIPPED
	Detail  string    `json:"detail"`
}

func newVerify(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "verify [SOURCE...]",
		Short: "Re-hash READY bundles against the digest recorded at publish; mismatches become FAILED",
		Long: `verify re-hashes READY bundles (all, or the SOURCEs named) against the digest
recorded when they were published. A mismatch makes the entry FAILED, with the
reason, also recorded next to the content so that doctor --rebuild keeps it
FAILED. Content or metadata that cannot be read is reported as ERROR and left
alone. A SOURCE named that is FAILED already is reported FAILED; one not in
the cache is an error. Exit 1 when anything is FAILED, ERROR or missing, with
--json too.`,
		Example: `  depcache verify
  depcache verify https://example.com/data.tar.gz
  depcache verify --json | jq '.[] | select(.ok | not)'`,
		RunE: func(cmd *cobra.Command, args []string) error {
			var keys []state.Key
			for _, a := range args {
				k, err := manager.ParseKey(a, "")
				if err != nil {
					return err
				}
				keys = append(keys, k)
			}
			if err := existingRoot(g); err != nil {
				return err
			}
			m, err := manager.New(g.plainConfig())
			if err != nil {
				return err
			}
			var sources []string
			for _, k := range keys {
				sources = append(sources, k.Source)
			}
			res, err := m.Verify(cmd.Context(), sources)
			if err != nil {
				return err
			}
			out := []verifyJSON{}
			failed, unchecked := 0, 0
			checked := map[string]bool{}
			for _, r := range res {
				v := verifyJSON{Key: r.Key, KeyID: r.Key.ID(), Source: r.Key.Source, Stage: string(state.Ready), OK: r.OK, Failed: r.Failed, Verdict: "ok", Detail: r.Detail}
				switch {
				case r.Failed:
					v.Verdict, v.Stage, failed = "FAILED", string(state.Failed), failed+1
				case !r.OK:
					v.Verdict, unchecked = "ERROR", unchecked+1
				}
				checked[r.Key.ID()] = true
				out = append(out, v)
			}
			// The sources named that verify did not check: not READY
			// bundles, or not in the cache.
			var missing []error
			if len(keys) > 0 {
				st, err := m.Entries(cmd.Context())
				if err != nil {
					return err
				}
				for _, k := range keys {
					n := 0
					for _, e := range st.Sorted() {
						if e.Key.Kind != k.Kind || e.Key.Source != k.Source {
							continue
						}
						n++
						if checked[e.Key.ID()] {
							continue
						}
						v := verifyJSON{Key: e.Key, KeyID: e.Key.ID(), Source: e.Key.Source, Stage: string(e.Stage)}
						switch {
						case e.Stage == state.Failed:
							v.Failed, v.Verdict, v.Detail = true, "FAILED", "not checked: FAILED already: "+e.Message
							failed++
						case e.Key.Kind == state.Image:
							v.OK, v.Verdict, v.Detail = true, "SKIPPED", "an image: its daemon checks its content"
						default:
							v.Verdict, v.Detail = "ERROR", "not checked: "+string(e.Stage)
							unchecked++
						}
						out = append(out, v)
					}
					if n == 0 {
						missing = append(missing, fmt.Errorf("no entry for %s: %w", k.Source, manager.ErrNotFound))
					}
				}
			}
			if g.json {
				if err := printJSON(g.stdout, out); err != nil {
					return err
				}
			} else {
				for _, v := range out {
					fmt.Fprintf(g.stdout, "%-6s %s: %s\n", v.Verdict, v.Source, v.Detail)
				}
			}
			var errs []error
			switch {
			case failed > 0 && unchecked > 0:
				errs = append(errs, fmt.Errorf("%s did not verify and %s FAILED; %s could not be checked and %s left alone: %w", count(failed, "entry", "entries"), isAre(failed), count(unchecked, "entry", "entries"), wasWere(unchecked), manager.ErrFailed))
			case failed > 0:
				errs = append(errs, fmt.Errorf("%s did not verify and %s FAILED: %w", count(failed, "entry", "entries"), isAre(failed), manager.ErrFailed))
			case unchecked > 0:
				errs = append(errs, fmt.Errorf("%s could not be checked (see the ERROR lines) and %s left alone: %w", count(unchecked, "entry", "entries"), wasWere(unchecked), errUnchecked))
			}
			return errors.Join(append(errs, missing...)...)
		},
	}
}

// rebuildRoot runs doctor --rebuild. On etcd, a root that still has the file
// store's state (one moving to etcd) gives what the rebuild carries over
// when the prefix has no state of its own: its policy, and each entry's
// last use and age.
func rebuildRoot(ctx context.Context, g *globals, m *manager.Manager, force bool) (manager.RebuildReport, error) {
	if _, ok := g.state.store.(*etcdstore.Store); !ok {
		return m.Rebuild(ctx, force)
	}
	// The file store's last state that parses: state.json, else its
	// previous version, else what of them still reads, as the file
	// store's own rebuild takes it.
	var from *state.State
	var name string
	for _, f := range []string{state.StateFile, state.StateFile + state.PrevSuffix} {
		p := filepath.Join(m.Root(), f)
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		st, err := state.DecodeFile(m.Root(), f)
		if err != nil {
			fmt.Fprintf(g.stderr, "depcache: the file store's state %s could not be read (%v)\n", p, err)
			continue
		}
		from, name = st, p
		break
	}
	var unread []state.UnreadShard
	if from == nil {
		// A shard damaged in both: the rest of them still counts.
		from, name, unread = state.ReadablePart(m.Root())
	}
	if from == nil {
		return m.Rebuild(ctx, force)
	}
	rep, err := m.RebuildFrom(ctx, force, from, name)
	if err != nil {
		return rep, err
	}
	if rep.LastState == name && len(unread) > 0 {
		rep.UnreadShards = unread
	}
	// The root is the prefix's now: the file store's state goes aside,
	// kept, so that a way back rebuilds from the published metadata
	// rather than from this state, which the etcd store's commits leave
	// behind.
	for _, f := range []string{state.StateFile, state.StateFile + state.PrevSuffix} {
		p := filepath.Join(m.Root(), f)
		if err := os.Rename(p, p+movedSuffix); err != nil && !errors.Is(err, fs.ErrNotExist) {
			fmt.Fprintf(g.stderr, "depcache: could not move the file store's %s aside: %v (remove it before going back to the file store)\n", p, err)
		}
	}
	return rep, nil
}

// movedSuffix names the file store's state files that a move to etcd set
// aside.
const movedSuffix = ".moved-to-etcd"

// count is n with the noun in its number: "1 entry", "2 entries".
func count(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

func isAre(n int) string {
	if n == 1 {
		return "is"
	}
	return "are"
}

func wasWere(n int) string {
	if n == 1 {
		return "was"
	}
	return "were"
}

// breakStateLock is doctor --break-lock without NAME. With --json it
// prints the object locks --break prints, with the name "" (the state
// lock; a named lock's name is never empty), and asks on stderr.
func breakStateLock(cmd *cobra.Command, g *globals, m *manager.Manager, yes bool) error {
	say := narration(g, yes)
	done := func(held, broken bool, why string) error {
		if g.json {
			return printBreak(g, "", held, broken, why)
		}
		fmt.Fprintln(g.stdout, why)
		return nil
	}
	if _, ok := g.state.store.(*etcdstore.Store); ok {
		return done(false, false, fmt.Sprintf("no state lock to break: %s commits by compare-and-swap transactions", g.state.store))
	}
	holder := m.LockHolder()
	if holder == "" {
		return done(false, false, "the state lock is free")
	}
	fmt.Fprintf(say, "the state lock is held by: %s\n", holder)
	if !yes {
		fmt.Fprint(say, "break it? only if that process is gone [y/N] ")
		answer, _ := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
		if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
			return done(true, false, "left alone")
		}
	}
	fmt.Fprintf(say, "breaking it if its holder is stale (a dead process of this host at once; any other, a live one stopped or stuck here included: once its lock stayed unchanged for --lock-lease, %s)...\n", g.lockLease)
	if err := m.BreakLock(cmd.Context(), holder); err != nil {
		return err
	}
	return done(true, true, "broke the state lock")
}

// printChecks prints doctor's checks, one a line or as a JSON array, and
// fails (errUnhealthy) when one of them failed.
func printChecks(g *globals, checks []manager.Check) error {
	if checks == nil {
		checks = []manager.Check{}
	}
	failed := 0
	for _, c := range checks {
		if !g.json {
			fmt.Fprintf(g.stdout, "%-4s %-12s %s\n", c.Status, c.Name, c.Detail)
		}
		if c.Status == "fail" {
			failed++
		}
	}
	if g.json {
		if err := printJSON(g.stdout, checks); err != nil {
			return err
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d check(s) failed: %w", failed, errUnhealthy)
	}
	return nil
}
