// Command depcache fetches dependencies into a cache shared by processes and
// hosts: each is downloaded once, everyone else waits for that download.
// See README.md and `depcache help`.
package main

import (
	"context"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// net/http writes diagnostics of its own to the standard logger (an
	// unsolicited response on an idle connection, with the bytes a
	// misbehaving server sent past its declared length). stderr is
	// depcache's: its log records, one failure line, or with --json one
	// error object. What matters reaches depcache as an error; serve
	// gives its server a logger of its own.
	log.SetOutput(io.Discard)
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
