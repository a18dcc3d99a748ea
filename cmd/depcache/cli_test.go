package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// cli runs depcache in-process, as main would, with the environment
// cleared of DEPCACHE_* so that the developer's settings do not leak in.
func cli(t *testing.T, root string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "DEPCACHE_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
	var out, errb bytes.Buffer
	code = run(context.Background(), append([]string{"--root", root}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

// normalise replaces what changes between runs with placeholders.
func normalise(s, root string) string {
	s = strings.ReplaceAll(s, root, "$ROOT")
	s = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ`).ReplaceAllString(s, "$$TIME")
	s = regexp.MustCompile(`cli-[^"\s]+`).ReplaceAllString(s, "$$ANON")
	return s
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	p := filepath.Join("testdata", name+".golden")
	if *update {
		os.MkdirAll("testdata", 0o755)
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test -run %s -update to create it)", err, t.Name())
	}
	if got != string(want) {
		t.Errorf("%s differs from %s:\n--- got\n%s\n--- want\n%s", name, p, got, want)
	}
}

func TestCLIGolden(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	src := "file://" + abs
	// The source path differs between machines; the golden files name it
	// $SRC.
	key, err := manager.ParseKey(src, "")
	if err != nil {
		t.Fatal(err)
	}
	norm := func(s string) string {
		s = strings.ReplaceAll(normalise(s, root), abs, "$SRC")
		return strings.ReplaceAll(s, key.ID(), "$KEYID")
	}

	code, out, errs := cli(t, root, "get", "--dependent", "job1", src)
	if code != 0 {
		t.Fatalf("get: exit %d: %s", code, errs)
	}
	golden(t, "get", norm(out))

	code, out, _ = cli(t, root, "get", "--json", "--dependent", "job2", src)
	if code != 0 {
		t.Fatalf("get --json: exit %d", code)
	}
	golden(t, "get-json", norm(out))

	code, out, _ = cli(t, root, "ls", "--json")
	if code != 0 {
		t.Fatalf("ls --json: exit %d", code)
	}
	golden(t, "ls-json", norm(out))

	code, out, errs = cli(t, root, "release", "--dependent", "job1", src)
	if code != 0 {
		t.Fatalf("release: exit %d: %s", code, errs)
	}
	golden(t, "release", norm(out))

	code, _, errs = cli(t, root, "release", "--dependent", "job1", src)
	if code != 1 || !strings.Contains(errs, "not registered") {
		t.Errorf("release twice: exit %d, %q; want 1 and 'not registered'", code, errs)
	}
}

func TestCLIExitCodes(t *testing.T) {
	stall := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer stall.Close()
	for _, tc := range []struct {
		name  string
		args  []string
		wcode int
		wmsg  string
	}{
		{"unsupported scheme", []string{"get", "ftp://example.com/x"}, 2, "unsupported scheme"},
		{"relative file path", []string{"get", "file://relative/x"}, 2, "absolute"},
		{"no source", []string{"get"}, 2, "takes 1 argument"},
		{"bad sha256", []string{"get", "--sha256", "zz", "file:///x"}, 2, "sha256"},
		{"negative retries", []string{"get", "--retries", "-1", "file:///x"}, 2, "--retries"},
		{"progress interval over half the timeout", []string{"get", "--download-timeout", "1s", "--progress-interval", "1s", "file:///x"}, 2, "--progress-interval"},
		{"unknown flag", []string{"get", "--nope", "file:///x"}, 2, "unknown flag"},
		{"bad log level", []string{"--log-level", "loud", "ls"}, 2, "--log-level"},
		{"release without dependent", []string{"release", "file:///x"}, 2, "--dependent is required"},
		// pflag kept the last of two values: the first dependent was
		// never registered (or released), without a word.
		{"get with two dependents", []string{"get", "--dependent", "a", "--dependent", "b", "file:///x"}, 2, `"--dependent" flag: given twice, "a" and then "b": one get registers one dependent`},
		{"release with two dependents", []string{"release", "--dependent", "a", "--dependent", "b", "file:///x"}, 2, `"--dependent" flag: given twice, "a" and then "b": one release removes one dependent`},
		{"get with one dependent given twice", []string{"get", "--dependent", "a", "--dependent", "a", helloSource(t)}, 0, ""},
		{"get with two sha256", []string{"get", "--sha256", strings.Repeat("0", 64), "--sha256", strings.Repeat("1", 64), "file:///x"}, 2, `"--sha256" flag: given twice`},
		{"missing file: FAILED", []string{"get", "file:///nonexistent/depcache-test"}, 1, "no such file"},
		{"timeout", []string{"get", "--timeout", "300ms", stall.URL + "/x"}, 3, "not ready after 300ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := cli(t, t.TempDir(), tc.args...)
			if code != tc.wcode || !strings.Contains(errs, tc.wmsg) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, errs, tc.wcode, tc.wmsg)
			}
		})
	}
}

func TestCLIEnvTwins(t *testing.T) {
	root := t.TempDir()
	t.Setenv("DEPCACHE_RETRIES", "-5")
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"--root", root, "get", "file:///x"}, &out, &errb)
	if code != 2 || !strings.Contains(errb.String(), "--retries -5") {
		t.Errorf("DEPCACHE_RETRIES=-5: exit %d, %q; want 2 naming --retries", code, errb.String())
	}
	t.Setenv("DEPCACHE_RETRIES", "many")
	errb.Reset()
	code = run(context.Background(), []string{"--root", root, "get", "file:///x"}, &out, &errb)
	if code != 2 || !strings.Contains(errb.String(), "DEPCACHE_RETRIES") {
		t.Errorf("DEPCACHE_RETRIES=many: exit %d, %q; want 2 naming the variable", code, errb.String())
	}
	t.Setenv("DEPCACHE_RETRIES", "")
	// A value a command checks itself, after the flags parse.
	t.Setenv("DEPCACHE_SHA256", "zz")
	errb.Reset()
	code = run(context.Background(), []string{"--root", root, "get", "file:///x"}, &out, &errb)
	if code != 2 || !strings.Contains(errb.String(), "--sha256") || !strings.Contains(errb.String(), "set by DEPCACHE_SHA256") {
		t.Errorf("DEPCACHE_SHA256=zz: exit %d, %q; want 2 naming --sha256 and the variable", code, errb.String())
	}
	t.Setenv("DEPCACHE_SHA256", "")
	errb.Reset()
	code = run(context.Background(), []string{"--root", root, "gc", "--dry-run", "--max-size", "7EiB"}, &out, &errb)
	if code != 2 || !strings.Contains(errb.String(), "at most 4EiB") {
		t.Errorf("--max-size 7EiB: exit %d, %q; want 2 saying the bound", code, errb.String())
	}
}

func TestCLIGCGolden(t *testing.T) {
	root := t.TempDir()
	src := func(name string) string {
		abs, _ := filepath.Abs(name)
		return "file://" + abs
	}
	a, b := src("../../testdata/bundles/hello.tar.gz"), src("../../testdata/hostile/README.md")
	for _, s := range []string{a, b} {
		if code, _, errs := cli(t, root, "get", "--dependent", "job", s); code != 0 {
			t.Fatalf("get %s: %s", s, errs)
		}
	}
	if code, _, errs := cli(t, root, "release", "--dependent", "job", a); code != 0 {
		t.Fatal(errs)
	}
	norm := func(s string) string {
		s = strings.ReplaceAll(normalise(s, root), a, "$A")
		return strings.ReplaceAll(s, b, "$B")
	}
	before, _ := os.ReadFile(filepath.Join(root, "state.json"))
	code, out, errs := cli(t, root, "gc", "--dry-run", "--max-size", "100", "--min-age", "0s", "--set-policy")
	if code != 0 {
		t.Fatalf("gc --dry-run: exit %d: %s", code, errs)
	}
	golden(t, "gc-dry-run", norm(out))
	after, _ := os.ReadFile(filepath.Join(root, "state.json"))
	if string(before) != string(after) {
		t.Error("gc --dry-run changed the state")
	}
	ents, _ := os.ReadDir(filepath.Join(root, "entries"))
	if len(ents) != 2 {
		t.Fatalf("gc --dry-run removed content: %d entries left", len(ents))
	}
	code, out, errs = cli(t, root, "gc", "--max-size", "100", "--min-age", "0s", "--set-policy")
	if code != 0 {
		t.Fatalf("gc: exit %d: %s", code, errs)
	}
	golden(t, "gc", norm(out))
	ents, _ = os.ReadDir(filepath.Join(root, "entries"))
	if len(ents) != 1 {
		t.Errorf("%d entries left, want 1 (the one in use)", len(ents))
	}
	if ents, _ := filepath.Glob(filepath.Join(root, "trash", "*", "*")); len(ents) != 1 || filepath.Base(ents[0]) != "owner.json" {
		t.Errorf("trash not emptied: %v", ents)
	}
	code, out, _ = cli(t, root, "ls")
	if code != 0 || !strings.Contains(out, "in use by [job]") {
		t.Errorf("ls does not explain why the entry is kept:\n%s", out)
	}
}

func TestCLIPolicyFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		wmsg string
	}{
		{[]string{"gc", "--max-size", "-5"}, "must not be negative"},
		{[]string{"gc", "--max-size", "lots"}, "want a size"},
		{[]string{"gc", "--high-watermark", "120"}, "--high-watermark 120"},
		{[]string{"gc", "--high-watermark", "95", "--low-watermark", "96"}, "must not exceed --high-watermark"},
		{[]string{"gc", "--min-free-disk", "150%"}, "percent"},
		{[]string{"gc", "--min-age", "-1s"}, "--min-age"},
		{[]string{"gc", "--dependent-lease", "10s"}, "at least 30s"},
		{[]string{"gc", "--cleanup-interval", "0s"}, "--cleanup-interval 0s"},
		{[]string{"gc", "--cleanup-interval", "1ns"}, "--cleanup-interval 1ns: bad flag value: must be at least 100ms"},
		{[]string{"policy", "set", "--cleanup-interval", "99ms"}, "--cleanup-interval 99ms"},
		{[]string{"gc", "--min-age", "2m", "--max-age", "1m", "--set-policy"}, "max-age"},
	} {
		code, _, errs := cli(t, t.TempDir(), tc.args...)
		if code != 2 || !strings.Contains(errs, tc.wmsg) {
			t.Errorf("%v: exit %d, %q; want 2 and %q", tc.args, code, errs, tc.wmsg)
		}
	}
}

func TestCLIDoctorRebuildVerify(t *testing.T) {
	root := t.TempDir()
	abs := func(p string) string { a, _ := filepath.Abs(p); return "file://" + a }
	a, b := abs("../../testdata/bundles/hello.tar.gz"), abs("../../testdata/hostile/README.md")
	for _, s := range []string{a, b} {
		if code, _, errs := cli(t, root, "get", "--dependent", "job", s); code != 0 {
			t.Fatal(errs)
		}
	}
	if code, out, errs := cli(t, root, "doctor"); code != 0 || strings.Contains(out, "fail") {
		t.Fatalf("doctor on a healthy root: exit %d\n%s%s", code, out, errs)
	}
	if code, out, _ := cli(t, root, "verify"); code != 0 || strings.Count(out, "ok ") != 2 {
		t.Fatalf("verify: exit %d\n%s", code, out)
	}

	// --rebuild refuses a state that parses: it would drop job's dependents.
	before, _ := os.ReadFile(filepath.Join(root, "state.json"))
	if code, _, errs := cli(t, root, "doctor", "--rebuild"); code != 1 || !strings.Contains(errs, "readable") || !strings.Contains(errs, "force") {
		t.Fatalf("doctor --rebuild on a healthy state: exit %d, %q; want 1 and a refusal", code, errs)
	}
	if after, _ := os.ReadFile(filepath.Join(root, "state.json")); !bytes.Equal(before, after) {
		t.Fatal("doctor --rebuild changed a healthy state it refused")
	}
	if code, out, errs := cli(t, root, "doctor", "--rebuild", "--force"); code != 0 || !strings.Contains(out, "from 2 published entries") {
		t.Fatalf("doctor --rebuild --force: exit %d\n%s%s", code, out, errs)
	}

	// A corrupt state: every command refuses it, naming it; doctor says so;
	// --rebuild brings the entries back from their metadata.
	os.WriteFile(filepath.Join(root, "state.json"), []byte(`{"version":1,"entries":{`), 0o644)
	if code, _, errs := cli(t, root, "ls"); code != 1 || !strings.Contains(errs, filepath.Join(root, "state.json")) {
		t.Errorf("ls on a corrupt state: exit %d, %q", code, errs)
	}
	if code, out, _ := cli(t, root, "doctor"); code != 1 || !strings.Contains(out, "fail state") {
		t.Errorf("doctor on a corrupt state: exit %d\n%s", code, out)
	}
	if code, out, errs := cli(t, root, "doctor", "--rebuild"); code != 0 || !strings.Contains(out, "from 2 published entries") {
		t.Fatalf("doctor --rebuild: exit %d\n%s%s", code, out, errs)
	}
	if bad, _ := filepath.Glob(filepath.Join(root, "state.json.bad-*")); len(bad) != 1 {
		t.Errorf("the unreadable state was not kept aside: %v", bad)
	}

	// A lost state file with content left: start-up refuses and points to
	// doctor --rebuild, which rebuilds it without --force.
	os.Remove(filepath.Join(root, "state.json"))
	if code, _, errs := cli(t, root, "get", "--no-wait", a); code != 1 || !strings.Contains(errs, "doctor --rebuild") {
		t.Errorf("get on a root that lost its state: exit %d, %q", code, errs)
	}
	if code, out, errs := cli(t, root, "doctor", "--rebuild"); code != 0 || !strings.Contains(out, "from 2 published entries") {
		t.Fatalf("doctor --rebuild of a lost state: exit %d\n%s%s", code, out, errs)
	}

	// Tampered content: verify marks it FAILED and says so.
	readme := filepath.Join(root, "entries", mustID(t, a)+"-g1", "content", "hello", "README.txt")
	if err := os.WriteFile(readme, []byte("tampered\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, _ := cli(t, root, "verify")
	if code != 1 || !strings.Contains(out, "FAILED "+a) || !strings.Contains(out, "ok     "+b) {
		t.Errorf("verify after tampering: exit %d\n%s", code, out)
	}
	_, out, _ = cli(t, root, "ls", "--json")
	if !strings.Contains(out, `"stage": "FAILED"`) || !strings.Contains(out, "verify: content digest") {
		t.Errorf("the tampered entry is not FAILED with the reason:\n%s", out)
	}

	// Unreadable metadata: reported as not checked, never as FAILED, and
	// the entry stays READY.
	metas, _ := filepath.Glob(filepath.Join(root, "entries", mustID(t, b)+"-g*", "meta.json"))
	if len(metas) != 1 {
		t.Fatalf("metadata of %s: %v", b, metas)
	}
	if err := os.Remove(metas[0]); err != nil {
		t.Fatal(err)
	}
	code, out, errs := cli(t, root, "verify", b)
	if code != 1 || !strings.Contains(out, "ERROR  "+b) || strings.Contains(out, "FAILED") || !strings.Contains(errs, "1 entry could not be checked") {
		t.Errorf("verify with unreadable metadata: exit %d\n%s%s", code, out, errs)
	}
	if _, out, _ = cli(t, root, "ls", "--json"); strings.Count(out, `"stage": "READY"`) != 1 {
		t.Errorf("the unchecked entry is no longer READY:\n%s", out)
	}
}

func TestCLIBreakLock(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(root, 0o755)
	holder := `{"host":"gone-host","boot_id":"x","pid_ns":"y","pid":42,"start_time":1,"nonce":"00112233445566778899aabbccddeeff"}`
	os.WriteFile(filepath.Join(root, "state.lock"), []byte(holder), 0o644)
	if _, out, _ := cli(t, root, "doctor"); !strings.Contains(out, "gone-host") {
		t.Errorf("doctor does not show the lock's holder:\n%s", out)
	}
	code, out, _ := cli(t, root, "doctor", "--break-lock") // stdin is empty: the answer is no
	if code != 0 || !strings.Contains(out, "left alone") {
		t.Errorf("break-lock without confirmation: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(filepath.Join(root, "state.lock")); err != nil {
		t.Fatal("the lock was removed without confirmation")
	}
	// Another host's holder is broken only once its lock stayed unchanged
	// for the lease, as a waiter would judge it, not at once.
	if code, out, _ := cli(t, root, "--lock-lease", "1s", "doctor", "--break-lock", "--yes"); code != 0 || !strings.Contains(out, "broke") || !strings.Contains(out, "--lock-lease, 1s") {
		t.Errorf("break-lock --yes: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(filepath.Join(root, "state.lock")); !os.IsNotExist(err) {
		t.Error("the lock is still there")
	}
}

func mustID(t *testing.T, src string) string {
	t.Helper()
	k, err := manager.ParseKey(src, "")
	if err != nil {
		t.Fatal(err)
	}
	return k.ID()
}

// get --no-wait on a FAILED entry exits 1 with or without --json, as a
// waiting get does; --json still prints the entry.
func TestCLINoWaitFailed(t *testing.T) {
	root := t.TempDir()
	src := "file:///nonexistent/depcache-no-wait"
	if code, _, errs := cli(t, root, "get", "--failure-cooldown", "1h", src); code != 1 {
		t.Fatalf("get of a missing file: exit %d, %q; want 1", code, errs)
	}
	for _, args := range [][]string{{"get", "--no-wait", src}, {"--json", "get", "--no-wait", src}} {
		code, out, errs := cli(t, root, args...)
		if code != 1 || !strings.Contains(out, "FAILED") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want 1 and FAILED", args, code, out, errs)
		}
	}
}

// A named dependent that holds one image in two daemons is released only
// in this host's daemon; with no daemon to ask, the release is refused as
// ambiguous and changes nothing.
func TestCLIReleaseImageInTwoDaemons(t *testing.T) {
	root := t.TempDir()
	s, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src := "docker://registry.invalid/team/x:1"
	put := func(daemon string) state.Key {
		k, err := manager.ParseKey(src, "")
		if err != nil {
			t.Fatal(err)
		}
		k.Daemon = daemon
		err = s.Update(context.Background(), func(st *state.State) (bool, error) {
			st.Put(&state.Entry{Key: k, Stage: state.Ready, ImageID: "sha256:" + strings.Repeat("a", 64), Generation: 1,
				Dependents: map[string]state.Dependent{"job": {Since: time.Now()}}})
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	put("daemon-one")
	put("daemon-two")
	t.Setenv("DOCKER_HOST", "unix://"+filepath.Join(t.TempDir(), "no.sock"))
	code, _, errs := cli(t, root, "release", "--dependent", "job", src)
	if code != 2 || !strings.Contains(errs, "2 daemons") {
		t.Fatalf("release of an image held in two daemons with none here: exit %d, %q; want 2 and the daemons named", code, errs)
	}
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range st.Entries {
		if len(e.Dependents) != 1 {
			t.Errorf("entry of %s lost its dependent in a refused release", e.Key.Daemon)
		}
	}
}

// TestDoctorOnBadLayout: a name of the root's layout that is not what
// depcache made (a directory where state.json belongs, a file for
// state.d/) stops every command, doctor included, but doctor reports it
// as a failing check in its usual forms, and the message says to move it
// out rather than to follow it. Nothing is moved or deleted.
func TestDoctorOnBadLayout(t *testing.T) {
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	for _, tc := range []struct {
		name string
		bend func(root string) error
		path string
	}{
		{"state.json a directory", func(root string) error {
			if err := os.Rename(filepath.Join(root, "state.json"), filepath.Join(root, "kept.json")); err != nil {
				return err
			}
			return os.Mkdir(filepath.Join(root, "state.json"), 0o755)
		}, "state.json"},
		{"state.d a file", func(root string) error {
			if err := os.Rename(filepath.Join(root, "state.d"), filepath.Join(root, "kept.d")); err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(root, "state.d"), []byte("x"), 0o644)
		}, "state.d"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if code, _, errs := cli(t, root, "get", "--dependent", "job", "file://"+abs); code != 0 {
				t.Fatal(errs)
			}
			if err := tc.bend(root); err != nil {
				t.Fatal(err)
			}
			code, out, _ := cli(t, root, "doctor")
			if code != 1 || !strings.HasPrefix(out, "fail layout") || !strings.Contains(out, filepath.Join(root, tc.path)) || !strings.Contains(out, "move it out") {
				t.Errorf("doctor: exit %d, %q; want exit 1 and a failing layout check naming %s", code, out, tc.path)
			}
			code, out, _ = cli(t, root, "--json", "doctor")
			var checks []map[string]string
			if code != 1 || json.Unmarshal([]byte(out), &checks) != nil || len(checks) != 1 || checks[0]["name"] != "layout" || checks[0]["status"] != "fail" {
				t.Errorf("doctor --json: exit %d, %q; want exit 1 and one failing layout check", code, out)
			}
			if code, _, errs := cli(t, root, "ls"); code != 1 || !strings.Contains(errs, tc.path) {
				t.Errorf("ls: exit %d, %q; want exit 1 naming %s", code, errs, tc.path)
			}
			if ents, err := os.ReadDir(filepath.Join(root, "entries")); err != nil || len(ents) != 1 {
				t.Errorf("entries after: %v, %v; want the one entry left", ents, err)
			}
		})
	}
}

// parseAge takes days, refuses what a Duration cannot hold (wrapped, a
// huge age turned negative and selected every entry), and keeps the rest.
func TestParseAge(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"7d", 7 * 24 * time.Hour, true},
		{"1d12h", 36 * time.Hour, true},
		{"36h", 36 * time.Hour, true},
		{"0s", 0, true},
		{"106751d", 106751 * 24 * time.Hour, true},
		{"106751d23h", 106751*24*time.Hour + 23*time.Hour, true},
		{"106751d24h", 0, false},
		{"106752d", 0, false},
		{"9223372036854775807d", 0, false},
		{"-1d", 0, false},
		{"1d-1h", 0, false},
		{"soon", 0, false},
	} {
		got, err := parseAge(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseAge(%q) = %s, %v; want %s, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
		if err == nil && got < 0 {
			t.Errorf("parseAge(%q) = %s: negative", tc.in, got)
		}
	}
}
