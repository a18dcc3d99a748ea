package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/state"
)

// TestE2EVerifyFailedSurvivesRebuild (issue 12, 5): content that verify
// failed (a file changed, a file replaced by a symlink, a file removed)
// stays FAILED through doctor --rebuild, of a corrupt state or a forced
// one, with the reason, because the verdict is recorded next to the
// content; get does not serve it.
func TestE2EVerifyFailedSurvivesRebuild(t *testing.T) {
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	src := "file://" + abs
	for _, tc := range []struct {
		name   string
		tamper func(readme string) error
	}{
		{"changed", func(p string) error { return os.WriteFile(p, []byte("tampered\n"), 0o644) }},
		{"symlink", func(p string) error {
			if err := os.Remove(p); err != nil {
				return err
			}
			return os.Symlink("data/numbers.txt", p)
		}},
		{"missing", os.Remove},
	} {
		for _, force := range []bool{false, true} {
			name := tc.name + "/corrupt-state"
			if force {
				name = tc.name + "/force"
			}
			t.Run(name, func(t *testing.T) {
				root := t.TempDir()
				// A run holds the entry, so its content stays in place
				// after verify fails it (for the run to finish with).
				code, out, errs := depcache(t, root, "get", "--dependent", "run", src)
				if code != 0 {
					t.Fatalf("get: exit %d: %s", code, errs)
				}
				content := strings.TrimSpace(out)
				if err := tc.tamper(filepath.Join(content, "hello", "README.txt")); err != nil {
					t.Fatal(err)
				}
				if code, out, _ := depcache(t, root, "verify"); code != 1 || !strings.Contains(out, "FAILED "+src) {
					t.Fatalf("verify after tampering: exit %d\n%s", code, out)
				}
				var meta struct {
					Failed       bool   `json:"failed"`
					FailedReason string `json:"failed_reason"`
					FailedAt     string `json:"failed_at"`
				}
				mb, err := os.ReadFile(filepath.Join(filepath.Dir(content), "meta.json"))
				if err != nil || json.Unmarshal(mb, &meta) != nil || !meta.Failed || !strings.Contains(meta.FailedReason, "content digest") || meta.FailedAt == "" {
					t.Errorf("verify did not record the failure next to the content (%v):\n%s", err, mb)
				}

				args := []string{"--json", "doctor", "--rebuild"}
				if force {
					args = append(args, "--force")
				} else if err := os.WriteFile(filepath.Join(root, state.StateFile), []byte("{garbage"), 0o644); err != nil {
					t.Fatal(err)
				}
				code, out, errs = depcache(t, root, args...)
				if code != 0 {
					t.Fatalf("doctor --rebuild: exit %d\n%s%s", code, out, errs)
				}
				var rep rebuildReport
				if err := json.Unmarshal([]byte(out), &rep); err != nil {
					t.Errorf("doctor --rebuild --json: %v\n%s", err, out)
				} else if rep.Entries != 1 || len(rep.Failed) != 1 || rep.Failed[0].Key.Source != src || !strings.Contains(rep.Failed[0].Reason, "content digest") {
					t.Errorf("the report does not say the entry was rebuilt FAILED:\n%s", out)
				}
				e := onlyEntry(t, readState(t, root))
				if e.Stage != state.Failed || !strings.HasPrefix(e.Message, "verify: content digest") {
					t.Errorf("after the rebuild: %s %q, want FAILED with verify's reason", e.Stage, e.Message)
				}

				// get fails it (FAILED, exit 1, the reason on stderr) and
				// never prints the tampered content's path.
				code, out, errs = depcache(t, root, "get", "--dependent", "another-run", src)
				if code != 1 || strings.Contains(out, content) || !strings.Contains(errs, "content digest") {
					t.Errorf("get after the rebuild: exit %d, stdout %q, stderr %q; want 1 and the reason", code, out, errs)
				}
				// The content is still there: a FAILED mark deletes nothing
				// that a run may hold.
				if _, err := os.Lstat(filepath.Join(content, "hello")); err != nil {
					t.Errorf("content deleted: %v", err)
				}
			})
		}
	}
}

// An entry whose metadata has no failure fields (written by an older
// depcache) is rebuilt READY, as before.
func TestE2ERebuildOldMetaIsReady(t *testing.T) {
	abs, _ := filepath.Abs("../../testdata/bundles/hello.tar.gz")
	src := "file://" + abs
	root := t.TempDir()
	if code, _, errs := depcache(t, root, "get", "--dependent", "run", src); code != 0 {
		t.Fatal(errs)
	}
	metas, _ := filepath.Glob(filepath.Join(root, "entries", "*", "meta.json"))
	if len(metas) != 1 {
		t.Fatalf("metadata: %v", metas)
	}
	b, _ := os.ReadFile(metas[0])
	if strings.Contains(string(b), "failed") {
		t.Fatalf("a fresh entry's metadata mentions a failure:\n%s", b)
	}
	os.Remove(filepath.Join(root, state.StateFile))
	if code, out, errs := depcache(t, root, "doctor", "--rebuild"); code != 0 || strings.Contains(out, "FAILED") {
		t.Fatalf("doctor --rebuild: exit %d\n%s%s", code, out, errs)
	}
	if e := onlyEntry(t, readState(t, root)); e.Stage != state.Ready {
		t.Errorf("rebuilt %s, want READY", e.Stage)
	}
	if code, out, errs := depcache(t, root, "get", "--dependent", "run2", src); code != 0 || !strings.Contains(out, "content") {
		t.Errorf("get after the rebuild: exit %d %q %q", code, out, errs)
	}
}
