package manager_test

import (
	"strings"
	"testing"

	"github.com/depcache/depcache/manager"
)

// FuzzParseKey: no source makes ParseKey panic; an accepted key is valid
// and normalising is idempotent.
func FuzzParseKey(f *testing.F) {
	for _, s := range []string{"https://Example.com:443/a.tgz#x", "http://h/p?q=1", "file:///tmp/../x", "docker://alpine",
		"docker://127.0.0.1:5000/a/b@sha256:" + strings.Repeat("0", 64), "ftp://x", "", "http://%zz", "file://host/x"} {
		f.Add(s, "")
	}
	f.Add("https://x/y", strings.Repeat("a", 64))
	f.Fuzz(func(t *testing.T, src, sha string) {
		if strings.HasPrefix(strings.ToLower(src), "docker-build:") {
			return // fingerprints a directory: I/O, not parsing
		}
		k, err := manager.ParseKey(src, sha)
		if err != nil {
			return
		}
		if err := k.Validate(); err != nil {
			t.Fatalf("ParseKey(%q) gave an invalid key: %v", src, err)
		}
		k2, err := manager.ParseKey(k.Source, k.SHA256)
		if err != nil {
			t.Fatalf("the normalised source %q does not parse: %v", k.Source, err)
		}
		if k2.Source != k.Source {
			t.Fatalf("normalising is not idempotent: %q -> %q -> %q", src, k.Source, k2.Source)
		}
	})
}
