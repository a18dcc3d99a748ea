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
	if err := os.Link(tmp, rootIDFile(s.root)); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", fmt.Errorf("root ID: %w", err)
	}
	id, err = readRootID(s.root)
	if err == nil && id == "" {
		err = fmt.Errorf("root ID file %s vanished after it was made", rootIDFile(s.root))
	}
	s.rootID = id
	return id, err
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
