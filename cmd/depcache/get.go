package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/spf13/cobra"
)

func newGet(g *globals) *cobra.Command {
	var (
		dependent, sha string
		ttl, timeout   time.Duration
		noWait         bool
		lf             loopFlags
		pf             policyFlags
	)
	cmd := &cobra.Command{
		Use:   "get [flags] SOURCE",
		Short: "Register a dependent, fetch SOURCE once (or wait for whoever fetches it) and print its path",
		Long: `get registers a dependent of SOURCE (http://, https://, file:// or docker://REF),
drives the download (or pull) in this process if nobody else does, waits until
it is READY and prints the local path (or the full image ID). Exit status: 0 READY, 1 FAILED (reason on stderr),
2 bad usage or bad input, 3 timed out.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if ttl < 0 || timeout < 0 {
				return fmt.Errorf("--ttl and --timeout: %w: must not be negative", errBadFlag)
			}
			if sha != "" {
				if err := state.CheckSHA256(sha); err != nil {
					return fmt.Errorf("--sha256: %w", err)
				}
			}
			key, err := manager.ParseKey(args[0], sha)
			if err != nil {
				return err
			}
			cfg, err := g.config(&lf, &pf)
			if err != nil {
				return err
			}
			m, err := manager.New(cfg)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if timeout > 0 {
				// The timeout covers everything: the lock, the loop, the wait.
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
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
			if dependent != "" {
				opts = append(opts, manager.Detached())
			} else {
				dependent = anonymousDependent()
			}
			if ttl > 0 {
				opts = append(opts, manager.WithTTL(ttl))
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
						printJSON(g.stdout, []entryJSON{toJSON(m, e)})
					}
					return err
				}
				if err != nil {
					if errors.Is(err, context.DeadlineExceeded) {
						return fmt.Errorf("%s: not ready after %s: %w", key.Source, timeout, err)
					}
					return err
				}
			}
			if e.Stage == state.Failed {
				// --no-wait on a FAILED entry: exit as a wait would.
				if g.json {
					printJSON(g.stdout, []entryJSON{toJSON(m, e)})
				} else {
					fmt.Fprintln(g.stdout, e.Stage)
				}
				return &manager.FailedError{Key: e.Key, Reason: e.Message}
			}
			if g.json {
				return printJSON(g.stdout, []entryJSON{toJSON(m, e)})
			}
			if e.Stage != state.Ready {
				fmt.Fprintln(g.stdout, e.Stage)
				return nil
			}
			if e.Key.Kind == state.Image {
				fmt.Fprintln(g.stdout, e.ImageID)
				return nil
			}
			p, err := m.Abs(e)
			if err != nil {
				return err
			}
			fmt.Fprintln(g.stdout, p)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dependent, "dependent", "", "name of the dependent to register (default: one unique to this invocation, bound to this process)")
	f.DurationVar(&ttl, "ttl", 0, "the dependent lapses after this long unless released (reaped by a sweep up to 5 minutes, or the TTL if shorter, later on a host that did not watch it all along)")
	f.StringVar(&sha, "sha256", "", "expected sha256 of the fetched bytes")
	f.BoolVar(&noWait, "no-wait", false, "register and return at once with the entry's stage")
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
