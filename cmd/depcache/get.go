package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/spf13/cobra"
)

func newGet(g *globals) *cobra.Command {
	var (
		dependent, sha string
		ttl, timeout   time.Duration
		noWait, retry  bool
		noUnpack       bool
		lf             loopFlags
		pf             policyFlags
	)
	cmd := &cobra.Command{
		Use: "get [flags] SOURCE",
		Example: `  depcache get https://example.com/data.tar.gz
  depcache get --dependent job-42 --sha256 HEX https://example.com/model.bin
  depcache get --no-unpack https://example.com/release.zip
  depcache get --json --timeout 10m docker://alpine:3.20
  DATA=$(depcache get --dependent "$JOB_ID" https://example.com/data.tar.gz)`,
		Short: "Register a dependent, fetch SOURCE once (or wait for whoever fetches it) and print its path",
		Long: `get registers a dependent of SOURCE (http://, https://, file:// or docker://REF),
drives the download (or pull) in this process if nobody else does, waits until
it is READY and prints the local path (or the full image ID). Exit status: 0 READY, 1 FAILED (reason on stderr),
2 bad usage or bad input, 3 timed out.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, d := range []struct {
				name string
				v    time.Duration
			}{{"ttl", ttl}, {"timeout", timeout}} {
				if d.v < 0 {
					return fmt.Errorf("--%s %s: %w: must not be negative", d.name, d.v, errBadFlag)
				}
			}
			if cmd.Flags().Changed("dependent") && dependent == "" {
				return usageErrorf("--dependent '': a dependent needs a name (leave the flag out for one unique to this invocation)")
			}
			if ttl > 0 && !cmd.Flags().Changed("dependent") {
				g.log.Warn("--ttl has no effect without --dependent: this get's own dependent ends when it exits")
			}
			if sha == "" && cmd.Flags().Changed("sha256") {
				// An unset variable in a script ($SUM) would drop the
				// check without a word.
				return usageErrorf("--sha256 '': empty (want the 64 hex digits of the file's sha256; leave the flag out for no check)")
			}
			if sha != "" {
				sha = manager.NormaliseDigest(sha)
				if err := state.CheckSHA256(sha); err != nil {
					return fmt.Errorf("--sha256: %w", err)
				}
			}
			key, err := manager.ParseKey(args[0], sha)
			if err != nil {
				return err
			}
			if err := refuseDirectory(key); err != nil {
				return err
			}
			if noUnpack {
				if key, err = manager.KeepPacked(key); err != nil {
					return err
				}
			}
			ctx := cmd.Context()
			if timeout > 0 {
				// The timeout covers everything: reaching the state store,
				// the lock, the loop, the wait.
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			g.ctx = ctx // the state store is opened with it
			cfg, err := g.config(&lf, &pf)
			if err != nil {
				if timeout > 0 && errors.Is(err, context.DeadlineExceeded) {
					return fmt.Errorf("%s: not ready after %s: %w", key.Source, timeout, err)
				}
				return err
			}
			m, err := manager.New(cfg)
			if err != nil {
				return err
			}
			if !noWait {
				// Only a get that waits drives the download; --no-wait
				// registers and leaves the work to a waiter or to serve.
				stop, err := m.Start(ctx)
				if err != nil {
					return err
				}
				defer stop()
			} else if err := m.Settle(ctx); err != nil {
				return err
			}
			g.notePolicyMismatch(m)
			var opts []manager.GetOption
			detached := dependent != ""
			if detached {
				opts = append(opts, manager.Detached())
			} else {
				dependent = anonymousDependent()
			}
			if ttl > 0 {
				opts = append(opts, manager.WithTTL(ttl))
			}
			if retry {
				opts = append(opts, manager.Retry())
			}
			e, err := m.Get(ctx, dependent, key, opts...)
			if err != nil {
				return err
			}
			key = e.Key // an image's key names the daemon
			if !noWait {
				e, err = waitShowingProgress(ctx, g, m, key)
				var failed *manager.FailedError
				if errors.As(err, &failed) {
					if g.json {
						printJSON(g.stdout, []getJSON{toGetJSON(ctx, m, e, failed)})
					}
					return explainFailed(failed)
				}
				if err != nil {
					if errors.Is(err, context.DeadlineExceeded) {
						return fmt.Errorf("%s: not ready after %s: %w", key.Source, timeout, err)
					}
					if detached && errors.Is(err, manager.ErrNotFound) {
						// This get registered NAME and nothing evicts an
						// entry with a dependent: NAME went first (released
						// by another process, or its TTL ended), and took
						// the entry with it. Said as when another
						// dependent kept the entry.
						return fmt.Errorf("%s: dependent %q is no longer registered: it was released, or its TTL ended, while this get waited, and no other dependent kept the entry; get it again to hold it: %w",
							key.Source, dependent, manager.ErrNotRegistered)
					}
					return err
				}
				if _, ok := e.Dependents[dependent]; !ok && detached {
					// Released by another process (or lapsed) while this get
					// waited: the entry was kept by another dependent, but
					// the path printed would be held by nobody this caller
					// knows. (Without another dependent, the entry is
					// gone: see above.)
					return fmt.Errorf("%s: dependent %q is no longer registered on the entry (released, or its TTL ended, while this get waited); get it again to hold it: %w",
						key.Source, dependent, manager.ErrNotRegistered)
				}
			}
			if e.Stage == state.Failed {
				// --no-wait on a FAILED entry: exit as a wait would.
				failed := m.Failed(e)
				if g.json {
					printJSON(g.stdout, []getJSON{toGetJSON(ctx, m, e, failed)})
				} else {
					fmt.Fprintln(g.stdout, e.Stage)
				}
				return explainFailed(failed)
			}
			if g.json {
				return printJSON(g.stdout, []getJSON{toGetJSON(ctx, m, e, nil)})
			}
			if e.Stage != state.Ready {
				// --no-wait: nothing in this process downloads. Say who
				// does, or that nobody does yet.
				fmt.Fprintln(g.stdout, e.Stage)
				switch pid, serving := localServe(m.Root()); {
				case e.Owner == nil && serving:
					fmt.Fprintf(g.stderr, "depcache: %s is queued: the 'depcache serve' (pid %d) of this root on this host takes it up at its next pass\n", key.Source, pid)
				case e.Owner == nil:
					// A serve may run on another host: say what takes it
					// up, true whether one runs or not.
					fmt.Fprintf(g.stderr, "depcache: %s is queued: no process downloads it yet; a 'depcache serve' on this root (%s), on any host, takes it up at its next pass, as does a 'depcache get' of it that waits\n", key.Source, m.Root())
				default:
					fmt.Fprintf(g.stderr, "depcache: %s is downloading in pid %d on %s\n", key.Source, e.Owner.PID, e.Owner.Host)
				}
				return nil
			}
			if e.Key.Kind == state.Image {
				fmt.Fprintln(g.stdout, e.ImageID)
				return nil
			}
			g.showWarnings(e, m.Warnings(e))
			p, err := m.Abs(e)
			if err != nil {
				return err
			}
			fmt.Fprintln(g.stdout, p)
			return nil
		},
	}
	f := cmd.Flags()
	newOnceString(f, &dependent, "dependent", "", "name of the dependent to register (default: one unique to this invocation, bound to this process)",
		"one get registers one dependent (run a get for each)")
	f.DurationVar(&ttl, "ttl", 0, "the dependent lapses after this long unless released (reaped by a sweep up to 5 minutes, or the TTL if shorter, later on a host that did not watch it all along)")
	newOnceString(f, &sha, "sha256", "", "expected sha256 of the fetched bytes", "a file has one sha256")
	f.BoolVar(&noWait, "no-wait", false, "register and return at once with the entry's stage; nothing in this process downloads: a queued entry waits for 'depcache serve' or a 'get' that waits")
	f.BoolVar(&noUnpack, "no-unpack", false, "keep an archive as the file it is, not unpacked (another entry than the unpacked one)")
	f.BoolVar(&retry, "retry", false, "retry a FAILED entry now instead of after its cool-down (--failure-cooldown, doubling per failure)")
	f.DurationVar(&timeout, "timeout", 0, "give up waiting after this long (exit 3)")
	lf.register(f)
	pf.register(f)
	return cmd
}

func anonymousDependent() string {
	b := make([]byte, 4)
	rand.Read(b)
	host, _ := os.Hostname()
	return fmt.Sprintf("cli-%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b))
}

// getJSON is an element of get --json: ls --json's fields (queued among
// them: a download nobody runs waits) and, for a FAILED entry, when it may
// be retried.
type getJSON struct {
	entryJSON
	// Permanent: the failure is one a retry would only repeat (a 404, a
	// missing file).
	Permanent bool `json:"permanent,omitempty"`
	// RetryAt (RFC 3339) is when a get retries the FAILED entry by itself:
	// its failure time plus --failure-cooldown, doubled per failure in a
	// row. get --retry retries at once.
	RetryAt string `json:"retry_at,omitempty"`
	// Warnings are what the user should know about the content (a file
	// named like an archive kept as a file): the lines get prints on
	// stderr without --json. [] when none.
	Warnings []string `json:"warnings"`
}

func toGetJSON(ctx context.Context, m *manager.Manager, e state.Entry, failed *manager.FailedError) getJSON {
	j := getJSON{entryJSON: toJSON(m, e)}
	// The dependents' liveness and why the entry is kept, as ls --json
	// says them (left empty if the entry cannot be read again now).
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second) // within --timeout too
	defer cancel()
	if _, d, err := m.DescribeEntry(dctx, e.Key); err == nil {
		j.Description = d
	}
	j.Warnings = append([]string{}, m.Warnings(e)...)
	if failed != nil {
		j.Permanent = failed.Permanent
		j.RetryAt = rfc3339(failed.RetryAt)
	}
	return j
}

// explainFailed adds to a FAILED entry's error when it will be retried,
// what sets that, and how to retry now.
func explainFailed(f *manager.FailedError) error {
	kind := "transient"
	switch {
	case f.Permanent && strings.Contains(f.Error(), manager.ErrPermanent.Error()):
		kind = "a retry is likely to fail the same way" // the reason says permanent already
	case f.Permanent:
		kind = "permanent: a retry is likely to fail the same way"
	}
	if f.Kept {
		// Neither the cool-down nor --retry would: say what does.
		return fmt.Errorf("%w (%s; its content is kept for the dependents that held it when it failed, and no get retries it while the entry has any dependent, a get's own --dependent included: release them (depcache ls shows them), and the first get once none is left retries it, past its cool-down or with --retry)", f, kind)
	}
	if f.RetryAt.IsZero() {
		return fmt.Errorf("%w (%s; get --retry retries now)", f, kind)
	}
	in := time.Until(f.RetryAt).Round(time.Second)
	when := fmt.Sprintf("a get retries it after %s (in %s)", f.RetryAt.UTC().Format(time.RFC3339), in)
	if in <= 0 {
		when = "its cool-down is over: the next get retries it"
	}
	return fmt.Errorf("%w (%s; %s, set by --failure-cooldown, doubling per failure; get --retry retries now)", f, kind, when)
}

// refuseDirectory refuses a file:// source that is a directory, with the
// command that makes it a bundle (bad input: exit 2).
func refuseDirectory(key state.Key) error {
	if dir, ok := strings.CutPrefix(strings.TrimSuffix(key.Source, "#no-unpack"), "file://"); ok {
		if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
			return usageErrorf("%s", manager.DirectoryHint(dir))
		}
	}
	return nil
}
