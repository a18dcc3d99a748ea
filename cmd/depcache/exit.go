package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/spf13/cobra"
)

// Exit codes: the contract in ../shared/design.md.
const (
	exitOK      = 0
	exitFailed  = 1 // the entry is FAILED, or any other error
	exitUsage   = 2 // bad usage or bad input
	exitTimeout = 3 // --timeout passed while waiting
)

// errUsage marks errors in how depcache was called.
var errUsage = errors.New("usage")

func usageErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errUsage}, args...)...)
}

// exitCode is the only place that knows exit statuses.
func exitCode(err error) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errUsage), errors.Is(err, manager.ErrBadSource), errors.Is(err, manager.ErrBadDependent),
		errors.Is(err, state.ErrBadKey), errors.Is(err, errBadFlag), errors.Is(err, manager.ErrBadPolicy):
		return exitUsage
	case errors.Is(err, context.DeadlineExceeded):
		return exitTimeout
	}
	return exitFailed
}

// exactArgs is cobra.ExactArgs with the error marked as bad usage.
func exactArgs(n int) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErrorf("%s takes %d argument(s), got %d", cmd.Name(), n, len(args))
		}
		return nil
	}
}
