package manager

import (
	"fmt"
	"net/url"
	"path"
	"strings"

	"github.com/depcache/depcache/state"
)

// keepPackedMark ends the source of a bundle key whose archive is kept as
// a file (KeepPacked). It is a URL fragment, which no source sends and
// ParseKey drops from what it is given (but this one, which it keeps), so
// the default key of a source, and
// its ID, are what they always were; and a depcache that predates the mark
// still reads a state that has such keys (it would fetch them unpacked, or
// fail to find the file).
const keepPackedMark = "#" + keepPackedFragment

// keepPackedFragment: a source given with this fragment (as ls shows a
// kept-packed key) names the kept-packed key, so that every command finds
// the entry by the source ls printed.
const keepPackedFragment = "no-unpack"

// KeepPacked returns the key of bundle k with its archive kept as a file,
// not unpacked (get --no-unpack). It is another entry than k: an unpacked
// and a kept copy of one source live side by side.
func KeepPacked(k state.Key) (state.Key, error) {
	if k.Kind != state.Bundle {
		return state.Key{}, fmt.Errorf("%s: only a bundle can be kept packed: %w", k.Source, ErrBadSource)
	}
	if !IsKeptPacked(k) {
		k.Source += keepPackedMark
	}
	if err := k.Validate(); err != nil {
		return state.Key{}, fmt.Errorf("%w: %w", ErrBadSource, err)
	}
	return k, nil
}

// IsKeptPacked reports whether k keeps its archive as a file.
func IsKeptPacked(k state.Key) bool {
	return k.Kind == state.Bundle && strings.HasSuffix(k.Source, keepPackedMark)
}

// fetchSource is the source to fetch for k: its Source without the marks
// that only tell entries apart.
func fetchSource(k state.Key) string {
	if k.Kind != state.Bundle {
		return k.Source
	}
	return strings.TrimSuffix(k.Source, keepPackedMark)
}

// archiveName returns the archive kind a bundle's name announces: ".zip",
// ".tar" (for .tar, .tar.gz, .tgz) or "".
func archiveName(k state.Key) string {
	p := fetchSource(k)
	if u, err := url.Parse(p); err == nil && (u.Scheme == "http" || u.Scheme == "https") {
		p = u.Path
	} else {
		p = strings.TrimPrefix(p, "file://")
	}
	name := strings.ToLower(path.Base(p))
	switch {
	case strings.HasSuffix(name, ".zip"):
		return ".zip"
	case strings.HasSuffix(name, ".tar"), strings.HasSuffix(name, ".tar.gz"), strings.HasSuffix(name, ".tgz"):
		return ".tar"
	}
	return ""
}
