package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
)

// schema is the subset of JSON Schema that testdata/schema uses: type (a
// name or a list), enum, required, properties, additionalProperties (false
// or a schema), items, and $ref to "#/$defs/NAME".
type schema struct {
	Type                 any                `json:"type"`
	Enum                 []any              `json:"enum"`
	Required             []string           `json:"required"`
	Properties           map[string]*schema `json:"properties"`
	AdditionalProperties json.RawMessage    `json:"additionalProperties"`
	Items                *schema            `json:"items"`
	Ref                  string             `json:"$ref"`
	Defs                 map[string]*schema `json:"$defs"`
}

func loadSchema(t *testing.T, name string) *schema {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "schema", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var s schema
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("schema %s: %v", name, err)
	}
	return &s
}

func jsonType(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	case json.Number:
		if !strings.ContainsAny(x.String(), ".eE") {
			return "integer"
		}
		return "number"
	}
	return fmt.Sprintf("%T", v)
}

// validate returns every place where v does not follow s (root holds the
// $defs).
func validate(root, s *schema, v any, at string) []string {
	if s.Ref != "" {
		def, ok := root.Defs[strings.TrimPrefix(s.Ref, "#/$defs/")]
		if !ok {
			return []string{at + ": unknown $ref " + s.Ref}
		}
		s = def
	}
	var errs []string
	got := jsonType(v)
	if s.Type != nil {
		var want []string
		switch t := s.Type.(type) {
		case string:
			want = []string{t}
		case []any:
			for _, x := range t {
				want = append(want, x.(string))
			}
		}
		if !slices.Contains(want, got) && !(got == "integer" && slices.Contains(want, "number")) {
			return []string{fmt.Sprintf("%s: %s, want %v", at, got, want)}
		}
	}
	if s.Enum != nil {
		if !slices.ContainsFunc(s.Enum, func(e any) bool { return fmt.Sprint(e) == fmt.Sprint(v) }) {
			errs = append(errs, fmt.Sprintf("%s: %v not in %v", at, v, s.Enum))
		}
	}
	switch x := v.(type) {
	case map[string]any:
		for _, r := range s.Required {
			if _, ok := x[r]; !ok {
				errs = append(errs, fmt.Sprintf("%s: missing %q", at, r))
			}
		}
		names := make([]string, 0, len(x))
		for k := range x {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			if p, ok := s.Properties[k]; ok {
				errs = append(errs, validate(root, p, x[k], at+"."+k)...)
				continue
			}
			switch ap := strings.TrimSpace(string(s.AdditionalProperties)); {
			case ap == "false":
				errs = append(errs, fmt.Sprintf("%s: unexpected property %q", at, k))
			case strings.HasPrefix(ap, "{"):
				var sub schema
				if err := json.Unmarshal([]byte(ap), &sub); err != nil {
					return append(errs, at+": bad additionalProperties")
				}
				errs = append(errs, validate(root, &sub, x[k], at+"."+k)...)
			}
		}
	case []any:
		if s.Items != nil {
			for i, e := range x {
				errs = append(errs, validate(root, s.Items, e, fmt.Sprintf("%s[%d]", at, i))...)
			}
		}
	}
	return errs
}

// checkSchema validates out, one JSON document, against testdata/schema/NAME.json.
func checkSchema(t *testing.T, name, out string) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(out))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Errorf("%s: output is not JSON: %v\n%s", name, err, out)
		return
	}
	if dec.More() {
		t.Errorf("%s: more than one JSON document:\n%s", name, out)
	}
	s := loadSchema(t, name)
	for _, e := range validate(s, s, v, "$") {
		t.Errorf("%s: %s", name, e)
	}
}

// The validator itself rejects what the schemas are there to catch.
func TestSchemaValidator(t *testing.T) {
	s := loadSchema(t, "gc")
	for _, tc := range []struct{ doc, want string }{
		{`{"DryRun": true}`, `unexpected property "DryRun"`},
		{`{"dry_run": true, "victims": null, "freed_bytes": 0, "reaped": {}, "usage_bytes": 0, "usage_after_bytes": 0, "budget_bytes": 0, "disk_free_bytes": 0, "disk_size_bytes": 0}`, "$.victims: null, want [array]"},
		{`{"dry_run": "yes"}`, "$.dry_run: string"},
		{`{}`, `missing "victims"`},
	} {
		dec := json.NewDecoder(strings.NewReader(tc.doc))
		dec.UseNumber()
		var v any
		dec.Decode(&v)
		errs := strings.Join(validate(s, s, v, "$"), "\n")
		if !strings.Contains(errs, tc.want) {
			t.Errorf("%s: errors %q, want %q", tc.doc, errs, tc.want)
		}
	}
	e := loadSchema(t, "ls")
	var v any
	json.Unmarshal([]byte(`[{"stage": "DONE"}]`), &v)
	if errs := strings.Join(validate(e, e, v, "$"), "\n"); !strings.Contains(errs, "DONE not in") || !strings.Contains(errs, `missing "key"`) {
		t.Errorf("ls schema through $ref: %q", errs)
	}
}

// TestJSONOutputsFollowTheirSchemas runs every command the built binary
// has with --json, on a root with a READY entry, a FAILED one and a
// dependent, and validates each output against testdata/schema/. Lists
// must be [] (the schemas say "array": null fails), and our own objects
// carry no field the schema does not name.
func TestJSONOutputsFollowTheirSchemas(t *testing.T) {
	root := t.TempDir()
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	ok, other := "file://"+abs, "file://"+filepath.Join(t.TempDir(), "other")
	os.WriteFile(strings.TrimPrefix(other, "file://"), []byte("other\n"), 0o644)
	missing := "file:///nonexistent/depcache-schema"
	run := func(name string, wantCode int, args ...string) string {
		t.Helper()
		code, out, errs := depcache(t, root, append([]string{"--json"}, args...)...)
		if code != wantCode {
			t.Fatalf("%v: exit %d, want %d\n%s%s", args, code, wantCode, out, errs)
		}
		if name != "" {
			checkSchema(t, name, out)
		}
		if code != 0 {
			checkSchema(t, "error", errs)
		} else if errs != "" {
			t.Errorf("%v: stderr %q on success", args, errs)
		}
		return out
	}
	run("policy", 0, "policy") // the defaults: no budget, no max age, no pins
	run("get", 0, "get", "--dependent", "job", ok)
	run("get", 0, "get", "--dependent", "job2", other)
	run("get", 1, "get", "--retries", "0", "--failure-cooldown", "1h", missing)
	run("ls", 0, "ls")
	run("ls", 0, "ls", "--filter", "stage=FAILED")
	var ids []string
	if err := json.Unmarshal([]byte(run("ls-quiet", 0, "ls", "-q")), &ids); err != nil || len(ids) != 3 {
		t.Errorf("ls -q --json: %v, %d IDs; want the 3 entries' IDs", err, len(ids))
	}
	for _, id := range ids {
		if !isIDPrefix(id) || len(id) != 32 {
			t.Errorf("ls -q --json: %q is no full key ID", id)
		}
	}
	run("verify", 0, "verify", ok)
	run("verify", 1, "verify", missing) // FAILED already
	run("doctor", 0, "doctor")
	run("release", 0, "release", "--dependent", "job2", other)
	run("release", 0, "release", "--ignore-missing", "--dependent", "job2", other)
	run("gc", 0, "gc", "--dry-run", "--max-size", "1", "--min-age", "0s")
	run("rm", 0, "rm", "--dry-run", other)
	run("rm", 0, "rm", "-y", other)
	run("gc", 0, "gc", "--max-size", "1", "--min-age", "0s")
	run("version", 0, "version")
	run("dir", 0, "dir")
	// Errors: usage, not found, in use.
	run("", 2, "ls", "--filter", "colour=red")
	run("", 1, "rm", "-y", ok)
	run("", 1, "release", "--dependent", "job", missing+"-never")
	run("policy", 0, "policy", "set", "--pin", "file:///nonexistent/*", "--max-size", "1GiB")
	run("policy", 0, "policy")
	// locks: none, one held, broken once its holder is gone, then free.
	if out := run("locks", 0, "locks"); strings.TrimSpace(out) != "[]" {
		t.Errorf("locks --json with none held: %q, want []", out)
	}
	ready := filepath.Join(t.TempDir(), "ready")
	holder, _, _ := startBin(t, root, nil, "lock", "schema-lock", "--", "sh", "-c", fmt.Sprintf(`touch %q; exec sleep 600`, ready))
	waitFor(t, "the holder's CMD", func() bool { return exists(ready) })
	if out := run("locks", 0, "locks"); !strings.Contains(out, `"name": "schema-lock"`) {
		t.Errorf("locks --json does not list the held lock:\n%s", out)
	}
	holder.Process.Kill()
	holder.Wait()
	for _, want := range []string{`"broken": true`, `"held": false`} {
		// With --yes, stdout has the outcome alone, and stderr nothing.
		code, out, errs := depcache(t, root, "--json", "locks", "--break", "schema-lock", "--yes")
		if code != 0 || !strings.Contains(out, want) || errs != "" {
			t.Errorf("locks --break --json: exit %d, %s %s; want %s", code, out, errs, want)
		}
		checkSchema(t, "locks-break", out)
	}
	// doctor --break-lock of the state lock prints the same object.
	if code, out, errs := depcache(t, root, "--json", "doctor", "--break-lock", "--yes"); code != 0 || !strings.Contains(out, `"name": ""`) || errs != "" {
		t.Errorf("doctor --break-lock --json: exit %d, %s %s", code, out, errs)
	} else {
		checkSchema(t, "locks-break", out)
	}
	// serve's /v1/entries is ls --json's array, under a schema of its own
	// whose entry is ls's.
	addr, serve := startServe(t, root)
	resp, err := http.Get(addr + "/v1/entries")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/v1/entries: %d %v\n%s", resp.StatusCode, err, body)
	}
	checkSchema(t, "entries", string(body))
	stopServe(t, serve)
	if a, b := loadSchema(t, "entries").Defs["entry"], loadSchema(t, "ls").Defs["entry"]; !reflect.DeepEqual(a, b) {
		t.Error("testdata/schema/entries.json's entry differs from ls.json's: /v1/entries is the array of ls --json")
	}
	run("doctor-rebuild", 0, "doctor", "--rebuild", "--force")
}
