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
// taken while the filesystem has room, and given up in parts when a commit
// that frees space or lets it be freed (an eviction, a removal, a release)
// meets a full disk. Without it, a disk filled to the last byte by anything
// could not be freed by depcache: the lock and every commit write a file
// first.
const ReserveFile = "state.reserve"

// DefaultReserve is the size of the reserve when Options.Reserve is 0:
// room for the lock's files and for a commit of a few changed entries
// (their deltas and the manifest) at 100,000 entries, in each of its
// quarters.
const DefaultReserve = 8 << 20

// Reserver is the optional interface of a Backend whose commits take space
// on the cache's own filesystem (the file store). Its callers are the
// commits that free space or let it be freed (a removal, an evicting
// sweep, a release): on an error that DiskFull reports, they give up part
// of the reserve and try again, while there is some; once content is
// deleted, they keep the reserve whole again.
type Reserver interface {
	// ReleaseReserve gives up part of the reserve, a quarter of it (all
	// of a small one), so that several commits in a row can be made on
	// a full disk: the release of a run's dependent, then the removal
	// of its entry. It returns how many bytes that freed: 0 when there
	// was no reserve left.
	ReleaseReserve(ctx context.Context) (int64, error)
	// KeepReserve makes the reserve, or grows it back to its size, when
	// the filesystem has room for what it adds twice over, so that the
	// reserve never takes the last of the space. A reserve larger than
	// this store's size stays as it is: processes with other sizes do
	// not shrink each other's.
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

// reservePage is the unit the reserve shrinks by: no smaller part is worth
// a commit's retry.
const reservePage = 4 << 10

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
	before := allocated(fi)
	part := (fi.Size()/4 + reservePage - 1) / reservePage * reservePage
	if left := fi.Size() - part; left < reservePage {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return 0, fmt.Errorf("state %s: giving up the disk reserve: %w", s.path, err)
		}
		return max(before, fi.Size()), nil
	} else if err := os.Truncate(p, left); err != nil {
		return 0, fmt.Errorf("state %s: giving up part of the disk reserve: %w", s.path, err)
	}
	if fi, err = os.Lstat(p); err == nil && before-allocated(fi) > 0 {
		return before - allocated(fi), nil
	}
	// A part that was a hole, blocks counted late (ZFS), or the file
	// given up meanwhile by another process: the size went down, so the
	// caller goes on.
	return part, nil
}

// KeepReserve implements Reserver.
func (s *Store) KeepReserve(ctx context.Context) error {
	want := s.reserveSize()
	if want == 0 {
		return nil
	}
	p := filepath.Join(s.root, ReserveFile)
	var have, size int64
	if fi, err := os.Lstat(p); err == nil {
		if !fi.Mode().IsRegular() {
			return nil // a directory in its way is doctor's to report
		}
		// By its blocks: a part given up may have left a hole below its
		// size, which a size check would never fill.
		have, size = min(allocated(fi), fi.Size()), fi.Size()
		if have >= want {
			return nil
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state %s: the disk reserve: %w", s.path, err)
	}
	if free, ok := freeSpace(s.root); ok && free < 2*(want-have) {
		return nil // no room: the next sweep that frees some tries again
	}
	// Made in place, never through a temporary file: processes that
	// start together allocate one reserve between them, not one each,
	// and one killed meanwhile leaves a smaller reserve, not litter.
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|syscall.O_NOFOLLOW, s.opts.Perms.File)
	if err != nil {
		return reserveErr(s, err)
	}
	if size == 0 {
		err = f.Chmod(s.opts.Perms.File) // past the umask: a shared root's group must give it up too
	}
	if err == nil {
		err = allocate(f, size, want)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return reserveErr(s, err)
}

// reserveErr is nil for nil and for a filesystem with no room (the
// reserve waits for the next sweep), else err named.
func reserveErr(s *Store, err error) error {
	if err == nil || DiskFull(s.root, err) {
		return nil
	}
	return fmt.Errorf("state %s: making the disk reserve: %w", s.path, err)
}

// DiskFull reports whether err is what a write to dir's full filesystem
// returns: ENOSPC, EDQUOT (a quota, which the reserve counts against too),
// or EIO while statfs shows less than 64 KiB free, which is how sshfs
// passes on the server's ENOSPC.
func DiskFull(dir string, err error) bool {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return true
	case errors.Is(err, syscall.EIO):
		free, ok := freeSpace(dir)
		return ok && free < fullBelow
	}
	return false
}

// freeSpace returns the bytes an unprivileged writer may still use on
// dir's filesystem, and false when statfs cannot tell.
func freeSpace(dir string) (int64, bool) {
	var sfs unix.Statfs_t
	if unix.Statfs(dir, &sfs) != nil || sfs.Blocks == 0 {
		return 0, false
	}
	return int64(sfs.Bavail) * int64(sfs.Bsize), true
}

// fullBelow is the free space under which a filesystem that says EIO is
// taken to be full: less than a commit of a few entries needs.
const fullBelow = 64 << 10

// allocate gives f the disk blocks of its first want bytes: fallocate(2)
// of them all where the filesystem has it (which also fills holes), else
// zeros written from size, the file's length (sshfs, older NFS): they take
// the same space on every filesystem that does not compress.
func allocate(f *os.File, size, want int64) error {
	err := fallocateFunc(f, 0, want)
	if err == nil || !(errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS)) {
		return err
	}
	zeros := make([]byte, 1<<20)
	for off := size; off < want; {
		w, err := f.WriteAt(zeros[:min(want-off, int64(len(zeros)))], off)
		if err != nil {
			return err
		}
		off += int64(w)
	}
	return f.Sync() // some servers allocate only at the flush
}

// fallocateFunc is fallocate, or in tests one that is not supported.
var fallocateFunc = fallocate

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
		return Check{Name: name, Status: "ok", Detail: fmt.Sprintf("%s held in %s, given up in parts so that release, rm and gc can commit on a full disk", humanize.IBytes(uint64(allocated(fi))), p)}
	case err == nil:
		return Check{Name: name, Status: "fail", Detail: fmt.Sprintf("%s is %s, not a regular file: %v (move it away)", p, describeType(fi.Mode()), ErrLayout)}
	case !errors.Is(err, fs.ErrNotExist):
		return Check{Name: name, Status: "warn", Detail: fmt.Sprintf("cannot look at %s: %v", p, err)}
	}
	want := s.reserveSize()
	if want == 0 {
		return Check{Name: name, Status: "ok", Detail: "none (--disk-reserve 0): on a full disk, gc and rm cannot commit"}
	}
	if free, ok := freeSpace(s.root); ok && free < 2*want {
		return Check{Name: name, Status: "warn", Detail: fmt.Sprintf("none, and %s free is too little to make one of %s (it takes twice its size): on a full disk, gc and rm cannot commit; free space by other means",
			humanize.IBytes(uint64(free)), humanize.IBytes(uint64(want)))}
	}
	return Check{Name: name, Status: "ok", Detail: fmt.Sprintf("none yet: one of %s is made at the next get, or when gc or rm frees space", humanize.IBytes(uint64(want)))}
}
