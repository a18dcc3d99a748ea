// Package unpack turns a fetched file into an entry's content: a tar archive
// (plain or gzip, recognised by its bytes, not its name) or a zip archive
// ([ExtractZip], under the same rules) becomes a directory, anything else
// stays a file.
//
// Archives are untrusted. Extract refuses, with an error wrapping
// [ErrHostile] that names the member, any member that would leave the target
// directory (.., absolute names, symlinks or hard links pointing out,
// writing through a symlink the archive made), device files and fifos, and
// duplicate files. An archive whose contents exceed the byte or file budget
// (which also stops gzip bombs) wraps [ErrTooLarge]; the byte budget counts
// what is actually written, so a sparse member counts at its full size.
// All writes go through an [os.Root], so even a bug in these checks cannot
// write outside the directory. A truncated or malformed archive wraps
// [ErrCorrupt].
//
// A symlink is judged by where it leads, not by its text: its target is
// resolved component by component through the symlinks the archive itself
// made, as the kernel would, and the archive is refused if the link leads
// to an absolute path or above the directory, or through a chain of links
// more than 40 deep (a loop). Because a link made early may pass through a
// name that a later member turns into a link, every symlink is resolved
// again against the final set of links once the last member is in. So when
// Extract succeeds, every symlink it published resolves inside the
// directory (or to a name that does not exist there).
package unpack

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
)

var (
	// ErrHostile means the archive tried something it may not.
	ErrHostile = errors.New("hostile archive refused")
	// ErrCorrupt means the archive is truncated or malformed.
	ErrCorrupt = errors.New("corrupt archive")
	// ErrMalformed, beside ErrCorrupt, means the archive is wrong in a way
	// that no cut transfer explains and no retry changes: a checksum that
	// does not match data that all arrived, data after its end, members
	// that collide (a file where a directory must go) or a name too long
	// for any filesystem.
	ErrMalformed = errors.New("malformed archive")
	// ErrTooLarge means the content exceeds the budget.
	ErrTooLarge = errors.New("archive exceeds the size budget")
)

// Format is what a fetched file turned out to be.
type Format int

const (
	// Plain is any file that is not a tar archive.
	Plain Format = iota
	// Tar is an uncompressed tar archive.
	Tar
	// TarGzip is a gzip-compressed tar archive.
	TarGzip
	// Zip is a zip archive (ExtractZip). Many formats are zip files
	// underneath (jar, whl, docx, apk): a caller that should keep those
	// as files decides by the source's name as well.
	Zip
)

func (f Format) String() string {
	return [...]string{"file", "tar", "tar+gzip", "zip"}[f]
}

// Limits bound what an archive may create. Zero means no bound.
type Limits struct {
	MaxBytes int64
	MaxFiles int
	// Group gives the owner's permissions to the group as well (a root
	// shared by a group), past the umask; others get none.
	Group bool
	// Used, when set, is kept at the disk the tree takes so far (what
	// MaxBytes bounds), for a caller that reports it while it unpacks.
	Used *atomic.Int64
}

// SniffHead is the number of leading bytes SniffBytes wants: enough
// compressed bytes to see the first tar header inside a gzip stream.
const SniffHead = 64 << 10

// Sniff tells a tar archive (plain or gzip) from any other file by its
// first bytes.
func Sniff(f io.ReaderAt) (Format, error) {
	head := make([]byte, SniffHead)
	n, err := f.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return Plain, err
	}
	return SniffBytes(head[:n]), nil
}

// SniffBytes tells a tar archive (plain or gzip) from any other content by
// its first bytes (up to SniffHead of them), without consuming a stream.
func SniffBytes(head []byte) Format {
	if isTar(head) {
		return Tar
	}
	// A local file header, or the end record of an empty archive.
	if bytes.HasPrefix(head, []byte("PK\x03\x04")) || bytes.HasPrefix(head, []byte("PK\x05\x06")) {
		return Zip
	}
	if len(head) >= 2 && head[0] == 0x1f && head[1] == 0x8b {
		zr, err := gzip.NewReader(bytes.NewReader(head))
		if err != nil {
			return Plain
		}
		inner := make([]byte, 512)
		m, _ := io.ReadFull(zr, inner)
		if isTar(inner[:m]) {
			return TarGzip
		}
	}
	return Plain
}

// EmptyTar tells, from the first bytes of a file (up to SniffHead of
// them), a tar archive with no member, plain or gzip: one that begins with
// the end-of-archive marker, two zero blocks (what `tar cf x.tar -T
// /dev/null` writes). archive/tar, like tar(1), stops there. The bytes say
// nothing else, so only a name that says tar should make such a file an
// archive: a disk image may begin with zeros too.
func EmptyTar(head []byte) (Format, bool) {
	if endMarker(head) {
		return Tar, true
	}
	if len(head) >= 2 && head[0] == 0x1f && head[1] == 0x8b {
		zr, err := gzip.NewReader(bytes.NewReader(head))
		if err != nil {
			return Plain, false
		}
		inner := make([]byte, 2*512)
		m, _ := io.ReadFull(zr, inner)
		if endMarker(inner[:m]) {
			return TarGzip, true
		}
	}
	return Plain, false
}

// endMarker reports whether b begins with two zero blocks.
func endMarker(b []byte) bool {
	if len(b) < 2*512 {
		return false
	}
	for _, c := range b[:2*512] {
		if c != 0 {
			return false
		}
	}
	return true
}

// isTar looks for the ustar magic (POSIX and GNU) at offset 257.
func isTar(b []byte) bool {
	return len(b) >= 262 && bytes.Equal(b[257:262], []byte("ustar"))
}

// Open returns the tar stream of an archive of format f.
func Open(r io.Reader, f Format) (io.Reader, error) {
	if f == TarGzip {
		return newGzipStream(r)
	}
	return r, nil
}

// Extract unpacks the tar stream r into dir, which must exist and be empty.
// It returns the number of content bytes written.
func Extract(ctx context.Context, r io.Reader, dir string, lim Limits) (int64, error) {
	n, _, err := ExtractHashed(ctx, r, dir, lim)
	return n, err
}

// ExtractHashed is Extract that also returns the sha256 (hex) of every
// regular file it wrote, by slash path, hashed on the way in.
func ExtractHashed(ctx context.Context, r io.Reader, dir string, lim Limits) (int64, map[string]string, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, nil, err
	}
	defer root.Close()
	x := newExtractor(root, lim)
	tail := &tailReader{r: r}
	tr := tar.NewReader(tail)
	for {
		if err := ctx.Err(); err != nil {
			return x.bytes, nil, err
		}
		before := tail.n
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			// The end marker is read by this last Next: a zero block read
			// earlier is the last member's data.
			if tail.n-before < int64(len(tail.last)) || !tail.endsWithZeroBlock() {
				// archive/tar takes a stream that stops at a member
				// boundary for the end; over a connection that just closes
				// (no length, not chunked) that is a cut-off download.
				return x.bytes, nil, fmt.Errorf("%w: the archive ends without its end-of-archive marker (truncated?)", ErrCorrupt)
			}
			if err := x.checkLinks(); err != nil {
				return x.bytes, nil, err
			}
			return x.bytes, x.hashes, nil
		}
		if err != nil {
			return x.bytes, nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		if err := x.member(hdr, tr); err != nil {
			return x.bytes, nil, err
		}
	}
}

// tailReader remembers the last block read through it.
type tailReader struct {
	r    io.Reader
	n    int64
	last [512]byte
}

func (t *tailReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	t.n += int64(n)
	if n >= len(t.last) {
		copy(t.last[:], p[n-len(t.last):n])
	} else {
		copy(t.last[:], t.last[n:])
		copy(t.last[len(t.last)-n:], p[:n])
	}
	return n, err
}

// endsWithZeroBlock reports whether the stream ended with a zero block, the
// start of a tar's end-of-archive marker.
func (t *tailReader) endsWithZeroBlock() bool {
	return t.n >= int64(len(t.last)) && t.last == [512]byte{}
}

// What an archive's members cost on disk beyond their bytes, charged
// against Limits.MaxBytes: an inode for every member, a block for every
// directory, and a file's bytes rounded up to whole blocks. Counting bytes
// alone let 20,000 empty directories (a 94 KB archive, 79 MiB on disk) pass
// a budget of 8 MiB as "0 bytes". These are ext4's and xfs's usual sizes.
const (
	inodeCost = 256
	blockSize = 4096
)

func blocks(n int64) int64 { return (n + blockSize - 1) / blockSize * blockSize }

// TreeCost is what the tree under dir takes by the measure an unpack is
// bounded by: each distinct file's bytes in whole blocks, a block for
// every directory, an inode for every name. It is the same on every
// filesystem (du is not: tmpfs gives directories no blocks), so an
// entry's size, and the budget, do not depend on where the root is.
func TreeCost(dir string) (int64, error) {
	seen := map[uint64]bool{}
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		n += inodeCost
		switch {
		case d.IsDir():
			n += blockSize
		case d.Type().IsRegular():
			fi, err := d.Info()
			if err != nil {
				return err
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				if seen[st.Ino] {
					return nil // a hard link: its blocks are counted once
				}
				seen[st.Ino] = true
			}
			n += blocks(fi.Size())
		}
		return nil
	})
	return n, err
}

type extractor struct {
	root   *os.Root
	lim    Limits
	bytes  int64 // content bytes written (what Extract returns)
	used   int64 // the disk they and the tree's inodes and directories take
	count  int
	dirs   map[string]bool   // directories made (or found) so far
	links  map[string]link   // the symlinks the archive made, by clean name
	order  []string          // their names, in archive order
	files  map[string]bool   // regular files, the only hard-link targets
	hashes map[string]string // sha256 of each regular file written
}

func newExtractor(root *os.Root, lim Limits) *extractor {
	return &extractor{root: root, lim: lim, links: map[string]link{}, files: map[string]bool{}, hashes: map[string]string{}, dirs: map[string]bool{}}
}

// charge counts n more bytes of disk for member name, and fails once the
// total passes the bound.
func (x *extractor) charge(name string, n int64) error {
	x.used += n
	if x.lim.Used != nil {
		x.lim.Used.Store(x.used)
	}
	if x.lim.MaxBytes > 0 && x.used > x.lim.MaxBytes {
		return x.tooLarge(name, "")
	}
	return nil
}

// shown is a member's name as messages quote it: whole up to 200 bytes,
// else its start and end around the count of bytes left out (a name of a
// hostile archive may be kilobytes long).
func shown(name string) string {
	const most, head, tail = 200, 120, 60
	if len(name) <= most {
		return strconv.Quote(name)
	}
	return fmt.Sprintf("%s…(%d bytes)…%s", strconv.Quote(strings.ToValidUTF8(name[:head], "")), len(name)-head-tail, strconv.Quote(strings.ToValidUTF8(name[len(name)-tail:], "")))
}

// pathMax is Linux's PATH_MAX, with its NUL. pathSlack is kept below it for
// the names that the content's path may take later beside the one it is
// unpacked under (trash/, a longer generation suffix).
const (
	pathMax   = 4096
	pathSlack = 64
)

func hostile(name, why string) error {
	return fmt.Errorf("%w: member %s: %s", ErrHostile, shown(name), why)
}

// clean returns the member's name as a local slash path, or an error.
func (x *extractor) clean(name string) (string, error) {
	if strings.ContainsRune(name, 0) {
		return "", hostile(name, "NUL in name")
	}
	if path.IsAbs(name) || filepath.IsAbs(name) {
		return "", hostile(name, "absolute name")
	}
	p := path.Clean(name)
	if !filepath.IsLocal(p) && p != "." {
		return "", hostile(name, "leaves the directory")
	}
	if n := len(x.root.Name()) + 1 + len(p); n >= pathMax-pathSlack {
		// Written relative to the root, it would unpack, and then no
		// path-based call (the content's digest, its size, rm) could
		// reach it.
		return "", fmt.Errorf("%w: %w: member %s: its path under %s would be %d bytes, and the limit is %d (PATH_MAX, less %d for the names the content takes later)",
			ErrCorrupt, ErrMalformed, shown(name), x.root.Name(), n, pathMax-pathSlack-1, pathSlack)
	}
	// Writing at or below a symlink the archive made would write wherever
	// it points.
	for q := p; q != "." && q != "/"; q = path.Dir(q) {
		if _, ok := x.links[q]; ok {
			return "", hostile(name, "writes through the symlink "+q)
		}
	}
	return p, nil
}

func (x *extractor) member(hdr *tar.Header, r io.Reader) (err error) {
	defer func() { err = colliding(hdr.Name, err) }()
	p, err := x.clean(hdr.Name)
	if err != nil {
		return err
	}
	x.count++
	if x.lim.MaxFiles > 0 && x.count > x.lim.MaxFiles {
		return fmt.Errorf("%w: more than %d members", ErrTooLarge, x.lim.MaxFiles)
	}
	if err := x.charge(hdr.Name, inodeCost); err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		if p == "." {
			return nil
		}
		return x.mkdir(p)
	case tar.TypeReg: // the reader reports old TypeRegA members as TypeReg
		return x.regular(p, hdr, r)
	case tar.TypeSymlink:
		t := hdr.Linkname
		// Judged by where it leads, not by its text: it may pass through
		// links made earlier (or through itself). This check sees only the
		// links made so far, taking other names as directories, so
		// checkLinks does the binding one at the end; this one refuses
		// sooner. Any error ends the extraction, so the link may join the
		// set before it exists.
		x.links[p] = link{member: hdr.Name, target: t}
		if _, err := x.dest(p, t, &walk{memo: map[string]string{}, budget: earlyBudget}); err != nil && !errors.Is(err, errBudget) {
			return hostile(hdr.Name, fmt.Sprintf("symlink to %q: %v", t, err))
		}
		if err := x.parent(p); err != nil {
			return err
		}
		if err := x.root.Symlink(t, p); err != nil {
			return fmt.Errorf("%w: member %s: %w", ErrHostile, shown(hdr.Name), err)
		}
		x.order = append(x.order, p)
		return nil
	case tar.TypeLink:
		t, err := x.clean(hdr.Linkname)
		if err != nil {
			return hostile(hdr.Name, fmt.Sprintf("hard link to %q: %v", hdr.Linkname, err))
		}
		if !x.files[t] {
			return hostile(hdr.Name, fmt.Sprintf("hard link to %q, which is not a file of this archive", hdr.Linkname))
		}
		if err := x.parent(p); err != nil {
			return err
		}
		if err := x.root.Link(t, p); err != nil {
			return fmt.Errorf("%w: member %s: %w", ErrHostile, shown(hdr.Name), err)
		}
		return nil
	case tar.TypeChar, tar.TypeBlock:
		return hostile(hdr.Name, "device file")
	case tar.TypeFifo:
		return hostile(hdr.Name, "fifo")
	case tar.TypeXGlobalHeader, tar.TypeXHeader, tar.TypeGNULongName, tar.TypeGNULongLink:
		return nil // metadata the reader has already applied
	}
	return hostile(hdr.Name, fmt.Sprintf("unsupported member type %q", hdr.Typeflag))
}

func (x *extractor) parent(p string) error {
	if d := path.Dir(p); d != "." {
		return x.mkdir(d)
	}
	return nil
}

func (x *extractor) mkdir(p string) error {
	// Every directory the tree gains is charged, parents made on the way
	// included: one deep name can make thousands.
	for q := p; q != "." && !x.dirs[q]; q = path.Dir(q) {
		x.dirs[q] = true
		if err := x.charge(q+"/", inodeCost+blockSize); err != nil {
			return err
		}
	}
	if !x.lim.Group {
		return x.root.MkdirAll(p, 0o755)
	}
	// Each directory made gets the group's mode, parents included.
	if fi, err := x.root.Lstat(p); err == nil && fi.IsDir() {
		return nil
	}
	if d := path.Dir(p); d != "." {
		if err := x.mkdir(d); err != nil {
			return err
		}
	}
	if err := x.root.Mkdir(p, 0o770); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return x.root.Chmod(p, 0o770|fs.ModeSetgid)
}

// tooLarge is the error for a member that does not fit the byte budget.
func (x *extractor) tooLarge(name, what string) error {
	if what != "" {
		what = " " + what
	}
	return fmt.Errorf("%w: member %s%s: the tree takes %d bytes of disk so far, %d bytes of them file content (a file takes whole %d-byte blocks, a directory one, a member an inode), the bound is %d",
		ErrTooLarge, shown(name), what, x.used, x.bytes, blockSize, x.lim.MaxBytes)
}

func (x *extractor) regular(p string, hdr *tar.Header, r io.Reader) error {
	if hdr.Size < 0 {
		return fmt.Errorf("%w: %w: member %s: negative size", ErrCorrupt, ErrMalformed, shown(hdr.Name))
	}
	if x.lim.MaxBytes > 0 && blocks(hdr.Size) > x.lim.MaxBytes-x.used {
		return x.tooLarge(hdr.Name, fmt.Sprintf("of %d bytes", hdr.Size))
	}
	if err := x.parent(p); err != nil {
		return err
	}
	// No set-uid, set-gid or sticky bits from strangers.
	perm := fs.FileMode(hdr.Mode).Perm() | 0o600
	if x.lim.Group {
		perm = perm&0o700 | (perm&0o700)>>3 // the group gets the owner's bits, others none
	}
	f, err := x.root.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if errors.Is(err, fs.ErrExist) {
		return hostile(hdr.Name, "duplicate member")
	}
	if err != nil {
		return fmt.Errorf("member %s: %w", shown(hdr.Name), err)
	}
	if x.lim.Group {
		if err := f.Chmod(perm); err != nil {
			f.Close()
			return fmt.Errorf("member %s: %w", shown(hdr.Name), err)
		}
	}
	h := sha256.New()
	// The size was checked above, but the budget is on what is written:
	// copy at most one byte past it, whatever the reader hands over.
	src := r
	if x.lim.MaxBytes > 0 {
		src = io.LimitReader(r, x.lim.MaxBytes-x.used+1)
	}
	n, err := io.Copy(io.MultiWriter(f, h), src)
	x.bytes += n
	x.used += blocks(n)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && x.lim.MaxBytes > 0 && x.used > x.lim.MaxBytes {
		return x.tooLarge(hdr.Name, fmt.Sprintf("whose header said %d bytes but which held more", hdr.Size))
	}
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: member %s: truncated", ErrCorrupt, shown(hdr.Name))
		}
		return fmt.Errorf("member %s: %w", shown(hdr.Name), err)
	}
	x.files[p] = true
	x.hashes[p] = hex.EncodeToString(h.Sum(nil))
	return nil
}

// link is a symlink the archive made.
type link struct {
	member string // the name the archive gave it, for errors
	target string
}

// maxDepth bounds how deeply a link may lead through links, like the
// kernel's limit of 40 (ELOOP): deeper is a loop or an attack, and it also
// bounds the recursion.
const maxDepth = 40

// earlyBudget bounds the components the early check of one symlink may
// walk, so that an archive of many links that lead through each other
// costs linear time; past it the check is left to checkLinks.
const earlyBudget = 1 << 14

var (
	errOutside = errors.New("leads outside the directory")
	errLoop    = fmt.Errorf("leads through more than %d links (a loop?)", maxDepth)
	errBudget  = errors.New("too many components to check early")
)

// walk is the state of one resolution.
type walk struct {
	// memo holds where each link fully resolved so far leads; valid only
	// while the set of links does not change.
	memo   map[string]string
	budget int // the most components to walk; <= 0 means no bound
	steps  int
}

// dest returns where the symlink named name (a clean local path whose
// parents are not links) with target t leads, as a clean local path ("."
// for the directory itself), following the archive's links the way the
// kernel does. Names that are not links are taken as directories: a name
// that does not exist yet may still become one, and through a regular
// file the kernel resolves nothing at all, so taking it as a directory can
// only refuse more, never less.
func (x *extractor) dest(name, t string, w *walk) (string, error) {
	return x.follow(name, t, w, 0)
}

func (x *extractor) follow(name, t string, w *walk, depth int) (string, error) {
	if d, ok := w.memo[name]; ok {
		return d, nil
	}
	if depth >= maxDepth {
		return "", errLoop
	}
	if t == "" {
		// The kernel refuses to resolve an empty target; tar cannot make
		// one anyway, so it is a malformed or hostile member.
		return "", errors.New("empty target")
	}
	if path.IsAbs(t) || filepath.IsAbs(t) {
		return "", fmt.Errorf("%w (%q is absolute)", errOutside, t)
	}
	dir := path.Dir(name)
	var via []string // the links this target passed through, for the error
	for c := range strings.SplitSeq(t, "/") {
		w.steps++
		if w.budget > 0 && w.steps > w.budget {
			return "", errBudget
		}
		switch c {
		case "", ".":
		case "..":
			if dir == "." {
				return "", x.outside(via)
			}
			dir = path.Dir(dir)
		default:
			next := path.Join(dir, c)
			if l, ok := x.links[next]; ok {
				d, err := x.follow(next, l.target, w, depth+1)
				if err != nil {
					if errors.Is(err, errBudget) || errors.Is(err, errLoop) {
						return "", err // a chain 40 deep would drown the reason
					}
					return "", fmt.Errorf("through %s -> %q: %w", next, l.target, err)
				}
				via = append(via, next)
				next = d
			}
			dir = next
		}
	}
	w.memo[name] = dir
	return dir, nil
}

// outside is errOutside, naming the first few links the target passed
// through (a target may pass through thousands).
func (x *extractor) outside(via []string) error {
	if len(via) == 0 {
		return errOutside
	}
	var b strings.Builder
	for i, l := range via {
		if i == 3 {
			fmt.Fprintf(&b, " and %d more", len(via)-i)
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s -> %q", l, x.links[l].target)
	}
	return fmt.Errorf("%w (through %s)", errOutside, b.String())
}

// checkLinks resolves every symlink against the final set of links: a link
// checked when it was made may have passed through a name that a later
// member made a link.
func (x *extractor) checkLinks() error {
	w := &walk{memo: map[string]string{}}
	for _, p := range x.order {
		l := x.links[p]
		if _, err := x.dest(p, l.target, w); err != nil {
			return hostile(l.member, fmt.Sprintf("symlink to %q, with the archive's other links: %v", l.target, err))
		}
	}
	return nil
}

// colliding marks an error of writing member name that the archive itself
// causes, whatever the transfer: a member where another of another type
// is (a file, then a directory under its name), or a name too long.
func colliding(name string, err error) error {
	if err == nil || errors.Is(err, ErrHostile) || errors.Is(err, ErrMalformed) {
		return err
	}
	for _, e := range []error{syscall.EEXIST, syscall.ENOTDIR, syscall.EISDIR, syscall.ENAMETOOLONG} {
		if errors.Is(err, e) {
			return fmt.Errorf("%w: %w: member %s: %w", ErrCorrupt, ErrMalformed, shown(name), err)
		}
	}
	return err
}
