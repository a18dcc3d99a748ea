package state

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
	// ShardGrace is how long a shard file that no manifest names must stay
	// so before a holder deletes it, on the holder's own clock: the litter
	// of a commit killed before its rename. Default: 10 minutes.
	ShardGrace time.Duration
	// NoCombine turns off combining with other processes (combine.go),
	// as DEPCACHE_COMBINE=0 does.
	NoCombine bool
	// OnCombine, when set, is told of each proposal of this store that
	// waits in the spool ("proposed"), of each that another process
	// applied ("answered"), and of each other process's proposal that
	// this store applied ("served").
	OnCombine func(event string)
	// Reserve is the size of the disk reserve (ReserveFile), given up in
	// parts by the commits that free space, or let it be freed, on a
	// full disk (Reserver): 0 is DefaultReserve; with a negative size,
	// none is made or grown (one that is there is still given up).
	Reserve int64
}

// Store is the state file of one cache root.
type Store struct {
	root string
	path string
	lock *Lock
	opts Options

	// The shards last read or written, by index (see v2.go): a shard
	// whose file the manifest still names is not read again, and a new
	// file of a shard decodes only the lines not in the old one. Any cache
	// is correct, however old: shard files never change, a line hit needs
	// the same bytes (read) or an Equal entry (write).
	cacheMu sync.Mutex
	shards  [numShards]shardCache
	man     manifestCache

	litter litter // unnamed shard files seen by this store

	shardDirOnce    sync.Once
	shardDirCovered bool        // see shardEntriesDurable
	shardDirMade    atomic.Bool // state.d was made or seen by this store
	modes           modeCheck   // of the manifests it writes in the root
	shardModes      modeCheck   // of the shard files it writes in state.d (its default ACL may differ)

	batch batcher
	comb  combiner

	nonceMu sync.Mutex
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
	if err := CheckUnbound(dir); err != nil {
		return nil, err
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

// CheckUnbound refuses (ErrBoundElsewhere) a root that another store
// describes: a file store on it would see that store's content named by no
// entry of its own, and reconcile would move it aside under the processes
// that hold it; and a file lock under it would exclude none of the hosts
// that lock through that store.
func CheckUnbound(dir string) error {
	if err := CheckLayout(dir, nil, []string{RootIDFile}); err != nil {
		return err
	}
	id, err := os.ReadFile(filepath.Join(dir, RootIDFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("state: root %s: its ID file: %w", dir, err)
	}
	return fmt.Errorf("state: root %s: %w: its ID file %s (ID %s) says an etcd state store describes its content; give every command on this root that store (--state etcd://HOST:PORT/PREFIX, or DEPCACHE_STATE), as the hosts that use it do",
		dir, ErrBoundElsewhere, filepath.Join(dir, RootIDFile), strings.TrimSpace(string(id)))
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

// View returns the current state, read without taking the lock. The
// manifest is only ever replaced by rename and shard files never change, so
// the result is a consistent snapshot, possibly already outdated. A missing
// file is an empty state. Only when every try found a shard the manifest
// names gone or cut (commits retiring them faster than this reader reads)
// does it read once more under the lock.
func (s *Store) View(ctx context.Context) (*State, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.verifyShared("before this View")
	sn, err := s.read(true, nil)
	var again *shardAgain
	if errors.As(err, &again) {
		// Commits replaced the shards under every try of this unlocked
		// read (a slow reader beside a busy root, as on sshfs): read once
		// more under the lock, where no commit can, rather than report a
		// state that is only moving as corrupt.
		unlock, lerr := s.lock.Lock(ctx)
		if lerr != nil {
			// Moving too fast to read without the lock, or a shard that
			// does not match its manifest: the lock that would tell them
			// apart could not be had.
			return nil, fmt.Errorf("state file %s: every unlocked read found a shard replaced or not as its manifest says (%v), and reading it under the lock: %w", s.path, again.err, lerr)
		}
		if lockedViewHook != nil {
			lockedViewHook()
		}
		sn, err = s.readKeeping(false, false, nil)
		if uerr := unlock(); uerr != nil && err == nil {
			if errors.Is(uerr, ErrLockLost) {
				s.lostUnwritten(uerr)
			} else {
				err = uerr
			}
		}
	}
	if err != nil {
		return nil, err
	}
	return sn.st, nil
}

// Update calls fn on the current state with the lock held. If fn reports a
// change and returns no error, the result is validated and the shards it
// changed are written, then the manifest, atomically; a result identical to
// the state is not written. fn must not block or do I/O: the lock is held
// while it runs. If the state cannot be parsed, fn is not called and the
// error wraps [ErrCorrupt] or [ErrUnsupportedVersion].
func (s *Store) Update(ctx context.Context, fn func(*State) (changed bool, err error)) (err error) {
	return s.transact(ctx, txHooks{}, func() ([]string, bool) { return nil, true }, fn)
}

// txHooks are a transact's ties to combining (combine.go): wait replaces
// the sleeps between lock attempts, after runs once the hold's outcome is
// known and before the lock is released.
type txHooks struct {
	wait  waitFunc
	after func(committed bool)
}

// transact is every read-modify-write: with the lock held, need says which
// entries fn will see (whole: all of them), the shards holding them are
// read, fn runs, and what it changed is committed.
func (s *Store) transact(ctx context.Context, hooks txHooks, need func() (ids []string, whole bool), fn func(*State) (bool, error)) (err error) {
	waitStart := time.Now()
	unlock, err := s.lock.lockOr(ctx, hooks.wait)
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
			switch {
			case committed:
				// After the commit point only log: the new state is in
				// place, and callers undo their work on an error.
				s.lock.opts.Log.WithError(uerr).WithField("state", s.path).Warn("releasing the state lock after a commit")
			case err == nil && errors.Is(uerr, ErrLockLost):
				s.lostUnwritten(uerr)
			case err == nil:
				err = uerr
			}
		}
		if s.opts.OnHold != nil {
			s.opts.OnHold(time.Since(start))
		}
	}()
	if hooks.after != nil {
		// Before the unlock above: see combine.go.
		defer func() { hooks.after(committed || err == nil) }()
	}
	s.verifyShared("before this Update")
	ids, whole := need()
	var sel *selection
	if !whole {
		sel = newSelection(ids)
	}
	sn, err := s.read(false, sel)
	if err != nil {
		return err
	}
	changed, err := fn(sn.st)
	s.verifyShared("by this Update's function")
	if err == nil && changed {
		committed, err = s.commitChanges(sn)
	}
	if whole && err == nil {
		s.collectLitter()
	}
	return err
}

// lostUnwritten logs a lock lost by a hold that wrote nothing: this
// process stalled past the lease (SIGSTOP, a paused VM) and another broke
// the lock. What the hold read was a committed state, so its outcome
// stands; an error would fail a get or a gc that did nothing wrong.
func (s *Store) lostUnwritten(err error) {
	s.lock.opts.Log.WithError(err).WithField("state", s.path).Warn("the state lock was broken while this process held it (it stalled past the lease); it wrote nothing")
}

// shardCache is one shard as a store last read or wrote it.
type shardCache struct {
	file  string // "" for a shard without entries
	off   int64  // where in file, a pack
	lines *lineCache
	// The delta over it (format 4), as last read or written: "" and nil
	// for none.
	dfile  string
	doff   int64
	dlines *lineCache
}

func (s *Store) cachedShards() [numShards]shardCache {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	return s.shards
}

func (s *Store) rememberShard(i int, ref shardRef, lines, dlines *lineCache) {
	s.cacheMu.Lock()
	s.shards[i] = shardCache{file: ref.File, off: ref.Offset, lines: lines, dfile: ref.Delta.File, doff: ref.Delta.Offset, dlines: dlines}
	s.cacheMu.Unlock()
}

// verifyShared panics if a cached entry was modified in place (see State).
func (s *Store) verifyShared(when string) {
	if !checkShared() {
		return
	}
	for _, c := range s.cachedShards() {
		c.lines.verifyShared(when)
		c.dlines.verifyShared(when)
	}
}

// snapshot is what a read found.
type snapshot struct {
	st     *State
	exists bool      // a state file is there (and parsed)
	man    *manifest // its manifest, nil for format 1 or no state
	// rewrite says every shard is written at the next commit: format 1
	// (its first write converts it) or a Reset.
	rewrite bool
	loaded  [numShards]bool       // the shards st holds
	lines   [numShards]*lineCache // their lines as read (of the base, when a delta is over it)
	deltas  [numShards]*lineCache // the lines of their deltas, nil for none
	// sel, for a read of named entries, names them: st holds only those,
	// and a commit carries the other lines of their shards over.
	sel *selection
}

// selection is the entries a read of named entries is for (UpdateEntries).
type selection struct {
	shards [numShards]bool
	ids    [numShards][]string // by shard, sorted
	set    map[string]bool
}

func newSelection(ids []string) *selection {
	sel := &selection{set: make(map[string]bool, len(ids))}
	for _, id := range ids {
		if sel.set[id] {
			continue
		}
		sel.set[id] = true
		if i, ok := shardOf(id); ok {
			sel.shards[i] = true
			sel.ids[i] = append(sel.ids[i], id)
		}
	}
	for i := range sel.ids {
		slices.Sort(sel.ids[i])
	}
	return sel
}

// need is the lines a read for sel decodes: nil (all) without one.
func (sel *selection) need() needFn {
	if sel == nil {
		return nil
	}
	return func(id string) bool { return sel.set[id] }
}

// newSnapshot returns the snapshot of a state that holds every shard
// (format 1, none yet, or a Reset's): its first commit writes them all.
func newSnapshot(st *State, exists bool) *snapshot {
	sn := &snapshot{st: st, exists: exists, rewrite: true}
	for i := range sn.loaded {
		sn.loaded[i] = true
	}
	return sn
}

// rereadDelays space the reads of a state file that does not parse before
// it is declared corrupt: on sshfs, a read of a file just replaced by a
// larger one may be cut to the old size, or one replaced by a smaller one
// may run on into the old one's cached pages, until the kernel's caches
// (1 s there) expire. A healthy file parses at the first read.
var rereadDelays = []time.Duration{0, 10 * time.Millisecond, 100 * time.Millisecond, 500 * time.Millisecond, time.Second, 1500 * time.Millisecond}

// read returns the state with the shards of the entries sel names (nil:
// all).
// unlocked says the caller does not hold the lock, so a commit may be
// replacing the manifest meanwhile: on sshfs, a rename over a file that is
// open on the renamer's mount is two renames on the server, between which
// the name is missing. A missing manifest beside a previous version is then
// read again before it is taken for an empty state, and a shard file gone
// (the manifest moved on, and a later commit deleted what it retired) makes
// it read the manifest again.
func (s *Store) read(unlocked bool, sel *selection) (*snapshot, error) {
	return s.readKeeping(unlocked, !unlocked, sel)
}

// readKeeping is read, keeping a copy of what does not parse when keep (a
// writer's read): a View, even under the lock, only looks.
func (s *Store) readKeeping(unlocked, keep bool, sel *selection) (*snapshot, error) {
	for i, d := range rereadDelays {
		time.Sleep(d)
		final := i == len(rereadDelays)-1
		b, err := os.ReadFile(s.path)
		if errors.Is(err, fs.ErrNotExist) {
			if !s.hasPrev() {
				return newSnapshot(New(), false), nil // a root where nothing was committed yet
			}
			if unlocked && !final {
				if missingHook != nil {
					missingHook(s.path)
				}
				continue
			}
			// Missing beside its previous version, under the lock (no
			// commit can be renaming it) or after looking again: lost.
			// An empty state would let the next commit and reconcile
			// treat every published entry as an orphan.
			return nil, fmt.Errorf("state file %s is missing beside its previous version %s (deleted, or restored without it); nothing was deleted; run 'depcache doctor --rebuild': %w",
				s.path, s.path+PrevSuffix, ErrCorrupt)
		}
		if err != nil {
			// Not corrupt: unreadable (a user outside a shared root's
			// group, an I/O error). errors.Is finds fs.ErrPermission.
			return nil, fmt.Errorf("state file %s: cannot read it: %w", s.path, err)
		}
		if !isManifest(b) {
			st, err := decodeV1(b)
			if err == nil {
				return newSnapshot(st, true), nil
			}
			if looksCut(err) && !final {
				continue
			}
			return nil, s.corrupt(s.path, b, err, keep)
		}
		man, err := s.decodeManifest(b)
		if err != nil {
			if looksCut(err) && !final {
				continue
			}
			return nil, s.corrupt(s.path, b, err, keep)
		}
		sn, err := s.loadShards(man, sel, keep)
		var again *shardAgain
		if errors.As(err, &again) {
			if !final {
				continue
			}
			if !unlocked {
				err = again.err
			}
		}
		if err != nil {
			return nil, err
		}
		return sn, nil
	}
	panic("unreachable")
}

// decodeManifest decodes a manifest, reusing what the last one this store
// read or wrote decoded: the same bytes are not parsed again, and of a
// later manifest only the lines that differ are.
func (s *Store) decodeManifest(b []byte) (*manifest, error) {
	s.cacheMu.Lock()
	last := s.man
	s.cacheMu.Unlock()
	if last.m != nil && bytes.Equal(b, last.raw) {
		return last.m, nil
	}
	m, lines, ok := decodeManifestLines(b, last.lines)
	if !ok {
		var err error
		if m, err = decodeManifest(b); err != nil {
			return nil, err
		}
	}
	s.rememberManifest(b, m, lines)
	return m, nil
}

// manifestCache is the manifest a store last read or wrote.
type manifestCache struct {
	raw   []byte
	m     *manifest // never changed once cached
	lines *manifestLines
}

func (s *Store) rememberManifest(b []byte, m *manifest, lines *manifestLines) {
	s.cacheMu.Lock()
	s.man = manifestCache{raw: b, m: m, lines: lines}
	s.cacheMu.Unlock()
}

// decodeV1 decodes a state file of format 1 (or one of no known format,
// which Decode explains).
func decodeV1(b []byte) (*State, error) {
	if st, _, ok := decodeLines(b, nil); ok {
		return st, nil
	}
	return Decode(b)
}

// corrupt is the error for the state file (or shard) name whose bytes b do
// not parse: the file stays where it is, and every process keeps refusing
// it until an operator acts. A writer (keep, under the lock) also keeps a
// copy aside; a reader that only looks (View: ls, doctor, gc --dry-run)
// writes nothing.
func (s *Store) corrupt(name string, b []byte, err error, keep bool) error {
	if !keep {
		return fmt.Errorf("state file %s (nothing was deleted or written; 'depcache doctor' checks the root, 'depcache doctor --rebuild' rebuilds the state from the published metadata): %w", name, err)
	}
	aside := s.keepAside(b)
	return fmt.Errorf("state file %s (copy kept at %s; nothing was deleted; 'depcache doctor' checks the root, 'depcache doctor --rebuild' rebuilds the state from the published metadata): %w", name, aside, err)
}

// lockedViewHook, nil outside tests (set through export_test.go), runs
// when a View falls back to reading under the lock, before that read.
var lockedViewHook func()

// shardAgain is a shard that could not be read as its manifest says (gone,
// or cut short): worth reading the manifest again before giving up.
type shardAgain struct{ err error }

func (e *shardAgain) Error() string { return e.err.Error() }
func (e *shardAgain) Unwrap() error { return e.err }

// loadShards returns the state of man with the shards of the entries sel
// names (nil: all), reading only those whose file changed since this store
// last saw them, or whose lines the read needs are not decoded (of a file
// it saw, only those lines: decodeMore). With sel, the state holds only
// the entries it names.
func (s *Store) loadShards(man *manifest, sel *selection, keep bool) (*snapshot, error) {
	cache := s.cachedShards()
	sn := &snapshot{exists: true, man: man, sel: sel}
	need := sel.need()
	// load reads shard i into sn; each shard's reads touch only its own
	// slots of sn and of the cache, so shards may load side by side.
	load := func(i int) error {
		ref, ok := man.Shards[shardPrefix(i)]
		if !ok {
			return nil
		}
		c := cache[i]
		lines, read, err := s.shardLines(i, ref, true, c.file == ref.File && c.off == ref.Offset, c.lines, need, keep)
		if err != nil {
			return err
		}
		sn.lines[i] = lines
		if ref.hasDelta() {
			dlines, dread, err := s.shardLines(i, ref.delta(), false, c.dfile == ref.Delta.File && c.doff == ref.Delta.Offset, c.dlines, need, keep)
			if err != nil {
				return err
			}
			sn.deltas[i], read = dlines, read || dread
		}
		if read || c.dfile != ref.Delta.File || c.doff != ref.Delta.Offset {
			s.rememberShard(i, ref, sn.lines[i], sn.deltas[i])
		}
		return nil
	}
	var todo []int
	for i := range numShards {
		if sel == nil || sel.shards[i] {
			sn.loaded[i] = true
			todo = append(todo, i)
		}
	}
	if err := loadAll(todo, load, s.changedShards(man, cache, todo)); err != nil {
		return nil, err
	}
	n := 0
	for _, i := range todo {
		if c := sn.lines[i]; c != nil {
			n += len(c.lines)
		}
	}
	if sel != nil {
		n = len(sel.set)
	}
	sn.st = &State{Version: FormatVersion, Policy: man.Policy, MaxGeneration: man.MaxGeneration, Entries: make(map[string]*Entry, n)}
	for i := range numShards {
		c := sn.lines[i]
		switch {
		case c == nil:
		case sel != nil:
			for _, id := range sel.ids[i] {
				if cl, ok := sn.lineOf(i, id); ok {
					sn.st.Entries[id] = cl.e
				}
			}
		default:
			for _, cl := range c.lines {
				sn.st.Entries[cl.id] = cl.e
			}
			if d := sn.deltas[i]; d != nil {
				for _, cl := range d.lines {
					sn.st.Entries[cl.id] = cl.e
				}
			}
		}
	}
	return sn, nil
}

// parallelShards is the number of shards to be read from their files
// from which a read decodes them side by side, on up to GOMAXPROCS (at most
// maxShardWorkers) goroutines: a whole read of a cache not seen before
// (every CLI command's first) decodes 256 shards, 1.7 s at 100,000
// entries on one core. Fewer, as in a named read or a read that finds
// most shards cached, are not worth the goroutines.
const (
	parallelShards  = 16
	maxShardWorkers = 8
)

// changedShards counts the shards of todo whose files are not the ones
// cache holds: those a read must decode.
func (s *Store) changedShards(man *manifest, cache [numShards]shardCache, todo []int) int {
	n := 0
	for _, i := range todo {
		if ref, ok := man.Shards[shardPrefix(i)]; ok && (cache[i].file != ref.File || cache[i].off != ref.Offset) {
			n++
		}
	}
	return n
}

// loadAll runs load for each shard of todo, side by side when changed of
// them are many (see parallelShards), and returns the error of the first
// shard, in todo's order, that failed: the same error a read one by one
// would give.
func loadAll(todo []int, load func(int) error, changed int) error {
	workers := min(runtime.GOMAXPROCS(0), maxShardWorkers, len(todo))
	if changed < parallelShards || workers < 2 {
		for _, i := range todo {
			if err := load(i); err != nil {
				return err
			}
		}
		return nil
	}
	errs := make([]error, len(todo))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= len(todo) {
					return
				}
				errs[k] = load(todo[k])
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// shardLines returns the lines of shard i's file ref (its base, or its
// delta) that a read needs: the cached ones when the file is the one
// cached (same) and they are decoded, else read (read true), only the
// lines when the file is the one cached (decodeMore), else whole.
func (s *Store) shardLines(i int, ref shardRef, base, same bool, cached *lineCache, need needFn, keep bool) (lines *lineCache, read bool, err error) {
	if same && cached.decodedFor(need) {
		return cached, false, nil
	}
	if same {
		if lines, _ = cached.decodeMore(need); lines != nil {
			return lines, true, nil
		}
	}
	lines, err = s.readShard(i, ref, base, cached, need, keep)
	return lines, true, err
}

// lineOf returns the line of id in shard i as read: its delta's, else its
// base's.
func (sn *snapshot) lineOf(i int, id string) (cachedLine, bool) {
	if cl, ok := sn.deltas[i].line(id); ok {
		return cl, true
	}
	return sn.lines[i].line(id)
}

// readShard reads and decodes the file of shard i, checking it against
// its manifest's record. prev is an older version of the shard, whose
// lines need not be decoded again.
func (s *Store) readShard(i int, ref shardRef, base bool, prev *lineCache, need needFn, keep bool) (*lineCache, error) {
	name := filepath.Join(s.root, ShardDir, ref.File)
	b, lines, err := readShardFile(s.root, shardPrefix(i), ref, base, prev, need)
	switch {
	case err == nil:
		return lines, nil
	case errors.Is(err, fs.ErrNotExist):
		return nil, &shardAgain{fmt.Errorf("state file %s names shard %s, which is missing; nothing was deleted; run 'depcache doctor --rebuild': %w", s.path, name, ErrCorrupt)}
	case !errors.Is(err, ErrCorrupt):
		return nil, fmt.Errorf("state shard %s: cannot read it: %w", name, err)
	case errors.Is(err, errShardMismatch):
		return nil, &shardAgain{s.corrupt(name, b, fmt.Errorf("named by %s: %w", s.path, err), keep)}
	}
	return nil, s.corrupt(name, b, err, keep)
}

// Decode parses a self-contained state document: a state file of format
// 1, or a copy doctor kept aside ([Encode]). The State it returns has
// the Version it will be written with, FormatVersion. A format 2 state.json is a
// manifest of shard files: read it with [DecodeFile]. Errors wrap
// [ErrCorrupt] or [ErrUnsupportedVersion] and say what is wrong.
func Decode(b []byte) (*State, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, fmt.Errorf("%w: file is empty", ErrCorrupt)
	}
	// One strict pass in the common case; the version is looked at alone
	// only to explain a failure, so that a newer format is reported as
	// such rather than as an unknown field.
	var st State
	err := strictUnmarshal(b, &st)
	if err != nil {
		switch v := versionOf(b); {
		case v > FormatVersion:
			return nil, errNewer(v)
		case v >= 2:
			return nil, fmt.Errorf("%w: a version %d manifest, not a self-contained state (read it with its shards)", ErrCorrupt, v)
		}
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	switch {
	case st.Version > FormatVersion:
		return nil, errNewer(st.Version)
	case st.Version != 1:
		return nil, fmt.Errorf("%w: no or bad \"version\" (%d)", ErrCorrupt, st.Version)
	}
	if err := checkRepeatedKeys(b, "entries"); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	st.Version = FormatVersion // what it becomes at its next write
	return &st, nil
}

// DecodeFile reads the state file name of the cache root (state.json,
// state.json.prev, a copy kept aside), in either format: a format 2
// manifest is read with the shards it names. It takes no lock and caches
// nothing, for doctor and tests.
func DecodeFile(root, name string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(root, name))
	if err != nil {
		return nil, err
	}
	return decodeFileBytes(root, b)
}

func decodeFileBytes(root string, b []byte) (*State, error) {
	if !isManifest(b) {
		return decodeV1(b)
	}
	man, err := decodeManifest(b)
	if err != nil {
		return nil, err
	}
	st := &State{Version: FormatVersion, Policy: man.Policy, MaxGeneration: man.MaxGeneration, Entries: map[string]*Entry{}}
	for p, ref := range man.Shards {
		for k, r := range ref.fileRefs() {
			_, lines, err := readShardFile(root, p, r, k == 0, nil, nil)
			if err != nil {
				return nil, fmt.Errorf("shard %s: %w", filepath.Join(root, ShardDir, r.File), err)
			}
			for _, cl := range lines.lines {
				st.Entries[cl.id] = cl.e
			}
		}
	}
	return st, nil
}

// UnreadShard is a shard of the last state's manifest that did not read
// when the state as a whole did not parse: see [Replaced.Unread].
type UnreadShard struct {
	// Shard is the shard's prefix, File the file (base or delta) that did
	// not read, and Reason why.
	Shard  string `json:"shard"`
	File   string `json:"file"`
	Reason string `json:"reason"`
	// From is the state file whose manifest's version of the shard was
	// read instead (state.json.prev, one commit older), or empty when no
	// version read: the shard's entries are unknown.
	From string `json:"from"`
	// Copy is where Reset kept the bytes of File (state.json.bad-HASH)
	// before the rebuild stopped naming it; empty for a file that could
	// not be read at all (missing).
	Copy string `json:"copy,omitempty"`
}

// readShards reads every shard man names, shard by shard: the entries of
// each shard whose files all read, by prefix, and for each of the others
// the first file that did not, and why.
func readShards(root string, man *manifest) (map[string][]*Entry, map[string]UnreadShard) {
	good, bad := map[string][]*Entry{}, map[string]UnreadShard{}
	for p, ref := range man.Shards {
		var ents []*Entry
		for k, r := range ref.fileRefs() {
			_, lines, err := readShardFile(root, p, r, k == 0, nil, nil)
			if err != nil {
				bad[p] = UnreadShard{Shard: p, File: filepath.Join(root, ShardDir, r.File), Reason: err.Error()}
				ents = nil
				break
			}
			for _, cl := range lines.lines {
				ents = append(ents, cl.e)
			}
		}
		if _, failed := bad[p]; !failed {
			good[p] = ents
		}
	}
	return good, bad
}

// readablePart is the part of a damaged format 2 state that still reads:
// the header and every shard that reads of the first of files (state.json,
// state.json.prev) whose manifest parses, and for a shard of it that does
// not read, that shard as a later file's manifest has it if it reads there.
// A base that no commit rewrote is named by both state.json and its
// previous version, so damage to it leaves no whole state that parses,
// while the other shards still say which entries had dependents and when
// each was last used. It returns a nil state when no manifest parses, and
// the file it took the header from.
func readablePart(root string, files []string) (*State, string, []UnreadShard) {
	var st *State
	var from string
	var missing map[string]UnreadShard
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil || !isManifest(b) {
			continue
		}
		man, err := decodeManifest(b)
		if err != nil {
			continue
		}
		good, bad := readShards(root, man)
		if st == nil && len(good) == 0 && len(bad) > 0 {
			// Nothing of it reads (state.d lost): it says nothing
			// of what was dropped, which must not read as "nothing".
			continue
		}
		if st == nil {
			st = &State{Version: FormatVersion, Policy: man.Policy, MaxGeneration: man.MaxGeneration, Entries: map[string]*Entry{}}
			from, missing = f, bad
			for _, ents := range good {
				for _, e := range ents {
					st.Entries[e.Key.ID()] = e
				}
			}
			continue
		}
		st.MaxGeneration = max(st.MaxGeneration, man.MaxGeneration)
		for p, u := range missing {
			if u.From != "" {
				continue
			}
			if ents, ok := good[p]; ok {
				for _, e := range ents {
					st.Entries[e.Key.ID()] = e
				}
				u.From = f
				missing[p] = u
			}
		}
	}
	if st == nil {
		return nil, "", nil
	}
	unread := slices.Collect(maps.Values(missing))
	slices.SortFunc(unread, func(a, b UnreadShard) int { return strings.Compare(a.Shard, b.Shard) })
	return st, from, unread
}

// ReadablePart is, for a file store root whose state.json and
// state.json.prev both fail to parse whole, what a [Store.Reset] there
// would hand over as the last state: every shard that still reads (see
// [Replaced.Unread]), the file its header was taken from, and the shards
// that do not read. It returns a nil state when no manifest parses or
// none of its shards reads. It takes no lock and writes nothing: for a
// root that moves to another store.
func ReadablePart(root string) (*State, string, []UnreadShard) {
	p := filepath.Join(root, StateFile)
	return readablePart(root, []string{p, p + PrevSuffix})
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
func (s *Store) commit(data []byte, hadOld bool) (err error) {
	tmp, err := s.writeTemp(data)
	if err != nil {
		return fmt.Errorf("state %s: writing: %w", s.path, err)
	}
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if hadOld {
		if err := s.keepPrev(); err != nil {
			// A holder judged stale may find its link collected as litter
			// by the holder that broke its lock: the lost lock is the
			// cause worth reporting.
			if !errors.Is(err, ErrLockLost) {
				if lerr := s.lock.Check(); lerr != nil {
					return fmt.Errorf("%w (%v)", lerr, err)
				}
			}
			return err
		}
	}
	// The last look before the commit point, so that a holder judged
	// stale by another host does not overwrite what the new holder wrote.
	// Only the rename follows it: the manifest was flushed before, and a
	// stall in that flush or in keepPrev's rename is caught here.
	if err := s.lock.Check(); err != nil {
		return err
	}
	if err := rename(tmp, s.path); err != nil {
		return fmt.Errorf("state %s: replacing: %w", s.path, err)
	}
	// The commit point has passed: a failed directory fsync is logged, not
	// returned, or the caller would undo work the new state records.
	if err := SyncDir(s.root); err != nil {
		s.lock.opts.Log.WithError(err).WithField("state", s.path).Warn("fsync of the root after a commit")
	}
	return nil
}

// writeTemp writes data, flushed, to a new temporary file next to the
// state file (named as renameio names its own, which collectLitter knows)
// and returns its name.
func (s *Store) writeTemp(data []byte) (string, error) {
	for range 4 {
		tmp := filepath.Join(s.root, "."+StateFile+strconv.FormatUint(uint64(s.nonce32())<<32|uint64(s.nonce32()), 10))
		f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, s.opts.Perms.File)
		if errors.Is(err, fs.ErrExist) {
			continue // litter of a killed commit under the same number
		}
		if err != nil {
			return "", err
		}
		err = s.modes.give(f, s.opts.Perms.File)
		if err == nil {
			_, err = f.Write(data)
		}
		if err == nil {
			err = f.Sync()
		}
		if err == nil && commitStepHook != nil {
			commitStepHook(stepFlushed)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(tmp)
			return "", err
		}
		return tmp, nil
	}
	return "", fmt.Errorf("no free temporary name in %s after 4 tries", s.root)
}

// rename is rename(2) of a file over a file. os.Rename looks at newpath
// first, to refuse a directory there, and on sshfs that look is one more
// round trip to the file server; rename(2) refuses a file over a
// directory by itself (EISDIR).
func rename(oldpath, newpath string) error {
	for {
		// EINTR, as os.Rename retries it: FUSE and CIFS mounts return it
		// when the runtime's preemption signal lands in the call.
		err := syscall.Rename(oldpath, newpath)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: err}
		}
		return nil
	}
}

func (s *Store) keepPrev() error {
	// The temporary name is this commit's own: a holder judged stale and
	// resumed may be between its link and its rename while the holder that
	// broke its lock commits, and a shared name would let one rename the
	// other's link away. A name a killed commit left behind is litter that
	// a later holder deletes.
	var err error
	for try := 0; try < 2; try++ {
		tmp := filepath.Join(s.root, "."+StateFile+PrevSuffix+strconv.FormatUint(uint64(s.nonce32()), 10))
		if prevTempHook != nil {
			prevTempHook(tmp)
		}
		if err = os.Link(s.path, tmp); err != nil {
			if errors.Is(err, fs.ErrExist) {
				continue // another commit's litter under the same number
			}
			break
		}
		if commitStepHook != nil {
			commitStepHook(stepPrevLinked)
		}
		// A holder judged stale while it stalled here must not roll
		// state.json.prev back to a manifest whose shards the holder
		// that broke its lock may have deleted since.
		if err := s.lock.Check(); err != nil {
			_ = os.Remove(tmp)
			return err
		}
		// When state.json.prev already is a link to the state file (a
		// commit failed or was killed after this step), rename(2) of two
		// links to one file does nothing and leaves tmp: litter that a
		// later holder deletes, rather than one more round trip to the
		// file server at every commit.
		if err = rename(tmp, s.path+PrevSuffix); err != nil {
			_ = os.Remove(tmp)
		} else if commitStepHook != nil {
			commitStepHook(stepPrevRenamed)
		}
		break
	}
	if err != nil {
		return fmt.Errorf("state %s: keeping the previous version: %w", s.path, err)
	}
	return nil
}

// prevTempHook, nil outside tests, runs with the temporary name of the link
// to the previous version just before it is made; commitStepHook at each
// step of a commit before its last lock check.
var (
	prevTempHook   func(name string)
	commitStepHook func(commitStep)
)

// A commitStep is a point in a commit before its last lock check, where a
// holder that stalls past its lease must still be fenced.
type commitStep int

const (
	// stepFlushed follows the flush of the new manifest's temporary file.
	stepFlushed commitStep = iota
	// stepPrevLinked follows the link of the state file for state.json.prev.
	stepPrevLinked
	// stepPrevRenamed follows the rename of that link to state.json.prev.
	stepPrevRenamed
)

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
	// does, else what of them still reads (see Unread); nil when no
	// manifest of theirs parses.
	Last *State
	// LastFile is the file Last was read from.
	LastFile string
	// LastCopy is a copy of LastFile (state.json.kept-HASH) that no later
	// commit replaces: state.json.prev is replaced at the next one.
	LastCopy string
	// Unread lists, when neither the state file nor its previous version
	// parses whole, the shards of the manifest Last was read from (the
	// first of the two that parses) that did not read. Last holds every
	// other shard of that manifest, and those of the listed shards that
	// read in the previous version's manifest (with From set): the rest
	// of the state, which a damaged shard does not make unknown.
	Unread []UnreadShard
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
// is given the last state that parses (see [Replaced]; when no version
// parses whole, the part that still reads), or nil, to carry over what it
// decides to; like an Update's function it does no I/O.
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
	var lastMan *manifest // the manifest of the state replaced, if it parsed
	var shardCopies map[string]string
	cur, rerr := os.ReadFile(s.path)
	switch {
	case rerr == nil:
		st, derr := decodeFileBytes(s.root, cur)
		if derr == nil {
			rep.Last, rep.LastFile = st, s.path
			lastMan, _ = decodeManifest(cur) // nil for format 1
			break
		}
		rep.UnreadableErr = derr
		if rep.Unreadable, err = s.keepCopy(cur, BadSuffix); err != nil {
			return rep, fmt.Errorf("state %s does not parse and a copy cannot be kept aside, so it is not replaced: %w", s.path, err)
		}
		if shardCopies, err = s.keepBadShards(cur); err != nil {
			return rep, fmt.Errorf("state %s: a shard does not read and a copy of it cannot be kept aside, so the state is not replaced: %w", s.path, err)
		}
	case !errors.Is(rerr, fs.ErrNotExist):
		rep.UnreadableErr = rerr
	}
	parsed := rep.Last != nil // state.json itself, whole
	if rep.Last == nil {
		prev := s.path + PrevSuffix
		if st, err := DecodeFile(s.root, StateFile+PrevSuffix); err == nil {
			rep.Last, rep.LastFile = st, prev
		} else {
			rep.Last, rep.LastFile, rep.Unread = ReadablePart(s.root)
			for i, u := range rep.Unread {
				rep.Unread[i].Copy = shardCopies[u.File]
			}
		}
	}
	if rep.Last != nil {
		// A self-contained copy: the shards of a format 2 state are
		// deleted once no manifest names them.
		doc, err := Encode(rep.Last)
		if err == nil {
			rep.LastCopy, err = s.keepCopy(doc, KeptSuffix)
		}
		if err != nil {
			return rep, fmt.Errorf("state %s: keeping a copy of %s before replacing it: %w", s.path, rep.LastFile, err)
		}
	}
	st := New()
	if err := fn(st, rep.Last); err != nil {
		return rep, err
	}
	// Only a state file that parses becomes state.json.prev: one that does
	// not never replaces a good previous version.
	sn := newSnapshot(st, parsed)
	sn.man = lastMan
	_, err = s.commitChanges(sn)
	return rep, err
}

// keepBadShards copies aside (state.json.bad-HASH) the files of the shards
// that manifest b names and that do not read, and returns the copies by
// file: once the rebuilt state names them no more, a later holder deletes
// them, and without a copy what they held would be gone with them. A file
// that cannot be read at all (missing, not a regular file) has no bytes to
// keep.
func (s *Store) keepBadShards(b []byte) (map[string]string, error) {
	if !isManifest(b) {
		return nil, nil
	}
	man, err := decodeManifest(b)
	if err != nil {
		return nil, nil
	}
	_, bad := readShards(s.root, man)
	copies := map[string]string{}
	for _, u := range bad {
		f, err := openShard(u.File)
		if err != nil {
			continue
		}
		data, err := io.ReadAll(io.LimitReader(f, maxShardCopy))
		f.Close()
		if err != nil {
			continue
		}
		if copies[u.File], err = s.keepCopy(data, BadSuffix); err != nil {
			return nil, err
		}
	}
	return copies, nil
}

// maxShardCopy bounds the copy kept of one bad shard file: a pack holds
// the shards of one commit, far below it.
const maxShardCopy = 64 << 20

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
