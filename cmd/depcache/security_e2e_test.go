package main

import (
	"bytes"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/rigtest"
)

// user is a uid and its groups, as a separate person on a shared machine.
type user struct {
	name   string
	uid    uint32
	gid    uint32
	groups []uint32
}

const sharedGID = 4711

// TestE2EGroupSharedTwoUsers: two users who share a group share a
// --group-shared root: each registers on the other's entries, downloads
// into it, reads the other's content and evicts it; a third user outside
// the group is refused with a clear error and changes nothing.
func TestE2EGroupSharedTwoUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		rigtest.Missing(t, "root, to run processes as other users")
	}
	alice := user{"alice", 4701, sharedGID, nil}
	bob := user{"bob", 4702, 4802, []uint32{sharedGID}}
	eve := user{"eve", 4703, 4803, nil}

	// Everything the users touch lies outside the tests' 0700 temporary
	// directories: a world-readable copy of the binary, a sticky parent for
	// the root.
	base, err := os.MkdirTemp("", "depcache-users-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	parent := filepath.Join(base, "parent")
	if err := os.Mkdir(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	for dir, mode := range map[string]fs.FileMode{base: 0o755, parent: 0o1777} {
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
	}
	exe := filepath.Join(base, "depcache")
	copyFile(t, bin, exe, 0o755)
	root := filepath.Join(parent, "cache")

	bodyA, bodyB := randomBody(1<<20), randomBody(2<<20)
	bodyB[0] ^= 0xff // randomBody is seeded: make the two differ
	srvA, srvB := newBlobServer(t, bodyA, nil), newBlobServer(t, bodyB, nil)
	urlA, urlB := srvA.URL+"/a", srvB.URL+"/b"

	run := func(u user, args ...string) (string, error) {
		t.Helper()
		cmd := exec.Command(exe, append([]string{"--root", root, "--group-shared"}, args...)...)
		cmd.Env = []string{"HOME=" + base, "PATH=/usr/bin:/bin"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: u.groups}}
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		return out.String(), err
	}
	must := func(u user, args ...string) string {
		t.Helper()
		out, err := run(u, args...)
		if err != nil {
			t.Fatalf("%s: depcache %s: %v\n%s", u.name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(out)
	}

	pathA := must(alice, "get", "--dependent", "job-a", urlA)
	if got := must(bob, "get", "--dependent", "job-b", urlA); got != pathA {
		t.Fatalf("bob got %s for the bundle alice fetched at %s", got, pathA)
	}
	pathB := must(bob, "get", "--dependent", "job-b2", urlB)
	if srvA.requests.Load() != 1 || srvB.requests.Load() != 1 {
		t.Errorf("downloads %d and %d, want 1 each", srvA.requests.Load(), srvB.requests.Load())
	}
	if fileSum(t, pathB) != hexSum(bodyB) || fileSum(t, pathA) != hexSum(bodyA) {
		t.Fatal("content does not verify")
	}
	checkGroupModes(t, root)

	// eve is outside the group: refused, by name, with nothing changed.
	before, err := os.ReadFile(filepath.Join(root, state.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"get", "--dependent", "job-e", urlA}, {"ls"}} {
		out, err := run(eve, args...)
		if err == nil || !strings.Contains(out, "permission denied") || strings.Contains(out, "corrupt") {
			t.Errorf("eve: depcache %s: %v, want a permission error naming it:\n%s", args[0], err, out)
		}
	}
	after, _ := os.ReadFile(filepath.Join(root, state.StateFile))
	if !bytes.Equal(before, after) {
		t.Error("a refused user changed the state")
	}

	// Each evicts what the other fetched.
	must(alice, "release", "--dependent", "job-a", urlA)
	must(bob, "release", "--dependent", "job-b", urlA)
	must(bob, "release", "--dependent", "job-b2", urlB)
	must(alice, "gc", "--max-size", "1", "--min-age", "0s", "--set-policy")
	if st := readState(t, root); len(st.Entries) != 0 {
		t.Errorf("%d entries left after alice's gc evicted bob's download", len(st.Entries))
	}
	for _, p := range []string{pathA, pathB} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still there after eviction: %v", p, err)
		}
	}
	trash, _ := os.ReadDir(filepath.Join(root, "trash"))
	for _, d := range trash {
		left, _ := os.ReadDir(filepath.Join(root, "trash", d.Name()))
		for _, l := range left {
			if l.Name() != "owner.json" { // the trash's owner, kept by design
				t.Errorf("trash/%s/%s left behind: another user's content not deleted", d.Name(), l.Name())
			}
		}
	}
	if out := must(bob, "doctor"); strings.Contains(strings.ToLower(out), "fail") {
		t.Errorf("doctor as bob after the exchange:\n%s", out)
	}
}

// checkGroupModes: every directory of a group-shared root is 2770 and every
// file at least 0660 with nothing for others, all in the shared group.
func checkGroupModes(t *testing.T, root string) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		rel, _ := filepath.Rel(root, p)
		if st.Gid != sharedGID {
			t.Errorf("%s: group %d, want %d", rel, st.Gid, sharedGID)
		}
		switch perm := fi.Mode() & (fs.ModePerm | fs.ModeSetgid); {
		case fi.IsDir() && perm != 0o770|fs.ModeSetgid:
			t.Errorf("%s: directory mode %v, want drwxrws---", rel, fi.Mode())
		case fi.Mode().IsRegular() && (perm&0o660 != 0o660 || perm&0o007 != 0):
			t.Errorf("%s: file mode %v, want group read-write and nothing for others", rel, fi.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string, mode fs.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
