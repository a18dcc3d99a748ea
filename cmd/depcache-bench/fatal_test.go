package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestFatalRunsCleanups: fatalf runs the cleanups registered with
// cleanupOnFatal (an etcd run's prefix deletion) before it exits 2, and a
// cleanup already run at its return does not run again.
func TestFatalRunsCleanups(t *testing.T) {
	if dir := os.Getenv("DEPCACHE_BENCH_FATAL_DIR"); dir != "" {
		cleanupOnFatal(func() { os.WriteFile(filepath.Join(dir, "first"), nil, 0o644) })()
		os.Remove(filepath.Join(dir, "first")) // ran at its return: must not run again
		cleanupOnFatal(func() { os.WriteFile(filepath.Join(dir, "second"), nil, 0o644) })
		fatalf("on purpose")
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run", "^TestFatalRunsCleanups$")
	cmd.Env = append(os.Environ(), "DEPCACHE_BENCH_FATAL_DIR="+dir)
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("fatalf: %v, want exit 2", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "second")); err != nil {
		t.Errorf("the pending cleanup did not run: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "first")); err == nil {
		t.Error("a cleanup that already ran ran again at fatalf")
	}
}
