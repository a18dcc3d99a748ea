package manager

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/depcache/depcache/manager/unpack"
	"github.com/depcache/depcache/state"
	"github.com/sirupsen/logrus"
)

// Warnings returns what a user of entry e should know about its content,
// as read from the metadata published with it: for a bundle named like an
// archive whose bytes are not one, that it is kept as a file (the warning
// its download logged, which a later user, or one whose log level hides
// warnings, did not see). It is nil when there is nothing to say, and for
// an entry that is not READY or whose metadata cannot be read.
func (m *Manager) Warnings(e state.Entry) []string {
	if e.Stage != state.Ready || e.Key.Kind != state.Bundle || IsKeptPacked(e.Key) || archiveName(e.Key) == "" || e.Path == "" {
		return nil
	}
	abs, err := m.Abs(e)
	if err != nil {
		return nil
	}
	b, err := readNote(filepath.Join(filepath.Dir(abs), metaName))
	if err != nil {
		return nil
	}
	var meta Meta
	if json.Unmarshal(b, &meta) != nil || meta.Format != unpack.Plain.String() {
		return nil
	}
	return []string{notArchiveWarning(e.Key)}
}

// notArchiveWarning is the warning of a bundle named like an archive whose
// content is not one, in the words the download logs it with.
func notArchiveWarning(k state.Key) string {
	return fmt.Sprintf("%s is named like a %s archive but its content is not one: it is kept as a file", k.Source, strings.TrimPrefix(archiveName(k), "."))
}

// WarningRecord returns the text of a log record that is one of the
// warnings Warnings returns, logged by the download that found it, so that
// a caller showing warnings its own way (the CLI, in one line) can tell it
// from the other records.
func WarningRecord(r *logrus.Entry) (string, bool) {
	src, _ := r.Data["source"].(string)
	if r.Level != logrus.WarnLevel || src == "" {
		return "", false
	}
	if w := notArchiveWarning(state.Key{Kind: state.Bundle, Source: src}); r.Message == w {
		return w, true
	}
	return "", false
}
