// Package gctune sets the garbage collector's target for depcache serve, a
// long-running process that keeps every entry of the root decoded.
//
// Go's default (GOGC=100) lets the heap grow to twice what is live before a
// collection: at 100,000 entries about 71 MB live gave a peak RSS of
// 164-174 MB. A target of 50 keeps the peak near 1.5 times the live heap
// (141 MB) at the cost of more frequent collections, which a loop that
// wakes every few seconds can afford. Prometheus sets GOGC=75 for the same
// reason. An explicit GOGC in the environment always wins.
package gctune

import (
	"os"
	"runtime/debug"
	"strconv"
)

// ServePercent is the GOGC that serve runs with when none is given.
const ServePercent = 50

// Serve applies ServePercent unless GOGC is set, and reports the GOGC in
// force ("50", or the environment's value).
func Serve() string {
	if v := os.Getenv("GOGC"); v != "" {
		return v
	}
	debug.SetGCPercent(ServePercent)
	return strconv.Itoa(ServePercent)
}
