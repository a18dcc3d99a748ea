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
	f, err := os.Open(p)
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
// directories.
func DirectoryHint(dir string) string {
	dir = filepath.Clean(dir)
	parent, base := filepath.Dir(dir), filepath.Base(dir)
	return fmt.Sprintf("%s is a directory; depcache fetches files and unpacks archives: make it a bundle with 'tar -czf %s.tar.gz -C %s %s' and get file://%s.tar.gz",
		dir, dir, parent, base, dir)
}
