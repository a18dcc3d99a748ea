package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/depcache/depcache/state"
)

// depcache runs the built binary on root with the environment cleared of
// DEPCACHE_* settings.
func depcache(t *testing.T, root string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"--root", root}, args...)...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DEPCACHE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), out.String(), errb.String()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0, out.String(), errb.String()
}

// copyRoot copies the root template into a new directory.
func copyRoot(t *testing.T, template string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "root")
	if out, err := exec.Command("cp", "-a", template, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	return dst
}

// holders returns, for each file of root that holds a state that parses,
// the dependents' names of each source.
func holders(t *testing.T, root string) map[string]map[string][]string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, state.StateFile+"*"))
	out := map[string]map[string][]string{}
	for _, f := range files {
		st, err := state.DecodeFile(root, filepath.Base(f))
		if err != nil {
			continue
		}
		deps := map[string][]string{}
		for _, e := range st.Sorted() {
			for name := range e.Dependents {
				deps[e.Key.Source] = append(deps[e.Key.Source], name)
			}
		}
		out[filepath.Base(f)] = deps
	}
	return out
}

// rebuildReport is the part of doctor --rebuild --json the tests read.
type rebuildReport struct {
	Entries int `json:"entries"`
	Failed  []struct {
		Key    state.Key `json:"key"`
		Reason string    `json:"reason"`
	} `json:"failed"`
	Unreadable        string `json:"unreadable_copy"`
	LastState         string `json:"last_state"`
	LastStateCopy     string `json:"last_state_copy"`
	DroppedDependents []struct {
		Key        state.Key `json:"key"`
		Dependents []struct {
			Name    string `json:"name"`
			Process string `json:"process"`
		} `json:"dependents"`
	} `json:"dropped_dependents"`
	DroppedDownloads []struct {
		Key state.Key `json:"key"`
	} `json:"dropped_downloads"`
	DroppedEntries []json.RawMessage `json:"dropped_entries"`
	Policy         struct {
		Carried  bool          `json:"carried"`
		Previous *state.Policy `json:"previous"`
		Rebuilt  state.Policy  `json:"rebuilt"`
	} `json:"policy"`
}

// TestE2ERebuildKeepsTheLastGoodState (issue 12, 4): whatever became of
// state.json (cut short, garbage, empty, missing), doctor --rebuild leaves
// the previous version (state.json.prev) and a copy of it in the root,
// lists the dependents, named and process-bound, and the download in
// flight that it drops, carries the policy over, and says so, in text and
// in --json.
func TestE2ERebuildKeepsTheLastGoodState(t *testing.T) {
	template := t.TempDir()
	abs := func(p string) string { a, _ := filepath.Abs(p); return "file://" + a }
	a, b := abs("../../testdata/bundles/hello.tar.gz"), abs("../../testdata/hostile/README.md")
	never := "http://127.0.0.1:1/never.tar.gz"
	for _, args := range [][]string{
		{"get", "--dependent", "job1", a},
		{"get", "--dependent", "job2", "--ttl", "1h", b},
		{"get", "--no-wait", a}, // bound to that process
		{"policy", "--max-size", "5GiB", "--min-age", "7m"},
		{"get", "--no-wait", "--dependent", "job3", never}, // registered, not driven: in flight
	} {
		if code, out, errs := depcache(t, template, args...); code != 0 {
			t.Fatalf("%v: exit %d\n%s%s", args, code, out, errs)
		}
	}
	good, err := os.ReadFile(filepath.Join(template, state.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	st, err := state.DecodeFile(template, state.StateFile)
	if err != nil {
		t.Fatal(err)
	}
	var anon string
	for name, d := range st.Entries[mustID(t, a)].Dependents {
		if d.Process != nil {
			anon = name
		}
	}
	if anon == "" || st.Policy == nil || st.Policy.MaxSizeBytes != 5<<30 || st.Entries[mustID(t, never)].Stage != state.Downloading {
		t.Fatalf("setup: the good state lacks a process-bound dependent, the policy or the download in flight:\n%s", good)
	}
	wantDeps := map[string][]string{a: {"job1", anon}, b: {"job2"}, never: {"job3"}}

	for _, tc := range []struct {
		name    string
		corrupt []byte // nil: the file is removed
	}{
		{"truncated", good[:len(good)*2/3]},
		{"garbage", []byte("\x89PNG\r\n\x1a\n not a state at all")},
		{"empty", []byte{}},
		{"missing", nil},
	} {
		for _, asJSON := range []bool{false, true} {
			name := tc.name + "/text"
			if asJSON {
				name = tc.name + "/json"
			}
			t.Run(name, func(t *testing.T) {
				root := copyRoot(t, template)
				sf := filepath.Join(root, state.StateFile)
				if err := os.WriteFile(sf+state.PrevSuffix, good, 0o644); err != nil {
					t.Fatal(err)
				}
				if tc.corrupt == nil {
					os.Remove(sf)
				} else if err := os.WriteFile(sf, tc.corrupt, 0o644); err != nil {
					t.Fatal(err)
				}
				args := []string{"doctor", "--rebuild"}
				if asJSON {
					args = append([]string{"--json"}, args...)
				}
				code, out, errs := depcache(t, root, args...)
				if code != 0 {
					t.Fatalf("doctor --rebuild: exit %d\n%s%s", code, out, errs)
				}

				// The previous version is still there, unchanged.
				if prev, _ := os.ReadFile(sf + state.PrevSuffix); !bytes.Equal(prev, good) {
					t.Errorf("state.json.prev was replaced by:\n%q", prev)
				}
				if asJSON {
					var rep rebuildReport
					if err := json.Unmarshal([]byte(out), &rep); err != nil {
						t.Fatalf("doctor --rebuild --json: %v\n%s", err, out)
					}
					for _, field := range []string{`"failed": []`, `"dropped_entries": []`} {
						if !strings.Contains(out, field) {
							t.Errorf("--json lacks %s:\n%s", field, out)
						}
					}
					if rep.Entries != 2 || rep.LastState != sf+state.PrevSuffix || rep.LastStateCopy == "" {
						t.Errorf("entries %d, last state %q (copy %q); want 2 and %s", rep.Entries, rep.LastState, rep.LastStateCopy, sf+state.PrevSuffix)
					}
					if (tc.corrupt == nil) != (rep.Unreadable == "") {
						t.Errorf("unreadable copy %q", rep.Unreadable)
					}
					got := map[string][]string{}
					for _, d := range rep.DroppedDependents {
						for _, dep := range d.Dependents {
							got[d.Key.Source] = append(got[d.Key.Source], dep.Name)
							if (dep.Name == anon) != (dep.Process != "") {
								t.Errorf("dependent %s: process %q", dep.Name, dep.Process)
							}
						}
					}
					for src, names := range wantDeps {
						if strings.Join(got[src], ",") != strings.Join(sorted(names), ",") {
							t.Errorf("dropped dependents of %s: %v, want %v", src, got[src], sorted(names))
						}
					}
					if len(rep.DroppedDownloads) != 1 || rep.DroppedDownloads[0].Key.Source != never {
						t.Errorf("dropped downloads: %+v, want %s", rep.DroppedDownloads, never)
					}
					if !rep.Policy.Carried || rep.Policy.Previous == nil || rep.Policy.Rebuilt.MaxSizeBytes != 5<<30 || rep.Policy.Rebuilt.MinAge != st.Policy.MinAge {
						t.Errorf("policy: %+v, want %+v carried over", rep.Policy, st.Policy)
					}
				} else {
					for _, want := range []string{"from 2 published entries", "job1", "job2", "job3", anon, "download in flight: " + never, "policy: carried over", sf + state.PrevSuffix} {
						if !strings.Contains(out, want) {
							t.Errorf("the report lacks %q:\n%s", want, out)
						}
					}
				}
				if st := readState(t, root); st.Policy == nil || st.Policy.MaxSizeBytes != 5<<30 {
					t.Errorf("the rebuilt state's policy: %+v, want max-size 5GiB carried over", st.Policy)
				}
				if code, out, errs := depcache(t, root, "policy"); code != 0 || !strings.Contains(out, "5.0 GiB") {
					t.Errorf("policy after the rebuild: exit %d\n%s%s", code, out, errs)
				}

				// Later commits replace state.json.prev; the copy of the
				// last good state stays.
				for _, dep := range []string{"again1", "again2"} {
					if code, _, errs := depcache(t, root, "get", "--dependent", dep, a); code != 0 {
						t.Fatalf("get after the rebuild: %s", errs)
					}
				}
				kept := false
				for f, deps := range holders(t, root) {
					ok := true
					for src, names := range wantDeps {
						ok = ok && strings.Join(sorted(deps[src]), ",") == strings.Join(sorted(names), ",")
					}
					if ok && f != state.StateFile {
						kept = true
					}
				}
				if !kept {
					t.Errorf("no file under the root holds the old dependents any more: %v", holders(t, root))
				}
			})
		}
	}
}

func sorted(s []string) []string { return slices.Sorted(slices.Values(s)) }

// TestE2ERebuildAfterADamagedShard: a shard that state.json and its
// previous version both name is damaged, so neither parses whole. doctor
// --rebuild still reports, from the shards that read, the dependents it
// drops, names the shard that did not read and says its contents are
// unknown, in text and in --json (unread_shards).
func TestE2ERebuildAfterADamagedShard(t *testing.T) {
	template := t.TempDir()
	// Two sources in different shards (a key ID's first byte).
	var a, b string
	var ka state.Key
	for _, f := range []string{"../../testdata/bundles/hello.tar.gz", "../../testdata/hostile/README.md", "../../testdata/hostile/gen.py", "../../testdata/hostile/gen_zip.py"} {
		abs, _ := filepath.Abs(f)
		k := state.Key{Kind: state.Bundle, Source: "file://" + abs}
		switch {
		case a == "":
			a, ka = k.Source, k
		case b == "" && k.ID()[:2] != ka.ID()[:2]:
			b = k.Source
		}
	}
	for _, args := range [][]string{{"get", "--dependent", "job-a", a}, {"get", "--dependent", "job-b", b}} {
		if code, out, errs := depcache(t, template, args...); code != 0 {
			t.Fatalf("%v: exit %d\n%s%s", args, code, out, errs)
		}
	}
	shardFile := func(name string) string {
		raw, err := os.ReadFile(filepath.Join(template, name))
		if err != nil {
			t.Fatal(err)
		}
		var man struct {
			Shards map[string]struct {
				File string `json:"file"`
			} `json:"shards"`
		}
		if err := json.Unmarshal(raw, &man); err != nil {
			t.Fatal(err)
		}
		return man.Shards[ka.ID()[:2]].File
	}
	f := shardFile(state.StateFile)
	if f == "" || f != shardFile(state.StateFile+state.PrevSuffix) {
		t.Fatalf("a's shard file %q is not named by both state.json and state.json.prev", f)
	}
	if err := os.WriteFile(filepath.Join(template, state.ShardDir, f), []byte("{damaged"), 0o644); err != nil {
		t.Fatal(err)
	}
	prefix := ka.ID()[:2]

	root := copyRoot(t, template)
	code, out, errs := depcache(t, root, "doctor", "--rebuild")
	if code != 0 {
		t.Fatalf("doctor --rebuild: exit %d\n%s%s", code, out, errs)
	}
	for _, want := range []string{"rebuilt the state from 2 published entries", "shard " + prefix + " did not read", "what it held is unknown", "dependents of " + b + ": job-b"} {
		if !strings.Contains(out, want) {
			t.Errorf("doctor --rebuild does not say %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "nothing: no dependents") {
		t.Errorf("doctor --rebuild says nothing was dropped:\n%s", out)
	}

	root = copyRoot(t, template)
	code, out, errs = depcache(t, root, "--json", "doctor", "--rebuild")
	var rep struct {
		rebuildReport
		UnreadShards []state.UnreadShard `json:"unread_shards"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != 0 {
		t.Fatalf("doctor --rebuild --json: exit %d, %v\n%s%s", code, err, out, errs)
	}
	if len(rep.UnreadShards) != 1 || rep.UnreadShards[0].Shard != prefix || rep.UnreadShards[0].From != "" || !strings.HasSuffix(rep.UnreadShards[0].File, f) {
		t.Errorf("unread_shards %+v, want shard %s (%s) with no other version", rep.UnreadShards, prefix, f)
	}
	if len(rep.DroppedDependents) != 1 || rep.DroppedDependents[0].Key.Source != b {
		t.Errorf("dropped_dependents %+v, want b's", rep.DroppedDependents)
	}
	if rep.LastState != filepath.Join(root, state.StateFile) {
		t.Errorf("last_state %q, want state.json", rep.LastState)
	}
}
