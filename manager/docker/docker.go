// Package docker is depcache's Docker engine: manager.Engine over the
// Docker Engine API (pulls, builds, inspection, container listing and
// removal, with API version negotiation) and go-containerregistry for the
// registry's size of an image. It is a package of its own so that an
// embedder of manager without images does not link the Docker SDK.
package docker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/build"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/client"
	"github.com/docker/docker/pkg/jsonmessage"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
)

// New talks to the engine at DOCKER_HOST (or the default socket),
// negotiating the API version down to the daemon's.
func New() (manager.Engine, error) {
	c, err := client.NewClientWithOpts(client.FromEnv, client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker: %w", err)
	}
	return &dockerEngine{c: c}, nil
}

type dockerEngine struct {
	c  *client.Client
	mu sync.Mutex
	id string // once known; an error is not kept, so a daemon started late is found
}

func (d *dockerEngine) DaemonID(ctx context.Context) (string, error) {
	d.mu.Lock()
	id := d.id
	d.mu.Unlock()
	if id != "" {
		return id, nil
	}
	// Asked outside the mutex: a hung daemon holds each caller only as long
	// as its own context allows.
	info, err := d.c.Info(ctx)
	if err != nil {
		return "", fmt.Errorf("docker: %w", err)
	}
	d.mu.Lock()
	d.id = info.ID
	d.mu.Unlock()
	return info.ID, nil
}

func (d *dockerEngine) Inspect(ctx context.Context, ref string) (manager.ImageInfo, bool, error) {
	r, err := d.c.ImageInspect(ctx, ref)
	if cerrdefs.IsNotFound(err) {
		return manager.ImageInfo{}, false, nil
	}
	if err != nil {
		return manager.ImageInfo{}, false, fmt.Errorf("docker: inspecting %s: %w", ref, err)
	}
	return manager.ImageInfo{ID: r.ID, RepoDigests: r.RepoDigests, Size: r.Size}, true, nil
}

func (d *dockerEngine) Pull(ctx context.Context, ref string, progress func(done, total int64)) error {
	rc, err := d.c.ImagePull(ctx, ref, image.PullOptions{})
	if err != nil {
		return fmt.Errorf("docker: pulling %s: %w", ref, pullErr(err))
	}
	defer rc.Close()
	type layer struct{ cur, total int64 }
	layers := map[string]layer{}
	dec := json.NewDecoder(rc)
	for {
		var msg jsonmessage.JSONMessage
		if err := dec.Decode(&msg); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("docker: pulling %s: reading the engine's stream: %w", ref, err)
		}
		if msg.Error != nil {
			// The stream's errors are the registry's, after the pull began:
			// a blob's 500 or a reset is worth a retry, a missing manifest
			// or a refused login is not.
			if permanentText(msg.Error.Message) {
				return fmt.Errorf("docker: pulling %s: %s: %w", ref, msg.Error.Message, manager.ErrPermanent)
			}
			return fmt.Errorf("docker: pulling %s: %s", ref, msg.Error.Message)
		}
		if msg.Progress != nil && msg.ID != "" && strings.HasPrefix(msg.Status, "Downloading") {
			layers[msg.ID] = layer{msg.Progress.Current, msg.Progress.Total}
		}
		if strings.HasPrefix(msg.Status, "Download complete") || strings.HasPrefix(msg.Status, "Pull complete") {
			if l, ok := layers[msg.ID]; ok {
				layers[msg.ID] = layer{l.total, l.total}
			}
		}
		var done, total int64
		for _, l := range layers {
			done += l.cur
			total += l.total
		}
		progress(done, total)
	}
}

// pullErr marks errors a retry will not fix. Engines before 23.0 answer
// a refused login with an error of no class ("no basic auth credentials"),
// so the text is read too.
func pullErr(err error) error {
	if cerrdefs.IsNotFound(err) || cerrdefs.IsUnauthorized(err) || cerrdefs.IsPermissionDenied(err) || cerrdefs.IsInvalidArgument(err) || permanentText(err.Error()) {
		return fmt.Errorf("%w: %w", err, manager.ErrPermanent)
	}
	return err
}

// permanentPull are what an engine or a registry says, in some words, of a
// pull that no retry changes: the image is not there, or we may not have it.
var permanentPull = []string{"not found", "manifest unknown", "name unknown", "does not exist", "unauthorized",
	"authentication required", "no basic auth credentials", "denied", "invalid reference format"}

// permanentText reports whether msg says one of permanentPull.
func permanentText(msg string) bool {
	m := strings.ToLower(msg)
	for _, s := range permanentPull {
		if strings.Contains(m, s) {
			return true
		}
	}
	return false
}

func (d *dockerEngine) RegistrySize(ctx context.Context, ref string) (int64, bool, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return 0, false, err
	}
	img, err := remote.Image(r, remote.WithContext(ctx))
	if err != nil {
		return 0, false, err
	}
	m, err := img.Manifest()
	if err != nil {
		return 0, false, err
	}
	n := m.Config.Size
	for _, l := range m.Layers {
		n += l.Size
	}
	return n, true, nil
}

func (d *dockerEngine) ImagesInUse(ctx context.Context) (map[string]bool, error) {
	cs, err := d.c.ContainerList(ctx, container.ListOptions{All: true})
	if err != nil {
		return nil, fmt.Errorf("docker: listing containers: %w", err)
	}
	used := map[string]bool{}
	for _, c := range cs {
		used[c.ImageID] = true
	}
	return used, nil
}

// ContainersByImage is ImagesInUse with the containers' names.
func (d *dockerEngine) ContainersByImage(ctx context.Context) (map[string][]string, error) {
	cs, err := d.c.ContainerList(ctx, container.ListOptions{All: true})
	if err != nil {
		return nil, fmt.Errorf("docker: listing containers: %w", err)
	}
	users := map[string][]string{}
	for _, c := range cs {
		name := c.ID[:min(len(c.ID), 12)]
		if len(c.Names) > 0 {
			name = strings.TrimPrefix(c.Names[0], "/")
		}
		users[c.ImageID] = append(users[c.ImageID], name)
	}
	return users, nil
}

// Addr is the engine's address (DOCKER_HOST, or the default socket).
func (d *dockerEngine) Addr() string { return d.c.DaemonHost() }

func (d *dockerEngine) Remove(ctx context.Context, id string) error {
	_, err := d.c.ImageRemove(ctx, id, image.RemoveOptions{PruneChildren: true})
	switch {
	case err == nil, cerrdefs.IsNotFound(err):
		return nil
	case cerrdefs.IsConflict(err):
		return fmt.Errorf("docker: removing %s: %w: %w", id, manager.ErrImageInUse, err)
	}
	return fmt.Errorf("docker: removing %s: %w", id, err)
}

func (d *dockerEngine) FindLabeled(ctx context.Context, label, value string) (manager.ImageInfo, bool, error) {
	imgs, err := d.c.ImageList(ctx, image.ListOptions{Filters: filters.NewArgs(filters.Arg("label", label+"="+value))})
	if err != nil {
		return manager.ImageInfo{}, false, fmt.Errorf("docker: listing images: %w", err)
	}
	if len(imgs) == 0 {
		return manager.ImageInfo{}, false, nil
	}
	return manager.ImageInfo{ID: imgs[0].ID, RepoDigests: imgs[0].RepoDigests, Size: imgs[0].Size}, true, nil
}

func (d *dockerEngine) Build(ctx context.Context, buildContext io.Reader, spec state.BuildSpec, labels map[string]string) (string, error) {
	opts := build.ImageBuildOptions{Dockerfile: spec.Dockerfile, Labels: labels, Remove: true, ForceRemove: true}
	if spec.Tag != "" {
		opts.Tags = []string{spec.Tag}
	}
	if len(spec.Args) > 0 {
		opts.BuildArgs = make(map[string]*string, len(spec.Args))
		for k, v := range spec.Args {
			opts.BuildArgs[k] = &v
		}
	}
	resp, err := d.c.ImageBuild(ctx, buildContext, opts)
	if err != nil {
		return "", fmt.Errorf("docker: build: %w", err)
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	id := ""
	for {
		var msg jsonmessage.JSONMessage
		if err := dec.Decode(&msg); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return "", fmt.Errorf("docker: build: reading the engine's stream: %w", err)
		}
		if msg.Error != nil {
			return "", fmt.Errorf("docker: build: %s: %w", msg.Error.Message, manager.ErrPermanent)
		}
		if msg.Aux != nil {
			var aux struct{ ID string }
			if json.Unmarshal(*msg.Aux, &aux) == nil && aux.ID != "" {
				id = aux.ID
			}
		}
		if s, ok := strings.CutPrefix(strings.TrimSpace(msg.Stream), "Successfully built "); ok && id == "" {
			id = s
		}
	}
	if id == "" {
		return "", errors.New("docker: build finished without an image ID")
	}
	return id, nil
}
