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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
