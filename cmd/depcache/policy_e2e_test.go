package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/state"
)

// cliEnv is cli with DEPCACHE_* variables set to env (and no others).
func cliEnv(t *testing.T, root string, env map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "DEPCACHE_") && k != "DEPCACHE_CHECK_SHARED" {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	var out, errb bytes.Buffer
	code = run(context.Background(), append([]string{"--root", root}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

// tree records every name under root with its size, mode and mtime.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		out[p] = fmt.Sprint(fi.Mode(), " ", fi.ModTime(), " ", fi.Size())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func storedPolicy(t *testing.T, root string) *state.Policy {
	t.Helper()
	return readState(t, root).Policy
}

// TestOneShotGCUsesItsFlags: a one-shot gc sweeps with the flags given to
// it, for that sweep only; the stored policy changes only through policy
// set (or --set-policy); the first get on a new root stores nothing; and a
// flag the stored policy overrides in a loop gets one line on stderr, not
// a log record.
func TestOneShotGCUsesItsFlags(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	src := "file://" + abs

	code, _, errs := cli(t, root, "get", "--dependent", "job", "--max-size", "10GiB", src)
	if code != 0 {
		t.Fatalf("get: %d %s", code, errs)
	}
	if p := storedPolicy(t, root); p != nil {
		t.Errorf("the first get stored its flags as the root's policy: %+v", p)
	}
	if lines := strings.Split(strings.TrimSpace(errs), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "max-size") || !strings.Contains(lines[0], "policy set") {
		t.Errorf("get --max-size on a root without that policy: stderr %q, want one line naming max-size and 'policy set'", errs)
	}
	if strings.Contains(errs, "level=") {
		t.Errorf("the override is a log record: %q", errs)
	}
	if code, _, errs := cli(t, root, "release", "--dependent", "job", src); code != 0 {
		t.Fatalf("release: %d %s", code, errs)
	}

	// A dry run with the flags says what it would do and writes nothing.
	before := tree(t, root)
	code, out, errs := cli(t, root, "gc", "--dry-run", "--max-size", "1", "--min-age", "0s")
	if code != 0 || !strings.Contains(out, "would evict 1,") {
		t.Fatalf("gc --dry-run --max-size 1: %d %q %q", code, out, errs)
	}
	if after := tree(t, root); len(after) != len(before) {
		t.Errorf("a dry run changed the root: %d names before, %d after", len(before), len(after))
	}

	code, out, errs = cli(t, root, "gc", "--max-size", "1", "--min-age", "0s")
	if code != 0 || !strings.Contains(out, "evicted 1,") {
		t.Fatalf("gc --max-size 1 --min-age 0s after a release: %d %q %q, want evicted 1", code, out, errs)
	}
	if strings.TrimSpace(errs) != "" {
		t.Errorf("a one-shot gc's own flags are not an override to warn about: %q", errs)
	}
	if p := storedPolicy(t, root); p != nil {
		t.Errorf("a one-shot gc stored its flags: %+v", p)
	}

	// policy set stores; policy shows; gc --set-policy still stores.
	if code, _, errs := cli(t, root, "policy", "set", "--max-size", "5MiB", "--min-age", "1m"); code != 0 {
		t.Fatalf("policy set: %d %s", code, errs)
	}
	if p := storedPolicy(t, root); p == nil || p.MaxSizeBytes != 5<<20 || p.MinAge != state.Duration(60e9) {
		t.Fatalf("after policy set: %+v", p)
	}
	code, out, _ = cli(t, root, "--json", "policy")
	var shown state.Policy
	if err := json.Unmarshal([]byte(out), &shown); code != 0 || err != nil || shown.MaxSizeBytes != 5<<20 {
		t.Errorf("policy --json: %d %q %v", code, out, err)
	}
	if code, _, errs := cli(t, root, "gc", "--max-size", "7MiB", "--set-policy"); code != 0 {
		t.Fatalf("gc --set-policy: %d %s", code, errs)
	}
	if p := storedPolicy(t, root); p == nil || p.MaxSizeBytes != 7<<20 || p.MinAge != state.Duration(60e9) {
		t.Errorf("gc --set-policy: %+v, want max-size 7 MiB and min-age kept", p)
	}
	// Out of range for this sweep: bad input, nothing swept.
	if code, _, errs := cli(t, root, "gc", "--high-watermark", "0"); code != 2 {
		t.Errorf("gc --high-watermark 0: exit %d (%s), want 2", code, errs)
	}
}

// TestLookingNeverWrites: ls, policy without flags and doctor without a
// repair flag leave the root exactly as it was, even with DEPCACHE_*
// variables that would change the policy.
func TestLookingNeverWrites(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	if code, _, errs := cli(t, root, "get", "--dependent", "job", "file://"+abs); code != 0 {
		t.Fatalf("get: %d %s", code, errs)
	}
	env := map[string]string{"DEPCACHE_MAX_SIZE": "1", "DEPCACHE_MIN_AGE": "0s", "DEPCACHE_PIN": "x", "DEPCACHE_HIGH_WATERMARK": "50"}
	for _, args := range [][]string{{"ls"}, {"--json", "ls"}, {"policy"}, {"--json", "policy"}, {"doctor"}, {"--json", "doctor"}} {
		before := tree(t, root)
		code, _, errs := cliEnv(t, root, env, args...)
		if code != 0 {
			t.Errorf("%v: exit %d: %s", args, code, errs)
		}
		after := tree(t, root)
		for p, v := range after {
			if before[p] != v {
				t.Errorf("%v with %v wrote %s", args, env, p)
			}
		}
		for p := range before {
			if _, ok := after[p]; !ok {
				t.Errorf("%v with %v removed %s", args, env, p)
			}
		}
	}
	if p := storedPolicy(t, root); p != nil {
		t.Errorf("a look stored a policy: %+v", p)
	}
	// A state that does not parse: looking at it (and doctor saying so)
	// writes no copy of it either; a writer keeps one.
	bad := t.TempDir()
	if code, _, errs := cli(t, bad, "get", "--dependent", "job", "file://"+abs); code != 0 {
		t.Fatalf("get: %d %s", code, errs)
	}
	if err := os.WriteFile(filepath.Join(bad, "state.json"), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	// And a shard with one byte changed (its size as its manifest says).
	badShard := t.TempDir()
	if code, _, errs := cli(t, badShard, "get", "--dependent", "job", "file://"+abs); code != 0 {
		t.Fatalf("get: %d %s", code, errs)
	}
	shards, _ := filepath.Glob(filepath.Join(badShard, "state.d", "*"))
	if len(shards) == 0 {
		t.Fatal("no shard files")
	}
	for _, f := range shards { // the one the manifest names among them
		sb, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		sb[len(sb)/2] ^= 0x01
		if err := os.WriteFile(f, sb, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []string{bad, badShard} {
		for _, args := range [][]string{{"ls"}, {"doctor"}, {"gc", "--dry-run"}, {"policy"}} {
			before := tree(t, r)
			// policy reads the manifest alone, which a bad shard leaves
			// readable; the others read the entries too.
			if code, _, _ := cli(t, r, args...); code != 1 && (args[0] != "policy" || r == bad) {
				t.Errorf("%v on a corrupt state: exit %d, want 1", args, code)
			}
			after := tree(t, r)
			if r == badShard {
				// A shard that fails its hash may be a commit in flight:
				// the look reads again under the state lock, whose file
				// comes and goes (the root's mtime with it). Nothing else
				// is written: no copy of the shard is kept.
				delete(before, r)
				delete(after, r)
			}
			if !maps.Equal(before, after) {
				t.Errorf("%v on a corrupt state wrote into the root: %v -> %v", args, before, after)
			}
		}
	}
	// The probes are asked for: they run, and leave nothing behind but
	// the root directory's mtime.
	before := tree(t, root)
	code, out, errs := cli(t, root, "doctor", "--probe")
	if code != 0 || !strings.Contains(out, "link(2) lock excludes") || !strings.Contains(out, "of the file server's") {
		t.Errorf("doctor --probe: exit %d, %q %s; want the lock and clock probed", code, out, errs)
	}
	after := tree(t, root)
	delete(before, root)
	delete(after, root)
	if !maps.Equal(before, after) {
		t.Errorf("doctor --probe left the root changed: %v -> %v", before, after)
	}
	if code, out, _ := cli(t, root, "doctor"); code != 0 || !strings.Contains(out, "skip lock") || !strings.Contains(out, "doctor --probe") {
		t.Errorf("doctor without --probe: %d %q; want the probes skipped, naming --probe", code, out)
	}
}

// TestPinTakesTheShortKey: the 12-character KEY that ls shows pins its
// entry (stored as the full ID), in policy set and in a one-shot gc; a
// prefix of no entry, or of several, is refused.
func TestPinTakesTheShortKey(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	src := "file://" + abs
	if code, _, errs := cli(t, root, "get", "--dependent", "job", src); code != 0 {
		t.Fatalf("get: %d %s", code, errs)
	}
	if code, _, errs := cli(t, root, "release", "--dependent", "job", src); code != 0 {
		t.Fatalf("release: %d %s", code, errs)
	}
	id := readState(t, root).Sorted()[0].Key.ID()
	if code, out, _ := cli(t, root, "gc", "--max-size", "1", "--min-age", "0s", "--pin", id[:12]); code != 0 || !strings.Contains(out, "evicted 0,") {
		t.Errorf("gc --pin KEY: %d %q, want the pinned entry kept", code, out)
	}
	// IDs copied in upper case pin the same entry, short or full.
	for _, pin := range []string{id[:12], strings.ToUpper(id[:12]), strings.ToUpper(id)} {
		if code, _, errs := cli(t, root, "policy", "set", "--pin", pin); code != 0 {
			t.Fatalf("policy set --pin %s: %d %s", pin, code, errs)
		}
		if p := storedPolicy(t, root); p == nil || len(p.Pins) != 1 || p.Pins[0] != id {
			t.Errorf("--pin %s: stored pins %+v, want the full ID %s", pin, p, id)
		}
		if code, out, _ := cli(t, root, "gc", "--max-size", "1", "--min-age", "0s"); code != 0 || !strings.Contains(out, "evicted 0,") {
			t.Errorf("gc under the stored pin %s: %d %q", pin, code, out)
		}
	}
	if code, out, _ := cli(t, root, "gc", "--max-size", "1", "--min-age", "0s", "--pin", strings.ToUpper(id[:10])); code != 0 || !strings.Contains(out, "evicted 0,") {
		t.Errorf("gc --pin in upper case: %d %q, want the pinned entry kept", code, out)
	}
	// A source pins as get names it: FILE:// and a doubled slash are the
	// same entry's source.
	alias := "FILE://" + strings.Replace(abs, "/", "//", 1)
	if code, _, errs := cli(t, root, "policy", "set", "--pin", alias); code != 0 {
		t.Fatalf("policy set --pin %s: %d %s", alias, code, errs)
	}
	if p := storedPolicy(t, root); p == nil || len(p.Pins) != 1 || p.Pins[0] != src {
		t.Errorf("--pin %s: stored pins %+v, want the source %s", alias, p, src)
	}
	if code, out, _ := cli(t, root, "gc", "--max-size", "1", "--min-age", "0s"); code != 0 || !strings.Contains(out, "evicted 0,") {
		t.Errorf("gc under the pinned source %s: %d %q", alias, code, out)
	}
	other := "00000000"
	if strings.HasPrefix(id, other) {
		other = "ffffffff"
	}
	if code, _, errs := cli(t, root, "policy", "set", "--pin", other); code != 2 || !strings.Contains(errs, "no entry's key ID starts with it") {
		t.Errorf("policy set --pin %s: %d %q, want exit 2 naming the prefix", other, code, errs)
	}
}

// TestRefusedPolicySetLeavesNoRoot: a policy set that is refused leaves no
// root behind where there was none; dir refuses a --root that is a file,
// as every other command does.
func TestRefusedPolicySetLeavesNoRoot(t *testing.T) {
	root := filepath.Join(t.TempDir(), "new")
	for _, args := range [][]string{{"policy", "set", "--pin", "abcdef0123"}, {"policy", "set", "--high-watermark", "0"}} {
		if code, _, errs := cli(t, root, args...); code != 2 {
			t.Errorf("%v: exit %d (%s), want 2", args, code, errs)
		}
		if _, err := os.Stat(root); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%v refused, and left the root: %v", args, err)
		}
	}
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"dir"}, {"--json", "dir"}} {
		if code, _, errs := cli(t, file, args...); code != 2 || !strings.Contains(errs, "not a directory") {
			t.Errorf("%v with --root a file: exit %d, %q; want 2", args, code, errs)
		}
	}
}
