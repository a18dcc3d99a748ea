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
