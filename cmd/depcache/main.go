// Command depcache fetches dependencies into a cache shared by processes and
// hosts: each is downloaded once, everyone else waits for that download.
// See README.md and `depcache help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		// The cause tells run that the command was interrupted, not failed:
		// exit 130 (SIGINT) or 143 (SIGTERM).
		cancel(&interruptedError{sig: s})
		// A second signal does not wait for the command to wind down: the
		// cache is safe against a kill at any step.
		<-sigs
		os.Exit((&interruptedError{sig: s}).code())
	}()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	signal.Stop(sigs)
	cancel(nil)
	os.Exit(code)
}
