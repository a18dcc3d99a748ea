package state

import (
	"os"
	"testing"
)

// The directory of a new shard is not fsynced only on filesystems known to
// make a new file's name durable with its fsync; anything else is.
func TestFsyncCoversNewEntry(t *testing.T) {
	dir := t.TempDir()
	typ := mountType(dir)
	if typ == "" {
		t.Fatalf("no mount found for %s in /proc/self/mounts", dir)
	}
	want := map[string]bool{"ext4": true, "ext3": true, "xfs": true, "btrfs": true, "tmpfs": true, "nfs": true, "nfs4": true, "fuse.sshfs": true}[typ]
	if got := fsyncCoversNewEntry(dir); got != want {
		t.Errorf("%s (%s): %v, want %v", dir, typ, got, want)
	}
	if fsyncCoversNewEntry(dir + "/missing") {
		t.Error("a directory that cannot be looked at counts as covered")
	}
	if m := os.Getenv("SHAREDFS_MNT1"); m != "" && !fsyncCoversNewEntry(m) {
		t.Errorf("sshfs mount %s not covered", m)
	}
}
