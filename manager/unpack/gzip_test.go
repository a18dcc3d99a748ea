package unpack

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"strings"
	"testing"
)

// TestGzipEndChecked: once the tar's end marker is read, the rest of the
// gzip stream is read and checked too: the CRC-32 and length of each
// member, and nothing after the last one but zero bytes. A tar that ends
// well inside a corrupt gzip was published before.
func TestGzipEndChecked(t *testing.T) {
	tarball := archive(t, file("a", "hello"), file("b", "world"))
	gz := func(parts ...[]byte) []byte {
		var out bytes.Buffer
		for _, p := range parts {
			zw := gzip.NewWriter(&out)
			zw.Write(p)
			zw.Close()
		}
		return out.Bytes()
	}
	whole := gz(tarball)
	badCRC := bytes.Clone(whole)
	badCRC[len(badCRC)-8] ^= 0xff // the trailer: CRC-32, then ISIZE
	badSize := bytes.Clone(whole)
	badSize[len(badSize)-1] ^= 0x01
	// malformed: no cut transfer explains it, so no retry is worth it
	// (ErrMalformed); a cut one stays only ErrCorrupt.
	for _, tc := range []struct {
		name          string
		b             []byte
		ok, malformed bool
	}{
		{"one member", whole, true, false},
		{"two members, the tar split across them", gz(tarball[:700], tarball[700:]), true, false},
		{"zero bytes after the stream", append(bytes.Clone(whole), make([]byte, 4096)...), true, false},
		{"more than a MiB of zero bytes after the stream", append(bytes.Clone(whole), make([]byte, 3<<20)...), true, false},
		{"zero bytes, then garbage, after the stream", append(append(bytes.Clone(whole), make([]byte, 100<<10)...), 'x'), false, true},
		{"a cut trailer", whole[:len(whole)-4], false, false},
		{"no trailer", whole[:len(whole)-8], false, false},
		{"cut in the middle", whole[:len(whole)/2], false, false},
		{"a wrong CRC-32", badCRC, false, true},
		{"a wrong length", badSize, false, true},
		{"garbage after the stream", append(bytes.Clone(whole), []byte("not gzip")...), false, true},
		{"another member cut after its first byte", append(bytes.Clone(whole), 0x1f), false, false},
		{"a lone 0x1f, then more", append(bytes.Clone(whole), 0x1f, 'x'), false, true},
		{"more than the padding after the end marker", gz(append(bytes.Clone(tarball), make([]byte, maxTail+1)...)), false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := Open(bytes.NewReader(tc.b), TarGzip)
			if err == nil {
				_, err = Extract(context.Background(), r, t.TempDir(), Limits{})
			}
			if err == nil {
				err = Finish(r)
			}
			if tc.ok != (err == nil) || (!tc.ok && !errors.Is(err, ErrCorrupt)) {
				t.Errorf("err = %v, want ok %v or ErrCorrupt", err, tc.ok)
			}
			if got := errors.Is(err, ErrMalformed); got != tc.malformed {
				t.Errorf("err = %v: malformed %v, want %v", err, got, tc.malformed)
			}
		})
	}
}

// TestCollidingMembersMalformed: members that collide (a file, then a
// directory under its name) and a name too long for the filesystem fail
// as ErrMalformed, which the manager does not retry.
func TestCollidingMembersMalformed(t *testing.T) {
	long := strings.Repeat("n", 300)
	for name, tb := range map[string][]byte{
		"a file, then a directory under its name": archive(t, file("a", "x"), file("a/b", "y")),
		"a name longer than NAME_MAX":             archive(t, file(long, "x")),
		// Each component fits NAME_MAX, the whole not PATH_MAX: written
		// relative to the root it would unpack, and no path could reach it.
		"a path longer than PATH_MAX": archive(t, file(strings.Repeat(strings.Repeat("d", 200)+"/", 30)+"f", "x")),
	} {
		r, err := Open(bytes.NewReader(tb), Tar)
		if err == nil {
			_, err = Extract(context.Background(), r, t.TempDir(), Limits{})
		}
		if !errors.Is(err, ErrMalformed) || !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrMalformed and ErrCorrupt", name, err)
		}
		if len(err.Error()) > 1000 {
			t.Errorf("%s: a message of %d bytes: %.300s…", name, len(err.Error()), err)
		}
	}
}

// TestLongPathJustFits: a path as long as the limit allows unpacks, and
// one byte more is refused.
func TestLongPathJustFits(t *testing.T) {
	dir := t.TempDir()
	room := 4096 - 64 - 1 - len(dir) - 1 // the longest member path
	name := func(n int) string {
		var b strings.Builder
		for b.Len()+201 < n {
			b.WriteString(strings.Repeat("d", 200) + "/")
		}
		b.WriteString(strings.Repeat("f", n-b.Len()))
		return b.String()
	}
	for _, tc := range []struct {
		n  int
		ok bool
	}{{room, true}, {room + 1, false}} {
		r, err := Open(bytes.NewReader(archive(t, file(name(tc.n), "x"))), Tar)
		if err == nil {
			_, err = Extract(context.Background(), r, t.TempDir(), Limits{})
		}
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrMalformed)) {
			t.Errorf("a member path of %d bytes: %v, want accepted: %v", tc.n, err, tc.ok)
		}
	}
}
