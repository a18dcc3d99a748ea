package etcdstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/depcache/depcache/state"
)

// RootIDFile is the name of a root's ID file: a random ID written once,
// which the etcd prefix describing that root's content records too. The
// file store refuses a root that has one (state.ErrBoundElsewhere).
const RootIDFile = state.RootIDFile

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }

func rootIDFile(root string) string { return filepath.Join(root, RootIDFile) }

// readRootID returns the root's ID, "" if it has none yet.
func readRootID(root string) (string, error) {
	// Looked at first, not followed: a symlink would let another root's
	// ID vouch for this one.
	if err := state.CheckLayout(root, nil, []string{RootIDFile}); err != nil {
		return "", fmt.Errorf("root ID: %w", err)
	}
	b, err := os.ReadFile(rootIDFile(root))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("root ID: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if len(id) != 32 || strings.Trim(id, "0123456789abcdef") != "" {
		return "", fmt.Errorf("root ID file %s: %q is not a root ID", rootIDFile(root), id)
	}
	return id, nil
}

// RootPrefixFile names the etcd prefix that bound the root: written when a
// prefix records the root's ID, read before an unbound prefix may record
// it too. A root whose ID another prefix recorded is refused even while it
// holds no content (an rm of its last entry made it look new), since that
// prefix's next start-up would take this one's content for orphans.
const RootPrefixFile = "root-prefix"

// readRootPrefix returns the prefix that bound the root, "" if none is
// recorded (a root bound before the file existed, or never bound).
func readRootPrefix(root string) (string, error) {
	if err := state.CheckLayout(root, nil, []string{RootPrefixFile}); err != nil {
		return "", fmt.Errorf("root prefix: %w", err)
	}
	b, err := os.ReadFile(filepath.Join(root, RootPrefixFile))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("root prefix: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// recordRootPrefix records this store's prefix as the one that binds the
// root (temp file, rename: a reader sees the old name or the new).
func (s *Store) recordRootPrefix() error {
	p := filepath.Join(s.root, RootPrefixFile)
	tmp := p + ".tmp-" + newNonce()
	if err := s.perms.WriteFile(tmp, []byte(s.l.p+"\n")); err != nil {
		return fmt.Errorf("root prefix: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("root prefix: %w", err)
	}
	return nil
}

// ensureRootID returns the root's ID, making it if the root has none: a
// temporary file linked to the ID file's name, so that of two makers one
// wins and both read its ID.
func (s *Store) ensureRootID() (string, error) {
	s.idMu.Lock()
	defer s.idMu.Unlock()
	if s.rootID != "" {
		return s.rootID, nil
	}
	id, err := readRootID(s.root)
	if err != nil || id != "" {
		s.rootID = id
		return id, err
	}
	if err := s.perms.MkdirAll(s.root); err != nil {
		return "", fmt.Errorf("root ID: %w", err)
	}
	tmp := rootIDFile(s.root) + ".tmp-" + newNonce()
	if err := s.perms.WriteFile(tmp, []byte(newNonce()+"\n")); err != nil {
		return "", fmt.Errorf("root ID: %w", err)
	}
	defer os.Remove(tmp)
	made := true
	if err := os.Link(tmp, rootIDFile(s.root)); errors.Is(err, fs.ErrExist) {
		made = false
	} else if err != nil {
		return "", fmt.Errorf("root ID: %w", err)
	}
	// The file store looks for the ID file at its start, and this store
	// for the file store's state at its own: a file-store process that
	// began the root since this store's start made its state in between.
	// The ID made, the state is looked for again, so that of two such
	// processes at least one sees the other.
	if err := s.checkNoFileState(); err != nil {
		if made {
			os.Remove(rootIDFile(s.root))
		}
		return "", err
	}
	id, err = readRootID(s.root)
	if err == nil && id == "" {
		err = fmt.Errorf("root ID file %s vanished after it was made", rootIDFile(s.root))
	}
	s.rootID = id
	return id, err
}

// checkNoFileState refuses (state.ErrBoundElsewhere) a root that holds
// the file store's state, unless the store is to adopt the root (the
// rebuild that moves a root to etcd, which sets that state aside): the
// content there is the file store's, which this prefix would take for
// orphans and move aside under the processes that hold it. Two processes
// that began a new root at once, one on each store, leave it with both
// stores' marks, and each store then refuses it.
func (s *Store) checkNoFileState() error {
	if s.adoptRoot {
		return nil
	}
	p := filepath.Join(s.root, state.StateFile)
	if _, err := os.Lstat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	return fmt.Errorf("%w: root %s holds the file store's state (%s), and one store describes a root's content: use the root without --state, "+
		"or, to move it to etcd, stop its workers and run depcache --root %s --state %s doctor --rebuild; "+
		"if it also has %s (two processes began the root at once, one on each store), see which store's processes use it, and remove the other's mark",
		state.ErrBoundElsewhere, s.root, p, s.root, s, rootIDFile(s.root))
}

// checkBoundTo checks that the prefix, bound meanwhile to the root with
// ID bound, is bound to this root. It makes no ID file: a root without
// one is another root.
func (s *Store) checkBoundTo(bound string) error {
	id, err := readRootID(s.root)
	if err != nil {
		return fmt.Errorf("%s: %w", s, err)
	}
	switch id {
	case bound:
		s.idMu.Lock()
		s.rootID = id
		s.idMu.Unlock()
		s.bound.Store(true)
		return nil
	case "":
		return fmt.Errorf("%w: %s belongs to the root with ID %s, but root %s has no ID file (%s): it is another root", ErrRootMismatch, s, bound, s.root, rootIDFile(s.root))
	}
	return fmt.Errorf("%w: %s belongs to the root with ID %s, but root %s has ID %s", ErrRootMismatch, s, bound, s.root, id)
}
