package state

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// commitChanges writes what fn changed in sn.st: the shards whose entries
// differ from those read, then the manifest. It reports whether the commit
// point (the manifest's rename) was passed; an error before it leaves the
// state as it was and removes the shard files it wrote. Nothing that
// changed is a commit of nothing.
func (s *Store) commitChanges(sn *snapshot) (committed bool, err error) {
	st := sn.st
	st.Version = FormatVersion
	st.NoteGenerations()
	invalid := func(err error) error {
		return fmt.Errorf("state %s: refusing to write an invalid state: %w", s.path, err)
	}
	if err := checkGeneration("max_generation", st.MaxGeneration); err != nil {
		// Counted up to from a state forged near the limit: refused here,
		// or the next read would refuse the whole state.
		return false, invalid(err)
	}
	if st.Entries == nil {
		return false, invalid(errors.New(`no "entries" object`))
	}
	// The entries of each shard that st holds: for a write of named
	// entries, only those (see carriedLines for the others).
	var buckets [numShards][]idEntry
	sel := sn.sel
	for id, e := range st.Entries {
		i, ok := shardOf(id)
		if !ok {
			return false, invalid(fmt.Errorf("entry %q: not a key ID", id))
		}
		if !sn.loaded[i] || (sel != nil && !sel.set[id]) {
			// The Txn refuses a key it was not given; only a bug gets here.
			return false, fmt.Errorf("state %s: an update wrote entry %s, which it did not read", s.path, id)
		}
		buckets[i] = append(buckets[i], idEntry{id, e})
	}
	old := sn.man
	nm := &manifest{Version: FormatVersion, Policy: st.Policy, MaxGeneration: st.MaxGeneration, Serial: 1, Shards: map[string]shardRef{}}
	if old != nil {
		nm.Serial = old.Serial + 1
		nm.Shards = make(map[string]shardRef, len(old.Shards)+numShards/16) // sized: the copy grew it from empty at every commit
		maps.Copy(nm.Shards, old.Shards)
	}
	var (
		written []string
		touched [numShards]bool
		lines   [numShards]*lineCache
		dlines  [numShards]*lineCache // of the deltas written or kept
		jobs    []shardJob
		dropped bool // a shard's record left the manifest, or lost its delta
	)
	defer func() {
		if !committed {
			s.deleteShards(written)
		}
	}()
	for i := range numShards {
		if !sn.loaded[i] {
			continue
		}
		b := buckets[i]
		switch {
		case sn.rewrite:
		case sel != nil && !namedChanged(sn, i, sel.ids[i], st.Entries):
			continue
		case sel == nil && !shardChanged(sn, i, len(b), st.Entries):
			continue
		}
		p := shardPrefix(i)
		oldRef, had := nm.Shards[p]
		touched[i] = true
		if had {
			delete(nm.Shards, p)
		}
		if sel != nil && had && !sn.rewrite && oldRef.largeBase() {
			d, ok := deltaOf(sn, i, sel.ids[i], st.Entries)
			switch {
			case ok && len(d) == 0:
				// Back to the base alone: the delta is retired (its pack
				// maybe not), and the record changes with no file written.
				nm.Shards[p] = shardRef{File: oldRef.File, Offset: oldRef.Offset, Bytes: oldRef.Bytes, Entries: oldRef.Entries, SHA256: oldRef.SHA256}
				lines[i] = sn.lines[i]
				dropped = true
				continue
			case ok:
				data, c, err := encodeShard(p, d, sn.deltas[i])
				if err == nil && deltaFits(len(data), oldRef.Bytes) {
					jobs = append(jobs, shardJob{i: i, prefix: p, data: data, lines: c, entries: len(d), over: oldRef, base: sn.lines[i]})
					continue
				}
				if err != nil && !errors.Is(err, errUndecodedUnreadable) {
					return false, invalid(err)
				}
				putShardBuf(data)
			}
			// A deletion from the base, or a delta grown too large: merge.
		}
		if sel != nil {
			b = append(carriedLines(sn, i, sel), b...)
		}
		slices.SortFunc(b, func(x, y idEntry) int { return strings.Compare(x.id, y.id) })
		if len(b) == 0 {
			// Emptied: its record goes (its file maybe not, if a pack
			// holds others still named).
			dropped = dropped || had
			continue
		}
		var prev *lineCache
		if !sn.rewrite {
			prev = sn.lines[i]
		}
		var (
			data []byte
			c    *lineCache
			err  error
		)
		if had && !sn.rewrite && (oldRef.largeBase() || oldRef.hasDelta()) && hasUndecoded(b) {
			// Lines of a large base, or of a delta, are never carried over
			// undecoded (see deltaMinBase): decode them, then encode.
			data, c, err = s.encodeDecoded(i, oldRef, sn, b)
		} else if data, c, err = encodeShard(p, b, prev); errors.Is(err, errUndecodedUnreadable) && had {
			// The shard's file could not be read again for the lines
			// carried over undecoded: decode it whole and encode them.
			data, c, err = s.encodeDecoded(i, oldRef, sn, b)
		} else if err != nil {
			return false, invalid(err)
		}
		if err != nil {
			return false, err
		}
		jobs = append(jobs, shardJob{i: i, prefix: p, data: data, lines: c, entries: len(b)})
	}
	if packs(jobs) {
		s.writePack(nm.Serial, jobs)
	} else {
		s.writeShards(nm.Serial, jobs)
	}
	for _, j := range jobs {
		if j.err == nil && !slices.Contains(written, j.name) {
			written = append(written, j.name)
		}
	}
	for _, j := range jobs {
		if j.err != nil {
			return false, j.err
		}
		if j.over.File != "" {
			r := j.over
			r.Delta = deltaRef{File: j.name, Offset: j.off, Bytes: len(j.data), Entries: j.entries, SHA256: shortHash(j.data)}
			nm.Shards[j.prefix] = r
			lines[j.i], dlines[j.i] = j.base, j.lines
		} else {
			nm.Shards[j.prefix] = shardRef{File: j.name, Offset: j.off, Bytes: len(j.data), Entries: j.entries, SHA256: shortHash(j.data)}
			lines[j.i] = j.lines
		}
		j.lines.detach(j.data, filepath.Join(s.root, ShardDir, j.name), j.off, isPackName(j.name))
		putShardBuf(j.data) // written, hashed, and no cache refers to it
	}
	nm.Retired = nm.retiredFrom(old)
	if old != nil && !sn.rewrite && written == nil && !dropped && len(nm.Retired) == 0 && sameHeader(old, nm) {
		return false, nil // nothing changed
	}
	if len(written) > 0 && !s.shardEntriesDurable() {
		if err := SyncDir(filepath.Join(s.root, ShardDir)); err != nil {
			return false, fmt.Errorf("state %s: %w", s.path, err)
		}
	}
	s.cacheMu.Lock()
	prevLines := s.man.lines
	s.cacheMu.Unlock()
	data, mlines, err := encodeManifest(nm, prevLines)
	if err != nil {
		return false, invalid(err)
	}
	if err := s.commit(data, sn.exists); err != nil {
		return false, err
	}
	committed = true
	s.rememberManifest(data, nm, mlines)
	for i := range numShards {
		if touched[i] {
			var r shardRef
			if got, ok := nm.Shards[shardPrefix(i)]; ok {
				r = got
			}
			s.rememberShard(i, r, lines[i], dlines[i])
		}
	}
	if old != nil && sn.exists {
		// state.json.prev is now old: what old retired is named by
		// neither it nor the new manifest.
		s.deleteShards(old.Retired)
	}
	return true, nil
}

// encodeDecoded encodes the entries b of shard i after reading its file
// ref (and its delta) whole, for the lines b carries over undecoded.
func (s *Store) encodeDecoded(i int, ref shardRef, sn *snapshot, b []idEntry) ([]byte, *lineCache, error) {
	full, err := s.readShard(i, ref, true, sn.lines[i], nil, true)
	if err != nil {
		return nil, nil, err
	}
	var fullDelta *lineCache
	if ref.hasDelta() {
		if fullDelta, err = s.readShard(i, ref.delta(), false, sn.deltas[i], nil, true); err != nil {
			return nil, nil, err
		}
	}
	b = slices.Clone(b)
	for k, ie := range b {
		if ie.e == nil {
			cl, ok := fullDelta.line(ie.id)
			if !ok {
				cl, ok = full.line(ie.id)
			}
			if !ok || cl.e == nil {
				return nil, nil, fmt.Errorf("state %s: entry %s is not in shard %s any more: %w", s.path, ie.id, ref.File, ErrCorrupt)
			}
			b[k].e = cl.e
		}
	}
	data, c, err := encodeShard(shardPrefix(i), b, full)
	if err != nil {
		return nil, nil, fmt.Errorf("state %s: refusing to write an invalid state: %w", s.path, err)
	}
	return data, c, nil
}

// sameHeader reports whether a and b have the same policy and highest
// generation.
func sameHeader(a, b *manifest) bool {
	if a.MaxGeneration != b.MaxGeneration {
		return false
	}
	if (a.Policy == nil) != (b.Policy == nil) {
		return false
	}
	if a.Policy == nil {
		return true
	}
	x, err1 := json.Marshal(a.Policy)
	y, err2 := json.Marshal(b.Policy)
	return err1 == nil && err2 == nil && string(x) == string(y)
}

// carriedLines returns the lines of shard i that a write of the named
// entries sel carries over as they were read (undecoded ones as their
// bytes): its delta's, and its base's others. A write that only adds a
// delta needs none of them: at 100,000 entries, gathering a base's 400
// lines on every write was a tenth of a commit.
func carriedLines(sn *snapshot, i int, sel *selection) []idEntry {
	d, base := sn.deltas[i], sn.lines[i]
	var out []idEntry
	if d != nil {
		for _, cl := range d.lines {
			if !sel.set[cl.id] {
				out = append(out, idEntry{cl.id, cl.e})
			}
		}
	}
	if base != nil {
		for _, cl := range base.lines {
			if !sel.set[cl.id] && !d.has(cl.id) {
				out = append(out, idEntry{cl.id, cl.e})
			}
		}
	}
	return out
}

// hasUndecoded reports whether b carries a line over undecoded.
func hasUndecoded(b []idEntry) bool {
	for _, ie := range b {
		if ie.e == nil {
			return true
		}
	}
	return false
}

// deltaOf returns the delta of shard i after a write of the named entries
// of it: the lines of its delta that the write did not name, and the
// named entries that differ from its base's. ok is false when the write
// deleted an entry of the base: a delta cannot say so, and the shard is
// merged into a new base instead.
func deltaOf(sn *snapshot, i int, named []string, entries map[string]*Entry) (d []idEntry, ok bool) {
	base := sn.lines[i]
	set := make(map[string]bool, len(named))
	for _, id := range named {
		set[id] = true
		e, now := entries[id]
		bl, inBase := base.line(id)
		switch {
		case !now && inBase:
			return nil, false
		case !now:
		case inBase && bl.e != nil && (bl.e == e || bl.e.Equal(e)):
			// As the base has it again: a change undone.
		default:
			d = append(d, idEntry{id, e})
		}
	}
	if dl := sn.deltas[i]; dl != nil {
		for _, cl := range dl.lines {
			if !set[cl.id] {
				d = append(d, idEntry{cl.id, cl.e})
			}
		}
	}
	slices.SortFunc(d, func(x, y idEntry) int { return strings.Compare(x.id, y.id) })
	return d, true
}

// shardJob is one shard for writeShards or writePack to write.
type shardJob struct {
	i       int
	prefix  string
	data    []byte
	lines   *lineCache
	entries int
	// over is the shard's record when the job is a delta over its base
	// (whose lines are base), empty for a job that is a base.
	over shardRef
	base *lineCache
	name string // written as
	off  int64  // at, in a pack
	err  error
}

// Packs are for the commits of the hot path, a few shards each. A commit
// of more (a sweep, a rebuild, an upgrade) writes a file per shard: a pack
// stays until none of its shards is named, so a large one would keep many
// dead shards on disk long after later commits replaced them.
const (
	maxPackShards = 64
	maxPackBytes  = 1 << 20
)

func packs(jobs []shardJob) bool {
	if len(jobs) < 2 || len(jobs) > maxPackShards {
		return false
	}
	size := 0
	for _, j := range jobs {
		size += len(j.data)
	}
	return size <= maxPackBytes
}

// writePack writes the shards of one commit into one file, a pack, each at
// its offset: one flush for all of them. A commit that combines several
// processes' operations changes as many shards, and each file of its own
// cost a device flush (five files flushed in turn took 2.2 ms against
// 0.5 ms for one, on this project's machine; BENCHMARKS.md).
func (s *Store) writePack(serial uint64, jobs []shardJob) {
	size := 0
	for _, j := range jobs {
		size += len(j.data)
	}
	buf := make([]byte, 0, size)
	for k := range jobs {
		jobs[k].off = int64(len(buf))
		buf = append(buf, jobs[k].data...)
	}
	f, name, err := s.createShard(packPrefix, serial, buf)
	if f != nil {
		err = s.finishShard(f, err)
	}
	for k := range jobs {
		jobs[k].name, jobs[k].err = name, err
	}
}

// writeShards writes each shard of a commit to a file of its own (packs
// hold several).
func (s *Store) writeShards(serial uint64, jobs []shardJob) {
	files := make([]*os.File, len(jobs))
	for k := range jobs {
		j := &jobs[k]
		files[k], j.name, j.err = s.createShard(j.prefix, serial, j.data)
	}
	for k, f := range files {
		if f != nil {
			jobs[k].err = s.finishShard(f, jobs[k].err)
		}
	}
}

// finishShard flushes and closes a shard file that createShard wrote (err:
// what writing it said), and removes it if anything failed.
func (s *Store) finishShard(f *os.File, err error) error {
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("state %s: writing shard %s: %w", s.path, f.Name(), err)
	}
	return nil
}

// createShard creates a shard file under a new name and writes data to it,
// unflushed. A file it returns is finishShard's to close, with the error.
func (s *Store) createShard(p string, serial uint64, data []byte) (*os.File, string, error) {
	dir := filepath.Join(s.root, ShardDir)
	if !s.shardDirMade.Load() {
		if err := s.opts.Perms.MkdirAll(dir); err != nil {
			return nil, "", fmt.Errorf("state %s: %w", s.path, err)
		}
		s.shardDirMade.Store(true) // removed later, the create below says so
	}
	for range 4 {
		name := fmt.Sprintf("%s-%016x-%08x.json", p, serial, s.nonce32())
		path := filepath.Join(dir, name)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, s.opts.Perms.File)
		if errors.Is(err, fs.ErrExist) {
			continue // a name taken (or, on sshfs, one a mount still remembers): draw another
		}
		if errors.Is(err, fs.ErrNotExist) && s.shardDirMade.Load() {
			// state.d was removed since: make it again.
			s.shardDirMade.Store(false)
			if err := s.opts.Perms.MkdirAll(dir); err != nil {
				return nil, "", fmt.Errorf("state %s: %w", s.path, err)
			}
			s.shardDirMade.Store(true)
			continue
		}
		if err != nil {
			return nil, "", fmt.Errorf("state %s: creating shard %s: %w", s.path, path, err)
		}
		err = s.shardModes.give(f, s.opts.Perms.File)
		if err == nil {
			_, err = f.Write(data)
		}
		return f, name, err
	}
	return nil, "", fmt.Errorf("state %s: no free shard name in %s after 4 tries", s.path, dir)
}

// shardEntriesDurable reports whether the fsync of a new shard file makes
// its name in state.d durable too (see fsyncCoversNewEntry), looked at once.
func (s *Store) shardEntriesDurable() bool {
	s.shardDirOnce.Do(func() {
		s.shardDirCovered = fsyncCoversNewEntry(filepath.Join(s.root, ShardDir))
	})
	return s.shardDirCovered
}

func (s *Store) nonce32() uint32 {
	s.nonceMu.Lock() // a Rand of the options need not be safe for concurrent use
	defer s.nonceMu.Unlock()
	r := s.opts.Lock.Rand
	if r == nil {
		r = rand.Reader
	}
	var b [4]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return uint32(time.Now().UnixNano())
	}
	return binary.BigEndian.Uint32(b[:])
}

// deleteShards removes shard files that no manifest names any more. A file
// already gone is fine; any other failure leaves litter, which a later
// holder collects.
func (s *Store) deleteShards(names []string) {
	for _, n := range names {
		if !isShardFile(n) {
			continue
		}
		if err := os.Remove(filepath.Join(s.root, ShardDir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.lock.opts.Log.WithError(err).WithField("state", s.path).Debug("deleting a retired shard")
		}
	}
}

// litter is what a store saw of the shard files that no manifest names:
// the files of a commit killed before its rename, or retired shards a
// killed commit did not delete. One that stays unnamed for the grace
// period, on this process's clock, is deleted. A file being written by a
// holder whose lock was broken is younger than that.
type litter struct {
	mu      sync.Mutex
	listed  time.Time       // when state.d was last listed
	unnamed map[string]bool // what that listing found unnamed
}

// collectLitter lists state.d at most once per grace period, with the lock
// held, and deletes the files unnamed at the last listing that still are.
func (s *Store) collectLitter() {
	grace := s.opts.ShardGrace
	if grace <= 0 {
		grace = 10 * time.Minute
	}
	l := &s.litter
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if !l.listed.IsZero() && now.Sub(l.listed) < grace {
		return
	}
	unnamed, committed, err := s.unnamedShards()
	if err != nil {
		return // an unreadable manifest: delete nothing
	}
	var gone []string
	for n := range unnamed {
		if l.unnamed[n] || olderThan(filepath.Join(s.root, ShardDir, n), committed, grace) {
			gone = append(gone, n)
			delete(unnamed, n)
		}
	}
	s.deleteShards(gone)
	if len(gone) > 0 {
		s.lock.opts.Log.WithField("state", s.path).WithField("files", len(gone)).Info("deleted shard files that no manifest names")
	}
	// The temporaries of manifest writes (and of copies kept aside) killed
	// before their rename, named as renameio names them; no other file.
	temps, _ := filepath.Glob(filepath.Join(s.root, "."+StateFile+"*"))
	for _, t := range temps {
		if stateTemp.MatchString(filepath.Base(t)) && olderThan(t, committed, grace) {
			if err := os.Remove(t); err == nil {
				s.lock.opts.Log.WithField("file", t).Info("deleted the temporary file of an interrupted commit")
			}
		}
	}
	l.listed, l.unnamed = now, unnamed
}

// stateTemp matches the temporary files renameio makes for state.json and
// the copies kept aside (".state.json", the copy's suffix and hash, then
// random digits), and the links keepPrev makes (".state.json.prev", then
// random digits).
var stateTemp = regexp.MustCompile(`^\.` + regexp.QuoteMeta(StateFile) + `((` + regexp.QuoteMeta(BadSuffix) + `|` + regexp.QuoteMeta(KeptSuffix) + `)[0-9a-f]{12}|` + regexp.QuoteMeta(PrevSuffix) + `)?[0-9]+$`)

// olderThan reports whether the regular file p was last written more than
// grace before the manifest was (committed, both by the file server's
// clock). Every file a commit names is written before its manifest, and a
// commit newer than the manifest read (a stale read on a weak filesystem)
// writes files newer than it: so a file unnamed and that old belongs to no
// commit, past or to come. One listing suffices, where a short-lived
// process could never watch a file for the grace period.
func olderThan(p string, committed time.Time, grace time.Duration) bool {
	if committed.IsZero() {
		return false
	}
	fi, err := os.Lstat(p)
	return err == nil && fi.Mode().IsRegular() && fi.ModTime().Before(committed.Add(-grace))
}

// unnamedShards returns the shard files of state.d that neither the
// manifest nor the previous one names, and when the manifest read was
// written (from the file it was read from). It fails when either cannot
// be read: nothing is then judged unnamed.
func (s *Store) unnamedShards() (map[string]bool, time.Time, error) {
	named := map[string]bool{}
	var committed time.Time
	for i, f := range []string{s.path, s.path + PrevSuffix} {
		b, mtime, err := readWithTime(f)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, time.Time{}, err
		}
		if i == 0 {
			committed = mtime
		}
		if !isManifest(b) {
			if _, err := decodeV1(b); err != nil {
				return nil, time.Time{}, err
			}
			continue // format 1 names no shard
		}
		m, err := decodeManifest(b)
		if err != nil {
			return nil, time.Time{}, err
		}
		for _, n := range m.files() {
			named[n] = true
		}
	}
	ents, err := os.ReadDir(filepath.Join(s.root, ShardDir))
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]bool{}, committed, nil
	}
	if err != nil {
		return nil, time.Time{}, err
	}
	out := map[string]bool{}
	for _, e := range ents {
		if n := e.Name(); isShardFile(n) && !named[n] && e.Type().IsRegular() {
			out[n] = true
		}
	}
	return out, committed, nil
}

// readWithTime reads the file p and its modification time, from one open
// file: the time is that of the content read, even where a weak
// filesystem's cache could give a name's attributes and content of two
// versions.
func readWithTime(p string) ([]byte, time.Time, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, time.Time{}, err
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, time.Time{}, err
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, time.Time{}, err
	}
	return b, fi.ModTime(), nil
}

// isShardFile reports whether name is a shard file's or a pack's.
func isShardFile(name string) bool {
	_, ok := shardFilePrefix(name)
	return ok || isPackName(name)
}
