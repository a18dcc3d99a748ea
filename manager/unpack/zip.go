package unpack

import (
	"archive/tar"
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
)

// maxLinkTarget bounds the target of a symlink a zip stores as its data
// (PATH_MAX): a longer one is refused before more is read.
const maxLinkTarget = 4096

// ExtractZip unpacks the zip archive r (of size bytes; zip keeps its index
// at the end, so it needs random access: spool a stream to a file first)
// into dir, which must exist and be empty, under the same rules as a tar:
// every name through [os.Root] and the same name checks, symlinks (a zip
// stores them as mode bits, their target as their data) resolved through
// the archive's other links, no devices, fifos or sockets, no duplicate
// files, and the byte budget held to the bytes actually written, whatever
// the headers say (a decompression bomb, or members that overlap in the
// file, fail with [ErrTooLarge]). It returns the bytes written and the
// sha256 of every regular file, as ExtractHashed does.
func ExtractZip(ctx context.Context, r io.ReaderAt, size int64, dir string, lim Limits) (int64, map[string]string, error) {
	zr, err := zip.NewReader(r, size)
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) {
		// ErrInsecurePath (GODEBUG zipinsecurepath=0) still returns the
		// reader: the names are judged below, like a tar's.
		return 0, nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, nil, err
	}
	defer root.Close()
	x := newExtractor(root, lim)
	for _, f := range zr.File {
		if err := ctx.Err(); err != nil {
			return x.bytes, nil, err
		}
		if err := x.zipMember(f); err != nil {
			return x.bytes, nil, err
		}
	}
	if err := x.checkLinks(); err != nil {
		return x.bytes, nil, err
	}
	return x.bytes, x.hashes, nil
}

// zipMember extracts one member through the tar member's checks: it is
// described as the tar header it would be.
func (x *extractor) zipMember(f *zip.File) error {
	mode := f.Mode()
	hdr := &tar.Header{Name: f.Name, Mode: int64(mode.Perm())}
	if f.UncompressedSize64 > math.MaxInt64 {
		return x.tooLarge(f.Name, fmt.Sprintf("of %d bytes", f.UncompressedSize64))
	}
	hdr.Size = int64(f.UncompressedSize64)
	switch {
	case mode&(fs.ModeDevice|fs.ModeCharDevice) != 0:
		hdr.Typeflag = tar.TypeChar
		return x.member(hdr, nil)
	case mode&fs.ModeNamedPipe != 0:
		hdr.Typeflag = tar.TypeFifo
		return x.member(hdr, nil)
	case mode&(fs.ModeSocket|fs.ModeIrregular) != 0:
		return hostile(f.Name, fmt.Sprintf("unsupported file type %s", mode.Type()))
	case mode.IsDir():
		hdr.Typeflag = tar.TypeDir
		return x.member(hdr, nil)
	case mode&fs.ModeSymlink != 0:
		// The target is the member's data: read it bounded, so that a
		// "link" of a gigabyte of zeros is refused, not decompressed.
		target, err := readZip(f, maxLinkTarget)
		if err != nil {
			return err
		}
		if len(target) > maxLinkTarget {
			return hostile(f.Name, fmt.Sprintf("symlink target longer than %d bytes", maxLinkTarget))
		}
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = string(target)
		hdr.Size = 0
		return x.member(hdr, nil)
	case mode.IsRegular():
		hdr.Typeflag = tar.TypeReg
		// Judged before the data is opened, as a tar member is: the name
		// (through x.member), the size its header claims, the file count.
		rc, err := f.Open()
		if err != nil {
			return fmt.Errorf("%w: member %s: %w", ErrCorrupt, shown(f.Name), err)
		}
		defer rc.Close()
		return x.member(hdr, zipData{rc})
	}
	return hostile(f.Name, fmt.Sprintf("unsupported file type %s", mode.Type()))
}

// readZip reads at most limit+1 bytes of member f.
func readZip(f *zip.File, limit int64) ([]byte, error) {
	rc, err := f.Open()
	if err != nil {
		return nil, fmt.Errorf("%w: member %s: %w", ErrCorrupt, shown(f.Name), err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(zipData{rc}, limit+1))
	if err != nil {
		return nil, fmt.Errorf("member %s: %w", shown(f.Name), err)
	}
	return b, nil
}

// zipData marks the errors of a member's data (a bad checksum, more data
// than its header says, a cut stream) as a corrupt archive.
type zipData struct{ r io.Reader }

func (z zipData) Read(p []byte) (int, error) {
	n, err := z.r.Read(p)
	if err != nil && err != io.EOF {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return n, err // the tar path says "truncated" for it
		}
		if errors.Is(err, zip.ErrChecksum) {
			// A zip is read whole from its spool: its data all arrived.
			return n, fmt.Errorf("%w: %w: %w", ErrCorrupt, ErrMalformed, err)
		}
		err = fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return n, err
}
