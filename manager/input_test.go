package manager_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// TestParseImageReferences drives ParseKey with the references docker pull
// accepts, as people write them: none of them may go through url.Parse,
// which reads "ubuntu:22.04" as a host and a port.
func TestParseImageReferences(t *testing.T) {
	dig := "sha256:" + strings.Repeat("ab", 32)
	for _, tc := range []struct{ in, want string }{
		{"docker://ubuntu:22.04", "docker://index.docker.io/library/ubuntu:22.04"},
		{"docker://alpine:latest", "docker://index.docker.io/library/alpine:latest"},
		{"docker://alpine", "docker://index.docker.io/library/alpine:latest"},
		{"DOCKER://alpine:3.19", "docker://index.docker.io/library/alpine:3.19"},
		{"docker://library/alpine:3.19", "docker://index.docker.io/library/alpine:3.19"},
		{"docker://docker.io/alpine:3.19", "docker://index.docker.io/library/alpine:3.19"},
		{"docker://docker.io/library/alpine:3.19", "docker://index.docker.io/library/alpine:3.19"},
		{"docker://index.docker.io/library/alpine:3.19", "docker://index.docker.io/library/alpine:3.19"},
		{"docker://bitnami/redis:7.2", "docker://index.docker.io/bitnami/redis:7.2"},
		{"docker://ubuntu@" + dig, "docker://index.docker.io/library/ubuntu@" + dig},
		{"docker://ubuntu:22.04@" + dig, "docker://index.docker.io/library/ubuntu@" + dig},
		{"docker://localhost/app:1", "docker://localhost/app:1"},
		{"docker://localhost:5000/app", "docker://localhost:5000/app:latest"},
		{"docker://127.0.0.1:5000/team/app:v1.2.3", "docker://127.0.0.1:5000/team/app:v1.2.3"},
		{"docker://registry.example.com:8443/a/b/c/app:1_beta-2", "docker://registry.example.com:8443/a/b/c/app:1_beta-2"},
		{"docker://ghcr.io/org/team/app@" + dig, "docker://ghcr.io/org/team/app@" + dig},
		{"docker://[::1]:5000/app:1", "docker://[::1]:5000/app:1"},
	} {
		k, err := manager.ParseKey(tc.in, "")
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		if k.Kind != state.Image || k.Source != tc.want {
			t.Errorf("%q → %s %q, want image %q", tc.in, k.Kind, k.Source, tc.want)
		}
	}
	for _, in := range []string{
		"docker://",
		"docker://UPPER/case",
		"docker://alpine:",
		"docker://alpine:a:b",
		"docker://alpine@sha256:abc",
		"docker://alpine:tag with space",
		"docker://-leading/dash",
		"docker://alpine:" + strings.Repeat("t", 129),
		"docker://registry:99999/x", // found by a trial: the port went unchecked
		"docker://registry:0/x",
		"docker://[::1]:70000/x",
	} {
		if k, err := manager.ParseKey(in, ""); !errors.Is(err, manager.ErrBadSource) {
			t.Errorf("%q: got %+v, %v; want ErrBadSource", in, k, err)
		}
	}
	if _, err := manager.ParseKey("docker://alpine", strings.Repeat("a", 64)); !errors.Is(err, manager.ErrBadSource) {
		t.Errorf("--sha256 on an image: %v", err)
	}
	// A build context that exists: only the parameters are wrong.
	ctx := t.TempDir()
	if err := os.WriteFile(filepath.Join(ctx, "Dockerfile"), []byte("FROM scratch\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := manager.ParseKey("docker-build://"+ctx+"?tag=a:1", ""); err != nil {
		t.Fatalf("a good build source: %v", err)
	}
	for _, q := range []string{"?bogus=1", "?tag=a:1&tag=b:2", "?dockerfile=Dockerfile&dockerfile=Dockerfile"} {
		if _, err := manager.ParseKey("docker-build://"+ctx+q, ""); !errors.Is(err, manager.ErrBadSource) || !strings.Contains(err.Error(), "docker-build parameter") {
			t.Errorf("docker-build %s: %v, want ErrBadSource naming the parameter", q, err)
		}
	}
}

// invalidUTF8 are byte strings that encoding/json would store as U+FFFD.
var invalidUTF8 = []string{"\xff", "\xfe", "a\xffb", "\xc0\x80", "\xed\xa0\x80", "\xe2\x82", "ok\x80"}

// TestStringsRoundTrip: every string that reaches the state either comes
// back byte for byte from a fresh read of the root, or is refused with
// ErrInvalidText before anything is written.
func TestStringsRoundTrip(t *testing.T) {
	root := t.TempDir()
	m := newManager(t, root)
	ctx := context.Background()
	abs, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")
	k := mustKey(t, "file://"+abs, "")
	valid := []string{"job-1", "ünïcödé", "日本語", "emoji 🚀", "\ufffd", "tab-less name with spaces", strings.Repeat("é", 128)}
	for _, name := range valid {
		if _, err := m.Get(ctx, name, k); err != nil {
			t.Fatalf("Get(%q): %v", name, err)
		}
	}
	for _, name := range invalidUTF8 {
		_, err := m.Get(ctx, name, k)
		if !errors.Is(err, manager.ErrBadDependent) || !errors.Is(err, state.ErrInvalidText) {
			t.Errorf("Get(%q) = %v, want ErrBadDependent and ErrInvalidText", name, err)
		}
		if err := m.Release(ctx, name, k); !errors.Is(err, state.ErrInvalidText) {
			t.Errorf("Release(%q) = %v, want ErrInvalidText", name, err)
		}
	}
	s, err := state.Open(root, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	e := st.Get(k)
	if e == nil || len(e.Dependents) != len(valid) {
		t.Fatalf("entry after a fresh read: %+v", e)
	}
	for _, name := range valid {
		if _, ok := e.Dependents[name]; !ok {
			t.Errorf("dependent %q did not come back byte for byte (have %q)", name, keys(e.Dependents))
		}
	}
	for _, name := range valid {
		if err := m.Release(ctx, name, k); err != nil {
			t.Errorf("Release(%q) by its own name: %v", name, err)
		}
	}

	// Sources, build arguments, tags and pins.
	for _, src := range []string{
		"file:///tmp/\xff",
		"file:///tmp/%FF",
		"https://example.com/\xfe",
		"https://h%FF/",      // escaped in the host: unescaped, then lower-cased
		"http://H%FE:8080/x", // to U+FFFD, which would make these one entry
		"docker://alpine:\xff",
		"docker-build:///tmp?arg=K=%FF",
		"docker-build:///tmp?arg=%FE=v",
		"docker-build:///tmp?tag=%FF",
		"docker-build:///tmp?dockerfile=%FF",
	} {
		if _, err := manager.ParseKey(src, ""); !errors.Is(err, manager.ErrBadSource) {
			t.Errorf("ParseKey(%q) = %v, want ErrBadSource", src, err)
		} else if !errors.Is(err, state.ErrInvalidText) && !strings.HasPrefix(src, "docker://") {
			t.Errorf("ParseKey(%q) = %v: not named as invalid UTF-8", src, err)
		}
	}
	// Accepted sources come back as they were stored, and name their own
	// entry when given back.
	for _, src := range []string{
		"https://例え.jp/ファイル.tar.gz",
		"https://h%EF%BF%BD/x",
		"https://example.com/%E6%97%A5%20x?q=%C3%A9",
		"file:///tmp/日本 語",
		"docker://ghcr.io/ünï/x:1",
	} {
		k1, err := manager.ParseKey(src, "")
		if err != nil {
			if strings.HasPrefix(src, "docker://") && errors.Is(err, manager.ErrBadSource) {
				continue // image names are lower-case ASCII: refused, not changed
			}
			t.Errorf("ParseKey(%q): %v", src, err)
			continue
		}
		k2, err := manager.ParseKey(k1.Source, "")
		if err != nil || k2.ID() != k1.ID() || k2.Source != k1.Source {
			t.Errorf("ParseKey(%q) = %q; given back: %q, %v", src, k1.Source, k2.Source, err)
		}
	}
	for _, pin := range invalidUTF8 {
		p := state.DefaultPolicy()
		p.Pins = []string{pin}
		if err := p.Validate(); !errors.Is(err, state.ErrInvalidText) {
			t.Errorf("pin %q: %v, want ErrInvalidText", pin, err)
		}
	}
	for _, k := range []state.Key{
		{Kind: state.Bundle, Source: "file:///x\xff"},
		{Kind: state.Image, Source: "docker://x", Daemon: "\xfe"},
		{Kind: state.Image, Source: "docker-build://sha256:00", Build: &state.BuildSpec{Context: "/c", Dockerfile: "D", Args: map[string]string{"K": "\xff"}}},
		{Kind: state.Image, Source: "docker-build://sha256:00", Build: &state.BuildSpec{Context: "/c", Dockerfile: "D", Args: map[string]string{"\xff": "v"}}},
		{Kind: state.Image, Source: "docker-build://sha256:00", Build: &state.BuildSpec{Context: "/c\xff", Dockerfile: "D"}},
		{Kind: state.Image, Source: "docker-build://sha256:00", Build: &state.BuildSpec{Context: "/c", Dockerfile: "D", Tag: "t\xff"}},
	} {
		if err := k.Validate(); !errors.Is(err, state.ErrInvalidText) || !errors.Is(err, state.ErrBadKey) {
			t.Errorf("%+v: Validate = %v, want ErrBadKey and ErrInvalidText", k, err)
		}
	}
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
