package state

import (
	"fmt"
	"io"
	"io/fs"

	"golang.org/x/sys/unix"
)

// readFile is os.ReadFile for the small files that waiters read on every
// poll (the lock, its turn marker, /proc/PID/stat, a proposal). os.Open
// offers every file to the runtime's poller, which costs four system calls
// more than the read itself (two fcntl, an epoll_ctl that a regular file
// refuses, an fstat): with eight processes polling one lock, that was a
// tenth of their CPU. The reads here block the thread, as os's reads of
// regular files do anyway. Errors are *fs.PathError like os's, so
// errors.Is(err, fs.ErrNotExist) holds for a missing file.
func readFile(name string) ([]byte, error) {
	return readFileFlags(name, 0, 0)
}

// readFileFlags is readFile with extra open flags (O_NOFOLLOW, O_NONBLOCK),
// and, when limit > 0, an error for a file of more than limit bytes.
func readFileFlags(name string, flags int, limit int) ([]byte, error) {
	var fd int
	var err error
	for {
		fd, err = unix.Open(name, unix.O_RDONLY|unix.O_CLOEXEC|flags, 0)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	defer unix.Close(fd)
	b := make([]byte, 0, 512)
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := unix.Read(fd, b[len(b):cap(b)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: name, Err: err}
		}
		if n == 0 {
			return b, nil
		}
		b = b[:len(b)+n]
		if limit > 0 && len(b) > limit {
			return nil, fmt.Errorf("%s: over %d bytes", name, limit)
		}
	}
}

// writeNew creates name, which must not exist, private to this user, and
// writes b to it: os.WriteFile without the poller's system calls (see
// readFile), for the proposals a waiter posts.
func writeNew(name string, b []byte) error {
	var fd int
	var err error
	for {
		fd, err = unix.Open(name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return &fs.PathError{Op: "open", Path: name, Err: err}
	}
	for len(b) > 0 && err == nil {
		var n int
		n, err = unix.Write(fd, b)
		if err == unix.EINTR {
			err = nil
		} else if err == nil && n == 0 {
			err = io.ErrShortWrite
		}
		b = b[max(n, 0):]
	}
	if err != nil {
		unix.Close(fd)
		return &fs.PathError{Op: "write", Path: name, Err: err}
	}
	// On Linux, close closes the descriptor even when it fails with EINTR.
	if err := unix.Close(fd); err != nil && err != unix.EINTR {
		return &fs.PathError{Op: "close", Path: name, Err: err}
	}
	return nil
}
