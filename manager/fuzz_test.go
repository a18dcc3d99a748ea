package manager_test

import (
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/depcache/depcache/manager"
)

// FuzzParseKey: no source makes ParseKey panic; an accepted key is valid,
// and normalising is idempotent in everything that makes the key: kind,
// source, digest and ID. docker-build:// sources are fuzzed on their query
// (Dockerfile, tag, build arguments) over one fixed context directory,
// since the fingerprint reads that directory.
func FuzzParseKey(f *testing.F) {
	ctxDir := f.TempDir()
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte("FROM scratch\n"), 0o644); err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{"https://Example.com:443/a.tgz#x", "http://h/p?q=1", "file:///tmp/../x", "docker://alpine",
		"docker://ubuntu:22.04", "docker://localhost:5000/a/b/c:1", "DOCKER://docker.io/library/alpine",
		"docker://127.0.0.1:5000/a/b@sha256:" + strings.Repeat("0", 64), "ftp://x", "", "http://%zz", "file://host/x",
		"docker-build:?tag=app:1&arg=K=V&arg=A=B", "docker-build:?dockerfile=Dockerfile", "docker-build:?arg=%FF=1",
		"file:///tmp/a%3Fb", "file:///tmp/a%23b#no-unpack", "file:///tmp/a%2541", "https://x/a.zip#no-unpack",
		"https://h%FF/", "http://H%c3%A9:80/", "http://h/a/./b/../%2E%2E/c/.", "http://h/a%2F..//./"} {
		f.Add(s, "")
	}
	f.Add("https://x/y", strings.Repeat("a", 64))
	f.Add("https://x/y", strings.Repeat("A", 64))
	f.Fuzz(func(t *testing.T, src, sha string) {
		const p = "docker-build:"
		build := false
		if len(src) >= len(p) && strings.EqualFold(src[:len(p)], p) {
			_, query, _ := strings.Cut(src[len(p):], "?")
			src, build = "docker-build://"+ctxDir+"?"+query, true
		}
		k, err := manager.ParseKey(src, sha)
		if err != nil {
			return
		}
		if err := k.Validate(); err != nil {
			t.Fatalf("ParseKey(%q) gave an invalid key: %v", src, err)
		}
		if u, err := url.Parse(src); err == nil && !utf8.ValidString(u.Host) {
			// Lower-casing would turn each bad byte into U+FFFD: two
			// sources, one entry.
			t.Fatalf("ParseKey(%q) accepted a host that unescapes to invalid UTF-8 (%q)", src, u.Host)
		}
		again := src
		if !build {
			// A build key's source is its fingerprint, which names no
			// context: it is parsed again from the request instead.
			again = k.Source
		}
		k2, err := manager.ParseKey(again, k.SHA256)
		if err != nil {
			t.Fatalf("the normalised source %q does not parse: %v", again, err)
		}
		if k2.Kind != k.Kind || k2.Source != k.Source || k2.SHA256 != k.SHA256 || k2.ID() != k.ID() || !reflect.DeepEqual(k2.Build, k.Build) {
			t.Fatalf("normalising is not idempotent: %q -> %+v -> %+v", src, k, k2)
		}
	})
}
