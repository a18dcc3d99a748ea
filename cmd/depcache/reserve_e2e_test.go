package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
)

// TestCLIRmOnAFullDisk: on a disk filled to its last byte by another
// program, `depcache rm` and `depcache gc` free an entry through the disk
// reserve, and ls then shows none; the reserve is there again afterwards.
func TestCLIRmOnAFullDisk(t *testing.T) {
	for _, free := range [][]string{{"rm", "-y", ""}, {"gc", "--max-size", "1", "--min-age", "0s"}} {
		t.Run(free[0], func(t *testing.T) { testCLIFreeOnAFullDisk(t, free) })
	}
}

func testCLIFreeOnAFullDisk(t *testing.T, free []string) {
	dir := rigtest.DiskFull(t)
	root, filler := rigtest.FullRoot(t, dir, dir)
	src := filepath.Join(t.TempDir(), "one-mib")
	if err := os.WriteFile(src, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	reserve := []string{"--disk-reserve", "256KiB"}
	if code, _, stderr := depcache(t, root, append(reserve, "get", "file://"+src)...); code != 0 {
		t.Fatalf("get: exit %d: %s", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(root, state.ReserveFile)); err != nil {
		t.Fatalf("no disk reserve after the first get: %v", err)
	}
	rigtest.FillUp(t, filler)
	args := append([]string{}, free...)
	if args[len(args)-1] == "" {
		args[len(args)-1] = "file://" + src
	}
	code, _, stderr := depcache(t, root, append(reserve, args...)...)
	if code != 0 || !strings.Contains(stderr, "gave up the disk reserve") {
		t.Fatalf("%s on a full disk: exit %d, stderr %q; want 0 and a warning of the reserve given up", free[0], code, stderr)
	}
	if code, out, stderr := depcache(t, root, "ls", "-q"); code != 0 || out != "" {
		t.Fatalf("ls after %s: exit %d, %q, %s", free[0], code, out, stderr)
	}
	if _, err := os.Stat(filepath.Join(root, state.ReserveFile)); err != nil {
		t.Errorf("the disk reserve was not made again once 1 MiB was freed: %v", err)
	}
	if code, out, _ := depcache(t, root, append(reserve, "doctor")...); !strings.Contains(out, "disk reserve") {
		t.Errorf("doctor (exit %d) has no disk reserve line:\n%s", code, out)
	}
}

// TestCLIGetOnAFullDisk: a get of a cached entry on a full disk exits 1
// with --json kind disk_full and says to free space, and leaves the reserve
// to the release and the removal that need it; both then go through.
func TestCLIGetOnAFullDisk(t *testing.T) {
	dir := rigtest.DiskFull(t)
	root, filler := rigtest.FullRoot(t, dir, dir)
	src := filepath.Join(t.TempDir(), "one-mib")
	if err := os.WriteFile(src, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	reserve := []string{"--disk-reserve", "256KiB"}
	if code, _, stderr := depcache(t, root, append(reserve, "get", "--dependent", "a", "file://"+src)...); code != 0 {
		t.Fatalf("get: exit %d: %s", code, stderr)
	}
	rigtest.FillUp(t, filler)
	code, _, stderr := depcache(t, root, append(reserve, "--json", "get", "--dependent", "b", "file://"+src)...)
	var e errorJSON
	if err := json.Unmarshal([]byte(stderr), &e); err != nil || code != 1 || e.Kind != "disk_full" || !strings.Contains(e.Error, "free space") {
		t.Fatalf("get --json on a full disk: exit %d, %q (%v); want exit 1, kind disk_full, saying to free space", code, stderr, err)
	}
	checkSchema(t, "error", stderr)
	// A named lock's files are on the full disk too.
	code, _, stderr = depcache(t, root, "--json", "lock", "job", "--", "true")
	if err := json.Unmarshal([]byte(stderr), &e); err != nil || code != 1 || e.Kind != "disk_full" {
		t.Fatalf("lock --json on a full disk: exit %d, %q (%v); want exit 1, kind disk_full", code, stderr, err)
	}
	if code, _, stderr := depcache(t, root, append(reserve, "release", "--dependent", "a", "file://"+src)...); code != 0 {
		t.Fatalf("release on the full disk after the refused get: exit %d: %s", code, stderr)
	}
	if code, _, stderr := depcache(t, root, append(reserve, "rm", "-y", "file://"+src)...); code != 0 {
		t.Fatalf("rm on the full disk after the release: exit %d: %s", code, stderr)
	}
}

// A --disk-reserve out of range exits 2 naming it.
func TestCLIDiskReserveFlag(t *testing.T) {
	for _, v := range []string{"2GiB", "-1", "lots"} {
		code, _, stderr := depcache(t, t.TempDir(), "--disk-reserve", v, "ls")
		if code != exitUsage || !strings.Contains(stderr, "--disk-reserve") {
			t.Errorf("--disk-reserve %s: exit %d, stderr %q; want exit 2 naming the flag", v, code, stderr)
		}
	}
	root := t.TempDir()
	if code, _, stderr := depcache(t, root, "--disk-reserve", "0", "get", "file:///etc/hostname"); code != 0 {
		t.Fatalf("get with --disk-reserve 0: exit %d: %s", code, stderr)
	}
	if _, err := os.Lstat(filepath.Join(root, state.ReserveFile)); !os.IsNotExist(err) {
		t.Errorf("--disk-reserve 0 made a reserve: %v", err)
	}
}
