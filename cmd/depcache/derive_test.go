package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// helloSource is the source of the test bundle.
func helloSource(t *testing.T) string {
	t.Helper()
	abs, err := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	return "file://" + abs
}

// Flags that depend on each other derive the default of the one not given;
// only two values both given that conflict are refused. An environment twin
// counts as given.
func TestFlagsDeriveDefaults(t *testing.T) {
	src := helloSource(t)
	for _, tc := range []struct {
		args  []string
		wcode int
		wmsg  string
	}{
		{[]string{"get", "--download-timeout", "3s", src}, 0, ""},
		{[]string{"get", "--download-timeout", "300ms", src}, 0, ""}, // derives the shortest interval, 100ms
		{[]string{"get", "--progress-interval", "3m", src}, 0, ""},
		{[]string{"get", "--download-timeout", "3s", "--progress-interval", "2s", src}, 2, "--progress-interval 2s"},
		{[]string{"gc", "--high-watermark", "80"}, 0, ""},
		{[]string{"gc", "--low-watermark", "97"}, 0, ""},
		{[]string{"gc", "--max-age", "1m"}, 0, ""},
		{[]string{"gc", "--high-watermark", "80", "--low-watermark", "85"}, 2, "must not exceed --high-watermark 80"},
		{[]string{"gc", "--min-age", "2m", "--max-age", "1m"}, 2, "--max-age 1m0s"},
	} {
		code, _, errs := cli(t, t.TempDir(), tc.args...)
		if code != tc.wcode || !strings.Contains(errs, tc.wmsg) {
			t.Errorf("%v: exit %d, %q; want %d and %q", tc.args, code, errs, tc.wcode, tc.wmsg)
		}
	}

	// The derived partner is what gets stored.
	root := t.TempDir()
	if code, _, errs := cli(t, root, "policy", "set", "--high-watermark", "80", "--max-age", "1m"); code != 0 {
		t.Fatalf("policy set --high-watermark 80 --max-age 1m: exit %d, %s", code, errs)
	}
	_, out, _ := cli(t, root, "--json", "policy")
	var p state.Policy
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if p.HighWatermark != 80 || p.LowWatermark != 70 || p.MaxAge != state.Duration(time.Minute) || p.MinAge != state.Duration(time.Minute) {
		t.Errorf("stored policy %+v: want watermarks 80/70 and min-age = max-age = 1m", p)
	}

	// Environment twins count as given: alone, DEPCACHE_DOWNLOAD_TIMEOUT
	// derives the interval; with DEPCACHE_PROGRESS_INTERVAL, they conflict.
	envRun := func(env map[string]string) (int, string) {
		for k, v := range env {
			t.Setenv(k, v)
		}
		defer func() {
			for k := range env {
				os.Unsetenv(k)
			}
		}()
		var out, errb bytes.Buffer
		code := run(context.Background(), []string{"--root", t.TempDir(), "get", src}, &out, &errb)
		return code, errb.String()
	}
	if code, errs := envRun(map[string]string{"DEPCACHE_DOWNLOAD_TIMEOUT": "3s"}); code != 0 {
		t.Errorf("DEPCACHE_DOWNLOAD_TIMEOUT=3s: exit %d, %s", code, errs)
	}
	if code, errs := envRun(map[string]string{"DEPCACHE_DOWNLOAD_TIMEOUT": "3s", "DEPCACHE_PROGRESS_INTERVAL": "2s"}); code != 2 || !strings.Contains(errs, "--progress-interval") {
		t.Errorf("both twins in conflict: exit %d, %q; want 2", code, errs)
	}
}

// A flag given alone is never refused in the name of a partner the user did
// not give: the derived default scales to fit, and when no default can fit,
// the error is about the value given (TestFlagsDeriveDefaults covers the
// pairs that fit).
func TestLoneFlagErrorsNameOnlyIt(t *testing.T) {
	src := helloSource(t)
	for _, tc := range []struct {
		args        []string
		want, never string
	}{
		{[]string{"get", "--download-timeout", "1ns", src}, "--download-timeout 1ns", "--progress-interval"},
		{[]string{"get", "--progress-interval", "2000000h", src}, "--progress-interval 2000000h", "--download-timeout"},
		// Absurdly short values are refused, naming the range (each
		// report is a commit of the state).
		{[]string{"get", "--progress-interval", "1ns", src}, "--progress-interval 1ns: bad flag value: must be at least 100ms", "--download-timeout"},
		{[]string{"get", "--progress-interval", "99ms", "--download-timeout", "1h", src}, "--progress-interval 99ms: bad flag value: must be at least 100ms", "--download-timeout"},
		{[]string{"get", "--download-timeout", "10ms", src}, "--download-timeout 10ms: bad flag value: must be at least 200ms", "--progress-interval"},
		{[]string{"gc", "--progress-interval", "1ns"}, "--progress-interval 1ns", "--download-timeout"},
		{[]string{"policy", "set", "--progress-interval", "1ns"}, "--progress-interval 1ns", "--download-timeout"},
	} {
		code, _, errs := cli(t, t.TempDir(), tc.args...)
		if code != 2 || !strings.Contains(errs, tc.want) || strings.Contains(errs, tc.never) {
			t.Errorf("%v: exit %d, %q; want 2, naming %s and not %s", tc.args, code, errs, tc.want, tc.never)
		}
	}
	// Its DEPCACHE_* twin is named as the one at fault.
	t.Setenv("DEPCACHE_DOWNLOAD_TIMEOUT", "1ns")
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"--root", t.TempDir(), "get", src}, &out, &errb)
	if errs := errb.String(); code != 2 || !strings.Contains(errs, "DEPCACHE_DOWNLOAD_TIMEOUT") || strings.Contains(errs, "--progress-interval") {
		t.Errorf("DEPCACHE_DOWNLOAD_TIMEOUT=1ns: exit %d, %q; want 2, naming the variable and not --progress-interval", code, errs)
	}
	os.Unsetenv("DEPCACHE_DOWNLOAD_TIMEOUT")
	t.Setenv("DEPCACHE_PROGRESS_INTERVAL", "1ns")
	out.Reset()
	errb.Reset()
	code = run(context.Background(), []string{"--root", t.TempDir(), "get", src}, &out, &errb)
	if errs := errb.String(); code != 2 || !strings.Contains(errs, "--progress-interval 1ns: bad flag value: must be at least 100ms") ||
		!strings.Contains(errs, "DEPCACHE_PROGRESS_INTERVAL") || strings.Contains(errs, "--download-timeout") {
		t.Errorf("DEPCACHE_PROGRESS_INTERVAL=1ns: exit %d, %q; want 2, naming the flag, the range and the variable", code, errs)
	}
}
