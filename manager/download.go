package manager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/depcache/depcache/manager/unpack"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Directories inside the root.
const (
	entriesDir  = "entries" // published content: entries/<id>-g<gen>/content
	stagingDir  = "staging" // downloads in progress: staging/<id>-g<gen>/
	trashDir    = "trash"   // content moved aside, deleted outside the lock
	contentName = "content"
	metaName    = "meta.json"
	ownerName   = "owner.json"
)

// checkLayout refuses a root whose entries/, staging/ or trash/ is a
// symlink or a file: moving an entry's content there, or deleting trash
// through it, would reach outside the root. Each use re-checks, since an
// administrator may move a directory while depcache runs.
func checkLayout(root string) error {
	return state.CheckLayout(root, []string{entriesDir, stagingDir, trashDir}, nil)
}

// Why a download's context was cancelled.
var (
	errReleased   = errors.New("last dependent released")
	errSuperseded = errors.New("superseded by another owner")
	errShutdown   = errors.New("manager stopping")
)

// errNotCommitted marks a publish whose bytes were fetched and verified
// but whose commit the state store did not take (an etcd cluster without
// a leader, a file store that could not write): a fault of the store, not
// of the download, so the entry is handed back, not made FAILED.
var errNotCommitted = errors.New("publish not committed by the state store")

type download struct {
	gen    uint64
	cancel context.CancelCauseFunc
}

// stagingName is unique to (entry, generation), so that two owners never
// write into one place, and is derived from the key's hash, never from the
// source string.
func stagingName(k state.Key, gen uint64) string {
	return fmt.Sprintf("%s-g%d", k.ID(), gen)
}

// Meta is the metadata file published next to an entry's content, from
// which the state can be rebuilt.
type Meta struct {
	Key        state.Key `json:"key"`
	Generation uint64    `json:"generation"`
	SizeBytes  int64     `json:"size_bytes"`
	SHA256     string    `json:"sha256"`
	Fetched    int64     `json:"fetched_bytes"`
	// ContentSHA256 is ContentDigest of the published content, for verify.
	ContentSHA256 string    `json:"content_sha256"`
	Format        string    `json:"format"`
	Published     time.Time `json:"published"`
	// Failed is set by verify when the content no longer matched
	// ContentSHA256, with the reason and when (the verifying host's
	// clock): a rebuild keeps the entry FAILED. Absent in older files.
	Failed       bool      `json:"failed,omitempty"`
	FailedReason string    `json:"failed_reason,omitempty"`
	FailedAt     time.Time `json:"failed_at,omitzero"`
}

func (m *Manager) startDownload(ctx context.Context, key state.Key, gen uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := key.ID()
	if d := m.downloads[id]; d != nil {
		d.cancel(errSuperseded)
	}
	// Only an explicit cancel, with its reason, stops a download: the
	// reason decides what happens to the entry.
	dctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	d := &download{gen: gen, cancel: cancel}
	m.downloads[id] = d
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.runDownload(dctx, key, gen)
		cancel(nil)
		m.mu.Lock()
		if m.downloads[id] == d {
			delete(m.downloads, id)
		}
		m.mu.Unlock()
		m.kick()
	}()
}

// runDownload fetches, verifies, unpacks and publishes one generation.
func (m *Manager) runDownload(ctx context.Context, key state.Key, gen uint64) {
	log := m.log.WithFields(logrus.Fields{"key": key.String(), "gen": gen})
	staging := filepath.Join(m.Root(), stagingDir, stagingName(key, gen))
	// Whatever happens below, state updates must not be cut short by the
	// download's own cancellation.
	bg := context.WithoutCancel(ctx)
	start := time.Now()
	m.metrics.downloads.WithLabelValues("started").Inc()
	var meta Meta
	var err error
	if key.Kind == state.Image {
		var pub transitions.Published
		pub, err = m.pullImage(ctx, key, gen, log)
		if err == nil {
			meta.SizeBytes, meta.Fetched = pub.SizeBytes, pub.Fetched
			err = m.update(bg, key, func(e *state.Entry) (transitions.Result, error) {
				return transitions.Publish(e, m.self, gen, pub, m.cfg.Clock.Now())
			})
			if err != nil && !errors.Is(err, transitions.ErrFenced) {
				err = fmt.Errorf("%w: %w", errNotCommitted, err)
			}
		}
	} else if meta, err = m.fetch(ctx, key, gen, staging, log); err == nil {
		err = m.publish(bg, key, gen, staging, meta)
	}
	if err == nil {
		m.metrics.downloads.WithLabelValues("finished").Inc()
		m.metrics.bytes.Add(float64(meta.Fetched))
		m.metrics.downloadSeconds.Observe(seconds(time.Since(start)))
		log.WithFields(logrus.Fields{"bytes": meta.SizeBytes, "took": time.Since(start).Round(time.Millisecond)}).Info("published")
		m.mu.Lock()
		m.sweepSoon = true
		m.mu.Unlock()
		return
	}
	cause := context.Cause(ctx)
	// Clean up before the terminal state is published, so that whoever
	// sees it never sees our leftovers. A download interrupted by our
	// shutdown keeps what it checkpointed: the next owner (another process,
	// or the next get) resumes from it, and removes it once it has copied
	// it. Every other end makes the bytes useless to anyone: superseded (a
	// successor copied them when it started), released, failed.
	if errors.Is(cause, errShutdown) && err != nil && hasCheckpoint(staging, key) {
		log.Info("keeping the checkpointed staging data for the next owner to resume from")
	} else if rerr := os.RemoveAll(staging); rerr != nil {
		log.WithError(rerr).Warn("removing staging data")
	}
	switch {
	case errors.Is(err, transitions.ErrFenced) || errors.Is(cause, errSuperseded):
		log.WithError(err).Info("discarding download: superseded")
	case errors.Is(cause, transitions.ErrTooLarge):
		m.metrics.downloads.WithLabelValues("failed").Inc()
		log.WithError(cause).Warn("download does not fit in the cache")
		m.update(bg, key, func(e *state.Entry) (transitions.Result, error) {
			return transitions.Fail(e, m.self, gen, cause.Error(), m.cfg.Clock.Now())
		})
	case errors.Is(cause, errReleased):
		log.Info("download cancelled: no dependent left")
	case errors.Is(err, errNotCommitted) && errors.Is(err, syscall.ENOSPC):
		// The disk is full: handed back, the entry was claimed and fetched
		// again at once, thousands of times a minute. FAILED (transient)
		// waits its cool-down instead; the mark is a small commit, which
		// may fit where the publish's did not.
		m.metrics.downloads.WithLabelValues("failed").Inc()
		log.WithError(err).Warn("publishing: the disk is full")
		m.update(bg, key, func(e *state.Entry) (transitions.Result, error) {
			return transitions.Fail(e, m.self, gen, "publishing: the disk is full: "+err.Error(), m.cfg.Clock.Now())
		})
	case errors.Is(err, errNotCommitted):
		// Not a failed download: a FAILED mark would fail every get of
		// the entry for its cool-down, for a fault of the store. Handed
		// back, it is claimed and fetched again by the next pass once the
		// store answers; if the hand-back fails too, the loop claims its
		// own unfinished generation again.
		log.WithError(err).Warn("handing the entry back")
		m.update(bg, key, func(e *state.Entry) (transitions.Result, error) {
			return transitions.Abandon(e, m.self, gen)
		})
	case errors.Is(cause, errShutdown):
		// Hand the entry back so that another process claims it at once
		// instead of waiting for our death to be noticed.
		m.update(bg, key, func(e *state.Entry) (transitions.Result, error) {
			return transitions.Abandon(e, m.self, gen)
		})
		log.Info("download interrupted: manager stopping")
	default:
		m.metrics.downloads.WithLabelValues("failed").Inc()
		// A caller of this process that waits on the entry is told by
		// Wait (the CLI prints it once); a warning is for nobody else.
		m.mu.Lock()
		waited := len(m.local[key.ID()]) > 0
		m.mu.Unlock()
		if waited {
			log.WithError(err).Info("download failed")
		} else {
			log.WithError(err).Warn("download failed")
		}
		m.update(bg, key, func(e *state.Entry) (transitions.Result, error) {
			r, ferr := transitions.Fail(e, m.self, gen, err.Error(), m.cfg.Clock.Now())
			if ferr == nil && r.Entry != nil {
				r.Entry.Permanent = permanent(err) // r.Entry is Fail's fresh copy
			}
			return r, ferr
		})
	}
}

// permanent reports whether a failed download would only fail the same
// way again: the source said so (a 404, a missing file), or the archive it
// sent was refused as hostile or is malformed in a way that no cut or
// flaky transfer explains (a checksum of data that all arrived, data past
// its end, colliding members). (An archive that merely does not parse may
// be one cut short by a source that sent no length: that stays
// transient.)
func permanent(err error) bool {
	return errors.Is(err, ErrPermanent) || errors.Is(err, unpack.ErrHostile) || errors.Is(err, unpack.ErrMalformed)
}

// update applies an owner's event to key's entry under the lock.
func (m *Manager) update(ctx context.Context, key state.Key, rule func(*state.Entry) (transitions.Result, error)) error {
	err := m.store.UpdateEntries(ctx, []string{key.ID()}, func(tx *state.Txn) (bool, error) {
		r, err := rule(tx.Get(key))
		if err != nil {
			return false, err
		}
		applyResult(tx, key, r)
		return r.Changed, nil
	})
	if err != nil && !errors.Is(err, transitions.ErrFenced) {
		m.log.WithError(err).WithField("key", key.String()).Error("state update failed")
	}
	m.kick()
	return err
}

// fetch downloads into staging with retries, verifies and unpacks. It
// reports progress and the heartbeat while it runs, and stops when the
// report finds it superseded.
func (m *Manager) fetch(ctx context.Context, key state.Key, gen uint64, staging string, log logrus.FieldLogger) (Meta, error) {
	meta := Meta{Key: key, Generation: gen}
	src, ok := m.cfg.Sources[scheme(key.Source)]
	if !ok {
		return meta, fmt.Errorf("no source for %q: %w", scheme(key.Source), ErrBadSource)
	}
	if err := checkLayout(m.Root()); err != nil {
		return meta, err
	}
	_ = os.RemoveAll(staging) // a leftover of our own earlier try of this generation
	if err := m.perms.MkdirAll(filepath.Dir(staging)); err != nil {
		return meta, err
	}
	if err := m.perms.MkdirAll(staging); err != nil {
		return meta, err
	}
	ob, _ := json.Marshal(struct {
		Owner      state.Owner `json:"owner"`
		Generation uint64      `json:"generation"`
	}{m.self, gen})
	if err := m.perms.WriteFile(filepath.Join(staging, ownerName), ob); err != nil {
		return meta, err
	}
	content := filepath.Join(staging, contentName)
	// onDisk: the raw bytes kept (the content itself for a plain file, a
	// spool for an archive); tree: what the unpacked tree takes. Their sum
	// is what the budget counts of this download in flight.
	var written, total, onDisk, tree atomic.Int64
	var budget atomic.Int64 // the attempt's bound when the budget set it, else 0
	stopReports, reportNow := m.reportProgressNow(ctx, key, gen, &written, &total, &diskWatch{
		used: func() int64 { return onDisk.Load() + tree.Load() }, budget: &budget})
	defer stopReports()

	// The bytes stream from the source through the hash straight into the
	// content file or the unpacker: one pass. The raw bytes are kept on
	// disk (the content itself for a plain file, a spool for an archive)
	// and checkpointed, so that a later attempt or a later owner resumes.
	rs, ranged := src.(RangeSource)
	var (
		format     unpack.Format
		hashes     map[string]string
		h          hash.Hash
		err        error
		first      = true
		fresh      int  // restarts from 0 after an answer that did not resume
		noSpool    bool // keep no copy of an archive to resume from (errSpoolCrowded)
		wholeAgain bool // fetched from 0 after a resumed download failed its digest
		bnd        bound
	)
	for attempt := 0; ; attempt++ {
		var r *resumed
		if ranged {
			if r, err = m.prepareAttempt(ctx, key, gen, staging, first, log); err != nil {
				return meta, err
			}
		} else if err := clearRaw(staging); err != nil {
			return meta, err
		}
		first = false
		written.Store(0)
		total.Store(0)
		onDisk.Store(0)
		tree.Store(0)
		bnd = m.bound(ctx, key)
		if bnd.disk {
			budget.Store(bnd.limit)
		} else {
			budget.Store(0)
		}
		s := &sink{m: m, ctx: ctx, key: key, staging: staging, b: bnd, written: &written, onDisk: &onDisk, tree: &tree, log: log, noSpool: noSpool,
			h: sha256.New(), resume: r, onTotal: func(n int64) {
				total.Store(n)
				reportNow()
				if ferr := m.checkFits(ctx, key, n); ferr != nil {
					m.cancelDownload(key, gen, ferr)
				}
			}}
		var from ResumeFrom
		if r != nil {
			from = ResumeFrom{Offset: r.c.Offset, Validator: r.c.Validator}
		}
		if ranged {
			err = rs.FetchRange(ctx, fetchSource(key), from, s, s.start)
		} else {
			err = src.Fetch(ctx, fetchSource(key), s, func(n int64) {
				if !s.started {
					s.start(RangeStart{Total: n})
				}
			})
		}
		var cerr error
		meta.SizeBytes, hashes, cerr = s.finish(err)
		format, h = s.format, s.h
		if err == nil && cerr == nil && format != unpack.Plain {
			// A tree takes more disk than its files' bytes: blocks, and a
			// block a directory. The budget counts what it takes.
			if du, derr := unpack.TreeCost(s.content()); derr == nil && du > meta.SizeBytes {
				meta.SizeBytes = du
			}
		}
		if ctx.Err() != nil {
			return meta, context.Cause(ctx) // the reason we were stopped, not "context canceled"
		}
		if errors.Is(cerr, errSpoolCrowded) && !noSpool {
			// It fits without the copy to resume from: fetch it again,
			// keeping none.
			noSpool = true
			log.WithError(cerr).Info("fetching again without a copy to resume from")
			if err := clearRaw(staging); err != nil {
				return meta, err
			}
			attempt--
			continue
		}
		if s.werr != nil || (err == nil && cerr != nil) {
			if s.resume != nil && !wholeAgain && (errors.Is(s.werr, unpack.ErrMalformed) || errors.Is(cerr, unpack.ErrMalformed)) {
				// A resumed archive whose checksum fails may be a mix of
				// two versions (as above, without --sha256 to tell): one
				// fetch from 0 tells that from an archive that is wrong.
				wholeAgain = true
				log.WithError(cerr).WithField("resumed_at", s.resume.c.Offset).Warn("the resumed archive is malformed; fetching it whole once")
				if err := clearRaw(staging); err != nil {
					return meta, err
				}
				attempt--
				continue
			}
			// The content itself failed (hostile archive, full disk), not
			// the transfer: retrying would fail the same way.
			return meta, cerr
		}
		if err == nil && s.resume != nil && key.SHA256 != "" && hex.EncodeToString(h.Sum(nil)) != key.SHA256 && !wholeAgain {
			// A resumed download that does not match its digest may be
			// a mix of two versions (a server that answered If-Range
			// with the rest of another under the same validator): one
			// fetch from 0 tells that from content that is wrong.
			wholeAgain = true
			log.WithField("resumed_at", s.resume.c.Offset).Warn("the resumed download does not match --sha256; fetching it whole once")
			if err := clearRaw(staging); err != nil {
				return meta, err
			}
			attempt--
			continue
		}
		if err == nil {
			break
		}
		if errors.Is(err, errNoResume) && fresh < 2 {
			fresh++
			// Not a failure of the transfer: ask again for the whole content.
			log.WithError(err).Info("not resuming; starting from 0")
			if err := clearRaw(staging); err != nil {
				return meta, err
			}
			attempt--
			continue
		}
		if permanent(err) || errors.Is(err, syscall.ENOSPC) || attempt >= m.cfg.Retries {
			if attempt > 0 {
				err = fmt.Errorf("after %d attempts: %w", attempt+1, err)
			}
			return meta, err
		}
		wait := m.cfg.RetryBackoff << attempt
		log.WithError(err).WithFields(logrus.Fields{"attempt": attempt + 1, "retry_in": wait}).Warn("fetch failed, retrying")
		if err := sleepCtx(ctx, wait); err != nil {
			return meta, context.Cause(ctx)
		}
	}
	if format == unpack.Plain && !IsKeptPacked(key) && archiveName(key) != "" {
		// Once per download, not per attempt: its name says archive, its
		// bytes do not.
		log.WithField("source", key.Source).Warn(notArchiveWarning(key))
	}
	meta.Format = format.String()
	meta.SHA256 = hex.EncodeToString(h.Sum(nil))
	meta.Fetched = written.Load()
	if key.SHA256 != "" && meta.SHA256 != key.SHA256 {
		return meta, fmt.Errorf("sha256 mismatch: got %s, want %s", meta.SHA256, key.SHA256)
	}
	if t := total.Load(); t > 0 && written.Load() != t {
		return meta, fmt.Errorf("size mismatch: got %d bytes, expected %d", written.Load(), t)
	}
	if meta.ContentSHA256, err = contentDigest(content, hashes); err != nil {
		return meta, err
	}
	// The whole size known, reported, and judged once more, against every
	// other download in flight: a compressed archive under the sniffing
	// head is unpacked at its end, in one go between two reports. Each of
	// two downloads that finish together reports before it looks, so at
	// least one sees the other's size: they cannot both publish past the
	// budget (both may fail). Only for a download the budget bounded whose
	// size nothing said up front (an archive's tree, a body without a
	// length): one that announced its length held it from its first
	// report. A report the store refuses is the publish's problem, which
	// it meets and handles (the entry handed back); fenced, we are
	// superseded.
	if bnd.disk && bnd.limit > 0 && (format != unpack.Plain || total.Load() <= 0) {
		// The reports that follow, until the publish, carry the whole
		// size too: one with the extractor's count (which a sparse run
		// of zeros undercounts) would make this download look smaller
		// to the others' checks than the one it passed.
		onDisk.Store(meta.SizeBytes)
		tree.Store(0)
		switch err := m.update(ctx, key, func(e *state.Entry) (transitions.Result, error) {
			return transitions.Report(e, m.self, gen, written.Load(), total.Load(), meta.SizeBytes)
		}); {
		case errors.Is(err, transitions.ErrFenced):
			return meta, err
		case err == nil:
			if err := m.roomLeft(ctx, key, meta.SizeBytes, false); err != nil {
				return meta, err
			}
		}
	}
	if ctx.Err() != nil {
		// Stopped after its bytes were in (a report found it too large,
		// superseded or released): it is not published.
		return meta, context.Cause(ctx)
	}
	meta.Published = m.cfg.Clock.Now()
	mb, _ := json.MarshalIndent(meta, "", "  ")
	if err := m.perms.WriteFile(filepath.Join(staging, metaName), mb); err != nil {
		return meta, err
	}
	// One syncfs makes every unpacked file durable before the publish.
	if err := syncFS(staging); err != nil {
		return meta, err
	}
	return meta, nil
}

// publish moves staging into place, then marks the entry READY in a
// commit that applies only if we still own this generation. The rename
// comes first, outside the commit: a store callback may run more than
// once and does no I/O. Until the commit, the published directory is
// named by nobody but our DOWNLOADING generation, which reconcile leaves
// alone (see reconcile); if the commit does not happen (fenced, or it
// failed), the directory goes back to staging, and a crash in between
// leaves an orphan that reconcile moves aside once our generation is
// superseded.
func (m *Manager) publish(ctx context.Context, key state.Key, gen uint64, staging string, meta Meta) error {
	final := filepath.Join(entriesDir, stagingName(key, gen))
	abs := filepath.Join(m.Root(), final)
	if err := checkLayout(m.Root()); err != nil {
		return err
	}
	if err := m.perms.MkdirAll(filepath.Dir(abs)); err != nil {
		return err
	}
	if err := os.Rename(staging, abs); err != nil {
		return err
	}
	failpoint("publish-renamed")
	err := m.store.UpdateEntries(ctx, []string{key.ID()}, func(tx *state.Txn) (bool, error) {
		r, err := transitions.Publish(tx.Get(key), m.self, gen, transitions.Published{
			Path: filepath.Join(final, contentName), SizeBytes: meta.SizeBytes, Fetched: meta.Fetched}, m.cfg.Clock.Now())
		if err != nil {
			return false, err
		}
		applyResult(tx, key, r)
		return true, nil
	})
	if err != nil {
		// Moved back only if nothing names it: a rebuild (doctor
		// --rebuild) that ran meanwhile may have published it from its
		// metadata, or a commit reported as failed may have happened.
		if st, verr := m.store.View(ctx); verr == nil && namesPath(st, filepath.Join(final, contentName)) {
			m.log.WithError(err).WithField("path", abs).Warn("a publish whose commit failed is named by the state all the same; leaving it in place")
		} else if rerr := os.Rename(abs, staging); rerr != nil {
			m.log.WithError(rerr).WithField("path", abs).Error("could not move back a publish whose commit did not happen; reconcile moves it aside once this generation is superseded")
		}
		if !errors.Is(err, transitions.ErrFenced) {
			err = fmt.Errorf("%w: %w", errNotCommitted, err)
		}
	} else if serr := state.SyncDir(filepath.Dir(abs)); serr != nil {
		m.log.WithError(serr).Warn("fsync of the entries directory")
	}
	m.kick()
	return err
}

// reportProgress reports progress every ProgressInterval until the
// returned function is called. A report that finds us superseded or the
// entry gone cancels the download.
func (m *Manager) reportProgress(ctx context.Context, key state.Key, gen uint64, written, total *atomic.Int64) func() {
	stop, _ := m.reportProgressNow(ctx, key, gen, written, total, nil)
	return stop
}

// diskWatch is what a bundle download tells its progress reports: what it
// has on disk, and the bound the budget set its attempt (0: none).
type diskWatch struct {
	used   func() int64
	budget *atomic.Int64
}

// reportProgressNow is reportProgress that also returns a function asking
// for a report at once (without waiting for the tick): waiters learn the
// expected size as soon as the source announces it. disk, when set, says
// what the download has on disk: each report records it, and, under a
// budget, checks it against the room left beside the other downloads in
// flight (recheckRoom) each time it grew by a sixteenth of its bound: a
// check reads the whole state, which on etcd is a range read.
func (m *Manager) reportProgressNow(ctx context.Context, key state.Key, gen uint64, written, total *atomic.Int64, disk *diskWatch) (stop, now func()) {
	done := make(chan struct{})
	stopped := make(chan struct{})
	asked := make(chan chan struct{}) // a report now; closed when it is made
	go func() {
		defer close(stopped)
		t := time.NewTicker(m.cfg.ProgressInterval)
		defer t.Stop()
		var ack chan struct{}
		var checked int64 // what the last room check judged
		for {
			if ack != nil {
				close(ack)
				ack = nil
			}
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			case ack = <-asked:
			}
			used := int64(-1)
			if disk != nil {
				used = disk.used()
			}
			err := m.update(context.WithoutCancel(ctx), key, func(e *state.Entry) (transitions.Result, error) {
				return transitions.Report(e, m.self, gen, written.Load(), total.Load(), used)
			})
			if disk != nil && err == nil && used > 0 {
				if used < checked {
					checked = 0 // an attempt that started again
				}
				if lim := disk.budget.Load(); lim > 0 && used >= checked+max(lim/16, 1) {
					checked = used
					m.recheckRoom(ctx, key, gen, used)
				}
			}
			if errors.Is(err, transitions.ErrFenced) {
				m.mu.Lock()
				if d := m.downloads[key.ID()]; d != nil && d.gen == gen {
					d.cancel(errSuperseded)
				}
				m.mu.Unlock()
				return
			}
		}
	}()
	return func() { close(done); <-stopped }, func() {
		ack := make(chan struct{})
		select {
		case asked <- ack:
			select {
			case <-ack:
			case <-stopped:
			}
		case <-stopped:
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func syncFS(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return &fs.PathError{Op: "syncfs", Path: dir, Err: err}
	}
	return nil
}

// bound is the most content one download may write.
type bound struct {
	limit int64  // 0: none
	why   string // what sets the limit, for the error
	// disk: the limit is room in the budget, which a spool on disk
	// counts against while it exists (not Config.MaxBundleBytes, a bound
	// of the content alone).
	disk bool
}

// check fails once n bytes written pass the bound.
func (b bound) check(n int64) error {
	if b.limit > 0 && n > b.limit {
		return fmt.Errorf("the content passed %d bytes: %s: %w", b.limit, b.why, ErrTooLarge)
	}
	return nil
}

// bound returns what this download of key may write: what the stored
// policy can make room for (the budget less what no sweep may evict), and
// Config.MaxBundleBytes. A compressed archive, or a plain download without
// a Content-Length, says nothing of its size up front: only the bytes
// written can be held to the budget.
func (m *Manager) bound(ctx context.Context, key state.Key) bound {
	b := bound{limit: m.cfg.MaxBundleBytes, why: fmt.Sprintf("the bundle limit is %d bytes", m.cfg.MaxBundleBytes)}
	st, err := m.store.View(ctx)
	if err != nil {
		return b // the publish will hit the same problem and say so
	}
	pol := policyOf(st)
	now := m.cfg.Clock.Now()
	// Judged as this manager's sweep, which follows the publish, judges
	// ages: room that only entries it may not evict yet could make would
	// leave the cache over its budget until they age (an entry past
	// min-age by its stamp, within the clock skew tolerance of it).
	watched := make(map[string]transitions.Watched, len(st.Entries))
	m.mu.Lock()
	for id, e := range st.Entries {
		watched[id] = m.watchedLocked(id, e, now)
	}
	m.mu.Unlock()
	room, fixed, ok := transitions.Room(pol, st.Entries, key, watched, now)
	if ok && (b.limit <= 0 || room < b.limit) {
		b = bound{limit: max(room, 1), disk: true, why: fmt.Sprintf("the budget of %d bytes can make room for %d (%d are held by entries that cannot be evicted now: in use, downloading, pinned, or younger than min-age as this process's sweep judges it)",
			pol.MaxSizeBytes, room, fixed)}
	}
	// The free-disk floor bounds it too: with no budget set, it is the
	// only bound a decompression bomb meets.
	free, size := m.cfg.Disk.Space(m.cfg.Root)
	room, floor, ok := transitions.RoomOnDisk(pol, st.Entries, key, transitions.Usage{DiskFree: free, DiskSize: size}, watched, now)
	if ok && (b.limit <= 0 || room < b.limit) {
		b = bound{limit: max(room, 1), disk: true, why: fmt.Sprintf("the disk has %d bytes free, evicting could make room for %d, and the policy keeps %d free (min-free-disk)",
			free, room, floor)}
	}
	return b
}

// recheckRoom fails our download of key at gen once what it has on disk
// (used) passes the room the budget leaves it now. The bound a download
// starts with counts what the others in flight had written then; those
// whose size nothing announced (a compressed archive, a body without a
// Content-Length) grow after it, and each would otherwise fill the room
// they all were given. Of downloads in flight, those whose key ID sorts
// after ours give way to ours (they are left out of its room), so that of
// several that together pass the budget the first by ID goes on, and the
// others fail as one that did not fit alone would (ErrTooLarge).
func (m *Manager) recheckRoom(ctx context.Context, key state.Key, gen uint64, used int64) {
	if err := m.roomLeft(ctx, key, used, true); err != nil {
		m.cancelDownload(key, gen, err)
	}
}

// roomLeft is recheckRoom's judgement: an ErrTooLarge when used passes the
// room, nil when it fits or the state cannot be read (the next look, or
// the publish, meets the same problem and says so), the reason ctx ended
// when it did. ranked leaves out the downloads in flight whose key ID
// sorts after key's.
func (m *Manager) roomLeft(ctx context.Context, key state.Key, used int64, ranked bool) error {
	st, err := m.store.View(ctx)
	if ctx.Err() != nil {
		return context.Cause(ctx) // a report's check stopped the download meanwhile
	}
	if err != nil {
		return nil
	}
	pol := policyOf(st)
	if pol.MaxSizeBytes <= 0 {
		return nil
	}
	id, now := key.ID(), m.cfg.Clock.Now()
	before := make(map[string]*state.Entry, len(st.Entries))
	watched := make(map[string]transitions.Watched, len(st.Entries))
	m.mu.Lock()
	for oid, e := range st.Entries {
		if ranked && e.Stage == state.Downloading && oid > id {
			continue
		}
		before[oid] = e
		watched[oid] = m.watchedLocked(oid, e, now)
	}
	m.mu.Unlock()
	if room, fixed, ok := transitions.Room(pol, before, key, watched, now); ok && used > room {
		return fmt.Errorf("the content passed %d bytes: the budget of %d bytes can make room for %d beside the downloads in flight (%d are held by entries that cannot be evicted now): %w",
			room, pol.MaxSizeBytes, room, fixed, ErrTooLarge)
	}
	return nil
}

// checkFits fails a download at once when its announced size cannot fit in
// the budget, or above the free-disk floor, even after evicting everything
// evictable.
func (m *Manager) checkFits(ctx context.Context, key state.Key, total int64) error {
	st, err := m.store.View(ctx)
	if err != nil {
		return nil // the publish will hit the same problem and say so
	}
	pol, now := policyOf(st), m.cfg.Clock.Now()
	if err := transitions.Fits(pol, st.Entries, key, total, now); err != nil {
		return err
	}
	free, size := m.cfg.Disk.Space(m.cfg.Root)
	if room, floor, ok := transitions.RoomOnDisk(pol, st.Entries, key, transitions.Usage{DiskFree: free, DiskSize: size}, nil, now); ok && total > room {
		return fmt.Errorf("%d bytes cannot fit on the disk: it has %d bytes free, evicting could make room for %d, and the policy keeps %d free (min-free-disk): %w",
			total, free, room, floor, transitions.ErrTooLarge)
	}
	return nil
}

// cancelDownload stops our download of key at gen with cause.
func (m *Manager) cancelDownload(key state.Key, gen uint64, cause error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d := m.downloads[key.ID()]; d != nil && d.gen == gen {
		d.cancel(cause)
	}
}

// unpackError says what an unpack's failure was, and names the budget
// behind an ErrTooLarge.
func unpackError(err error, b bound) error {
	if errors.Is(err, unpack.ErrTooLarge) {
		return fmt.Errorf("unpacking: %w: %s: %w", err, b.why, ErrTooLarge)
	}
	if err != nil {
		return fmt.Errorf("unpacking: %w", err)
	}
	return nil
}

// spoolName is where a zip is spooled inside the staging directory: a zip
// keeps its index at its end, so it is unpacked from a file, not a stream.
// The spool is its raw file, which checkpoints cover.
const spoolName = "spool.zip"

// extractZipSpool unpacks the complete zip spool of size bytes into
// content through unpack.ExtractZip, and removes the spool. While it
// unpacks, the staging directory holds both, so the spool counts against
// the bound (as a tar archive's does): the tree may write the bound less
// the spool's size.
func (m *Manager) extractZipSpool(ctx context.Context, spool string, size int64, content string, b bound, tree *atomic.Int64) (int64, map[string]string, error) {
	if b.limit > 0 && b.disk {
		b = bound{limit: max(b.limit-size, 1), disk: true, why: fmt.Sprintf("%s, less the %d bytes of the zip archive it is unpacked from", b.why, size)}
	}
	defer os.Remove(spool)
	f, err := os.Open(spool)
	if err != nil {
		return 0, nil, err
	}
	defer f.Close()
	if err := m.perms.MkdirAll(content); err != nil {
		return 0, nil, err
	}
	n, hashes, err := unpack.ExtractZip(ctx, f, size, content, unpack.Limits{MaxBytes: b.limit, Group: m.cfg.GroupShared, Used: tree})
	return n, hashes, unpackError(err, b)
}

// namesPath reports whether an entry of st names rel as its content.
func namesPath(st *state.State, rel string) bool {
	for _, e := range st.Entries {
		if e.Path == rel {
			return true
		}
	}
	return false
}
