package manager

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// ContentDigest is the sha256 of an entry's content as it lies on disk: of
// the bytes for a file; for a directory, of a listing of every path, its
// type and permissions, and the digest of each file (or the target of each
// symlink), in lexical order. It does not follow symlinks.
func ContentDigest(path string) (string, error) {
	return contentDigest(path, nil)
}

// contentDigest is ContentDigest with the digests of some files already
// known (hashed while they were written), by slash path relative to path.
func contentDigest(path string, known map[string]string) (string, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return "", err
	}
	if fi.Mode().IsRegular() {
		if sum, ok := known["."]; ok {
			return sum, nil
		}
		return fileDigest(path)
	}
	h := sha256.New()
	err = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(path, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.Type().IsRegular():
			sum, ok := known[filepath.ToSlash(rel)]
			if !ok {
				if sum, err = fileDigest(p); err != nil {
					return err
				}
			}
			fmt.Fprintf(h, "f %s %o %s\n", rel, info.Mode().Perm(), sum)
		case d.IsDir():
			fmt.Fprintf(h, "d %s\n", rel)
		case d.Type()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "l %s %s\n", rel, t)
		default:
			return fmt.Errorf("%s: unexpected file type %s", p, d.Type())
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func fileDigest(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
