package state

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
)

// Perms are the modes of what depcache creates in a root. A creation whose
// umask stripped bits is followed by a chmod, so that the umask cannot
// strip the group bits of a shared root. On the state's hot path the check
// stops once a file came out right (see modeCheck): a process that tightens
// its umask after that gets the tighter modes for its state files.
type Perms struct {
	Dir  fs.FileMode
	File fs.FileMode
}

// DefaultPerms is for a root used by one user: 0755 and 0644.
func DefaultPerms() Perms { return Perms{Dir: 0o755, File: 0o644} }

// GroupPerms is for a root shared by the users of one group (as CodaLab
// workers share theirs): directories 2770 (new files inherit the group),
// files 0660. Others get nothing.
func GroupPerms() Perms { return Perms{Dir: 0o770 | fs.ModeSetgid, File: 0o660} }

// MkdirAll creates dir and its missing parents, giving each directory it
// creates its mode. Existing directories are left alone: another member of
// the group may own them, and only the owner may change a mode.
func (p Perms) MkdirAll(dir string) error {
	if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
		return nil
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := p.MkdirAll(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, p.Dir.Perm()); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil // made meanwhile by someone else
		}
		return err
	}
	return os.Chmod(dir, p.Dir)
}

// WriteFile writes a small file and gives it its mode.
func (p Perms) WriteFile(name string, data []byte) error {
	if err := os.WriteFile(name, data, p.File); err != nil {
		return err
	}
	return os.Chmod(name, p.File)
}

// modeCheck gives the files a store or a lock creates in one directory on
// the hot path their mode. A chmod past the umask is one more round trip
// to the file server per file (0.65 ms on the sshfs rig, three files per
// commit), so it is skipped once a file came out of its create with the
// mode asked for: what strips bits (this process's umask, the directory's
// default ACL, or on sshfs the file server's umask) does not strip these.
// An embedder that tightens its process's umask later gets files of the
// tighter mode from then on.
type modeCheck struct{ ok atomic.Bool }

// give gives f, just created with the permission bits perm, exactly those.
func (c *modeCheck) give(f *os.File, perm fs.FileMode) error {
	if c.ok.Load() {
		return nil
	}
	if fi, err := f.Stat(); err == nil && perm&^fs.ModePerm == 0 && fi.Mode()&^fs.ModeType == perm {
		c.ok.Store(true)
		return nil
	}
	return f.Chmod(perm)
}
