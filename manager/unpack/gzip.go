package unpack

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
)

// maxTail bounds what may follow a tar's end-of-archive marker inside the
// gzip stream (the padding of the last record: 10 KiB for GNU tar's
// default blocking). More is not padding; reading it would be
// decompressing a bomb's tail.
const maxTail = 1 << 20

// gzipStream reads a gzip file of one or more members (RFC 1952) and, at
// Finish, checks its end: each member's CRC-32 and length, which a reader
// that stops at the tar's end marker never reaches, and nothing after the
// last member but zero bytes (as gzip -d allows). Corrupt content (a bit
// flipped inside the compressed data that still inflates, a cut-off
// trailer) then fails as ErrCorrupt instead of being published.
type gzipStream struct {
	br   *bufio.Reader
	zr   *gzip.Reader
	done bool // past the last member
}

func newGzipStream(r io.Reader) (*gzipStream, error) {
	br := bufio.NewReader(r)
	zr, err := gzip.NewReader(br)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	zr.Multistream(false)
	return &gzipStream{br: br, zr: zr}, nil
}

func (g *gzipStream) Read(p []byte) (int, error) {
	for !g.done {
		n, err := g.zr.Read(p)
		if !errors.Is(err, io.EOF) {
			switch {
			case errors.Is(err, gzip.ErrChecksum):
				// The member's data and trailer arrived: a cut stream
				// ends in io.ErrUnexpectedEOF instead.
				err = fmt.Errorf("%w: %w: %w", ErrCorrupt, ErrMalformed, err)
			case err != nil:
				err = fmt.Errorf("%w: %w", ErrCorrupt, err)
			}
			return n, err
		}
		// A member ended, its checksum verified. Another may follow.
		if next, _ := g.br.Peek(2); len(next) == 2 && next[0] == 0x1f && next[1] == 0x8b {
			if err := g.zr.Reset(g.br); err != nil {
				return n, fmt.Errorf("%w: %w", ErrCorrupt, err)
			}
			g.zr.Multistream(false)
		} else {
			g.done = true
		}
		if n > 0 {
			return n, nil
		}
	}
	return 0, io.EOF
}

// finish reads what is left: at most maxTail bytes of tar padding, each
// member's trailer, and after the last one only zero bytes, any number.
func (g *gzipStream) finish() error {
	n, err := io.Copy(io.Discard, io.LimitReader(g, maxTail+1))
	if err != nil {
		return err
	}
	if n > maxTail {
		return fmt.Errorf("%w: %w: more than %d bytes after the end of the archive", ErrCorrupt, ErrMalformed, maxTail)
	}
	// Zero bytes after the stream (tape blocking) are padding, however
	// many: they are part of the download, already bounded as such.
	buf := make([]byte, 32<<10)
	var at int64
	for {
		n, err := g.br.Read(buf)
		if i := bytes.IndexFunc(buf[:n], func(r rune) bool { return r != 0 }); i >= 0 {
			if i == n-1 && buf[i] == 0x1f {
				// The first byte of another member, and the stream ends:
				// a cut transfer, not a malformed archive.
				if _, perr := g.br.Peek(1); errors.Is(perr, io.EOF) {
					return fmt.Errorf("%w: the stream ends in the first byte of another gzip member (truncated?)", ErrCorrupt)
				}
			}
			return fmt.Errorf("%w: %w: data after the gzip stream that is neither another member nor zero padding (at byte %d after its end)", ErrCorrupt, ErrMalformed, at+int64(i))
		}
		at += int64(n)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// Finish ends the reading of r, a stream Open returned, once the archive
// in it was extracted: for gzip, it checks the checksums and that nothing
// but padding follows. A plain tar's rest is left to the caller.
func Finish(r io.Reader) error {
	if g, ok := r.(*gzipStream); ok {
		return g.finish()
	}
	return nil
}
