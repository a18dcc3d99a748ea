package manager

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/depcache/depcache/manager/unpack"
	"github.com/depcache/depcache/state"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Checkpoints. An owner records in its own staging directory how far its
// download got: the offset, the validator the source gave, and the state
// of the running SHA-256 of the raw bytes up to the offset. It writes one
// only once the bytes it covers are durable (fsync of the raw file, then
// temp + fsync + rename of the checkpoint). The owner of a later generation
// copies those bytes (never links them, never writes into the old
// directory: a superseded owner may still append there), checks them
// against the hash, and asks the source for the rest under the validator.
const (
	checkpointName    = "checkpoint.json"
	checkpointVersion = 1
	// rawSpoolName holds the raw bytes of a tar archive, which is unpacked
	// while it streams: a resumed unpack replays them. A plain file is its
	// own raw file (contentName), a zip its spool (spoolName).
	rawSpoolName = "raw.spool"
	// checkpointEvery is how many bytes pass between two checkpoints, at
	// least (one is written at a time, in the background).
	checkpointEvery = 8 << 20
)

// errNoResume: a source's answer does not continue the version asked for;
// the fetch is retried from the start at once.
var errNoResume = errors.New("the source cannot resume this version")

type checkpoint struct {
	Version   int       `json:"version"`
	Source    string    `json:"source"`
	Raw       string    `json:"raw"` // the file of the staging directory that holds the raw bytes
	Offset    int64     `json:"offset"`
	Validator Validator `json:"validator"`
	// SHA256 is the sha256 digest's state (MarshalBinary) after Offset
	// raw bytes.
	SHA256 []byte `json:"sha256_state"`
}

// readCheckpoint returns dir's checkpoint for key when it is one a later
// generation may resume from (usable).
func readCheckpoint(dir string, key state.Key) (checkpoint, bool) {
	c, err := loadCheckpoint(dir)
	if err != nil {
		return c, false
	}
	return c, c.usable(dir, key)
}

// loadCheckpoint reads and parses dir's checkpoint.
func loadCheckpoint(dir string) (checkpoint, error) {
	var c checkpoint
	b, err := readNote(filepath.Join(dir, checkpointName))
	if err != nil {
		return c, err
	}
	return c, json.Unmarshal(b, &c)
}

// usable reports whether c, read from dir, is one a later generation of
// key may resume from: of key's source, under a strong validator, past the
// bytes that tell the format, and with a raw file that holds at least the
// bytes it covers. Whether they are the right bytes is checked when they
// are copied.
func (c checkpoint) usable(dir string, key state.Key) bool {
	if c.Version != checkpointVersion || c.Source != key.Source || !c.Validator.Strong() ||
		c.Offset < unpack.SniffHead || len(c.SHA256) == 0 ||
		(c.Raw != contentName && c.Raw != spoolName && c.Raw != rawSpoolName) {
		return false
	}
	fi, err := os.Lstat(filepath.Join(dir, c.Raw))
	return err == nil && fi.Mode().IsRegular() && fi.Size() >= c.Offset
}

// writeCheckpoint replaces dir's checkpoint atomically: temp file, fsync,
// rename. The caller made the raw bytes it covers durable first.
func (m *Manager) writeCheckpoint(dir string, c checkpoint) error {
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, checkpointName+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, m.perms.File)
	if err != nil {
		return err
	}
	if err := f.Chmod(m.perms.File); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, checkpointName))
}

// stagingGen returns the generation of a staging directory of key, from
// its name (stagingName).
func stagingGen(key state.Key, name string) (uint64, bool) {
	rest, ok := strings.CutPrefix(name, key.ID()+"-g")
	if !ok {
		return 0, false
	}
	g, err := strconv.ParseUint(rest, 10, 64)
	return g, err == nil
}

// olderStaging lists key's staging directories of generations before gen,
// the newest first.
func (m *Manager) olderStaging(key state.Key, gen uint64) []string {
	dir := filepath.Join(m.Root(), stagingDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	type older struct {
		gen  uint64
		path string
	}
	var found []older
	for _, d := range ents {
		if g, ok := stagingGen(key, d.Name()); ok && g < gen && d.IsDir() {
			found = append(found, older{g, filepath.Join(dir, d.Name())})
		}
	}
	slices.SortFunc(found, func(a, b older) int { return -cmpUint(a.gen, b.gen) })
	paths := make([]string, len(found))
	for i, o := range found {
		paths[i] = o.path
	}
	return paths
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// writerGone reports whether the writer named by a staging directory's
// owner.json is proven gone: a process of this machine that no longer
// runs, or this manager, which no longer runs that generation. A writer
// on another host, or one that may be stopped, is not.
func (m *Manager) writerGone(dir string, key state.Key) bool {
	var rec struct {
		Owner      state.Owner `json:"owner"`
		Generation uint64      `json:"generation"`
	}
	b, err := readNote(filepath.Join(dir, ownerName))
	if err != nil || json.Unmarshal(b, &rec) != nil {
		return false
	}
	if rec.Owner.Same(&m.self) {
		m.mu.Lock()
		defer m.mu.Unlock()
		d := m.downloads[key.ID()]
		return d == nil || d.gen != rec.Generation
	}
	if !m.self.SameMachine(rec.Owner.Process) {
		return false
	}
	alive, err := m.cfg.Processes.Alive(rec.Owner.Process)
	return err == nil && !alive
}

// removeSuperseded removes key's staging directories of generations before
// gen whose writers are proven gone: the owner of gen has copied what it
// resumes from (or chose not to). A writer that may still run removes its
// own when it finds itself superseded.
func (m *Manager) removeSuperseded(key state.Key, gen uint64, log logrus.FieldLogger) {
	for _, p := range m.olderStaging(key, gen) {
		if !m.writerGone(p, key) {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			log.WithError(err).WithField("dir", filepath.Base(p)).Warn("removing superseded staging data")
		}
	}
}

// removeDeadOwnerStaging carries out RemoveStaging (a takeover from a dead
// owner): staging data with a checkpoint stays for the download this
// manager just started, which resumes from it and then removes it.
func (m *Manager) removeDeadOwnerStaging(key state.Key, gen uint64, log logrus.FieldLogger) {
	dir := filepath.Join(m.Root(), stagingDir, stagingName(key, gen))
	if _, ok := readCheckpoint(dir, key); ok {
		return
	}
	if err := os.RemoveAll(dir); err != nil {
		log.WithError(err).Warn("removing a dead owner's staging data")
	}
}

// hasCheckpoint reports whether staging holds a checkpoint of key.
func hasCheckpoint(staging string, key state.Key) bool {
	_, ok := readCheckpoint(staging, key)
	return ok
}

// sha256State returns the marshalled state of a sha256 digest.
func sha256State(h hash.Hash) []byte {
	b, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return nil
	}
	return b
}

// resumed is the prefix an attempt starts on: raw holds Offset checked
// bytes, h their digest.
type resumed struct {
	c   checkpoint
	raw *os.File // opened read-write, positioned at c.Offset
	h   hash.Hash
}

// loadPrefix checks the first c.Offset bytes of src (the raw file of a
// checkpoint) against the checkpoint's hash while it writes them to dst, a
// new file (or, when dst is src, reads them in place and truncates what
// follows). It returns the prefix or why it cannot be used.
func (m *Manager) loadPrefix(ctx context.Context, c checkpoint, src, dst string) (*resumed, error) {
	in, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	h := sha256.New()
	var out *os.File
	if src == dst {
		if out, err = os.OpenFile(dst, os.O_RDWR, 0); err != nil {
			return nil, err
		}
		if _, err = io.CopyN(h, ctxReader{ctx, in}, c.Offset); err == nil {
			err = out.Truncate(c.Offset)
		}
	} else {
		if out, err = os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, m.perms.File); err != nil {
			return nil, err
		}
		if err = out.Chmod(m.perms.File); err == nil {
			// Copied, never linked: the old owner may still write to its file.
			_, err = io.CopyN(io.MultiWriter(out, h), ctxReader{ctx, in}, c.Offset)
		}
	}
	if err == nil && !bytes.Equal(sha256State(h), c.SHA256) {
		err = fmt.Errorf("the first %d bytes do not match the checkpoint's hash", c.Offset)
	}
	if err == nil {
		_, err = out.Seek(c.Offset, io.SeekStart)
	}
	if err != nil {
		out.Close()
		return nil, err
	}
	return &resumed{c: c, raw: out, h: h}, nil
}

// clearRaw removes what an attempt may have left in staging: the raw
// files, the checkpoint and the content.
// errSpoolCrowded means an archive's tree passed the bound only because
// the copy kept to resume from counted against it too: without the copy
// it may fit, so the download starts again without one.
var errSpoolCrowded = errors.New("the tree and the copy of its archive kept to resume from do not fit together")

func clearRaw(staging string) error {
	for _, n := range []string{checkpointName, checkpointName + ".tmp", rawSpoolName, spoolName, contentName} {
		if err := os.RemoveAll(filepath.Join(staging, n)); err != nil {
			return err
		}
	}
	return nil
}

// prepareAttempt sets staging up for one attempt of a fetch and returns
// the prefix it resumes on (nil: from the first byte). The first attempt
// of a generation copies the newest older generation's checkpointed
// prefix; a later attempt resumes on its own last checkpoint. Anything
// that does not check out is dropped, and the attempt starts from 0.
func (m *Manager) prepareAttempt(ctx context.Context, key state.Key, gen uint64, staging string, first bool, log logrus.FieldLogger) (*resumed, error) {
	var r *resumed
	if c, ok := readCheckpoint(staging, key); ok && !first {
		p := filepath.Join(staging, c.Raw)
		var err error
		if r, err = m.loadPrefix(ctx, c, p, p); err != nil {
			log.WithError(err).Warn("not resuming from our own checkpoint")
			r = nil
		}
	}
	if r == nil {
		if err := clearRaw(staging); err != nil {
			return nil, err
		}
	}
	if first {
		for _, old := range m.olderStaging(key, gen) {
			c, ok := readCheckpoint(old, key)
			if !ok {
				continue
			}
			from := filepath.Base(old)
			var err error
			r, err = m.loadPrefix(ctx, c, filepath.Join(old, c.Raw), filepath.Join(staging, c.Raw))
			if err != nil {
				// The newest checkpoint decides: a prefix that does not
				// check out is not replaced by an older one.
				log.WithError(err).WithField("from", from).Warn("not resuming: the previous generation's bytes do not check out; starting from 0")
				if err := clearRaw(staging); err != nil {
					return nil, err
				}
				r = nil
				break
			}
			// Our own checkpoint at once: the old directory may go.
			if err = r.raw.Sync(); err == nil {
				err = m.writeCheckpoint(staging, r.c)
			}
			if err != nil {
				r.raw.Close()
				return nil, err
			}
			log.WithFields(logrus.Fields{"from": from, "offset": c.Offset}).Info("resuming the previous generation's download")
			break
		}
		if ctx.Err() != nil {
			if r != nil {
				r.raw.Close()
			}
			return nil, context.Cause(ctx)
		}
		m.removeSuperseded(key, gen, log)
	}
	return r, nil
}

// sink receives one attempt's raw bytes from the source: it hashes them,
// counts them, writes them to the raw file (the content itself for a plain
// file, the spool of a zip or a tar archive), feeds a tar archive's
// unpacker, and checkpoints. Its format is told by the first bytes
// (unpack.SniffHead), which it holds back until it has them.
type sink struct {
	m       *Manager
	ctx     context.Context
	key     state.Key
	staging string
	b       bound
	written *atomic.Int64
	// onDisk and tree: the raw bytes this attempt keeps on disk, and the
	// disk its unpacked tree takes (see the progress reports).
	onDisk, tree *atomic.Int64
	onTotal      func(int64)
	log          logrus.FieldLogger
	// noSpool keeps no copy of a tar to resume from: an earlier attempt
	// found that its tree and the copy together pass the bound.
	noSpool bool

	h       hash.Hash
	n       int64
	started bool
	total   int64
	val     Validator
	resume  *resumed

	decided bool
	head    []byte
	format  unpack.Format
	raw     *os.File
	rawName string
	pw      *io.PipeWriter
	done    chan unpacked
	werr    error // our side failed: the disk, the bound, the unpacker

	ckptAt   int64
	ckptBusy chan error // a checkpoint being written; nil when none
}

type unpacked struct {
	n      int64
	hashes map[string]string
	err    error
}

func (s *sink) content() string { return filepath.Join(s.staging, contentName) }

// start takes what the source sends: the rest of the prefix's version, or
// the whole content (offset 0), which drops the prefix.
func (s *sink) start(rs RangeStart) error {
	if s.started {
		return fmt.Errorf("source started twice")
	}
	s.started = true
	if s.resume != nil && rs.Offset != s.resume.c.Offset {
		if rs.Offset != 0 {
			return fmt.Errorf("the source sends from byte %d, we asked from %d: %w", rs.Offset, s.resume.c.Offset, errNoResume)
		}
		s.log.WithField("offset", s.resume.c.Offset).Info("not resuming: the source sends the whole content (it changed, or cannot send a range); starting from 0")
		s.resume.raw.Close()
		s.resume = nil
		if err := clearRaw(s.staging); err != nil {
			return err
		}
	}
	s.total, s.val = rs.Total, rs.Validator
	if r := s.resume; r != nil {
		// Before the report that the total brings: the prefix is in.
		s.written.Store(r.c.Offset)
	}
	if s.total >= 0 {
		s.onTotal(s.total)
	}
	if r := s.resume; r != nil {
		s.val = r.c.Validator
		s.h, s.n, s.ckptAt = r.h, r.c.Offset, r.c.Offset
		s.written.Store(s.n)
		head := make([]byte, unpack.SniffHead)
		if _, err := r.raw.ReadAt(head, 0); err != nil {
			return err
		}
		return s.decide(head, r)
	}
	if err := os.RemoveAll(s.content()); err != nil {
		return err
	}
	return nil
}

// decide picks the raw file and the consumer from the first bytes. With a
// prefix, they are the prefix's own, and a tar archive's unpacker replays
// the prefix from the raw spool.
func (s *sink) decide(head []byte, r *resumed) error {
	s.decided = true
	format := unpack.SniffBytes(head)
	if format == unpack.Plain && archiveName(s.key) == ".tar" {
		// An archive of nothing has no header to sniff: its name says
		// what it is, and it unpacks to an empty directory.
		if f, ok := unpack.EmptyTar(head); ok {
			format = f
		}
	}
	if IsKeptPacked(s.key) || (format == unpack.Zip && archiveName(s.key) != ".zip") {
		format = unpack.Plain
	}
	s.format = format
	// A tar archive is kept to resume from only when it and a tree of
	// its size fit the budget together: a download that would fit
	// without the copy is not failed for it (it just cannot resume).
	spoolTar := !s.noSpool && s.total >= 0 && s.val.Strong() && (s.b.limit <= 0 || !s.b.disk || 2*s.total <= s.b.limit)
	switch format {
	case unpack.Plain:
		s.rawName = contentName
	case unpack.Zip:
		s.rawName = spoolName
	default:
		if spoolTar || r != nil {
			s.rawName = rawSpoolName
		}
	}
	if r != nil && s.rawName == rawSpoolName && !spoolTar {
		// The spool of an archive is bounded by the length the source
		// declares: with none (a Content-Range of "*/"), or one that does
		// not fit the bound with the unpacked tree, start again without
		// a spool.
		return fmt.Errorf("the rest of the %s comes with no length that bounds the copy kept to resume from (total %d, bound %d): %w", format, s.total, s.b.limit, errNoResume)
	}
	if r != nil {
		if r.c.Raw != s.rawName {
			return fmt.Errorf("the prefix is a %s in %s, not in %s: %w", format, r.c.Raw, s.rawName, errNoResume)
		}
		s.raw = r.raw
		if s.onDisk != nil {
			s.onDisk.Store(s.n) // the prefix, copied in
		}
		if s.rawName == rawSpoolName {
			// The archive is unpacked again from its first byte: the
			// tree an earlier attempt of this generation left half made
			// would read as duplicate members.
			if err := os.RemoveAll(s.content()); err != nil {
				return err
			}
		}
	} else if s.rawName != "" {
		f, err := os.OpenFile(filepath.Join(s.staging, s.rawName), os.O_RDWR|os.O_CREATE|os.O_EXCL, s.m.perms.File)
		if err != nil {
			return err
		}
		if err := f.Chmod(s.m.perms.File); err != nil {
			f.Close()
			return err
		}
		s.raw = f
	}
	if format != unpack.Tar && format != unpack.TarGzip {
		return nil
	}
	// The spool counts against the bound while it exists.
	b := s.b
	crowded := false                                             // the copy alone may make the tree too large
	if s.rawName != "" && b.limit > 0 && b.disk && s.total > 0 { // an unknown total (-1) must not raise the bound
		b = bound{limit: max(b.limit-s.total, 1), disk: true, why: fmt.Sprintf("%s, less the %d bytes of the archive kept to resume from", b.why, s.total)}
		crowded = r == nil
	}
	if err := s.m.perms.MkdirAll(s.content()); err != nil {
		return err
	}
	pr, pw := io.Pipe()
	s.pw, s.done = pw, make(chan unpacked, 1)
	var in io.Reader = pr
	if r != nil {
		in = io.MultiReader(io.NewSectionReader(s.raw, 0, s.n), pr)
	}
	go func() {
		var u unpacked
		tr, err := unpack.Open(in, format)
		if err != nil {
			u.err = fmt.Errorf("unpacking: %w", err)
		}
		if u.err == nil {
			u.n, u.hashes, u.err = unpack.ExtractHashed(s.ctx, tr, s.content(), unpack.Limits{MaxBytes: b.limit, Group: s.m.cfg.GroupShared, Used: s.tree})
			if crowded && errors.Is(u.err, unpack.ErrTooLarge) {
				u.err = fmt.Errorf("%w: %w", u.err, errSpoolCrowded)
			}
			u.err = unpackError(u.err, b)
		}
		if u.err == nil {
			if err := unpack.Finish(tr); err != nil {
				u.err = fmt.Errorf("unpacking: %w", err)
			}
		}
		if u.err == nil {
			_, u.err = io.Copy(io.Discard, in) // the rest (tar padding), so that the hash covers every byte
		}
		pr.CloseWithError(u.err) // a failure stops the writer
		s.done <- u
	}()
	return nil
}

func (s *sink) Write(p []byte) (int, error) {
	if !s.started {
		if err := s.start(RangeStart{Total: -1}); err != nil {
			return 0, err
		}
	}
	if s.werr != nil {
		return 0, s.werr
	}
	if !s.decided {
		s.head = append(s.head, p...)
		if len(s.head) < unpack.SniffHead {
			return len(p), nil
		}
		head := s.head
		s.head = nil
		if err := s.decide(head, nil); err != nil {
			s.werr = err
			return 0, err
		}
		if err := s.write(head); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if err := s.write(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *sink) write(p []byte) error {
	if s.format == unpack.Plain || s.format == unpack.Zip {
		if err := s.b.check(s.n + int64(len(p))); err != nil {
			s.werr = err
			return err
		}
	}
	if (s.total > 0 || s.rawName == rawSpoolName) && s.n+int64(len(p)) > s.total {
		// The download would fail its size check at the end; failing
		// now bounds what it writes. That matters most for an
		// archive's spool: the bound of the unpacked tree left room for
		// its declared length only (decide). The source may be a 206
		// with no Content-Length whose body runs on.
		s.werr = fmt.Errorf("the source sent more than the %d bytes it declared", s.total)
		return s.werr
	}
	if s.raw != nil {
		if _, err := s.raw.Write(p); err != nil {
			s.werr = err
			return err
		}
	}
	s.h.Write(p)
	s.n += int64(len(p))
	s.written.Store(s.n)
	if s.raw != nil && s.onDisk != nil {
		s.onDisk.Store(s.n)
	}
	if s.pw != nil {
		if _, err := s.pw.Write(p); err != nil {
			s.werr = err
			return err
		}
	}
	s.maybeCheckpoint()
	return nil
}

func (s *sink) checkpointable() bool {
	return s.raw != nil && s.val.Strong() && s.n >= unpack.SniffHead
}

func (s *sink) checkpointAt() checkpoint {
	return checkpoint{Version: checkpointVersion, Source: s.key.Source, Raw: s.rawName,
		Offset: s.n, Validator: s.val, SHA256: sha256State(s.h)}
}

// maybeCheckpoint starts a checkpoint in the background once
// checkpointEvery bytes passed since the last, unless one is being
// written: the fsync does not hold up the stream.
func (s *sink) maybeCheckpoint() {
	if !s.checkpointable() || s.n-s.ckptAt < checkpointEvery {
		return
	}
	if s.ckptBusy != nil {
		select {
		case err := <-s.ckptBusy:
			s.ckptBusy = nil
			s.noteCheckpoint(err)
		default:
			return
		}
	}
	c := s.checkpointAt()
	s.ckptAt = s.n
	done := make(chan error, 1)
	s.ckptBusy = done
	raw := s.raw
	go func() {
		// Every byte c covers was written before the fsync starts.
		err := raw.Sync()
		if err == nil {
			err = s.m.writeCheckpoint(s.staging, c)
		}
		done <- err
	}()
}

func (s *sink) noteCheckpoint(err error) {
	if err != nil {
		s.log.WithError(err).Debug("writing a checkpoint")
	}
}

// waitCheckpoint waits for the checkpoint being written, if any.
func (s *sink) waitCheckpoint() {
	if s.ckptBusy != nil {
		s.noteCheckpoint(<-s.ckptBusy)
		s.ckptBusy = nil
	}
}

// finish ends the attempt once the source returned ferr: it ends the
// consumer, checkpoints what an interrupted attempt got, and for a
// complete one unpacks a zip and removes what only a resume needs. It
// returns the content's size and file digests, and our side's failure.
func (s *sink) finish(ferr error) (int64, map[string]string, error) {
	if ferr == nil && !s.started {
		if err := s.start(RangeStart{Total: -1}); err != nil {
			ferr = err
		}
	}
	if ferr == nil && !s.decided {
		head := s.head
		s.head = nil
		if err := s.decide(head, nil); err != nil {
			s.werr = err
		} else {
			s.write(head)
		}
	}
	var u unpacked
	if s.pw != nil {
		if ferr != nil {
			s.pw.CloseWithError(ferr)
		} else {
			s.pw.Close()
		}
		u = <-s.done
	}
	s.waitCheckpoint()
	if ferr != nil && s.checkpointable() && s.n > s.ckptAt {
		// An interrupted attempt: what it got is for the next one, or the
		// next owner.
		err := s.raw.Sync()
		if err == nil {
			err = s.m.writeCheckpoint(s.staging, s.checkpointAt())
		}
		s.noteCheckpoint(err)
	}
	if s.raw != nil {
		if err := s.raw.Close(); err != nil && s.werr == nil {
			s.werr = err
		}
	}
	if r := s.resume; r != nil && r.raw != nil && r.raw != s.raw {
		// A prefix this attempt did not take (not resumed, or the
		// source failed before it started): its file is closed here, so
		// that a deleted spool does not hold its disk.
		r.raw.Close()
	}
	if s.werr != nil {
		return 0, nil, s.werr
	}
	if ferr != nil {
		return 0, nil, u.err
	}
	// Complete: nothing is left to resume.
	os.Remove(filepath.Join(s.staging, checkpointName))
	switch s.format {
	case unpack.Plain:
		return s.n, map[string]string{".": hex.EncodeToString(s.h.Sum(nil))}, nil
	case unpack.Zip:
		n, hashes, err := s.m.extractZipSpool(s.ctx, filepath.Join(s.staging, spoolName), s.n, s.content(), s.b, s.tree)
		return n, hashes, err
	}
	if s.rawName != "" {
		os.Remove(filepath.Join(s.staging, s.rawName))
	}
	return u.n, u.hashes, u.err
}

// maxNoteBytes bounds the small files depcache writes beside content and
// reads back (checkpoints, owner notes, metadata): none is near it.
const maxNoteBytes = 1 << 20

// readNote reads one of those files without trusting what is at its name:
// a symlink is not followed, a FIFO does not block (a planted one hung
// every start-up on the root), and a file past maxNoteBytes (a link to
// /dev/zero, before) is refused rather than read into memory.
func readNote(p string) ([]byte, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is %s, not a regular file", p, fi.Mode().Type())
	}
	if fi.Size() > maxNoteBytes {
		return nil, fmt.Errorf("%s: %d bytes, more than a note of depcache's can be", p, fi.Size())
	}
	return io.ReadAll(io.LimitReader(f, maxNoteBytes+1))
}
