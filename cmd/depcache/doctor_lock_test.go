package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// TestDoctorBreaksANamedLock: doctor --break-lock NAME refuses a live
// holder of the named lock NAME that renews it (watching up to a third of
// its 30 s lease) and breaks a dead one's, as locks --break
// does; without NAME it is the state lock's.
func TestDoctorBreaksANamedLock(t *testing.T) {
	root := t.TempDir()
	ready := filepath.Join(t.TempDir(), "ready")
	holder, _, _ := startBin(t, root, nil, "lock", "cleanup", "--", "sh", "-c", fmt.Sprintf(`touch %q; exec sleep 600`, ready))
	waitFor(t, "the holder's CMD", func() bool { return exists(ready) })
	if code, out, stderr := depcache(t, root, "doctor", "--break-lock", "--yes", "cleanup"); code != exitFailed || !strings.Contains(stderr, "renewed") {
		t.Errorf("doctor --break-lock of a live holder: exit %d: %s %s; want 1, renewed", code, out, stderr)
	}
	if err := holder.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := holder.Wait(); err == nil {
		t.Fatal("the killed holder exited 0")
	}
	// Before it is broken, doctor says who left it.
	if code, out, _ := depcache(t, root, "doctor"); code != 0 || !strings.Contains(out, "named locks") || !strings.Contains(out, `"cleanup" (pid`) {
		t.Errorf("doctor beside a dead holder's named lock: exit %d: %s; want a warning naming it", code, out)
	}
	if code, out, stderr := depcache(t, root, "doctor", "--break-lock", "--yes", "cleanup"); code != 0 || !strings.Contains(out, "broke") {
		t.Errorf("doctor --break-lock of a dead holder: exit %d: %s %s", code, out, stderr)
	}
	if left, err := filepath.Glob(filepath.Join(root, "locks", "*.lock")); err != nil || len(left) != 0 {
		t.Errorf("lock files left: %v %v", left, err)
	}
	if code, out, _ := depcache(t, root, "doctor"); code != 0 || !strings.Contains(out, "ok   named locks") {
		t.Errorf("doctor after the break: exit %d: %s; want the named locks ok", code, out)
	}
	if code, out, _ := depcache(t, root, "doctor", "--break-lock", "--yes"); code != 0 || !strings.Contains(out, "state lock is free") {
		t.Errorf("doctor --break-lock without NAME: exit %d: %s", code, out)
	}
	if code, _, _ := depcache(t, root, "doctor", "cleanup"); code != exitUsage {
		t.Errorf("doctor NAME without --break-lock: exit %d, want 2", code)
	}
}
