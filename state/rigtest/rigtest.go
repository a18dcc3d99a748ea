// Package rigtest finds the test rigs of ../shared/rigs (shared filesystem,
// Docker engine, disk full, fake hosts) for integration tests. A test that
// needs a rig that is not running skips on a developer's machine and fails
// under CI=true, where .ci/run has started every rig.
package rigtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// InCI reports whether the tests run under CI=true.
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing skips t, or fails it under CI, because what is missing.
func Missing(t testing.TB, what string) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true but %s; .ci/run must start it", what)
	}
	t.Skipf("skipping: %s (start the rigs of ../shared/rigs, see .ci/run)", what)
}

// Env returns the environment variable name, which a rig sets.
func Env(t testing.TB, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		Missing(t, name+" is not set")
	}
	return v
}

// SharedFS returns two mounts of one export of the sshfs rig.
func SharedFS(t testing.TB) (mnt1, mnt2 string) {
	t.Helper()
	mnt1, mnt2 = Env(t, "SHAREDFS_MNT1"), Env(t, "SHAREDFS_MNT2")
	for _, m := range []string{mnt1, mnt2} {
		if _, err := os.Stat(m); err != nil {
			Missing(t, "shared filesystem mount "+m+" is not usable: "+err.Error())
		}
	}
	return mnt1, mnt2
}

// DiskFull returns the directory of the disk-full rig, held for t alone
// until it ends: tests of several packages fill that one filesystem, and
// each needs to know what is free. The hold is an flock(2) of a file in
// the rig, so it spans the test binaries that go test runs at once.
func DiskFull(t testing.TB) string {
	t.Helper()
	dir := Env(t, "DISKFULL_DIR")
	f, err := os.OpenFile(filepath.Join(dir, ".rigtest-hold"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatalf("disk-full rig %s: %v", dir, err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		t.Fatalf("disk-full rig %s: flock: %v", dir, err)
	}
	t.Cleanup(func() { f.Close() }) // closing drops the flock
	return dir
}

// Dir returns the rigs directory: $DEPCACHE_RIGS, else ../shared/rigs next to
// the module root.
func Dir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("DEPCACHE_RIGS"); d != "" {
		return d
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	mod := string(out[:len(out)-1])
	return filepath.Join(filepath.Dir(mod), "..", "shared", "rigs")
}

// FakeHost returns the command that runs argv as if on a separate host
// named name (its own PID and UTS namespace). pid, when non-zero, is the
// pid argv gets inside that host.
func FakeHost(t testing.TB, name string, pid int, argv ...string) *exec.Cmd {
	t.Helper()
	script := filepath.Join(Dir(t), "fakehost.sh")
	if _, err := os.Stat(script); err != nil {
		Missing(t, "fakehost.sh not found at "+script)
	}
	if os.Geteuid() != 0 {
		Missing(t, "fake hosts need root")
	}
	cmd := exec.Command("bash", append([]string{script, name}, argv...)...)
	cmd.Env = os.Environ()
	if pid != 0 {
		cmd.Env = append(cmd.Env, "FAKEHOST_PID="+strconv.Itoa(pid))
	}
	return cmd
}

// Chromium returns the Chromium binary that browser tests drive headless:
// $DEPCACHE_CHROMIUM when set, else Debian's /usr/bin/chromium, else
// chromium or chromium-browser on PATH. None found is Missing: .ci/run
// installs Debian's chromium package.
func Chromium(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("DEPCACHE_CHROMIUM"); p != "" {
		if _, err := os.Stat(p); err != nil {
			Missing(t, "DEPCACHE_CHROMIUM="+p+" is not usable: "+err.Error())
		}
		return p
	}
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	Missing(t, "no Chromium found (/usr/bin/chromium, or chromium on PATH; apt-get install chromium)")
	return ""
}
