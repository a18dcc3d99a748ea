package unpack

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// gzipper compresses pieces into one gzip file of concatenated members
// (RFC 1952 allows it, and gzip -d and compress/gzip read it as one
// stream), so that a piece repeated is compressed only once: 200 MiB of
// zeros costs the test a few kilobytes of work.
type gzipper struct {
	zw *gzip.Writer
}

func (g *gzipper) compress(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	if g.zw == nil {
		g.zw = gzip.NewWriter(&buf)
	} else {
		g.zw.Reset(&buf)
	}
	if _, err := g.zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := g.zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// header returns the tar header block(s) of h.
func header(t testing.TB, h *tar.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := tar.NewWriter(&buf).WriteHeader(h); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// written sums the sizes of the distinct regular files (inodes) under dir.
func written(t testing.TB, dir string) (total int64, files int) {
	t.Helper()
	var seen []fs.FileInfo
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		for _, s := range seen {
			if os.SameFile(s, fi) {
				return nil
			}
		}
		seen = append(seen, fi)
		total += fi.Size()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return total, len(seen)
}

// bomb extracts a gzip of an archive of members members of size bytes of
// zeros each under the 8 MiB budget, and checks that it is refused with
// ErrTooLarge before more than the bound and one member are written or
// decompressed.
func bomb(t *testing.T, members int, size int64) {
	if size%512 != 0 {
		t.Fatal("size must be whole blocks, to need no padding")
	}
	var g gzipper
	var gz bytes.Buffer
	const chunk = 1 << 20
	zeros := map[int64][]byte{} // compressed runs of zeros, by length
	for i := range members {
		gz.Write(g.compress(t, header(t, &tar.Header{Name: fmt.Sprintf("z/%05d", i), Typeflag: tar.TypeReg, Mode: 0o644, Size: size})))
		for left := size; left > 0; left -= chunk {
			n := min(left, chunk)
			if zeros[n] == nil {
				zeros[n] = g.compress(t, make([]byte, n))
			}
			gz.Write(zeros[n])
		}
	}
	gz.Write(g.compress(t, make([]byte, 1024)))
	t.Logf("%d members of %d bytes (%d in all): %d compressed bytes", members, size, int64(members)*size, gz.Len())

	r, err := Open(&gz, TarGzip)
	if err != nil {
		t.Fatal(err)
	}
	cr := &countingReader{r: r}
	dir := t.TempDir()
	n, err := Extract(context.Background(), cr, dir, Limits{MaxBytes: budget})
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
	if errors.Is(err, ErrHostile) || errors.Is(err, ErrCorrupt) {
		t.Errorf("err = %v, also wraps another error", err)
	}
	for _, want := range []string{"bytes of disk so far", strconv.Itoa(budget), strconv.FormatInt(n, 10) + " bytes of them file content"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if n > budget {
		t.Errorf("Extract reports %d bytes written, past the bound of %d", n, budget)
	}
	if disk, _ := written(t, dir); disk != n || disk > budget {
		t.Errorf("%d bytes on disk, reported %d, bound %d", disk, n, budget)
	}
	// The stream is read no further than the bound and the member that
	// would pass it (and its header).
	if limit := int64(budget) + size + 1024; cr.n > limit {
		t.Errorf("decompressed %d bytes, want at most %d", cr.n, limit)
	}
	t.Logf("refused after writing %d and decompressing %d bytes: %v", n, cr.n, err)
}

func TestGzipBombOneMember(t *testing.T) { bomb(t, 1, 200<<20) }

func TestGzipBombManyMembers(t *testing.T) { bomb(t, 2000, 100<<10) }

// paxRecord is one record of a PAX extended header: its length counts
// itself.
func paxRecord(k, v string) string {
	rest := " " + k + "=" + v + "\n"
	n := len(rest) + 1
	for len(strconv.Itoa(n))+len(rest) != n {
		n++
	}
	return strconv.Itoa(n) + rest
}

// sparse returns a PAX (GNU 0.1) sparse member: logical size realSize,
// holding only its first 512 bytes of data. archive/tar writes no sparse
// files, so the extended header is made by hand.
func sparse(t testing.TB, name string, realSize int64) []byte {
	t.Helper()
	recs := paxRecord("GNU.sparse.major", "0") + paxRecord("GNU.sparse.minor", "1") +
		paxRecord("GNU.sparse.size", strconv.FormatInt(realSize, 10)) +
		paxRecord("GNU.sparse.numblocks", "1") + paxRecord("GNU.sparse.map", "0,512")
	x := header(t, &tar.Header{Name: "PaxHeaders/" + name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(recs))})
	x[156] = tar.TypeXHeader
	copy(x[148:156], "        ")
	var sum int
	for _, b := range x[:512] {
		sum += int(b)
	}
	copy(x[148:156], fmt.Sprintf("%06o\x00 ", sum))
	x = append(x, recs...)
	x = append(x, make([]byte, 511-(len(recs)+511)%512)...)
	x = append(x, header(t, &tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: 512})...)
	return append(x, bytes.Repeat([]byte{'s'}, 512)...)
}

// A sparse member counts at the size it is written at (holes become
// zeros), not at the few bytes it stores.
func TestSparseMembersCountInFull(t *testing.T) {
	end := make([]byte, 1024)
	for _, tc := range []struct {
		name    string
		members [][]byte
		want    int64 // bytes written, or -1 for ErrTooLarge
	}{
		{"one under the bound", [][]byte{sparse(t, "a", 5<<20)}, 5 << 20},
		{"one of 200 MiB", [][]byte{sparse(t, "a", 200<<20)}, -1},
		{"two that pass the bound together", [][]byte{sparse(t, "a", 5<<20), sparse(t, "b", 5<<20)}, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := append(bytes.Join(tc.members, nil), end...)
			dir := t.TempDir()
			n, err := Extract(context.Background(), bytes.NewReader(data), dir, Limits{MaxBytes: budget})
			disk, _ := written(t, dir)
			if tc.want < 0 {
				if !errors.Is(err, ErrTooLarge) {
					t.Fatalf("err = %v, want ErrTooLarge", err)
				}
				if disk > budget {
					t.Errorf("%d bytes on disk, past the bound", disk)
				}
				return
			}
			if err != nil || n != tc.want || disk != tc.want {
				t.Fatalf("n = %d, %d on disk, err = %v; want %d", n, disk, err, tc.want)
			}
		})
	}
}

// Hard links share the inode they link to, so they write nothing; files
// are counted however small.
func TestBudgetLinksAndSmallFiles(t *testing.T) {
	big := strings.Repeat("x", 5<<20)
	links := []mem{file("big", big)}
	for i := range 100 {
		links = append(links, hard(fmt.Sprintf("h%d", i), "big"))
	}
	var small []mem
	for i := range 1100 {
		small = append(small, file(fmt.Sprintf("s/%d", i), strings.Repeat("y", 8<<10)))
	}
	for _, tc := range []struct {
		name string
		ms   []mem
		ok   bool
	}{
		{"a file and 100 hard links to it", links, true},
		{"two files that pass the bound together", []mem{file("a", big), file("b", big)}, false},
		{"1,100 files of 8 KiB", small, false},
		{"the same, with hard links", append(links, small...), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			n, err := Extract(context.Background(), bytes.NewReader(archive(t, tc.ms...)), dir, Limits{MaxBytes: budget})
			disk, _ := written(t, dir)
			if disk != n || disk > budget {
				t.Errorf("%d bytes on disk, %d reported, bound %d", disk, n, budget)
			}
			if tc.ok {
				if err != nil || n != 5<<20 {
					t.Fatalf("n = %d, err = %v; want %d", n, err, 5<<20)
				}
				return
			}
			if !errors.Is(err, ErrTooLarge) {
				t.Fatalf("err = %v, want ErrTooLarge", err)
			}
		})
	}
}

// tar cannot hand over more data than its header says, but the budget is on
// what is written: a reader that lies is cut one byte past the bound.
func TestBudgetCountsWhatIsWritten(t *testing.T) {
	root, err := os.OpenRoot(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	const bound = 64 << 10
	x := newExtractor(root, Limits{MaxBytes: bound})
	if err := x.member(&tar.Header{Name: "small", Typeflag: tar.TypeReg, Size: 100}, strings.NewReader(strings.Repeat("a", 100))); err != nil {
		t.Fatal(err)
	}
	lying := &countingReader{r: bytes.NewReader(make([]byte, 1<<20))}
	room := bound - x.used - inodeCost // what the liar may write: the bound less the tree so far and its inode
	err = x.member(&tar.Header{Name: "liar", Typeflag: tar.TypeReg, Size: 10}, lying)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
	if x.bytes-100 != room+1 || lying.n > bound+32<<10 {
		t.Errorf("the liar wrote %d bytes (read %d), want its room and one byte, %d", x.bytes-100, lying.n, room+1)
	}
	if fi, err := root.Stat("liar"); err != nil || fi.Size() != x.bytes-100 {
		t.Errorf("liar on disk: %v %v, want %d bytes, as counted", fi, err, x.bytes-100)
	}
	t.Log(err)
}

func TestMaxFiles(t *testing.T) {
	ms := []mem{dir("d/"), file("d/a", "a"), sym("l", "d/a"), hard("h", "d/a")}
	for _, tc := range []struct {
		max int
		ok  bool
	}{{4, true}, {3, false}} {
		_, err := Extract(context.Background(), bytes.NewReader(archive(t, ms...)), t.TempDir(), Limits{MaxFiles: tc.max})
		if tc.ok != (err == nil) || (!tc.ok && !errors.Is(err, ErrTooLarge)) {
			t.Errorf("MaxFiles %d: err = %v, want ok %v or ErrTooLarge", tc.max, err, tc.ok)
		}
	}
}

// treeCost is what the tree under dir takes by the extractor's measure,
// counted from the disk: an inode for every name, a block for every
// directory, and each distinct file's bytes in whole blocks.
func treeCost(t testing.TB, dir string) (cost int64, dirs int) {
	t.Helper()
	seen := map[uint64]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		cost += inodeCost
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			cost += blockSize
			dirs++
		case fi.Mode().IsRegular():
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && !seen[st.Ino] {
				seen[st.Ino] = true
				cost += blocks(fi.Size())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return cost, dirs
}

// TestTreeBombs: archives of nothing but names (empty directories, empty
// files, symlinks, one very deep path) are bounded by the disk their tree
// takes, not by their files' bytes, which are none: 20,000 empty
// directories took 79 MiB and were counted as 0 bytes.
func TestTreeBombs(t *testing.T) {
	const bound = 4 << 20
	many := func(n int, f func(i int) mem) []mem {
		ms := make([]mem, n)
		for i := range ms {
			ms[i] = f(i)
		}
		return ms
	}
	deep := strings.Repeat("a/", 1500) + "f"
	for _, tc := range []struct {
		name string
		ms   []mem
	}{
		{"20,000 empty directories", many(20000, func(i int) mem { return dir(fmt.Sprintf("d%05d/", i)) })},
		{"20,000 files under their own directories", many(20000, func(i int) mem { return file(fmt.Sprintf("d%05d/f", i), "") })},
		{"20,000 empty files", many(20000, func(i int) mem { return file(fmt.Sprintf("f%05d", i), "") })},
		{"20,000 symlinks", many(20000, func(i int) mem { return sym(fmt.Sprintf("l%05d", i), "x") })},
		{"one name 1,500 directories deep", []mem{file(deep, "x")}},
		{"20,000 one-byte files", many(20000, func(i int) mem { return file(fmt.Sprintf("f%05d", i), "x") })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := archive(t, tc.ms...)
			dir := t.TempDir()
			n, err := Extract(context.Background(), bytes.NewReader(b), dir, Limits{MaxBytes: bound})
			if !errors.Is(err, ErrTooLarge) {
				t.Fatalf("n = %d, err = %v; want ErrTooLarge", n, err)
			}
			if cost, dirs := treeCost(t, dir); cost > bound+blockSize+inodeCost {
				t.Errorf("the tree takes %d bytes (%d directories), bound %d", cost, dirs, bound)
			}
		})
	}
	t.Run("zip of 20,000 empty directories", func(t *testing.T) {
		zs := make([]zmem, 20000)
		for i := range zs {
			zs[i] = zdir(fmt.Sprintf("d%05d/", i))
		}
		dir := t.TempDir()
		if _, _, err := extractZipBytes(t, zipArchive(t, zs...), dir, Limits{MaxBytes: bound}); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("err = %v, want ErrTooLarge", err)
		}
		if cost, dirs := treeCost(t, dir); cost > bound+blockSize+inodeCost {
			t.Errorf("the tree takes %d bytes (%d directories), bound %d", cost, dirs, bound)
		}
	})
	// The same shapes, smaller, fit: the bound is on the tree, not on names.
	ms := many(400, func(i int) mem { return file(fmt.Sprintf("d%03d/f", i), "x") })
	if _, err := Extract(context.Background(), bytes.NewReader(archive(t, ms...)), t.TempDir(), Limits{MaxBytes: bound}); err != nil {
		t.Errorf("400 small files in their directories (%d bytes of tree): %v", 400*(2*inodeCost+2*blockSize), err)
	}
}
