package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// Exit codes: the contract in ../shared/design.md and README.md.
const (
	exitOK          = 0
	exitFailed      = 1   // the entry is FAILED, or any other error
	exitUsage       = 2   // bad usage or bad input
	exitTimeout     = 3   // --timeout passed while waiting
	exitCannotRun   = 126 // run or lock: CMD was found but could not be started (as env, timeout and shells say)
	exitNoCommand   = 127 // run or lock: CMD was not found
	exitInterrupted = 130 // SIGINT (SIGTERM: 143), as shells report 128 + signal
)

var (
	// errUsage marks errors in how depcache was called.
	errUsage = errors.New("usage")
	// errNoCache: --root names a directory that does not exist, for a
	// command that only looks at (or cleans) a cache.
	errNoCache = errors.New("no cache")
)

// cmdStatus is the exit status of the command that run or lock ran,
// passed through as depcache's own. It is not a failure of depcache's:
// nothing is printed for it.
type cmdStatus int

func (c cmdStatus) Error() string { return fmt.Sprintf("the command exited with status %d", int(c)) }

// passStatus is the result of a command that ran CMD: its own error, or
// CMD's status passed through.
func passStatus(code int, err error) error {
	if err != nil || code == exitOK {
		return err
	}
	return cmdStatus(code)
}

// lostError is run's and lock's exit 75: what they held for CMD (a
// dependency, the lock's lease) was lost while CMD ran, and they ended it.
// told: its text was printed when it happened, so main prints it again
// only as the --json error object.
type lostError struct {
	msg  string
	told bool
}

func (e *lostError) Error() string { return e.msg }

// interruptedError is the cause of the context main cancels on a signal.
type interruptedError struct{ sig os.Signal }

func (e *interruptedError) Error() string {
	name := "SIGINT"
	if s, ok := e.sig.(syscall.Signal); ok && s != syscall.SIGINT {
		if name = unix.SignalName(s); name == "" {
			name = s.String()
		}
	}
	return "interrupted (" + name + ")"
}

func (e *interruptedError) code() int {
	if s, ok := e.sig.(syscall.Signal); ok {
		return 128 + int(s)
	}
	return exitInterrupted
}

func usageErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errUsage}, args...)...)
}

// exitCode is the only place that knows exit statuses.
func exitCode(err error) int {
	var intr *interruptedError
	var status cmdStatus
	var lost *lostError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &status):
		return int(status)
	case errors.As(err, &lost):
		return exitLost
	case errors.As(err, &intr):
		return intr.code()
	case errors.Is(err, errCmdStart) && (errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist)):
		return exitNoCommand
	case errors.Is(err, errCmdStart):
		return exitCannotRun
	case isUsage(err):
		return exitUsage
	case errors.Is(err, context.DeadlineExceeded):
		return exitTimeout
	}
	return exitFailed
}

func isUsage(err error) bool {
	return errors.Is(err, errUsage) || errors.Is(err, manager.ErrBadSource) || errors.Is(err, manager.ErrBadDependent) ||
		errors.Is(err, state.ErrBadKey) || errors.Is(err, errBadFlag) || errors.Is(err, manager.ErrBadPolicy) ||
		errors.Is(err, state.ErrInvalidText) || isBadAddress(err) || errors.Is(err, etcdstore.ErrBadURL)
}

// errKind is the "kind" of the JSON error object: what a script branches
// on, finer than the exit code.
func errKind(err error) string {
	var intr *interruptedError
	var lost *lostError
	switch {
	case errors.As(err, &intr):
		return "interrupted"
	case errors.As(err, &lost):
		return "lost"
	case errors.Is(err, errCmdStart):
		return "cannot_run"
	case isUsage(err):
		return "usage"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, errNoCache), errors.Is(err, manager.ErrNotFound):
		return "not_found"
	case errors.Is(err, manager.ErrInUse), errors.Is(err, errLockHeld), errors.Is(err, state.ErrLockHeld):
		return "in_use"
	case errors.Is(err, manager.ErrNotRegistered):
		return "not_registered"
	case errors.Is(err, manager.ErrFailed):
		return "failed"
	case errors.Is(err, errUnhealthy):
		return "unhealthy"
	case errors.Is(err, errUnchecked):
		return "unchecked"
	case errors.Is(err, manager.ErrStateReadable), errors.Is(err, state.ErrBoundElsewhere), errors.Is(err, etcdstore.ErrRootMismatch):
		return "refused"
	case errors.Is(err, etcdstore.ErrOutcomeUnknown):
		// It may still apply: not one to retry blindly.
		return "error"
	case errors.Is(err, etcdstore.ErrUnavailable), errors.Is(err, manager.ErrEngineUnavailable):
		return "unavailable"
	case errors.Is(err, manager.ErrDiskFull), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		// ENOSPC unwrapped: a write outside the state's commits (a named
		// lock's file, say) on the full disk.
		return "disk_full"
	}
	return "error"
}

// errorJSON is what --json prints on stderr for an error.
type errorJSON struct {
	Error    string `json:"error"`
	ExitCode int    `json:"exit_code"`
	Kind     string `json:"kind"`
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

// minArgs is cobra.MinimumNArgs with the error marked as bad usage.
func minArgs(n int) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < n {
			return usageErrorf("%s takes at least %d argument(s), got %d", cmd.Name(), n, len(args))
		}
		return nil
	}
}

// existingRoot refuses a root that does not exist, for the commands that
// look at or clean a cache: they must not create one (state.Open would).
func existingRoot(g *globals) error {
	if err := g.state.check(); err != nil {
		return err // a bad flag is reported as one, first
	}
	fi, err := os.Stat(g.root)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("no cache at %s (nothing was created; depcache get creates it): %w", g.rootPath(), errNoCache)
	case err != nil:
		return err
	case !fi.IsDir():
		return fmt.Errorf("--root %s: not a directory: %w", g.root, errBadFlag)
	}
	return nil
}

// rootPath is the root as an absolute path, for messages: a relative
// --root means nothing once the message is read elsewhere (a log, a CI
// page). The root as given when it has none.
func (g *globals) rootPath() string {
	if abs, err := filepath.Abs(g.root); err == nil {
		return abs
	}
	return g.root
}

// rootNotFile refuses a root that exists and is not a directory, for the
// commands that create a root: the same bad flag value as existingRoot.
func rootNotFile(g *globals) error {
	if fi, err := os.Stat(g.root); err == nil && !fi.IsDir() {
		return fmt.Errorf("--root %s: not a directory: %w", g.root, errBadFlag)
	}
	return nil
}

// isBadAddress: a listen address that does not parse (no port, a port
// out of range) is bad input, not a failure.
func isBadAddress(err error) bool {
	var ae *net.AddrError
	return errors.As(err, &ae)
}

// classify marks what the command's error means beyond its chain: an error
// after a signal is an interruption (exit 130), whatever the command
// made of the cancelled context; cobra's own usage errors are usage.
func classify(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var intr *interruptedError
	if errors.As(err, &intr) {
		return err // says so itself (run's and lock's own signal handling)
	}
	if ctx.Err() != nil && errors.As(context.Cause(ctx), &intr) {
		if errors.Is(err, context.Canceled) {
			return intr
		}
		return fmt.Errorf("%w: %w", intr, err)
	}
	if strings.HasPrefix(err.Error(), "unknown command ") {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	return err
}

// jsonAsked reports whether --json is among args (before "--"), for errors
// raised before the flags were parsed.
func jsonAsked(args []string) bool {
	for _, a := range args {
		switch {
		case a == "--":
			return false
		case a == "--json", a == "--json=true", a == "--json=1":
			return true
		}
	}
	return false
}

// logLevels names the values --log-level takes.
func logLevels() string {
	names := make([]string, 0, len(logrus.AllLevels))
	for _, l := range logrus.AllLevels {
		names = append(names, l.String())
	}
	return strings.Join(names, ", ")
}

// envTrue reports whether the environment variable name holds a true
// boolean ("1", "true").
func envTrue(name string) bool {
	b, err := strconv.ParseBool(os.Getenv(name))
	return err == nil && b
}
