package state

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/dustin/go-humanize"
	"golang.org/x/sys/unix"
)

// ReserveFile is the file of the root that holds the disk reserve: space
// taken while the filesystem has room, and given up when a commit that
// would free space (an eviction, a removal) meets a full disk. Without it,
// a disk filled to the last byte by anything could not be freed by
// depcache: the lock and every commit write a file first.
const ReserveFile = "state.reserve"

// DefaultReserve is the size of the reserve when Options.Reserve is 0:
// room for the lock's files and for a commit of a few changed entries
// (their deltas and the manifest) at 100,000 entries.
const DefaultReserve = 8 << 20

// reserveTemp is the prefix of the temporary file a reserve is allocated
// in before its rename; the litter of a process killed meanwhile is
// deleted by a later holder (see collectLitter).
const reserveTemp = ReserveFile + ".tmp-"

// Reserver is the optional interface of a Backend whose commits take space
// on the cache's own filesystem (the file store). Its callers are the
// commits that free space: on an error wrapping syscall.ENOSPC, they give
// up the reserve and try once more; once content is deleted, they keep a
// reserve again.
type Reserver interface {
	// ReleaseReserve deletes the reserve and returns how many bytes that
	// freed: 0 when there was none.
	ReleaseReserve(ctx context.Context) (int64, error)
	// KeepReserve makes the reserve when it is missing and the
	// filesystem has room for it twice over, so that the reserve never
	// takes the last of the space. A reserve that is there stays as it
	// is, whatever its size: processes with other sizes do not replace
	// each other's.
	KeepReserve(ctx context.Context) error
}

var _ Reserver = (*Store)(nil)

func (s *Store) reserveSize() int64 {
	switch {
	case s.opts.Reserve < 0:
		return 0
	case s.opts.Reserve == 0:
		return DefaultReserve
	}
	return s.opts.Reserve
}

// ReleaseReserve implements Reserver.
func (s *Store) ReleaseReserve(ctx context.Context) (int64, error) {
	p := filepath.Join(s.root, ReserveFile)
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("state %s: the disk reserve: %w", s.path, err)
	}
	if err := CheckLayout(s.root, nil, []string{ReserveFile}); err != nil {
		return 0, err // never a directory of someone's
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("state %s: giving up the disk reserve: %w", s.path, err)
	}
	return allocated(fi), nil
}

// KeepReserve implements Reserver.
func (s *Store) KeepReserve(ctx context.Context) error {
	want := s.reserveSize()
	if want == 0 {
		return nil
	}
	p := filepath.Join(s.root, ReserveFile)
	if _, err := os.Lstat(p); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state %s: the disk reserve: %w", s.path, err)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(s.root, &sfs); err == nil && int64(sfs.Bavail)*int64(sfs.Bsize) < 2*want {
		return nil // no room: the next sweep that frees some tries again
	}
	tmp := filepath.Join(s.root, fmt.Sprintf("%s%08x", reserveTemp, s.nonce32()))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, s.opts.Perms.File)
	if err != nil {
		return reserveErr(s, err)
	}
	err = f.Chmod(s.opts.Perms.File) // past the umask: a shared root's group must give it up too
	if err == nil {
		err = allocate(f, want)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return reserveErr(s, err)
	}
	return nil
}

// reserveErr is nil for a filesystem with no room (the reserve waits for
// the next sweep), else err named.
func reserveErr(s *Store, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return nil
	}
	return fmt.Errorf("state %s: making the disk reserve: %w", s.path, err)
}

// allocate gives f size bytes of disk: fallocate(2) where the filesystem
// has it, else written zeros (sshfs, older NFS), which take the same space
// on every filesystem that does not compress.
func allocate(f *os.File, size int64) error {
	err := fallocate(f, size)
	if err == nil || !(errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS)) {
		return err
	}
	zeros := make([]byte, 1<<20)
	for left := size; left > 0; {
		n := min(left, int64(len(zeros)))
		if _, err := f.Write(zeros[:n]); err != nil {
			return err
		}
		left -= n
	}
	return f.Sync() // some servers allocate only at the flush
}

// allocated returns the bytes the file takes on disk (its blocks), its
// size where the system does not say.
func allocated(fi fs.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blocks > 0 {
		return st.Blocks * 512
	}
	return fi.Size()
}

// reserveCheck reports on the disk reserve, for doctor.
func (s *Store) reserveCheck() Check {
	const name = "disk reserve"
	p := filepath.Join(s.root, ReserveFile)
	fi, err := os.Lstat(p)
	switch {
	case err == nil && fi.Mode().IsRegular():
		return Check{Name: name, Status: "ok", Detail: fmt.Sprintf("%s held in %s, given up so that gc and rm can commit on a full disk", humanize.IBytes(uint64(allocated(fi))), p)}
	case err == nil:
		return Check{Name: name, Status: "fail", Detail: fmt.Sprintf("%s is %s, not a regular file: %v (move it away)", p, describeType(fi.Mode()), ErrLayout)}
	case !errors.Is(err, fs.ErrNotExist):
		return Check{Name: name, Status: "warn", Detail: fmt.Sprintf("cannot look at %s: %v", p, err)}
	}
	want := s.reserveSize()
	if want == 0 {
		return Check{Name: name, Status: "ok", Detail: "none (--disk-reserve 0): on a full disk, gc and rm cannot commit"}
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(s.root, &sfs); err == nil && int64(sfs.Bavail)*int64(sfs.Bsize) < 2*want {
		return Check{Name: name, Status: "warn", Detail: fmt.Sprintf("none, and %s free is too little to make one of %s (it takes twice its size): on a full disk, gc and rm cannot commit; free space by other means",
			humanize.IBytes(uint64(sfs.Bavail)*uint64(sfs.Bsize)), humanize.IBytes(uint64(want)))}
	}
	return Check{Name: name, Status: "ok", Detail: fmt.Sprintf("none yet: one of %s is made at the next get, or when gc or rm frees space", humanize.IBytes(uint64(want)))}
}
