package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/depcache/depcache/state"
)

// Source fetches the bytes of one kind of source.
//
// Fetch writes the content at src to w from its first byte. It calls total
// with the expected size as soon as it knows it. An error that retrying
// cannot fix (a 404, a missing file) wraps [ErrPermanent]; any other error
// is retried by the manager with back-off, into a fresh w.
type Source interface {
	Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) error
}

// RangeSource is a Source that can resume a fetch from an offset, as long
// as the content is still the version a validator names. The manager uses
// it when a Source implements it, and checkpoints only what it fetched
// under a strong validator (see [Validator.Strong]).
//
// FetchRange writes the content at src to w from the offset it hands to
// start, which it calls once before it writes any byte: from.Offset when
// the source sends the rest of the version from.Validator names, 0 when it
// sends the whole content instead (the content changed, the source cannot
// send a range, from is zero or its validator is not strong). start also
// gets the full size (-1 when unknown) and the validator of the bytes sent;
// an error from start ends the fetch with it. Errors are as for Fetch; a
// retry gets a fresh from.
type RangeSource interface {
	Source
	FetchRange(ctx context.Context, src string, from ResumeFrom, w io.Writer, start func(RangeStart) error) error
}

// Validator names one version of a source's content: a strong ETag, or
// the Last-Modified time with the length.
type Validator struct {
	ETag         string `json:"etag,omitempty"`
	LastModified string `json:"last_modified,omitempty"`
	Length       int64  `json:"length,omitempty"`
}

// Strong reports whether v may resume a fetch: a strong ETag, or, with no
// ETag at all, a Last-Modified time and a length. A weak ETag (W/"...")
// names a version only up to equivalence, not its bytes, so it never does.
func (v Validator) Strong() bool {
	if v.ETag != "" {
		return !strings.HasPrefix(v.ETag, "W/") && strings.HasPrefix(v.ETag, `"`)
	}
	return v.LastModified != "" && v.Length > 0
}

// names reports whether v names the version w does, by w's own terms: its
// ETag when it has one, else its Last-Modified time; and the length when
// both know it.
func (v Validator) names(w Validator) bool {
	if v.Length > 0 && w.Length > 0 && v.Length != w.Length {
		return false
	}
	if w.ETag != "" {
		return v.ETag == w.ETag
	}
	return v.ETag == "" && v.LastModified == w.LastModified
}

// ResumeFrom asks a RangeSource for the bytes from Offset on of the version
// Validator names. The zero value asks for the whole content.
type ResumeFrom struct {
	Offset    int64
	Validator Validator
}

// RangeStart is what a RangeSource sends: its bytes start at Offset of a
// content of Total bytes (-1: unknown), whose version is Validator (zero
// when the source gave none).
type RangeStart struct {
	Offset    int64
	Total     int64
	Validator Validator
}

// ErrPermanent marks a fetch error that a retry would only repeat.
var ErrPermanent = errors.New("permanent failure")

// ErrBadSource means a source string cannot be used: unknown scheme,
// malformed URL, relative file path.
var ErrBadSource = errors.New("bad source")

// NormaliseDigest takes a SHA-256 as sha256sum, docker and most registries
// print it: upper or lower case, with or without a "sha256:" prefix, and
// returns its lower-case hex.
func NormaliseDigest(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > len("sha256:") && strings.EqualFold(s[:len("sha256:")], "sha256:") {
		s = s[len("sha256:"):]
	}
	return strings.ToLower(s)
}

// ParseKey normalises a source string and an optional expected sha256
// (NormaliseDigest's forms) into a key. Normalising makes two spellings of
// one URL share one entry.
func ParseKey(source, sha256 string) (state.Key, error) {
	if err := state.CheckText("source", source); err != nil {
		return state.Key{}, fmt.Errorf("%w: %w", ErrBadSource, err)
	}
	// An image reference is not a URL: "docker://ubuntu:22.04" would be
	// read as host "ubuntu" with port "22.04". Only the scheme is shared.
	if sch, rest, ok := strings.Cut(source, "://"); ok && strings.EqualFold(sch, "docker") {
		if sha256 != "" {
			return state.Key{}, fmt.Errorf("source %q: --sha256 applies to bundles; pin an image by digest (docker://repo@sha256:...): %w", source, ErrBadSource)
		}
		ref, err := ParseImageRef(rest)
		if err != nil {
			return state.Key{}, err
		}
		k := state.Key{Kind: state.Image, Source: "docker://" + ref}
		if err := k.Validate(); err != nil {
			return state.Key{}, fmt.Errorf("%w: %w", ErrBadSource, err)
		}
		return k, nil
	}
	if sch, rest, ok := strings.Cut(source, "://"); ok && strings.EqualFold(sch, "docker-build") && strings.HasPrefix(strings.ToLower(rest), "sha256:") {
		return buildRef(source, rest, sha256)
	}
	u, err := url.Parse(source)
	if err != nil {
		return state.Key{}, fmt.Errorf("source %q: %w: %w", source, ErrBadSource, err)
	}
	k := state.Key{Kind: state.Bundle, SHA256: NormaliseDigest(sha256)}
	switch strings.ToLower(u.Scheme) {
	case "http", "https":
		if u.Hostname() == "" { // "https://:443" has a port and no host
			return state.Key{}, fmt.Errorf("source %q: no host: %w", source, ErrBadSource)
		}
		if u.User != nil {
			// The source is the entry's name: it would be written to the
			// state, which every user of the root reads, and shown by ls,
			// logs and the status page.
			return state.Key{}, fmt.Errorf("source %s://%s%s: credentials in a source (user:password@) are refused: a source is stored in the state, which every user of the root can read, and shown by ls and the status page; serve the file without them, or through a proxy that adds them: %w",
				u.Scheme, u.Host, u.EscapedPath(), ErrBadSource)
		}
		if p := u.Port(); p != "" {
			if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
				return state.Key{}, fmt.Errorf("source %q: port %s: %w: want 1 to 65535", source, p, ErrBadSource)
			}
		}
		// The host is kept unescaped: "h%FF" and "h%FE" would both
		// lower-case to U+FFFD and name one entry.
		if err := state.CheckText("host", u.Host); err != nil {
			return state.Key{}, fmt.Errorf("source %q: %w: %w", source, ErrBadSource, err)
		}
		u.Scheme = strings.ToLower(u.Scheme)
		u.Host = strings.ToLower(u.Host)
		if p := u.Port(); (u.Scheme == "http" && p == "80") || (u.Scheme == "https" && p == "443") {
			u.Host = u.Hostname()
		}
		packed := u.Fragment == keepPackedFragment
		u.Fragment, u.RawFragment = "", ""
		if u.Path == "" {
			u.Path = "/"
		}
		// RFC 3986, 6.2.2: "%7E" and "~" name one resource, "%2f" and
		// "%2F" too; "%2F" and "/" do not. So unreserved characters are
		// unescaped and the other escapes upper-cased, and nothing else.
		// And 6.2.2.3: "/a/./b" and "/a/x/../b" are "/a/b" (after the
		// escapes, so that "%2E%2E" is a ".." too, and "%2F" no "/").
		raw := removeDotSegments(normaliseEscapes(u.EscapedPath()))
		if p, err := url.PathUnescape(raw); err == nil {
			u.Path, u.RawPath = p, raw
		} else {
			u.RawPath = normaliseEscapes(u.EscapedPath())
		}
		u.RawQuery = normaliseEscapes(u.RawQuery)
		k.Source = u.String()
		if packed {
			k.Source += keepPackedMark
		}
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return state.Key{}, fmt.Errorf("source %q: file URLs must name a local absolute path (file:///path): %w", source, ErrBadSource)
		}
		if !filepath.IsAbs(u.Path) {
			return state.Key{}, fmt.Errorf("source %q: file path must be absolute: %w", source, ErrBadSource)
		}
		k.Source = "file://" + filepath.Clean(u.Path)
		if strings.HasSuffix(k.Source, keepPackedMark) {
			// It would read as the kept-packed copy of another file.
			return state.Key{}, fmt.Errorf("source %q: a file path may not end in %q (rename it): %w", source, keepPackedMark, ErrBadSource)
		}
		if strings.ContainsAny(u.Path, "%#?") {
			// The source is kept unescaped, as ls prints it: given back,
			// "#..." and "?..." would read as a fragment or a query and
			// "%41" as an escape, naming another file.
			return state.Key{}, fmt.Errorf("source %q: a file path with %%, # or ? in it cannot be named back by its source (rename it): %w", source, ErrBadSource)
		}
		if u.Fragment == keepPackedFragment {
			k.Source += keepPackedMark
		}
	case "docker-build":
		if sha256 != "" {
			return state.Key{}, fmt.Errorf("source %q: --sha256 applies to bundles: %w", source, ErrBadSource)
		}
		if k, err = parseBuildKey(u); err != nil {
			return state.Key{}, err
		}
	case "":
		return state.Key{}, fmt.Errorf("source %q: no scheme (want http://, https://, file://, docker:// or docker-build://): %w", source, ErrBadSource)
	default:
		return state.Key{}, fmt.Errorf("source %q: unsupported scheme %q: %w", source, u.Scheme, ErrBadSource)
	}
	if err := k.Validate(); err != nil {
		return state.Key{}, fmt.Errorf("%w: %w", ErrBadSource, err)
	}
	return k, nil
}

// scheme returns the scheme of a normalised source.
func scheme(src string) string {
	s, _, _ := strings.Cut(src, "://")
	return s
}

// removeDotSegments is RFC 3986's remove_dot_segments (5.2.4) for p, an
// escaped absolute path: "." segments go, and ".." ones with the segment
// before them (none past the root). A path with neither is p itself.
func removeDotSegments(p string) string {
	if !strings.Contains(p, ".") || !strings.HasPrefix(p, "/") {
		return p
	}
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	for i, seg := range segs {
		last := i == len(segs)-1
		switch seg {
		case ".":
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
		default:
			out = append(out, seg)
			continue
		}
		if last {
			out = append(out, "") // "/a/." and "/a/b/.." end in a "/"
		}
	}
	return "/" + strings.Join(out, "/")
}

// normaliseEscapes unescapes the percent-escapes of unreserved characters
// (letters, digits, "-", ".", "_", "~") in s, an escaped URL component, and
// upper-cases the hex digits of the others (RFC 3986, 6.2.2.1 and 6.2.2.2).
func normaliseEscapes(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' || i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
			b.WriteByte(s[i])
			continue
		}
		c := unhex(s[i+1])<<4 | unhex(s[i+2])
		if unreserved(c) {
			b.WriteByte(c)
		} else {
			b.WriteByte('%')
			b.WriteString(strings.ToUpper(s[i+1 : i+3]))
		}
		i += 2
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}
