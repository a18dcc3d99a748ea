// Package rigtest finds the test rigs of ../shared/rigs (shared filesystem,
// Docker engine, disk full, fake hosts) for integration tests. A test that
// needs a rig that is not running skips on a developer's machine and fails
// under CI=true, where .ci/run has started every rig.
package rigtest

import (
	"errors"
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

// FullRoot makes a cache root in parent and names its filler, a file in
// fill that FillUp writes; both are removed when t ends. parent and fill
// are on the filesystem to fill, through two paths on the sshfs rig (a
// mount, and the server's own directory).
func FullRoot(t testing.TB, parent, fill string) (root, filler string) {
	t.Helper()
	root, err := os.MkdirTemp(parent, "full-")
	if err != nil {
		t.Fatal(err)
	}
	filler = Filler(root, fill)
	t.Cleanup(func() {
		os.Remove(filler)
		os.RemoveAll(root)
	})
	return root, filler
}

// Filler is the name of the filler of root in the directory fill.
func Filler(root, fill string) string { return filepath.Join(fill, "filler-"+filepath.Base(root)) }

// FillUp appends to filler until its filesystem has no byte left, and
// fails t unless the write met ENOSPC and nothing is free after it.
func FillUp(t testing.TB, filler string) {
	t.Helper()
	f, err := os.OpenFile(filler, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.Write(make([]byte, FreeBytes(t, filepath.Dir(filler))+1<<20))
	f.Close()
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling the disk: %v, want ENOSPC", err)
	}
	if free := FreeBytes(t, filepath.Dir(filler)); free != 0 {
		t.Fatalf("%d bytes free after the filler", free)
	}
}

// FreeBytes returns the bytes of dir's filesystem that an unprivileged
// writer may still take.
func FreeBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatalf("statfs %s: %v", dir, err)
	}
	return int64(st.Bavail) * st.Bsize
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
