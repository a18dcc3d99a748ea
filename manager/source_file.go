package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
)

// FileSource reads file:// sources from the local filesystem.
func FileSource() Source { return fileSource{} }

type fileSource struct{}

func (fileSource) Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) error {
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
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file: %w", p, ErrPermanent)
	}
	total(fi.Size())
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
