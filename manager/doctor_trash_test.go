package manager_test

import (
	"context"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestDoctorSaysContentWaitsInTrash: a READY entry whose content an
// interrupted sweep (of an older depcache, which moved before committing)
// left in trash/ is reported as missing and waiting there, not only as
// missing.
func TestDoctorSaysContentWaitsInTrash(t *testing.T) {
	root := t.TempDir()
	key := state.Key{Kind: state.Bundle, Source: "https://example.com/in-trash"}
	name := key.ID() + "-g1"
	held := filepath.Join(root, "trash", "oldmanager", name)
	if err := os.MkdirAll(held, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(held, "content"), []byte("still needed"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: key, Stage: state.Ready, Path: filepath.Join("entries", name, "content"), SizeBytes: 12})
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	m, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	var detail string
	for _, c := range m.Doctor(context.Background()) {
		if c.Name == "content" && c.Status == "fail" {
			detail = c.Detail
		}
	}
	if want := filepath.Join("trash", "oldmanager", name); !strings.Contains(detail, "waiting in "+want) {
		t.Errorf("doctor's content check: %q, want it to say the content waits in %s", detail, want)
	}
}

// TestDoctorReportsTrash: doctor says what trash/ holds, directory by
// directory, and who deletes it; it warns about what nobody ever will (a
// note that does not parse, a file planted in trash/), and changes nothing.
func TestDoctorReportsTrash(t *testing.T) {
	root := t.TempDir()
	machine := &fakeMachine{dead: map[int]bool{20: true}}
	m, err := manager.New(manager.Config{Root: root, Log: quietLog(), Processes: fakeProc{m: machine, self: fakeProcess("h", 11)}})
	if err != nil {
		t.Fatal(err)
	}
	trashCheck := func() manager.Check {
		t.Helper()
		var got []manager.Check
		for _, c := range m.Doctor(context.Background()) {
			if c.Name == "trash" {
				got = append(got, c)
			}
		}
		if len(got) != 1 {
			t.Fatalf("trash checks: %+v, want one", got)
		}
		return got[0]
	}
	if c := trashCheck(); c.Status != "ok" || c.Detail != "empty" {
		t.Errorf("no trash: %+v, want ok, empty", c)
	}
	note := func(p state.Process) []byte {
		b, _ := json.Marshal(map[string]state.Owner{"owner": {Process: p, ManagerID: "m"}})
		return b
	}
	mk := func(id string, note []byte, age time.Duration) string { return makeTrashDir(t, root, id, note, age) }
	mk("live", note(fakeProcess("h", 12)), 0)
	mk("dead", note(fakeProcess("h", 20)), 0)
	mk("elsewhere", note(fakeProcess("other", 20)), 0)
	mk("elsewhere-old", note(fakeProcess("gone", 30)), 2*time.Hour) // its host died: nothing adopts it
	mk("cut-old", []byte{}, 11*time.Minute)
	mk("cut-new", nil, time.Minute)
	mk("garbled", []byte("{not json"), 0)
	if err := os.MkdirAll(filepath.Join(root, "trash", "emptied"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "trash", "planted"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	before := trashFiles(t, root)
	c := trashCheck()
	if c.Status != "warn" {
		t.Errorf("status %q, want warn (a note that does not parse, a planted file)", c.Status)
	}
	for _, want := range []string{
		"6.8 KiB of evicted content",
		"live: 1 item(s), 1000 B, of pid 12 on h, which deletes it",
		"dead: 1 item(s), 1000 B, of pid 20 on h, which is gone: the next sweep here adopts",
		"elsewhere: 1 item(s), 1000 B, of pid 20 on other on another host, which deletes it",
		"elsewhere-old: 1 item(s), 1000 B, of pid 30 on gone on another host, unchanged for over 1h0m0s: if that host died or rebooted, no command deletes it; remove " + filepath.Join(root, "trash", "elsewhere-old") + " by hand",
		"cut-old: 1 item(s), 1000 B, with no owner note (a full disk cut it short): the next sweep adopts",
		"cut-new: 1 item(s), 1000 B, with no owner note yet",
		"garbled: 1 item(s), 1000 B, whose owner note does not parse: left alone",
		"planted: not a directory",
	} {
		if !strings.Contains(c.Detail, want) {
			t.Errorf("trash check does not say %q:\n%s", want, c.Detail)
		}
	}
	if strings.Contains(c.Detail, "emptied") {
		t.Errorf("an empty directory is reported: %s", c.Detail)
	}
	if after := trashFiles(t, root); strings.Join(after, "\n") != strings.Join(before, "\n") {
		t.Errorf("doctor changed trash/:\nbefore %v\nafter  %v", before, after)
	}
}

// trashFiles lists every path under root/trash.
func trashFiles(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(filepath.Join(root, "trash"), func(p string, d fs.DirEntry, err error) error {
		out = append(out, p)
		return nil
	})
	return out
}

// TestDoctorOrphanWithUnreadableMeta: content that no entry names and
// whose meta.json does not parse is not said to be moved aside at
// start-up (reconcile leaves it in place): doctor names it, and the
// metadata, as what a rebuild cannot name. An orphan with good metadata
// is still said to be moved aside.
func TestDoctorOrphanWithUnreadableMeta(t *testing.T) {
	root := t.TempDir()
	s, err := state.Open(root, state.Options{Lock: state.LockOptions{Log: quietLog()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		st.Put(&state.Entry{Key: state.Key{Kind: state.Bundle, Source: "https://example.com/other"}, Stage: state.Downloading})
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	bad := state.Key{Kind: state.Bundle, Source: "https://example.com/bad-meta"}.ID() + "-g3"
	good := state.Key{Kind: state.Bundle, Source: "https://example.com/good-meta"}.ID() + "-g4"
	for name, meta := range map[string]string{bad: `{"source":`, good: `{}`} {
		dir := filepath.Join(root, "entries", name)
		if err := os.MkdirAll(filepath.Join(dir, "content"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "meta.json"), []byte(meta), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m, err := manager.New(manager.Config{Root: root, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	var said []string
	for _, c := range m.Doctor(context.Background()) {
		if c.Name == "orphans" {
			said = append(said, c.Detail)
		}
	}
	all := strings.Join(said, "\n")
	var movedAside, unreadable string
	for _, d := range said {
		if strings.Contains(d, "start-up moves it aside") {
			movedAside = d
		}
		if strings.Contains(d, "metadata cannot be read") {
			unreadable = d
		}
	}
	if strings.Contains(movedAside, bad) || !strings.Contains(unreadable, bad) || !strings.Contains(unreadable, "meta.json") {
		t.Errorf("doctor's orphans checks for content with unreadable metadata:\n%s", all)
	}
	if !strings.Contains(movedAside, good) {
		t.Errorf("doctor's orphans checks for an orphan with good metadata:\n%s", all)
	}
}
