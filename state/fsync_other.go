//go:build !linux

package state

// fsyncCoversNewEntry is false where the filesystem cannot be told: the
// directory is fsynced.
func fsyncCoversNewEntry(string) bool { return false }

// isTmpfs is false where the filesystem cannot be told: the spool stays in
// os.TempDir().
func isTmpfs(string) bool { return false }
