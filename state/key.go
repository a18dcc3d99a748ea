package state

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Kind is the kind of an entry.
type Kind string

const (
	// Bundle is a file, or a directory unpacked from a tar archive, fetched
	// from http://, https:// or file://.
	Bundle Kind = "bundle"
	// Image is a Docker image held by one daemon.
	Image Kind = "image"
)

// maxSourceLen bounds a source so that a hostile key cannot bloat the state.
const maxSourceLen = 4096

// Key identifies an entry. Source must already be normalised by whoever
// parsed it (the manager's source registry); Key only checks that it is safe
// to store.
type Key struct {
	Kind   Kind   `json:"kind"`
	Source string `json:"source"`
	// SHA256 is the expected digest of the fetched bytes, lower-case hex,
	// when the requester gave one. Two requests that differ only here are
	// different entries.
	SHA256 string `json:"sha256,omitempty"`
	// Daemon is the Docker daemon's ID for image entries.
	Daemon string `json:"daemon,omitempty"`
	// Build says how to build a docker-build:// image. It is not part of
	// the key's identity (Source holds the fingerprint of the context, the
	// Dockerfile and the build arguments): two requests for the same
	// content share one entry whatever their tag.
	Build *BuildSpec `json:"build,omitempty"`
}

// BuildSpec is how to build an image from a context directory.
type BuildSpec struct {
	Context    string            `json:"context"`
	Dockerfile string            `json:"dockerfile"`
	Tag        string            `json:"tag,omitempty"`
	Args       map[string]string `json:"args,omitempty"`
}

// String is the canonical text of the key; ID hashes it.
func (k Key) String() string {
	var b strings.Builder
	b.WriteString(string(k.Kind))
	b.WriteByte(':')
	b.WriteString(k.Source)
	if k.SHA256 != "" {
		b.WriteString("#sha256=")
		b.WriteString(k.SHA256)
	}
	if k.Daemon != "" {
		b.WriteString("@daemon=")
		b.WriteString(k.Daemon)
	}
	return b.String()
}

// ID is a fixed-length name derived from the key. User strings never become
// paths: every file depcache keeps for an entry is named by its ID.
func (k Key) ID() string {
	sum := sha256.Sum256([]byte(k.String()))
	return hex.EncodeToString(sum[:16])
}

// Validate reports what makes k unsafe or meaningless.
func (k Key) Validate() error {
	switch k.Kind {
	case Bundle, Image:
	default:
		return fmt.Errorf("key %q: unknown kind %q: %w", k.Source, k.Kind, ErrBadKey)
	}
	if k.Source == "" {
		return fmt.Errorf("empty source: %w", ErrBadKey)
	}
	if len(k.Source) > maxSourceLen {
		return fmt.Errorf("source longer than %d bytes: %w", maxSourceLen, ErrBadKey)
	}
	if err := CheckText("source", k.Source); err != nil {
		return fmt.Errorf("%w: %w", err, ErrBadKey)
	}
	for _, r := range k.Source {
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			return fmt.Errorf("source %q: control or invalid character: %w", k.Source, ErrBadKey)
		}
	}
	if k.SHA256 != "" {
		if err := CheckSHA256(k.SHA256); err != nil {
			return fmt.Errorf("key %q: %w", k.Source, err)
		}
	}
	if strings.ContainsFunc(k.Daemon, unicode.IsControl) || len(k.Daemon) > 256 {
		return fmt.Errorf("key %q: bad daemon ID: %w", k.Source, ErrBadKey)
	}
	if err := CheckText("daemon ID", k.Daemon); err != nil {
		return fmt.Errorf("key %q: %w: %w", k.Source, err, ErrBadKey)
	}
	if k.Build != nil {
		if err := k.Build.Validate(); err != nil {
			return fmt.Errorf("key %q: %w: %w", k.Source, err, ErrBadKey)
		}
	}
	return nil
}

// Validate refuses a build spec with a string the state cannot store.
func (b *BuildSpec) Validate() error {
	for _, f := range [...]struct{ what, s string }{{"build context", b.Context}, {"dockerfile", b.Dockerfile}, {"build tag", b.Tag}} {
		if err := CheckText(f.what, f.s); err != nil {
			return err
		}
	}
	for name, v := range b.Args {
		if err := CheckText("build argument name", name); err != nil {
			return err
		}
		if err := CheckText("build argument "+name, v); err != nil {
			return err
		}
	}
	return nil
}

// CheckText refuses a string that is not valid UTF-8. The state is JSON,
// and encoding/json replaces each invalid byte with U+FFFD: two different
// names ("\xff" and "\xfe") would be stored as one, and neither could be
// found again by its own bytes. Every string that reaches the state passes
// here first, so that what is stored comes back byte for byte.
func CheckText(what, s string) error {
	if utf8.ValidString(s) {
		return nil
	}
	return fmt.Errorf("%s %q: %w", what, s, ErrInvalidText)
}

// CheckSHA256 accepts exactly 64 lower-case hex digits.
func CheckSHA256(s string) error {
	if len(s) != 64 {
		return fmt.Errorf("sha256 %q: want 64 hex digits, got %d characters: %w", s, len(s), ErrBadKey)
	}
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("sha256 %q: not lower-case hex: %w", s, ErrBadKey)
		}
	}
	return nil
}
