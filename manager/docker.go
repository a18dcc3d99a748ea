package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"

	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/depcache/depcache/state"
)

// ErrImageInUse means the engine refused to remove an image because a
// container uses it.
var ErrImageInUse = errors.New("image in use")

// ErrEngineUnavailable means the Docker engine could not be asked: none is
// configured here, it is down or its socket unreachable, or a call to it
// ran out of its bound (10 s). It says nothing of the image: nothing was
// changed for it, and the same request may succeed once the engine
// answers.
var ErrEngineUnavailable = errors.New("docker engine unavailable")

// Engine is the Docker engine as the manager needs it: images live in a
// host's daemon, not on the shared filesystem. Package manager/docker
// implements it with the Docker Engine API, so that an embedder without
// images does not link the Docker SDK.
type Engine interface {
	// DaemonID identifies the daemon; image entries belong to one daemon.
	DaemonID(ctx context.Context) (string, error)
	// Inspect returns the image's full ID and size, and false when the
	// daemon does not have it.
	Inspect(ctx context.Context, ref string) (ImageInfo, bool, error)
	// Pull pulls ref, reporting bytes done and expected over all layers.
	Pull(ctx context.Context, ref string, progress func(done, total int64)) error
	// RegistrySize sums the manifest's layer and config sizes, or returns
	// false when the registry cannot tell.
	RegistrySize(ctx context.Context, ref string) (int64, bool, error)
	// ImagesInUse returns the full IDs of images used by any container,
	// running or not.
	ImagesInUse(ctx context.Context) (map[string]bool, error)
	// Remove removes an image by full ID; ErrImageInUse on a conflict. It
	// never forces.
	Remove(ctx context.Context, id string) error
	// FindLabeled finds an image carrying label=value.
	FindLabeled(ctx context.Context, label, value string) (ImageInfo, bool, error)
	// Build builds an image from a tar of its context and returns its ID.
	Build(ctx context.Context, context io.Reader, spec state.BuildSpec, labels map[string]string) (string, error)
}

// ContainerNamer is an Engine that can also name the containers (running
// or not) that use each image, by the image's full ID, so that what keeps
// an image can be said (ls, rm). An Engine without it is asked
// ImagesInUse, and its containers go unnamed.
type ContainerNamer interface {
	ContainersByImage(ctx context.Context) (map[string][]string, error)
}

// EngineAddr is an Engine that can say where it is (its DOCKER_HOST), for
// messages.
type EngineAddr interface {
	Addr() string
}

// engineName names eng in messages: "the Docker engine at ADDR".
func engineName(eng Engine) string {
	if a, ok := eng.(EngineAddr); ok && a.Addr() != "" {
		return "the Docker engine at " + a.Addr()
	}
	return "the Docker engine"
}

// ImageInfo is what the engine says of an image.
type ImageInfo struct {
	ID          string
	RepoDigests []string
	Size        int64
}

// ParseImageRef normalises a docker:// reference: the registry, the
// repository and a tag (latest when none is given) or a digest.
//
// A reference must follow the grammar docker pull applies
// (distribution's reference package, which the engine itself uses), so
// that what is accepted here is what the daemon can pull;
// go-containerregistry's name package, whose checks are looser, gives the
// canonical text that keys have always been written in.
func ParseImageRef(ref string) (string, error) {
	if _, err := reference.ParseNormalizedNamed(ref); err != nil {
		return "", fmt.Errorf("image reference %q: %w: %w", ref, ErrBadSource, err)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return "", fmt.Errorf("image reference %q: %w: %w", ref, ErrBadSource, err)
	}
	// The parsers take any digits after the registry's colon.
	if _, port, err := net.SplitHostPort(r.Context().RegistryStr()); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("image reference %q: registry port %s: %w: want 1 to 65535", ref, port, ErrBadSource)
		}
	}
	return r.Name(), nil
}
