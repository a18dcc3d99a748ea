package main

import (
	"errors"
	"os/exec"
	"strings"
	"testing"
)

// TestFailedGetPrintsOneLine: at the default log level a failed get says
// why in one human line on stderr, not that line and a log record of the
// same failure.
func TestFailedGetPrintsOneLine(t *testing.T) {
	cmd := exec.Command(bin, "--root", t.TempDir(), "get", "file:///nonexistent/depcache-one-line.tar.gz")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("get of a missing file: %v, want exit 1", err)
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "no such file") || strings.Contains(lines[0], "level=") {
		t.Errorf("stderr: %q, want one human line naming the cause", stderr.String())
	}
}

// TestNegativeDurationsNameTheirFlag: a duration out of range names the
// one flag that is wrong, with exit 2.
func TestNegativeDurationsNameTheirFlag(t *testing.T) {
	root := t.TempDir()
	for _, tc := range []struct{ flag, other string }{{"--timeout", "--ttl"}, {"--ttl", "--timeout"}} {
		code, _, errs := cli(t, root, "get", tc.flag, "-1s", "file:///nonexistent/x")
		if code != 2 || !strings.Contains(errs, tc.flag+" -1s") || strings.Contains(errs, tc.other) {
			t.Errorf("get %s -1s: exit %d, %q; want 2 naming %s alone", tc.flag, code, errs, tc.flag)
		}
	}
}

// TestInvalidUTF8IsBadInput: a name or source that is not valid UTF-8 is
// bad input (exit 2, naming it) in every command that takes one, before
// anything is looked up.
func TestInvalidUTF8IsBadInput(t *testing.T) {
	root := t.TempDir()
	for _, args := range [][]string{
		{"get", "--dependent", "\xff", "file:///nonexistent/x"},
		{"release", "--dependent", "\xfe", "file:///nonexistent/x"},
		{"get", "file:///nonexistent/\xff"},
		{"policy", "set", "--pin", "\xfe"},
		{"lock", "\xff", "--", "true"},
		{"run", "--dep", "A=file:///nonexistent/\xff", "--", "true"},
	} {
		code, _, errs := cli(t, root, args...)
		if code != 2 || !strings.Contains(errs, "not valid UTF-8") {
			t.Errorf("%q: exit %d, %q; want 2 and \"not valid UTF-8\"", args, code, errs)
		}
	}
}
