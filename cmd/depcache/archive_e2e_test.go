package main

import (
	"archive/zip"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// A directory is refused with how to make it a bundle; an archive-named
// file that is no archive is kept with one warning; --no-unpack keeps an
// archive as a file, in another entry than the unpacked one; a .zip is
// unpacked.
func TestArchivesFirstDay(t *testing.T) {
	root := t.TempDir()
	dir := t.TempDir()
	code, _, errs := cli(t, root, "get", "file://"+dir)
	if code != 2 || !strings.Contains(errs, "tar -czf "+dir+".tar.gz -C "+filepath.Dir(dir)+" "+filepath.Base(dir)) {
		t.Errorf("get of a directory: exit %d, %q; want 2 and the tar command", code, errs)
	}

	fake := filepath.Join(dir, "notes.tar.gz")
	os.WriteFile(fake, []byte("just text\n"), 0o644)
	code, out, errs := cli(t, root, "get", "file://"+fake)
	if code != 0 || strings.Count(errs, "is named like a tar archive but its content is not one") != 1 {
		t.Errorf("a .tar.gz that is text: exit %d, stderr %q; want 0 and one warning", code, errs)
	}
	if b, err := os.ReadFile(strings.TrimSpace(out)); err != nil || string(b) != "just text\n" {
		t.Errorf("the text was not kept as a file: %q %v", b, err)
	}

	src := helloSource(t)
	_, unpacked, _ := cli(t, root, "get", "--dependent", "a", src)
	code, kept, errs := cli(t, root, "get", "--dependent", "b", "--no-unpack", src)
	if code != 0 {
		t.Fatalf("--no-unpack: exit %d, %s", code, errs)
	}
	if fi, err := os.Stat(strings.TrimSpace(unpacked)); err != nil || !fi.IsDir() {
		t.Errorf("default get: %v %v, want a directory", fi, err)
	}
	if fileSum(t, strings.TrimSpace(kept)) != fileSum(t, strings.TrimPrefix(src, "file://")) {
		t.Error("--no-unpack did not keep the archive's bytes")
	}
	st := readState(t, root)
	def, _ := manager.ParseKey(src, "")
	if st.Entries[def.ID()] == nil || st.Entries[(state.Key{Kind: state.Bundle, Source: src}).ID()] == nil {
		t.Error("the default entry is not under its old key ID")
	}
	if k, _ := manager.KeepPacked(def); st.Entries[k.ID()] == nil || len(st.Entries) != 3 {
		t.Errorf("want the kept copy as its own entry: %d entries", len(st.Entries))
	}
	// The kept copy goes by the source ls shows for it, in every command.
	shown := src + "#no-unpack"
	if code, out, errs := cli(t, root, "ls", "-q", shown); code != 0 || strings.Count(strings.TrimSpace(out), "\n") != 0 || strings.TrimSpace(out) == "" {
		t.Errorf("ls %s: exit %d, %q %s; want the kept copy alone", shown, code, out, errs)
	}
	if code, again, errs := cli(t, root, "get", "--dependent", "c", shown); code != 0 || again != kept {
		t.Errorf("get %s: exit %d, %q %s; want the kept copy %q", shown, code, again, errs, kept)
	}
	for _, dep := range []string{"b", "c"} {
		if code, _, errs := cli(t, root, "release", "--dependent", dep, shown); code != 0 {
			t.Errorf("release --dependent %s %s: exit %d, %s", dep, shown, code, errs)
		}
	}

	var zb bytes.Buffer
	zw := zip.NewWriter(&zb)
	w, _ := zw.Create("docs/readme.txt")
	io.WriteString(w, "zipped\n")
	zw.Close()
	zp := filepath.Join(dir, "docs.zip")
	os.WriteFile(zp, zb.Bytes(), 0o644)
	code, out, errs = cli(t, root, "get", "file://"+zp)
	if code != 0 {
		t.Fatalf("get of a .zip: exit %d, %s", code, errs)
	}
	if b, err := os.ReadFile(filepath.Join(strings.TrimSpace(out), "docs", "readme.txt")); err != nil || string(b) != "zipped\n" {
		t.Errorf("the zip was not unpacked: %q %v", b, err)
	}
}

// The command a directory's refusal suggests is one shell line that works
// as printed, for a path with a space and a quote too; the root directory
// gets a template, not 'tar -czf /.tar.gz -C / /'.
func TestDirectoryHintIsShellQuoted(t *testing.T) {
	root := t.TempDir()
	parent := t.TempDir()
	dir := filepath.Join(parent, "my data's")
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "f.txt"), []byte("in a dir\n"), 0o644)
	code, _, errs := depcache(t, root, "get", "file://"+dir)
	_, line, ok := strings.Cut(strings.TrimSpace(errs), "and get that: ")
	if code != 2 || !ok {
		t.Fatalf("get of a directory: exit %d, %q; want 2 and a command line", code, errs)
	}
	// Run the line as a shell would, with depcache standing for a function
	// that hands back the source it was given.
	sh := exec.Command("sh", "-c", `depcache() { printf '%s' "$2"; }; `+line)
	sh.Dir = t.TempDir()
	src, err := sh.Output()
	if err != nil {
		t.Fatalf("%s: %v", line, err)
	}
	if want := "file://" + dir + ".tar.gz"; string(src) != want {
		t.Errorf("%s: gets %q, want %q", line, src, want)
	}
	code, out, errs := depcache(t, root, "get", string(src))
	if b, err := os.ReadFile(filepath.Join(strings.TrimSpace(out), "my data's", "sub", "f.txt")); code != 0 || err != nil || string(b) != "in a dir\n" {
		t.Errorf("get %s: exit %d, %s %s; %q %v", src, code, out, errs, b, err)
	}

	code, _, errs = depcache(t, root, "get", "file:///")
	if code != 2 || strings.Contains(errs, "/.tar.gz") || strings.Contains(errs, "-C / /") || !strings.Contains(errs, "tar -czf") {
		t.Errorf("get file:///: exit %d, %q; want 2 and a tar template", code, errs)
	}
}

// A file named like an archive that is not one is kept with a warning: one
// human line on stderr at the default log level, for the get that fetched
// it and for a later one; in get --json, in "warnings" (stderr stays
// empty). Other gets have "warnings": [].
func TestNotAnArchiveWarnsInOneLine(t *testing.T) {
	root := t.TempDir()
	fake := smallFile(t, "notes.tar.gz", "just text\n")
	want := "depcache: warning: " + fake + " is named like a tar archive but its content is not one: it is kept as a file\n"
	for _, dep := range []string{"first", "second"} {
		code, out, errs := depcache(t, root, "get", "--dependent", dep, fake)
		if code != 0 || errs != want {
			t.Errorf("get (%s): exit %d, %s, stderr %q; want %q", dep, code, out, errs, want)
		}
	}
	code, out, errs := depcache(t, root, "--json", "get", "--dependent", "third", fake)
	var got []struct {
		Warnings []string `json:"warnings"`
	}
	if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || len(got) != 1 || len(got[0].Warnings) != 1 ||
		got[0].Warnings[0] != strings.TrimSuffix(strings.TrimPrefix(want, "depcache: warning: "), "\n") || errs != "" {
		t.Errorf("get --json: exit %d, %v, %s, stderr %q; want the warning in warnings", code, err, out, errs)
	}
	checkSchema(t, "get", out)
	// --log-format json: one JSON record, for the get that fetched it and
	// for a later one.
	other := smallFile(t, "more.tgz", "more text\n")
	for _, dep := range []string{"first", "second"} {
		code, _, errs := depcache(t, root, "--log-format", "json", "get", "--dependent", dep, other)
		var rec struct{ Level, Msg, Source string }
		if err := json.Unmarshal([]byte(errs), &rec); code != 0 || err != nil || strings.Count(errs, "\n") != 1 || rec.Level != "warning" || rec.Source != other ||
			!strings.HasPrefix(rec.Msg, other+" is named like a tar archive") {
			t.Errorf("--log-format json get (%s): exit %d, %v, stderr %q; want one warning record", dep, code, err, errs)
		}
	}
	if code, out, errs := depcache(t, root, "--json", "get", "--dependent", "d", hello(t)); code != 0 || !strings.Contains(out, `"warnings": []`) {
		t.Errorf("get --json of an archive: exit %d, %s %s; want \"warnings\": []", code, out, errs)
	}
}
