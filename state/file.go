package state

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/renameio/v2"
)

// File names inside the root.
const (
	StateFile = "state.json"
	LockFile  = "state.lock"
	// PrevSuffix names the previous good version of the state file.
	PrevSuffix = ".prev"
	// BadSuffix names copies of unreadable state files, followed by a hash
	// of their content.
	BadSuffix = ".bad-"
	// KeptSuffix names copies, followed by a hash of their content, of the
	// last state that parsed when a [Store.Reset] replaced it: unlike
	// state.json.prev, no later commit replaces them.
	KeptSuffix = ".kept-"
)

// Options configures a [Store].
type Options struct {
	// Lock configures the state lock.
	Lock LockOptions
	// Perms are the modes of the root, the state and lock files. Default:
	// DefaultPerms().
	Perms Perms
	// OnHold, when set, is told how long each Update held the lock.
	OnHold func(time.Duration)
	// OnWait, when set, is told how long each Update waited for the lock.
	OnWait func(time.Duration)
}

// Store is the state file of one cache root.
type Store struct {
	root string
	path string
	lock *Lock
	opts Options

	// The entry lines of a recent state file read or written (see
	// layout.go): a read decodes only the lines not in it, a write encodes
	// only the entries that changed. Any cache is correct, however old: a
	// hit needs the same bytes (read) or an Equal entry (write).
	cacheMu sync.Mutex
	lines   *lineCache

	batch batcher
}

// Open returns the store of the cache root dir, creating the directory if
// needed. It does not read the state.
func Open(dir string, opts Options) (*Store, error) {
	if dir == "" {
		return nil, errors.New("state: empty root directory")
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("state: root %q: %w", dir, err)
	}
	if opts.Perms == (Perms{}) {
		opts.Perms = DefaultPerms()
	}
	if err := opts.Perms.MkdirAll(dir); err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	if err := checkFiles(dir); err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	if opts.Lock.Perm == 0 {
		opts.Lock.Perm = opts.Perms.File
	}
	l, err := NewLock(filepath.Join(dir, LockFile), opts.Lock)
	if err != nil {
		return nil, err
	}
	return &Store{root: dir, path: filepath.Join(dir, StateFile), lock: l, opts: opts, batch: batcher{leader: make(chan struct{}, 1)}}, nil
}

// Root returns the absolute cache root.
func (s *Store) Root() string { return s.root }

// Path returns the state file's name.
func (s *Store) Path() string { return s.path }

// Lock returns the store's lock, for callers that must hold it around more
// than one Update (none in depcache) and for diagnostics.
func (s *Store) Lock() *Lock { return s.lock }

// Abs returns the absolute path of rel, a path recorded in the state, or an
// error if it would leave the root.
func (s *Store) Abs(rel string) (string, error) { return AbsIn(s.root, rel) }

// AbsIn returns the absolute path of rel, a path recorded in the state,
// under root, or an error if it would leave the root.
func AbsIn(root, rel string) (string, error) {
	if err := CheckRelPath(rel); err != nil {
		return "", err
	}
	return filepath.Join(root, rel), nil
}

// View returns the current state without taking the lock. The file is only
// ever replaced by rename, so the result is a consistent snapshot, possibly
// already outdated. A missing file is an empty state.
func (s *Store) View(ctx context.Context) (*State, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.cachedLines().verifyShared("before this View")
	st, b, err := s.read(true)
	putBuf(b)
	return st, err
}

// Update calls fn on the current state with the lock held. If fn reports a
// change and returns no error, the result is validated and written
// atomically; a result identical to the file is not written. fn must not
// block or do I/O: the lock is held while it runs. If the state file cannot
// be parsed, fn is not called and the error wraps [ErrCorrupt] or
// [ErrUnsupportedVersion].
func (s *Store) Update(ctx context.Context, fn func(*State) (changed bool, err error)) (err error) {
	waitStart := time.Now()
	unlock, err := s.lock.Lock(ctx)
	if err != nil {
		return err
	}
	start := time.Now()
	if s.opts.OnWait != nil {
		s.opts.OnWait(start.Sub(waitStart))
	}
	committed := false
	defer func() {
		if uerr := unlock(); uerr != nil {
			if committed {
				// After the commit point only log: the new state is in
				// place, and callers undo their work on an error.
				s.lock.opts.Log.WithError(uerr).WithField("state", s.path).Warn("releasing the state lock after a commit")
			} else if err == nil {
				err = uerr
			}
		}
		if s.opts.OnHold != nil {
			s.opts.OnHold(time.Since(start))
		}
	}()
	s.cachedLines().verifyShared("before this Update")
	st, old, err := s.read(false)
	if err != nil {
		return err
	}
	defer putBuf(old)
	changed, err := fn(st)
	s.cachedLines().verifyShared("by this Update's function")
	if err != nil || !changed {
		return err
	}
	st.Version = FormatVersion
	st.NoteGenerations()
	data, lines, err := encodeLines(getBuf(), st, s.cachedLines())
	if err != nil {
		return fmt.Errorf("state %s: refusing to write an invalid state: %w", s.path, err)
	}
	defer putBuf(data)
	if bytes.Equal(data, old) {
		return nil
	}
	if err := s.commit(data, old != nil); err != nil {
		return err
	}
	committed = true
	s.remember(lines)
	return nil
}

func (s *Store) cachedLines() *lineCache {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	return s.lines
}

func (s *Store) remember(c *lineCache) {
	s.cacheMu.Lock()
	s.lines = c
	s.cacheMu.Unlock()
}

// rereadDelays space the reads of a state file that does not parse before
// it is declared corrupt: on sshfs, a read of a file just replaced by a
// larger one may be cut to the old size, or one replaced by a smaller one
// may run on into the old one's cached pages, until the kernel's caches
// (1 s there) expire. A healthy file parses at the first read.
var rereadDelays = []time.Duration{0, 10 * time.Millisecond, 100 * time.Millisecond, 500 * time.Millisecond, time.Second, 1500 * time.Millisecond}

// read returns the parsed state and the raw bytes (nil if no file).
// unlocked says the caller does not hold the lock, so a commit may be
// replacing the file meanwhile: on sshfs, a rename over a file that is open
// on the renamer's mount is two renames on the server, between which the
// name is missing. A missing file beside a previous version is then read
// again before it is taken for an empty state.
func (s *Store) read(unlocked bool) (*State, []byte, error) {
	var (
		b   []byte
		st  *State
		err error
	)
	b = getBuf()
	for i, d := range rereadDelays {
		time.Sleep(d)
		b, err = readInto(b[:0], s.path)
		if errors.Is(err, fs.ErrNotExist) {
			if !s.hasPrev() {
				putBuf(b) // a root where nothing was committed yet
				return New(), nil, nil
			}
			if unlocked && i < len(rereadDelays)-1 {
				if missingHook != nil {
					missingHook(s.path)
				}
				continue
			}
			// Missing beside its previous version, under the lock (no
			// commit can be renaming it) or after looking again: lost.
			// An empty state would let the next commit and reconcile
			// treat every published entry as an orphan.
			putBuf(b)
			return nil, nil, fmt.Errorf("state file %s is missing beside its previous version %s (deleted, or restored without it); nothing was deleted; run 'depcache doctor --rebuild': %w",
				s.path, s.path+PrevSuffix, ErrCorrupt)
		}
		if err != nil {
			putBuf(b)
			// Not corrupt: unreadable (a user outside a shared root's
			// group, an I/O error). errors.Is finds fs.ErrPermission.
			return nil, nil, fmt.Errorf("state file %s: cannot read it: %w", s.path, err)
		}
		if fast, lines, ok := decodeLines(b, s.cachedLines()); ok {
			s.remember(lines)
			return fast, b, nil
		}
		if st, err = Decode(b); err == nil || !looksCut(err) {
			break
		}
	}
	if err != nil {
		aside := s.keepAside(b)
		putBuf(b)
		return nil, nil, fmt.Errorf("state file %s (copy kept at %s; nothing was deleted; run 'depcache doctor'): %w", s.path, aside, err)
	}
	return st, b, nil
}

// Buffers for reading and encoding the state file: a state of a thousand
// entries is a third of a megabyte, read and written on every operation, and
// allocating them anew made the garbage collector a fifth of an operation's
// cost under contention.
var bufPool sync.Pool

func getBuf() []byte {
	if p, ok := bufPool.Get().(*[]byte); ok {
		return (*p)[:0]
	}
	return nil
}

// putBuf returns b to the pool; b must not be used afterwards.
func putBuf(b []byte) {
	if cap(b) > 0 {
		bufPool.Put(&b)
	}
}

// readInto appends the content of the file name to buf.
func readInto(buf []byte, name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return buf, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && int64(cap(buf)-len(buf)) < fi.Size()+512 {
		buf = slices.Grow(buf, int(fi.Size())+512)
	}
	for {
		n, err := f.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, 4096)
		}
	}
}

// Decode parses a state file's bytes. Errors wrap [ErrCorrupt] or
// [ErrUnsupportedVersion] and say what is wrong.
func Decode(b []byte) (*State, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, fmt.Errorf("%w: file is empty", ErrCorrupt)
	}
	// One strict pass in the common case; the version is looked at alone
	// only to explain a failure, so that a newer format is reported as
	// such rather than as an unknown field.
	var st State
	err := strictUnmarshal(b, &st)
	var probe struct {
		Version *int `json:"version"`
	}
	if err != nil {
		if json.Unmarshal(b, &probe) == nil && probe.Version != nil && *probe.Version > FormatVersion {
			return nil, fmt.Errorf("%w: version %d, this depcache reads up to %d", ErrUnsupportedVersion, *probe.Version, FormatVersion)
		}
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	switch {
	case st.Version > FormatVersion:
		return nil, fmt.Errorf("%w: version %d, this depcache reads up to %d", ErrUnsupportedVersion, st.Version, FormatVersion)
	case st.Version < 1:
		return nil, fmt.Errorf("%w: no or bad \"version\" (%d)", ErrCorrupt, st.Version)
	}
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return &st, nil
}

// keepAside copies unreadable bytes next to the state file, named by their
// hash so that repeated failures keep one copy. The state file itself stays
// where it is: every process keeps refusing it until an operator acts.
func (s *Store) keepAside(b []byte) string {
	aside, err := s.keepCopy(b, BadSuffix)
	if err != nil {
		return "(none: " + err.Error() + ")"
	}
	return aside
}

// keepCopy writes b next to the state file, named by suffix and a hash of
// b, unless that copy exists already, and returns its name.
func (s *Store) keepCopy(b []byte, suffix string) (string, error) {
	sum := sha256.Sum256(b)
	name := s.path + suffix + hex.EncodeToString(sum[:6])
	if _, err := os.Stat(name); err == nil {
		return name, nil
	}
	if err := renameio.WriteFile(name, b, s.opts.Perms.File, renameio.WithTempDir(s.root), renameio.WithStaticPermissions(s.opts.Perms.File)); err != nil {
		return "", err
	}
	return name, nil
}

// commit replaces the state file with data. The previous version is linked
// to state.json.prev first, so no moment exists without a state file.
func (s *Store) commit(data []byte, hadOld bool) error {
	pf, err := renameio.NewPendingFile(s.path, renameio.WithTempDir(s.root), renameio.WithStaticPermissions(s.opts.Perms.File))
	if err != nil {
		return fmt.Errorf("state %s: %w", s.path, err)
	}
	defer pf.Cleanup()
	if _, err := pf.Write(data); err != nil {
		return fmt.Errorf("state %s: writing: %w", s.path, err)
	}
	if hadOld {
		if err := s.keepPrev(); err != nil {
			return err
		}
	}
	// Last look before the commit point: a holder judged stale by another
	// host must not overwrite what the new holder wrote.
	if err := s.lock.Check(); err != nil {
		return err
	}
	if err := pf.CloseAtomicallyReplace(); err != nil {
		return fmt.Errorf("state %s: replacing: %w", s.path, err)
	}
	// The commit point has passed: a failed directory fsync is logged, not
	// returned, or the caller would undo work the new state records.
	if err := SyncDir(s.root); err != nil {
		s.lock.opts.Log.WithError(err).WithField("state", s.path).Warn("fsync of the root after a commit")
	}
	return nil
}

func (s *Store) keepPrev() error {
	tmp := s.path + PrevSuffix + ".tmp"
	_ = os.Remove(tmp)
	if err := os.Link(s.path, tmp); err != nil {
		return fmt.Errorf("state %s: keeping the previous version: %w", s.path, err)
	}
	if err := os.Rename(tmp, s.path+PrevSuffix); err != nil {
		return fmt.Errorf("state %s: keeping the previous version: %w", s.path, err)
	}
	return nil
}

// SyncDir makes a rename in dir durable (fsync of the directory).
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// Replaced is what a [Store.Reset] replaced, so that its caller can say
// what the new state dropped.
type Replaced struct {
	// Last is the last state that parses: the state file itself when it
	// parses, else its previous version (state.json.prev) when that one
	// does; nil when neither does.
	Last *State
	// LastFile is the file Last was read from.
	LastFile string
	// LastCopy is a copy of LastFile (state.json.kept-HASH) that no later
	// commit replaces: state.json.prev is replaced at the next one.
	LastCopy string
	// Unreadable is where the state file that did not parse is kept aside
	// (state.json.bad-HASH), and UnreadableErr why it was not used (it did
	// not parse, or could not be read). Both are zero when it parsed or
	// was missing.
	Unreadable    string
	UnreadableErr error
}

// Reset replaces the state with the one fn builds from scratch, with the
// lock held, without using the current file: it is how an operator
// recovers from an unreadable state file (depcache doctor --rebuild). fn
// is given the last state that parses (see [Replaced]), or nil, to carry
// over what it decides to; like an Update's function it does no I/O.
//
// Nothing that held a state is lost: an unreadable state file is copied
// aside first, as every read does, and never becomes state.json.prev (a
// good previous version stays); the last state that parses is copied to a
// name no later commit replaces. If either copy cannot be written, Reset
// writes nothing.
func (s *Store) Reset(ctx context.Context, fn func(st, last *State) error) (rep Replaced, err error) {
	unlock, err := s.lock.Lock(ctx)
	if err != nil {
		return rep, err
	}
	defer func() {
		if uerr := unlock(); uerr != nil && err == nil {
			err = uerr
		}
	}()
	var lastBytes []byte
	cur, rerr := os.ReadFile(s.path)
	switch {
	case rerr == nil:
		st, derr := Decode(cur)
		if derr == nil {
			rep.Last, rep.LastFile, lastBytes = st, s.path, cur
			break
		}
		rep.UnreadableErr = derr
		if rep.Unreadable, err = s.keepCopy(cur, BadSuffix); err != nil {
			return rep, fmt.Errorf("state %s does not parse and a copy cannot be kept aside, so it is not replaced: %w", s.path, err)
		}
	case !errors.Is(rerr, fs.ErrNotExist):
		rep.UnreadableErr = rerr
	}
	if rep.Last == nil {
		prev := s.path + PrevSuffix
		if b, err := os.ReadFile(prev); err == nil {
			if st, err := Decode(b); err == nil {
				rep.Last, rep.LastFile, lastBytes = st, prev, b
			}
		}
	}
	if rep.Last != nil {
		if rep.LastCopy, err = s.keepCopy(lastBytes, KeptSuffix); err != nil {
			return rep, fmt.Errorf("state %s: keeping a copy of %s before replacing it: %w", s.path, rep.LastFile, err)
		}
	}
	st := New()
	if err := fn(st, rep.Last); err != nil {
		return rep, err
	}
	data, lines, err := encodeLines(nil, st, nil)
	if err != nil {
		return rep, fmt.Errorf("state %s: refusing to write an invalid state: %w", s.path, err)
	}
	// Only a state file that parses becomes state.json.prev: one that does
	// not never replaces a good previous version.
	if err := s.commit(data, rep.LastFile == s.path); err != nil {
		return rep, err
	}
	s.remember(lines)
	return rep, nil
}

// missingHook, nil outside tests, runs when an unlocked read found the
// state file missing beside its previous version and is about to look
// again: a test puts the file back there, as the second server rename of a
// commit would.
var missingHook func(path string)

// hasPrev reports whether a previous version of the state file exists: a
// state was committed here.
func (s *Store) hasPrev() bool {
	_, err := os.Lstat(s.path + PrevSuffix)
	return err == nil
}

// looksCut reports whether a decode error is what a read cut short, or
// torn between a new file and the old one's cached pages, gives: worth
// reading again before the file is declared corrupt.
func looksCut(err error) bool {
	return errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, errTrailing) || strings.Contains(err.Error(), "unexpected end of JSON input")
}
