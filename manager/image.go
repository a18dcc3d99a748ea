package manager

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/dustin/go-humanize"
	"github.com/sirupsen/logrus"
)

// pullImage makes the image of key present in our daemon: at most one pull
// per (daemon, image) across processes, because only the owner of the
// entry's generation gets here.
func (m *Manager) pullImage(ctx context.Context, key state.Key, gen uint64, log logrus.FieldLogger) (transitions.Published, error) {
	eng := m.cfg.Docker
	if eng == nil {
		return transitions.Published{}, fmt.Errorf("no Docker engine configured: %w", ErrPermanent)
	}
	if key.Build != nil {
		// A build reports no bytes, but its heartbeat must move like a
		// pull's, or a build longer than the download timeout is taken
		// over again and again.
		var done, total atomic.Int64
		stop := m.reportProgress(ctx, key, gen, &done, &total)
		info, existed, err := m.buildImage(ctx, key)
		stop()
		if err != nil {
			return transitions.Published{}, err
		}
		if existed {
			log.WithField("image_id", info.ID).Info("an earlier build of this fingerprint is in the daemon: not built again")
		}
		return published(info, 0, false), nil
	}
	ref := strings.TrimPrefix(key.Source, "docker://")
	// Double check after taking ownership: an image the daemon already has
	// is READY without a pull, and depcache will never remove it.
	if info, ok, err := eng.Inspect(ctx, ref); err != nil {
		return transitions.Published{}, err
	} else if ok {
		if m.pulledByUs(ctx, key, info.ID) {
			// A tag and a digest of one image: the daemon has it because
			// depcache pulled it under the other name, and it goes when
			// neither entry is left (an External mark kept it for ever).
			log.WithField("image_id", info.ID).Info("image already present, pulled by depcache under another reference")
			return published(info, 0, false), nil
		}
		log.WithField("image_id", info.ID).Info("image already present: not pulled, never removed by depcache")
		return published(info, 0, true), nil
	}
	if limit := m.cfg.MaxImageBytes; limit > 0 {
		size, known, err := eng.RegistrySize(ctx, ref)
		switch {
		case err != nil || !known:
			log.WithError(err).Warn("the registry did not tell the image's size; pulling without the size check")
		case size > limit:
			return transitions.Published{}, fmt.Errorf("image of %s (registry manifest) exceeds the image size limit of %s: %w",
				humanize.IBytes(uint64(size)), humanize.IBytes(uint64(limit)), ErrPermanent)
		}
	}
	var done, total atomic.Int64
	stop := m.reportProgress(ctx, key, gen, &done, &total)
	defer stop()
	var err error
	for attempt := 0; ; attempt++ {
		err = m.pullWatched(ctx, eng, ref, &done, &total)
		if err == nil || ctx.Err() != nil || errors.Is(err, ErrPermanent) || attempt >= m.cfg.Retries {
			break
		}
		log.WithError(err).WithField("attempt", attempt+1).Warn("pull failed, retrying")
		if sleepCtx(ctx, m.cfg.RetryBackoff<<attempt) != nil {
			break
		}
	}
	if ctx.Err() != nil {
		return transitions.Published{}, context.Cause(ctx)
	}
	if err != nil {
		return transitions.Published{}, err
	}
	info, ok, err := eng.Inspect(ctx, ref)
	if err != nil {
		return transitions.Published{}, err
	}
	if !ok {
		return transitions.Published{}, fmt.Errorf("the engine reported %s pulled, but does not have it", ref)
	}
	return published(info, done.Load(), false), nil
}

// pullWatched is one Pull of ref, failed (transiently) when its bytes do
// not move for the stall limit bundles have (the download timeout, at most
// a minute): the owner's progress reports beat whether or not bytes move,
// so a registry that stalls would hold every waiter for ever.
func (m *Manager) pullWatched(ctx context.Context, eng Engine, ref string, done, total *atomic.Int64) error {
	idle := min(m.cfg.Policy.DownloadTimeout, time.Minute)
	if idle <= 0 {
		idle = time.Minute
	}
	pctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stalled := fmt.Errorf("pulling %s: no bytes moved for %s", ref, idle)
	timer := time.AfterFunc(idle, func() { cancel(stalled) })
	defer timer.Stop()
	err := eng.Pull(pctx, ref, func(d, t int64) {
		if d != done.Load() || t != total.Load() {
			timer.Reset(idle)
		}
		done.Store(d)
		total.Store(t)
	})
	if err != nil && ctx.Err() == nil && errors.Is(context.Cause(pctx), stalled) {
		return stalled
	}
	return err
}

// engineTimeout bounds each short call to the Docker engine (its ID, an
// inspect, the containers, a removal): a wedged engine must not hold a
// command for ever, nor one about bundles at all.
const engineTimeout = 10 * time.Second

func engineContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, engineTimeout)
}

// engineErr names a call that ran out of engineTimeout (ectx's deadline,
// not the caller's ctx).
func engineErr(ctx, ectx context.Context, err error) error {
	if err != nil && ctx.Err() == nil && errors.Is(ectx.Err(), context.DeadlineExceeded) {
		// ErrEngineUnavailable, and not the deadline: that one is this
		// call's bound, and a caller's deadline (exit 3) is its own.
		return fmt.Errorf("%w: the Docker engine did not answer within %s: %v", ErrEngineUnavailable, engineTimeout, err)
	}
	return err
}

// pulledByUs reports whether another entry of key's daemon names image id
// as one depcache fetched (not External).
func (m *Manager) pulledByUs(ctx context.Context, key state.Key, id string) bool {
	st, err := m.store.View(ctx)
	if err != nil {
		return false // External: the safe side, never removed
	}
	for oid, e := range st.Entries {
		if oid != key.ID() && e.Key.Kind == state.Image && e.Key.Daemon == key.Daemon && e.ImageID == id && !e.External && e.Stage == state.Ready {
			return true
		}
	}
	return false
}

func published(info ImageInfo, fetched int64, external bool) transitions.Published {
	p := transitions.Published{ImageID: info.ID, SizeBytes: info.Size, Fetched: fetched, External: external}
	if len(info.RepoDigests) > 0 {
		p.RepoDigest = info.RepoDigests[0]
	}
	return p
}

// imageGuards returns, by key ID, why image entries of this root may not be
// evicted by this manager: another daemon's, or used by a container. The
// engine is asked before the lock is taken; a container created after
// that is caught by the engine's refusal to remove the image.
//
// unavailable is not nil when the engine could not be asked (none here, or
// it did not answer): every image entry is guarded then, and the error,
// wrapping ErrEngineUnavailable and naming the engine, says why.
func (m *Manager) imageGuards(ctx context.Context, st *state.State) (guards map[string]string, unavailable error) {
	guards = map[string]string{}
	if !hasImages(st) {
		return guards, nil
	}
	guardAll := func(why string) {
		for id, e := range st.Entries {
			if e.Key.Kind == state.Image {
				guards[id] = why
			}
		}
	}
	if m.cfg.Docker == nil {
		why := "no Docker engine here (DOCKER_HOST, or /var/run/docker.sock)"
		guardAll(why)
		return guards, fmt.Errorf("%w: %s", ErrEngineUnavailable, why)
	}
	// The engine's ID, asked once: a manager that never started (rm) has
	// not learnt it.
	daemon, err := m.daemon(ctx)
	if err != nil {
		why := fmt.Sprintf("%s does not answer: %v", engineName(m.cfg.Docker), err)
		guardAll(why)
		return guards, fmt.Errorf("%w: %s", ErrEngineUnavailable, why)
	}
	var users map[string][]string
	for id, e := range st.Entries {
		if e.Key.Kind != state.Image {
			continue
		}
		if e.Key.Daemon != daemon {
			guards[id] = "image of another daemon"
			continue
		}
		if users == nil {
			var err error
			if users, err = m.containersByImage(ctx); err != nil {
				if ctx.Err() == nil { // a sweep cut short by its caller's end is no problem
					m.log.WithError(err).Warn("cannot list containers: no image is evicted in this sweep")
				}
				why := fmt.Sprintf("containers unknown: %s did not list them: %v", engineName(m.cfg.Docker), err)
				guardAll(why)
				return guards, fmt.Errorf("%w: %s", ErrEngineUnavailable, why)
			}
		}
		if names, used := users[e.ImageID]; used {
			guards[id] = usedBy(names)
		}
	}
	return guards, nil
}

// containersByImage asks the engine, within its bound, which containers
// use each image: by name when it can say (ContainerNamer).
func (m *Manager) containersByImage(ctx context.Context) (map[string][]string, error) {
	ectx, cancel := engineContext(ctx)
	defer cancel()
	if n, ok := m.cfg.Docker.(ContainerNamer); ok {
		users, err := n.ContainersByImage(ectx)
		return users, engineErr(ctx, ectx, err)
	}
	used, err := m.cfg.Docker.ImagesInUse(ectx)
	if err != nil {
		return nil, engineErr(ctx, ectx, err)
	}
	users := make(map[string][]string, len(used))
	for id, u := range used {
		if u {
			users[id] = nil
		}
	}
	return users, nil
}

// usedBy says which containers use an image: "used by container NAME",
// the first few of them by name when the engine named them.
func usedBy(names []string) string {
	switch names = slices.Sorted(slices.Values(names)); {
	case len(names) == 0:
		return "used by a container"
	case len(names) == 1:
		return "used by container " + names[0]
	case len(names) <= 3:
		return "used by containers " + strings.Join(names, ", ")
	}
	return fmt.Sprintf("used by containers %s and %d more", strings.Join(names[:3], ", "), len(names)-3)
}

// removeImages removes evicted images from the engine, outside the lock.
// An image the engine refuses to remove (a container appeared, another tag
// of the user's names it) gets its entry back, to be retried at a later
// sweep; nothing is forced. It returns those, by key ID, with the engine's
// refusal, so that a report does not count them as removed; and, by key
// ID, the victim whose image it did remove (one per image, however many
// victims named it), so that only those count as freed.
//
// The image stays when another entry of the daemon names it: a tag and a
// digest of one image, or a Get of the same reference since the eviction's
// commit that found the image still there. A Get that does so between that
// look and the removal gets its entry fetched again.
func (m *Manager) removeImages(ctx context.Context, victims []*state.Entry) (kept map[string]error, removed map[string]bool) {
	kept, removed = map[string]error{}, map[string]bool{}
	// One removal per image: the victims that name it go with it, or
	// come back with it.
	var order []string
	byImage := map[string][]*state.Entry{}
	for _, e := range victims {
		img := e.Key.Daemon + "\x00" + e.ImageID
		if byImage[img] == nil {
			order = append(order, img)
		}
		byImage[img] = append(byImage[img], e)
	}
	for _, img := range order {
		group := byImage[img]
		e := group[len(group)-1]
		st, err := m.store.View(ctx)
		if err == nil && namesImage(st, e) {
			m.log.WithField("image_id", e.ImageID).Info("evicted an image entry whose image another entry names: the image stays")
			continue
		}
		if err == nil {
			ectx, cancel := engineContext(ctx)
			err = engineErr(ctx, ectx, m.cfg.Docker.Remove(ectx, e.ImageID))
			cancel()
			if err == nil {
				removed[e.Key.ID()] = true
				m.refetchRemoved(ctx, e)
				continue
			}
		}
		m.log.WithError(err).WithField("image_id", e.ImageID).Warn("image not removed; its entry is kept for a later sweep")
		for _, e := range group {
			kept[e.Key.ID()] = err
			restore := *e
			m.store.Update(ctx, func(st *state.State) (bool, error) {
				if st.Get(restore.Key) != nil {
					return false, nil
				}
				st.Put(&restore)
				return true, nil
			})
		}
	}
	return kept, removed
}

// namesImage reports whether an entry of st names gone's image in gone's
// daemon.
func namesImage(st *state.State, gone *state.Entry) bool {
	for _, e := range st.Entries {
		if e.Key.Kind == state.Image && e.Key.Daemon == gone.Key.Daemon && e.ImageID == gone.ImageID {
			return true
		}
	}
	return false
}

// refetchRemoved makes every READY entry that names the image just removed
// fetch it again: one made READY by a Get between namesImage and Remove.
func (m *Manager) refetchRemoved(ctx context.Context, gone *state.Entry) {
	var lost []string
	err := m.store.Update(ctx, func(st *state.State) (bool, error) {
		lost = lost[:0]
		for id, e := range st.Entries {
			if e.Stage == state.Ready && e.Key.Kind == state.Image && e.Key.Daemon == gone.Key.Daemon && e.ImageID == gone.ImageID {
				st.Entries[id] = transitions.Refetch(e, "its image was removed by an eviction racing this get: fetching it again").Entry
				lost = append(lost, e.Key.Source)
			}
		}
		return len(lost) > 0, nil
	})
	if err != nil {
		m.log.WithError(err).WithField("image_id", gone.ImageID).Error("cannot check for entries that name an image just removed")
	}
	for _, src := range lost {
		m.log.WithFields(logrus.Fields{"source": src, "image_id": gone.ImageID}).Warn("an entry named an image just removed: fetching it again")
	}
}
