package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// FileSource reads file:// sources from the local filesystem.
func FileSource() Source { return fileSource{} }

type fileSource struct{}

func (f fileSource) Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) error {
	return f.FetchRange(ctx, src, ResumeFrom{}, w, func(s RangeStart) error {
		total(s.Total)
		return nil
	})
}

// FetchRange resumes at from.Offset when the file still has the size and
// the modification time (to the nanosecond) of from.Validator.
func (fileSource) FetchRange(ctx context.Context, src string, from ResumeFrom, w io.Writer, start func(RangeStart) error) error {
	p := strings.TrimPrefix(src, "file://")
	// Only a regular file is opened: an open of a FIFO would wait, deaf to
	// ctx, for a writer that may never come (and keep the process from
	// exiting), and a device's open may act. O_NONBLOCK covers a swap
	// between the stat and the open (the type is checked again on the
	// open file); it changes nothing for a regular file.
	if fi, err := os.Stat(p); err == nil && fi.IsDir() {
		return fmt.Errorf("%s: %w", DirectoryHint(p), ErrPermanent)
	} else if err == nil && !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file: %w", p, ErrPermanent)
	}
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("%w: %w", ErrPermanent, err)
		}
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s: %w", DirectoryHint(p), ErrPermanent)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file: %w", p, ErrPermanent)
	}
	got := RangeStart{Total: fi.Size(), Validator: Validator{LastModified: fi.ModTime().UTC().Format(time.RFC3339Nano), Length: fi.Size()}}
	if from.Offset > 0 && from.Offset < fi.Size() && from.Validator.Strong() && got.Validator.names(from.Validator) {
		if _, err := f.Seek(from.Offset, io.SeekStart); err != nil {
			return err
		}
		got.Offset = from.Offset
	}
	if err := start(got); err != nil {
		return err
	}
	_, err = io.Copy(w, ctxReader{ctx, f})
	return err
}

// ctxReader stops a copy when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// DirectoryHint says that dir is a directory and how to make it a bundle:
// depcache fetches files and archives, and unpacks archives into
// directories. What follows "and get that: " is one shell command line,
// quoted for sh, that makes the bundle beside dir and gets it; for the
// root directory, a template to fill in.
func DirectoryHint(dir string) string {
	dir = filepath.Clean(dir)
	parent, base := filepath.Dir(dir), filepath.Base(dir)
	if dir == parent {
		// "/": no parent to put it beside, no name to give it.
		return fmt.Sprintf("%s is the root directory; depcache fetches files and unpacks archives: make a bundle of the directory you need, and get that: tar -czf /PATH/NAME.tar.gz -C PARENT NAME && depcache get file:///PATH/NAME.tar.gz", dir)
	}
	return fmt.Sprintf("%s is a directory; depcache fetches files and unpacks archives: make it a bundle, and get that: tar -czf %s -C %s %s && depcache get %s",
		dir, shellQuote(dir+".tar.gz"), shellQuote(parent), shellQuote(base), shellQuote("file://"+dir+".tar.gz"))
}

// shellQuote quotes s for a POSIX shell: as it is when it holds only
// characters no shell treats specially, else in single quotes, each single
// quote inside ending the quotes, escaped, and opening them again.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
