package manager

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/depcache/depcache/state"
)

// fingerprintLabel marks images built by depcache with their fingerprint.
const fingerprintLabel = "io.depcache.fingerprint"

// parseBuildKey reads docker-build:///abs/context?dockerfile=F&tag=T&arg=K=V
// and fingerprints the context: the key is the fingerprint, not the tag.
func parseBuildKey(u *url.URL) (state.Key, error) {
	dir := filepath.Clean(u.Path)
	if u.Host != "" || !filepath.IsAbs(dir) {
		return state.Key{}, fmt.Errorf("docker-build:// needs an absolute context path (docker-build:///path/to/context): %w", ErrBadSource)
	}
	q := u.Query()
	for k, vs := range q {
		switch {
		case k != "dockerfile" && k != "tag" && k != "arg":
			// A typo would otherwise build with the default silently.
			return state.Key{}, fmt.Errorf("docker-build parameter %q: unknown (want dockerfile, tag or arg): %w", k, ErrBadSource)
		case k != "arg" && len(vs) > 1:
			return state.Key{}, fmt.Errorf("docker-build parameter %q given %d times: %w", k, len(vs), ErrBadSource)
		}
	}
	spec := &state.BuildSpec{Context: dir, Dockerfile: q.Get("dockerfile"), Tag: q.Get("tag")}
	if spec.Dockerfile == "" {
		spec.Dockerfile = "Dockerfile"
	}
	if !filepath.IsLocal(spec.Dockerfile) {
		return state.Key{}, fmt.Errorf("dockerfile %q must be a path inside the context: %w", spec.Dockerfile, ErrBadSource)
	}
	for _, a := range q["arg"] {
		k, v, ok := strings.Cut(a, "=")
		if !ok || k == "" {
			return state.Key{}, fmt.Errorf("build arg %q: want NAME=VALUE: %w", a, ErrBadSource)
		}
		if spec.Args == nil {
			spec.Args = map[string]string{}
		}
		spec.Args[k] = v
	}
	if err := spec.Validate(); err != nil {
		return state.Key{}, fmt.Errorf("%w: %w", ErrBadSource, err)
	}
	if spec.Tag != "" {
		if _, err := ParseImageRef(spec.Tag); err != nil {
			return state.Key{}, err
		}
	}
	fp, err := fingerprint(spec)
	if err != nil {
		return state.Key{}, fmt.Errorf("build context %s: %w: %w", dir, ErrBadSource, err)
	}
	return state.Key{Kind: state.Image, Source: "docker-build://sha256:" + fp, Build: spec}, nil
}

// buildRef parses docker-build://sha256:FINGERPRINT, the source that ls
// prints for a built image: it names an entry that exists (for rm,
// release, and a get that holds it), but carries no context to build
// from, so a get of it when the entry is gone fails (applyRequest).
func buildRef(source, rest, sha256 string) (state.Key, error) {
	if sha256 != "" {
		return state.Key{}, fmt.Errorf("source %q: --sha256 applies to bundles: %w", source, ErrBadSource)
	}
	fp := strings.TrimPrefix(strings.ToLower(rest), "sha256:")
	if len(fp) != 64 || strings.Trim(fp, "0123456789abcdef") != "" {
		return state.Key{}, fmt.Errorf("source %q: a built image's fingerprint is 64 hex digits (docker-build://sha256:HEX, as ls prints it), or give its context: docker-build:///path/to/context: %w", source, ErrBadSource)
	}
	return state.Key{Kind: state.Image, Source: "docker-build://sha256:" + fp}, nil
}

// isBuildRef reports whether k names a built image by its fingerprint
// alone, without the spec to build it from.
func isBuildRef(k state.Key) bool {
	return k.Kind == state.Image && k.Build == nil && strings.HasPrefix(k.Source, "docker-build://sha256:")
}

// fingerprint hashes every file of the context (path, mode, content), the
// Dockerfile's name and the build arguments.
func fingerprint(spec *state.BuildSpec) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "dockerfile %s\n", spec.Dockerfile)
	keys := make([]string, 0, len(spec.Args))
	for k := range spec.Args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(h, "arg %q=%q\n", k, spec.Args[k])
	}
	if _, err := os.Stat(filepath.Join(spec.Context, spec.Dockerfile)); err != nil {
		return "", err
	}
	d, err := ContentDigest(spec.Context)
	if err != nil {
		return "", err
	}
	fmt.Fprintf(h, "context %s\n", d)
	return hex.EncodeToString(h.Sum(nil)), nil
}

// contextTar streams the build context as a tar archive.
func contextTar(dir string) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || p == dir {
				return err
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			link := ""
			if d.Type()&fs.ModeSymlink != 0 {
				if link, err = os.Readlink(p); err != nil {
					return err
				}
			}
			hdr, err := tar.FileInfoHeader(info, link)
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(dir, p)
			hdr.Name = filepath.ToSlash(rel)
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			if d.Type().IsRegular() {
				f, err := os.Open(p)
				if err != nil {
					return err
				}
				defer f.Close()
				_, err = io.Copy(tw, f)
				return err
			}
			return nil
		})
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	return pr
}

// buildImage builds the image of key (owner only), or finds the image an
// earlier build of the same fingerprint left in the daemon.
func (m *Manager) buildImage(ctx context.Context, key state.Key) (ImageInfo, bool, error) {
	eng := m.cfg.Docker
	if eng == nil {
		return ImageInfo{}, false, fmt.Errorf("no Docker engine configured: %w", ErrPermanent)
	}
	if key.Build == nil {
		return ImageInfo{}, false, fmt.Errorf("no build spec in the entry: %w", ErrPermanent)
	}
	fp := strings.TrimPrefix(key.Source, "docker-build://sha256:")
	if info, ok, err := eng.FindLabeled(ctx, fingerprintLabel, fp); err != nil || ok {
		return info, ok, err
	}
	rc := contextTar(key.Build.Context)
	defer rc.Close()
	id, err := eng.Build(ctx, rc, *key.Build, map[string]string{fingerprintLabel: fp})
	if err != nil {
		return ImageInfo{}, false, err
	}
	info, ok, err := eng.Inspect(ctx, id)
	if err == nil && !ok {
		err = fmt.Errorf("the engine built %s but does not have it", id)
	}
	return info, false, err
}
