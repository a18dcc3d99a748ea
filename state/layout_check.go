package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// ErrLayout means a name of the root's own layout (a directory such as
// entries/, or the state or lock file) is not what depcache made there: a
// symlink, or a file where a directory belongs. depcache refuses to work
// through it rather than write, move or delete wherever it leads.
var ErrLayout = errors.New("unexpected file in the cache root's layout")

// CheckLayout refuses a root whose layout names are not what they should
// be, naming the first that is not: each of dirs must be a directory (not
// a symlink to one) and each of files a regular file, or not exist. It
// looks with Lstat, so that nothing is followed.
func CheckLayout(root string, dirs, files []string) error {
	for _, names := range []struct {
		list []string
		want fs.FileMode
		what string
	}{{dirs, fs.ModeDir, "a directory"}, {files, 0, "a regular file"}} {
		for _, n := range names.list {
			p := filepath.Join(root, n)
			fi, err := os.Lstat(p)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			if fi.Mode().Type() != names.want {
				hint := "move it out of the cache root; depcache makes " + n + " itself"
				if fi.Mode()&fs.ModeSymlink != 0 {
					hint = "move it back, or make --root the directory it points to"
				}
				return fmt.Errorf("%s is %s, not %s: %w (%s)", p, describeType(fi.Mode()), names.what, ErrLayout, hint)
			}
		}
	}
	return nil
}

func describeType(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "a symlink"
	case m.IsDir():
		return "a directory"
	case m.IsRegular():
		return "a regular file"
	}
	return "a special file (" + m.Type().String() + ")"
}

// checkFiles refuses a state, previous-state or lock file that is not a
// regular file.
func checkFiles(root string) error {
	return CheckLayout(root, []string{ShardDir}, []string{StateFile, StateFile + ".prev", LockFile, ReserveFile})
}
