package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/spf13/cobra"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// The tests of issue 13, "A user's first day": they drive the built binary.

func hello(t *testing.T) string {
	t.Helper()
	abs, err := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	return "file://" + abs
}

// smallFile writes a file of its own and returns its file:// source.
func smallFile(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return "file://" + p
}

func decodeError(t *testing.T, stderr string) errorJSON {
	t.Helper()
	var e errorJSON
	dec := json.NewDecoder(strings.NewReader(stderr))
	if err := dec.Decode(&e); err != nil || dec.More() {
		t.Fatalf("stderr is not one JSON error object (%v):\n%s", err, stderr)
	}
	return e
}

// SIGINT during a get that waits on a stalled download exits 130 and says
// "interrupted", with --json as an error object of kind interrupted; it
// used to exit 1 ("context canceled"), the code of a FAILED entry.
func TestInterruptExits130(t *testing.T) {
	for _, jsonOut := range []bool{false, true} {
		srv := newBlobServer(t, randomBody(1<<20), func(int32) bool { return true })
		args := []string{"--root", t.TempDir(), "get", srv.URL + "/blob"}
		if jsonOut {
			args = append([]string{"--json"}, args...)
		}
		cmd := exec.Command(bin, args...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		<-srv.started // the download is under way
		cmd.Process.Signal(syscall.SIGINT)
		err := cmd.Wait()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 130 {
			t.Fatalf("json=%v: after SIGINT: %v, want exit 130\n%s", jsonOut, err, errb.String())
		}
		if jsonOut {
			e := decodeError(t, errb.String())
			if e.Kind != "interrupted" || e.ExitCode != 130 || !strings.Contains(e.Error, "interrupted") {
				t.Errorf("--json error after SIGINT: %+v", e)
			}
		} else if !strings.Contains(errb.String(), "depcache: interrupted (SIGINT)") || strings.Contains(errb.String(), "context canceled") {
			t.Errorf("stderr after SIGINT: %q", errb.String())
		}
	}
}

// A signal to run while it fetches, or to lock while it waits, before CMD
// started: exit 128+N, and with --json one error object of kind
// interrupted (both printed plain text only).
func TestRunAndLockInterruptedBeforeCMD(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		srv := newBlobServer(t, randomBody(1<<20), func(int32) bool { return true })
		cmd, _, errb := startBin(t, t.TempDir(), nil, "--json", "run", "--dep", "A="+srv.URL+"/blob", "--", "true")
		<-srv.started // fetching
		cmd.Process.Signal(sig)
		if code := exitStatus(t, cmd); code != 128+int(sig) {
			t.Fatalf("run, %v while fetching: exit %d, want %d\n%s", sig, code, 128+int(sig), errb)
		}
		e := decodeError(t, errb.String())
		if e.Kind != "interrupted" || e.ExitCode != 128+int(sig) || !strings.Contains(e.Error, "before CMD started") {
			t.Errorf("run --json after %v: %+v", sig, e)
		}
		checkSchema(t, "error", errb.String())
	}

	root := t.TempDir()
	ready := filepath.Join(t.TempDir(), "ready")
	holder, _, _ := startBin(t, root, nil, "lock", "held", "--", "sh", "-c", fmt.Sprintf("touch %q; sleep 60", ready))
	defer holder.Process.Kill()
	waitFor(t, "the holder to run CMD", func() bool { return exists(ready) })
	attempts := func() int {
		f, _ := filepath.Glob(filepath.Join(root, "locks", "*.tmp-*"))
		return len(f)
	}
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		before := attempts()
		cmd, _, errb := startBin(t, root, nil, "--json", "lock", "held", "--", "true")
		waitFor(t, "the second lock to wait", func() bool { return attempts() > before })
		cmd.Process.Signal(sig)
		if code := exitStatus(t, cmd); code != 128+int(sig) {
			t.Fatalf("lock, %v while waiting: exit %d, want %d\n%s", sig, code, 128+int(sig), errb)
		}
		e := decodeError(t, errb.String())
		if e.Kind != "interrupted" || e.ExitCode != 128+int(sig) || !strings.Contains(e.Error, `waiting for lock "held"`) || strings.Count(e.Error, "interrupted") != 1 {
			t.Errorf("lock --json after %v: %+v", sig, e)
		}
		checkSchema(t, "error", errb.String())
	}
}

// Bad input exits 2 at once (no retries); each refusal says what to do.
func TestBadInputAndRefusals(t *testing.T) {
	root := t.TempDir()
	if code, _, errs := depcache(t, root, "get", "--dependent", "job", hello(t)); code != 0 {
		t.Fatalf("get: %d %s", code, errs)
	}
	for _, tc := range []struct {
		args  []string
		wcode int
		wmsg  []string
	}{
		{[]string{"get", "http://localhost:99999/x"}, 2, []string{"port 99999", "want 1 to 65535"}},
		{[]string{"get", "http://[::1/x"}, 2, []string{"bad source"}},
		{[]string{"serve", "--listen", "nonsense"}, 2, []string{"--listen nonsense", "missing port"}},
		{[]string{"serve", "--listen", "127.0.0.1:noservice"}, 2, []string{"--listen 127.0.0.1:noservice", "names no known service"}},
		{[]string{"run", "--dep", "P=file://" + filepath.Dir(strings.TrimPrefix(hello(t), "file://")), "--", "true"}, 2, []string{"tar -czf"}},
		{[]string{"get", "--no-wait", "docker://registry:99999/x"}, 2, []string{"registry port 99999"}},
		{[]string{"serve", "--listen", "127.0.0.1:70000"}, 2, []string{"port 70000 out of range"}},
		{[]string{"gc", "--dry-run", "--high-watermark", "0"}, 2, []string{"--high-watermark 0", "[1, 100]"}},
		{[]string{"gc", "--dry-run", "--high-watermark", "150"}, 2, []string{"--high-watermark 150", "[1, 100]"}},
		{[]string{"gc", "--dry-run", "--low-watermark", "-1"}, 2, []string{"--low-watermark -1", "[0, 100]"}},
		{[]string{"--log-level", "loud", "ls"}, 2, []string{"panic, fatal, error, warning, info, debug, trace"}},
		{[]string{"doctor", "--force"}, 2, []string{"--force goes with --rebuild"}},
		{[]string{"doctor", "--yes"}, 2, []string{"--yes goes with --break-lock"}},
		{[]string{"doctor", "--rebuild"}, 1, []string{"readable", "doctor --rebuild --force"}},
		{[]string{"frobnicate"}, 2, []string{"unknown command"}},
		{[]string{"verify", "file:///not/cached"}, 1, []string{"no entry for file:///not/cached"}},
		{[]string{"release", "--dependent", "job", "file:///not/cached"}, 1, []string{"no entry for file:///not/cached"}},
		{[]string{"release", "--dependent", "nobody", hello(t)}, 1, []string{`dependent "nobody"`, "not registered"}},
		{[]string{"ls", "--sort", "colour"}, 2, []string{"want size, last-used or source"}},
		{[]string{"ls", "--filter", "unused=soon"}, 2, []string{"7d"}},
		{[]string{"release", "--dependent", "", hello(t)}, 2, []string{"--dependent '': empty"}},
		{[]string{"release", hello(t)}, 2, []string{"--dependent is required"}},
		{[]string{"locks", "--break", "", "--yes"}, 2, []string{"--break '': empty"}},
		{[]string{"ls", "--filter", "unused=106752d"}, 2, []string{"106752d is out of range", "106751d"}},
		{[]string{"ls", "--filter", "unused=200000d"}, 2, []string{"out of range"}},
		{[]string{"ls", "--filter", "unused=106751d24h"}, 2, []string{"out of range"}},
		{[]string{"rm", "abc"}, 2, []string{"at least 8 hex"}},
		{[]string{"gc", "--dry-run", "--max-size", "0.5"}, 2, []string{"whole number of bytes"}},
		{[]string{"gc", "--dry-run", "--max-size", "1.5B"}, 2, []string{"whole number of bytes"}},
		{[]string{"ls", "--filter", "dependent="}, 2, []string{"dependent=: empty"}},
		{[]string{"get", "--sha256", "", hello(t)}, 2, []string{"--sha256 '': empty"}},
		{[]string{"--state", "etcd://a b:1/p", "ls"}, 2, []string{"space or control character"}},
		{[]string{"--state", "etcd://127.0.0.1:+2379/p", "ls"}, 2, []string{"want HOST:PORT"}},
	} {
		code, _, errs := depcache(t, root, tc.args...)
		if code != tc.wcode {
			t.Errorf("%v: exit %d, want %d: %s", tc.args, code, tc.wcode, errs)
		}
		for _, w := range tc.wmsg {
			if !strings.Contains(errs, w) {
				t.Errorf("%v: stderr %q lacks %q", tc.args, errs, w)
			}
		}
		// One human line, and no retries for bad input.
		if lines := strings.Count(strings.TrimSpace(errs), "\n") + 1; lines != 1 || strings.Contains(errs, "retrying") || strings.Contains(errs, "level=") {
			t.Errorf("%v: want one line on stderr, got %d:\n%s", tc.args, lines, errs)
		}
		// The same error with --json is one object with the exit code.
		code, _, errs = depcache(t, root, append([]string{"--json"}, tc.args...)...)
		if e := decodeError(t, errs); e.ExitCode != code || code != tc.wcode {
			t.Errorf("--json %v: exit %d, %+v", tc.args, code, e)
		}
	}
	// --ignore-missing lets a cleanup script release what may be gone.
	for _, src := range []string{"file:///not/cached", hello(t)} {
		code, out, errs := depcache(t, root, "release", "--ignore-missing", "--dependent", "nobody", src)
		if code != 0 || !strings.Contains(out, "nothing to release") {
			t.Errorf("release --ignore-missing %s: exit %d %q %q", src, code, out, errs)
		}
	}
	if code, out, _ := depcache(t, root, "--json", "release", "--dependent", "job", hello(t)); code != 0 || !strings.Contains(out, `"released": [`) || !strings.Contains(out, mustID(t, hello(t))) {
		t.Errorf("release --json: exit %d\n%s", code, out)
	}
	// run's --sha256 takes what get's does: either case, with sha256:.
	sum := fileSum(t, strings.TrimPrefix(hello(t), "file://"))
	if code, _, errs := depcache(t, root, "run", "--dep", "P="+hello(t), "--sha256", "P=sha256:"+strings.ToUpper(sum), "--", "true"); code != 0 {
		t.Errorf("run --sha256 P=sha256:UPPER: exit %d: %s", code, errs)
	}
	// A key ID prefix in upper case selects as in lower case.
	if code, out, errs := depcache(t, root, "ls", "-q", strings.ToUpper(mustID(t, hello(t))[:10])); code != 0 || strings.TrimSpace(out) == "" {
		t.Errorf("ls -q UPPER-ID-PREFIX: exit %d, %q %s", code, out, errs)
	}
}

// ls, doctor, gc, verify, rm and release on a --root that does not exist
// say "no cache at ROOT" and create nothing; get creates it.
func TestNoCacheAtMissingRoot(t *testing.T) {
	root := filepath.Join(t.TempDir(), "never")
	for _, args := range [][]string{{"ls"}, {"doctor"}, {"doctor", "--rebuild"}, {"gc"}, {"gc", "--dry-run"}, {"verify"}, {"rm", "-y", hello(t)}, {"release", "--dependent", "x", hello(t)}} {
		code, _, errs := depcache(t, root, args...)
		if code != 1 || !strings.Contains(errs, "no cache at "+root) {
			t.Errorf("%v: exit %d, %q; want 1 and no cache at %s", args, code, errs, root)
		}
		if _, err := os.Stat(root); !os.IsNotExist(err) {
			t.Fatalf("%v created the root", args)
		}
	}
	code, _, errs := depcache(t, root, "--json", "ls")
	if e := decodeError(t, errs); code != 1 || e.Kind != "not_found" {
		t.Errorf("ls --json on a missing root: exit %d, %+v", code, e)
	}
	if code, out, _ := depcache(t, root, "dir"); code != 0 || strings.TrimSpace(out) != root {
		t.Errorf("dir: exit %d, %q; want %s", code, out, root)
	}
	// A relative --root is named by its absolute path: the message may be
	// read far from the directory it was relative to.
	cwd := t.TempDir()
	rel := exec.Command(bin, "--root", "never", "ls")
	rel.Dir = cwd
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DEPCACHE_") {
			rel.Env = append(rel.Env, kv)
		}
	}
	if out, err := rel.CombinedOutput(); err == nil || !strings.Contains(string(out), "no cache at "+filepath.Join(cwd, "never")+" ") {
		t.Errorf("ls --root never (relative): %v, %q; want the absolute path named", err, out)
	}
	if _, err := os.Stat(root); !os.IsNotExist(err) {
		t.Fatal("dir created the root")
	}
	// policy only looks: on a missing root, the defaults a new root
	// would apply, and nothing created.
	for _, args := range [][]string{{"policy"}, {"--json", "policy"}} {
		if code, out, errs := depcache(t, root, args...); code != 0 || !strings.Contains(out, "95") {
			t.Errorf("%v on a missing root: exit %d, %q %s; want the defaults", args, code, out, errs)
		}
		if _, err := os.Stat(root); !os.IsNotExist(err) {
			t.Fatalf("%v created the root", args)
		}
	}
	// A root that is a file is a bad flag value for every command.
	file := filepath.Join(t.TempDir(), "afile")
	os.WriteFile(file, nil, 0o644)
	for _, args := range [][]string{{"get", hello(t)}, {"policy"}, {"policy", "set", "--max-size", "1GiB"}, {"ls"}, {"gc"}, {"run", "--dep", "A=" + hello(t), "--", "true"}} {
		if code, _, errs := depcache(t, file, args...); code != 2 || !strings.Contains(errs, "not a directory") {
			t.Errorf("%v on a root that is a file: exit %d, %q; want 2", args, code, errs)
		}
	}
	if code, _, errs := depcache(t, root, "get", hello(t)); code != 0 {
		t.Fatalf("get on a new root: exit %d %s", code, errs)
	}
	if code, _, errs := depcache(t, root, "ls"); code != 0 {
		t.Errorf("ls after get: exit %d %s", code, errs)
	}
}

// verify --json and doctor --json exit 1 when something failed, as
// without --json; verify SOURCE on a FAILED entry reports it, not null.
func TestJSONExitCodesAgree(t *testing.T) {
	root := t.TempDir()
	a := hello(t)
	if code, _, errs := depcache(t, root, "get", "--dependent", "job", a); code != 0 {
		t.Fatal(errs)
	}
	readme := filepath.Join(root, "entries", mustID(t, a)+"-g1", "content", "hello", "README.txt")
	if err := os.WriteFile(readme, []byte("tampered\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for range 2 { // tampered, then FAILED already
		code, out, errs := depcache(t, root, "--json", "verify", a)
		var res []verifyJSON
		if err := json.Unmarshal([]byte(out), &res); err != nil || len(res) != 1 {
			t.Fatalf("verify --json: %v\n%s", err, out)
		}
		if code != 1 || !res[0].Failed || res[0].Verdict != "FAILED" || res[0].Stage != "FAILED" || decodeError(t, errs).Kind != "failed" {
			t.Errorf("verify --json on a failed entry: exit %d, %+v, %s", code, res[0], errs)
		}
	}
	os.WriteFile(filepath.Join(root, "state.json"), []byte(`{"version":1,"entries":{`), 0o644)
	code, out, errs := depcache(t, root, "--json", "doctor")
	if code != 1 || !strings.Contains(out, `"status": "fail"`) || decodeError(t, errs).Kind != "unhealthy" {
		t.Errorf("doctor --json on a corrupt state: exit %d\n%s%s", code, out, errs)
	}
}

// rm removes entries nobody uses, by source or key ID prefix, all or
// nothing; refuses one in use naming its dependents; asks for -y when
// stdin is not a terminal.
func TestRm(t *testing.T) {
	root := t.TempDir()
	a, b := hello(t), smallFile(t, "b.txt", "bee\n")
	for _, s := range []string{a, b} {
		if code, _, errs := depcache(t, root, "get", "--dependent", "job", s); code != 0 {
			t.Fatal(errs)
		}
	}
	if code, _, errs := depcache(t, root, "release", "--dependent", "job", b); code != 0 {
		t.Fatal(errs)
	}
	entries := func() int {
		ents, _ := os.ReadDir(filepath.Join(root, "entries"))
		return len(ents)
	}
	idB := mustID(t, b)

	code, _, errs := depcache(t, root, "rm", "-y", a, b)
	if code != 1 || !strings.Contains(errs, "nothing removed") || !strings.Contains(errs, a+": in use by job") {
		t.Errorf("rm of an entry in use: exit %d, %q", code, errs)
	}
	if n := len(readState(t, root).Entries); n != 2 || entries() != 2 {
		t.Fatalf("a refused rm removed something: %d entries, %d directories", n, entries())
	}
	if code, _, errs := depcache(t, root, "--json", "rm", "-y", a); code != 1 || decodeError(t, errs).Kind != "in_use" {
		t.Errorf("rm --json of an entry in use: exit %d, %s", code, errs)
	}
	code, _, errs = depcache(t, root, "rm", b) // stdin is not a terminal
	if code != 2 || !strings.Contains(errs, "pass -y") {
		t.Errorf("rm without -y and no terminal: exit %d, %q", code, errs)
	}
	code, out, _ := depcache(t, root, "rm", "--dry-run", b)
	if code != 0 || !strings.Contains(out, "would remove "+b) || !strings.Contains(out, "would remove 1, would free ") || strings.Contains(out, "freed") || len(readState(t, root).Entries) != 2 {
		t.Errorf("rm --dry-run: exit %d %q; want what would go and what it would free", code, out)
	}
	if code, _, errs := depcache(t, root, "rm", "-y", "file:///not/cached"); code != 1 || !strings.Contains(errs, "no entry for file:///not/cached") {
		t.Errorf("rm of an unknown source: exit %d %q", code, errs)
	}
	code, out, errs = depcache(t, root, "rm", "-y", idB[:12])
	if code != 0 || !strings.Contains(out, "removed "+b) || !strings.Contains(out, "removed 1, freed ") {
		t.Fatalf("rm -y KEY: exit %d %q %q", code, out, errs)
	}
	st := readState(t, root)
	if _, ok := st.Entries[idB]; ok || len(st.Entries) != 1 {
		t.Errorf("rm left the entry in the state: %v", st.Entries)
	}
	if entries() != 1 {
		t.Errorf("rm left the content: %d entry directories", entries())
	}
	if left, _ := filepath.Glob(filepath.Join(root, "trash", "*", idB+"*")); len(left) != 0 {
		t.Errorf("rm left its content in trash: %v", left)
	}
	if code, _, errs := depcache(t, root, "rm", "-y", "--ignore-missing", b); code != 0 {
		t.Errorf("rm --ignore-missing of a removed entry: exit %d %q", code, errs)
	}
}

// ls: a short KEY, a sha256 column, times as people say them (RFC 3339
// in --json), --sort, --filter, -q, patterns and a totals line.
func TestLsFirstDay(t *testing.T) {
	root := t.TempDir()
	a := hello(t)
	body := strings.Repeat("b", 50000) // larger than hello's tree on disk (blocks), for --sort size
	b := smallFile(t, "b.txt", body)
	if code, _, errs := depcache(t, root, "get", "--dependent", "job", a); code != 0 {
		t.Fatal(errs)
	}
	if code, _, errs := depcache(t, root, "get", "--sha256", hexSum([]byte(body)), b); code != 0 {
		t.Fatal(errs)
	}
	idA, idB := mustID(t, a), ""
	for id, e := range readState(t, root).Entries {
		if e.Key.Source == b && e.Key.SHA256 != "" {
			idB = id
		}
	}
	if idB == "" {
		t.Fatal("no entry with a sha256")
	}
	_, out, _ := depcache(t, root, "ls")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if !strings.HasPrefix(lines[0], "KEY ") || !strings.Contains(lines[0], "SHA256") {
		t.Errorf("ls header: %q", lines[0])
	}
	rowOf := func(id string) string {
		for _, l := range lines {
			if strings.HasPrefix(l, id[:12]+" ") {
				return l
			}
		}
		t.Errorf("no row with KEY %s:\n%s", id[:12], out)
		return ""
	}
	if r := rowOf(idB); !strings.Contains(r, hexSum([]byte(body))[:12]) || !strings.Contains(r, " now ") && !strings.Contains(r, " ago ") {
		t.Errorf("the row of the entry with --sha256: %q", r)
	}
	if r := rowOf(idA); !regexp.MustCompile(`READY\s+\S+ KiB\s+-\s`).MatchString(r) {
		t.Errorf("the row of the entry without --sha256 has no '-' digest: %q", r)
	}
	if regexp.MustCompile(`\d{4}-\d\d-\d\dT`).MatchString(out) {
		t.Errorf("ls prints RFC 3339 times:\n%s", out)
	}
	if last := lines[len(lines)-1]; !regexp.MustCompile(`^2 entries, .+ used of budget none, \d+(\.\d)? KiB in use, .+ free on disk$`).MatchString(last) {
		t.Errorf("totals line: %q", last)
	}
	_, out, _ = depcache(t, root, "--json", "ls")
	if !regexp.MustCompile(`"last_used": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"`).MatchString(out) {
		t.Errorf("ls --json lost RFC 3339:\n%s", out)
	}
	byKey := idA[:12] + "\n" + idB[:12] + "\n"
	if idB < idA {
		byKey = idB[:12] + "\n" + idA[:12] + "\n"
	}
	// hello.tar.gz lives under the repository, b.txt under the temp dir.
	bySource := idA[:12] + "\n" + idB[:12] + "\n"
	if strings.TrimPrefix(b, "file://") < strings.TrimPrefix(a, "file://") {
		bySource = idB[:12] + "\n" + idA[:12] + "\n"
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ls", "-q"}, byKey},
		{[]string{"ls", "-q", "--no-trunc", "--sort", "size"}, idB + "\n" + idA + "\n"},
		{[]string{"ls", "-q", "--sort", "size", "--reverse"}, idA[:12] + "\n" + idB[:12] + "\n"},
		{[]string{"ls", "-q", "--sort", "source"}, bySource},
		{[]string{"ls", "-q", "*/b.txt"}, idB[:12] + "\n"},
		{[]string{"ls", "-q", a}, idA[:12] + "\n"},
		{[]string{"ls", "-q", idB[:8]}, idB[:12] + "\n"},
		{[]string{"ls", "-q", "--filter", "stage=failed"}, ""},
		{[]string{"ls", "-q", "--filter", "in-use=true"}, idA[:12] + "\n"},
		{[]string{"ls", "-q", "--filter", "unused=0s"}, idB[:12] + "\n"},
		{[]string{"ls", "-q", "--filter", "unused=7d"}, ""},
		{[]string{"ls", "-q", "--filter", "dependent=job", "--filter", "kind=bundle"}, idA[:12] + "\n"},
	} {
		code, out, errs := depcache(t, root, tc.args...)
		if code != 0 || out != tc.want {
			t.Errorf("%v: exit %d, %q; want %q %s", tc.args, code, out, tc.want, errs)
		}
	}
	_, out, _ = depcache(t, root, "ls", "--filter", "stage=READY", "*/b.txt")
	if !strings.Contains(out, "1 of 2 entries shown") {
		t.Errorf("filtered totals:\n%s", out)
	}
}

// dir prints the root; version and --version the module version, the
// VCS revision when the build has one, and the Go version.
func TestDirAndVersion(t *testing.T) {
	root := t.TempDir()
	if code, out, _ := depcache(t, root, "dir"); code != 0 || out != root+"\n" {
		t.Errorf("dir: exit %d %q", code, out)
	}
	info, err := exec.Command("go", "version", "-m", bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	mod := regexp.MustCompile(`(?m)^\s+mod\s+\S+\s+(\S+)`).FindSubmatch(info)
	if mod == nil {
		t.Fatalf("go version -m: %s", info)
	}
	want := []string{string(mod[1]), runtime.Version()}
	if rev := regexp.MustCompile(`vcs\.revision=(\S+)`).FindSubmatch(info); rev != nil {
		want = append(want, string(rev[1]))
	}
	for _, args := range [][]string{{"version"}, {"--version"}} {
		code, out, _ := depcache(t, root, args...)
		for _, w := range want {
			if code != 0 || !strings.Contains(out, w) {
				t.Errorf("%v: exit %d, %q lacks %q", args, code, out, w)
			}
		}
	}
	_, out, _ := depcache(t, root, "--json", "version")
	var v versionJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil || v.Version != want[0] || v.Go != runtime.Version() {
		t.Errorf("version --json: %v %+v", err, v)
	}
}

// rm refuses a DOWNLOADING entry that a live dependent waits for, naming
// it; one that nobody waits for (no dependent, or only dead ones) is
// removed.
func TestRmRefusesDownloading(t *testing.T) {
	root := t.TempDir()
	s, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	k, err := manager.ParseKey("https://example.invalid/big.tar.gz", "")
	if err != nil {
		t.Fatal(err)
	}
	abandoned, err := manager.ParseKey("https://example.invalid/abandoned.tar.gz", "")
	if err != nil {
		t.Fatal(err)
	}
	procs, err := state.System()
	if err != nil {
		t.Fatal(err)
	}
	self := procs.Self() // this test's process: alive while rm runs
	err = s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: k, Stage: state.Downloading, Generation: 1, Created: time.Now(), LastUsed: time.Now(),
			Dependents: map[string]state.Dependent{"job": {Since: time.Now(), Process: &self}}})
		st.Put(&state.Entry{Key: abandoned, Stage: state.Downloading, Generation: 2, Created: time.Now(), LastUsed: time.Now()})
		st.MaxGeneration = 2
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	code, _, errs := depcache(t, root, "rm", "-y", k.ID())
	if code != 1 || !strings.Contains(errs, "downloading") {
		t.Errorf("rm of a download a live process waits for: exit %d %q", code, errs)
	}
	if readState(t, root).Entries[k.ID()] == nil {
		t.Error("rm removed a download a live process waits for")
	}
	if code, _, errs := depcache(t, root, "rm", "-y", abandoned.ID()); code != 0 {
		t.Errorf("rm of a download nobody waits for: exit %d %q", code, errs)
	}
	if readState(t, root).Entries[abandoned.ID()] != nil {
		t.Error("rm left a download nobody waits for")
	}
}

// get --json describes the dependents as ls --json does: every name in
// dependents has its liveness in dependents_detail, and the entry is
// kept because it is in use.
func TestGetJSONDescribesDependents(t *testing.T) {
	root := t.TempDir()
	if code, _, errs := depcache(t, root, "get", "--dependent", "first", "--ttl", "1h", hello(t)); code != 0 {
		t.Fatalf("get: exit %d %s", code, errs)
	}
	code, out, errs := depcache(t, root, "--json", "get", "--dependent", "second", "--ttl", "1h", hello(t))
	if code != 0 {
		t.Fatalf("get --json: exit %d %s", code, errs)
	}
	var got []struct {
		Dependents []string `json:"dependents"`
		Detail     []struct {
			Name string `json:"name"`
			Live bool   `json:"live"`
		} `json:"dependents_detail"`
		Kept string `json:"kept"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil || len(got) != 1 {
		t.Fatalf("get --json: %v\n%s", err, out)
	}
	e := got[0]
	if len(e.Dependents) != 2 || len(e.Detail) != 2 || e.Detail[0].Name != "first" || e.Detail[1].Name != "second" || !e.Detail[0].Live || !e.Detail[1].Live {
		t.Errorf("get --json: dependents %v, detail %+v; want both, live", e.Dependents, e.Detail)
	}
	if !strings.Contains(e.Kept, "in use") {
		t.Errorf("get --json: kept %q, want in use", e.Kept)
	}
}

// Every command's --help shows examples (the README promises it).
func TestEveryCommandHasExamples(t *testing.T) {
	root := newRoot(&globals{})
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			if sub.Hidden || sub.Name() == "help" || sub.Name() == "completion" {
				continue
			}
			if strings.TrimSpace(sub.Example) == "" {
				t.Errorf("%s has no examples in its --help", sub.CommandPath())
			}
			walk(sub)
		}
	}
	walk(root)
}

// gc --dry-run plans on a snapshot and takes no lock: it runs as a user
// who may read the root but not write it (as ls does), and changes
// nothing.
func TestDryRunOnReadOnlyRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		rigtest.Missing(t, "root, to run the dry run as nobody")
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		rigtest.Missing(t, "setpriv")
	}
	root := filepath.Join(t.TempDir(), "root")
	if code, _, errs := depcache(t, root, "get", "--dependent", "job", hello(t)); code != 0 {
		t.Fatalf("get: exit %d %s", code, errs)
	}
	if code, _, errs := depcache(t, root, "release", "--dependent", "job", hello(t)); code != 0 {
		t.Fatalf("release: exit %d %s", code, errs)
	}
	// Readable by all, writable by root only: the test's temp dirs are 0700.
	for _, d := range []string{root, filepath.Dir(root), filepath.Dir(filepath.Dir(root))} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := os.ReadFile(filepath.Join(root, "state.json"))
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, "--root", root, "--json", "gc", "--dry-run", "--max-size", "1", "--min-age", "0s")
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("gc --dry-run as nobody: %v: %s", err, stderr)
	}
	var rep struct {
		DryRun  bool `json:"dry_run"`
		Victims []struct {
			Source string `json:"source"`
		} `json:"victims"`
	}
	if err := json.Unmarshal(out, &rep); err != nil || !rep.DryRun || len(rep.Victims) != 1 {
		t.Errorf("gc --dry-run as nobody: %s (%v); want the released entry as the one victim", out, err)
	}
	if after, _ := os.ReadFile(filepath.Join(root, "state.json")); !bytes.Equal(before, after) {
		t.Error("the dry run changed state.json")
	}
}

// A bad value that came from a flag's DEPCACHE_* twin names the variable
// as well as the flag.
func TestBadEnvTwinNamed(t *testing.T) {
	root := t.TempDir()
	cmd := exec.Command(bin, "--root", root, "gc", "--dry-run")
	cmd.Env = append(os.Environ(), "DEPCACHE_HIGH_WATERMARK=150")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "DEPCACHE_HIGH_WATERMARK") || !strings.Contains(string(out), "--high-watermark 150") {
		t.Errorf("DEPCACHE_HIGH_WATERMARK=150 gc --dry-run: %v: %s", err, out)
	}
}

// The cleanup pipelines the README and --help show (every example line
// with "ls -q") run as printed: on a root where nothing matches they do
// nothing and exit 0, and a FAILED entry that a dependent still holds is
// left out, not a reason for rm to refuse them all.
func TestCleanupExamplesRunAsPrinted(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	_, examples, _ := strings.Cut(string(readme), "### Examples\n")
	examples, _, _ = strings.Cut(examples, "\n```\n")
	for _, l := range strings.Split(examples, "\n") {
		if strings.Contains(l, "ls -q") {
			lines = append(lines, "README: "+l)
		}
	}
	for _, cmd := range [][]string{{"--help"}, {"rm", "--help"}, {"ls", "--help"}} {
		_, out, _ := depcache(t, t.TempDir(), cmd...)
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "ls -q") || strings.Contains(l, "-q |") {
				lines = append(lines, strings.Join(cmd, " ")+": "+strings.TrimSpace(l))
			}
		}
	}
	if len(lines) < 4 {
		t.Fatalf("found %d example lines with ls -q: %q", len(lines), lines)
	}
	root := t.TempDir()
	held := smallFile(t, "held", "x")
	os.Remove(strings.TrimPrefix(held, "file://"))
	// A FAILED entry a live dependent holds, one nobody holds (its get's
	// process is gone), and a READY one in use.
	for _, args := range [][]string{
		{"get", "--retries", "0", "--dependent", "job", held},
		{"get", "--retries", "0", "file:///nonexistent/depcache-examples"},
	} {
		if code, _, errs := depcache(t, root, args...); code != 1 {
			t.Fatalf("%v: exit %d, %s; want FAILED", args, code, errs)
		}
	}
	if code, _, errs := depcache(t, root, "get", "--dependent", "job", hello(t)); code != 0 {
		t.Fatal(errs)
	}
	env := []string{"PATH=" + filepath.Dir(bin) + ":" + os.Getenv("PATH"), "DEPCACHE_ROOT=" + root}
	for _, l := range lines {
		_, line, _ := strings.Cut(l, ": ")
		sh := exec.Command("sh", "-c", line)
		sh.Env = env
		out, err := sh.CombinedOutput()
		if err != nil {
			t.Errorf("%s: %v\n%s", l, err, out)
		}
	}
	st := readState(t, root)
	if e := st.Entries[mustID(t, held)]; e == nil || e.Stage != state.Failed {
		t.Errorf("the FAILED entry a dependent holds is gone: %v", e)
	}
	if _, ok := st.Entries[mustID(t, "file:///nonexistent/depcache-examples")]; ok {
		t.Error("the FAILED entry nobody holds is still there")
	}
}

// rm's question counts in words: "remove 1 entry", "remove 2 entries".
func TestRmQuestionCounts(t *testing.T) {
	for n, want := range map[int]string{1: "remove 1 entry (1.0 KiB)?", 2: "remove 2 entries (1.0 KiB)?"} {
		if got := removeQuestion(manager.RemoveReport{Removed: make([]manager.Removed, n), Freed: 1024}); got != want {
			t.Errorf("%d: %q, want %q", n, got, want)
		}
	}
}
