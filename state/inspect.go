package state

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Probe tests that link(2) excludes on the root's filesystem: two locks
// on a probe name, made and removed beside the state lock. It writes (the
// probe), so doctor runs it only when asked (doctor --probe).
func (s *Store) Probe(ctx context.Context) []Check {
	var out []Check
	add := func(name, status, format string, args ...any) {
		out = append(out, Check{Name: name, Status: status, Detail: fmt.Sprintf(format, args...)})
	}
	probe := filepath.Join(s.root, fmt.Sprintf(".doctor-lock-%d-%d", os.Getpid(), time.Now().UnixNano()))
	opts := LockOptions{Log: s.lock.opts.Log, Processes: s.lock.opts.Processes, Clock: s.lock.opts.Clock}
	a, aerr := NewLock(probe, opts)
	b, berr := NewLock(probe, opts)
	if err := errors.Join(aerr, berr); err != nil {
		add("lock", "fail", "cannot make a lock in %s: %v", s.root, err)
	} else if unlock, err := a.Lock(ctx); err != nil {
		add("lock", "fail", "cannot take a lock in %s: %v", s.root, err)
	} else {
		tctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		_, berr := b.Lock(tctx)
		cancel()
		uerr := unlock()
		switch {
		case berr == nil:
			add("lock", "fail", "two holders got the same lock: link(2) does not exclude on this filesystem")
		case uerr != nil:
			add("lock", "fail", "release: %v", uerr)
		default:
			add("lock", "ok", "link(2) lock excludes a second holder")
		}
	}
	return out
}

// Checks reports on the file store's lock (who holds the state lock, and
// files left by interrupted lock attempts) and its format. It only looks.
func (s *Store) Checks(ctx context.Context) []Check {
	var out []Check
	add := func(name, status, format string, args ...any) {
		out = append(out, Check{Name: name, Status: status, Detail: fmt.Sprintf(format, args...)})
	}
	if h := s.Holder(); h != "" {
		add("state lock", "warn", "held now or left behind: %s (doctor --break-lock removes it after showing it)", h)
	} else {
		add("state lock", "ok", "not held")
	}
	leftovers, _ := filepath.Glob(s.lock.path + ".*")
	leftovers = slices.DeleteFunc(leftovers, func(f string) bool { return f == s.lock.path+turnSuffix })
	if len(leftovers) > 0 {
		add("lock litter", "warn", "%d files of interrupted lock attempts: %s (a sweep, such as depcache gc, removes those of dead processes of this host, and empty ones an hour older than the last commit)", len(leftovers), strings.Join(leftovers, ", "))
	}
	if b, err := os.ReadFile(s.lock.path + turnSuffix); err == nil {
		// A long waiter's claim on the next turn: normal while someone
		// waits; a dead owner's is broken by the next waiter.
		add("lock turn", "ok", "a waiter claims the next turn: %s", strings.TrimSpace(string(b)))
	}
	out = append(out, s.reserveCheck())
	return append(out, s.formatChecks()...)
}

// formatChecks reports the state's format and checks format 2's shards:
// every file the manifest and the previous one name is there, of the size
// and hash recorded, and parses; files no manifest names are litter that a
// later holder deletes.
func (s *Store) formatChecks() []Check {
	var out []Check
	add := func(name, status, format string, args ...any) {
		out = append(out, Check{Name: name, Status: status, Detail: fmt.Sprintf(format, args...)})
	}
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		add("state format", "ok", "no state yet (format %d at the first write)", FormatVersion)
		return out
	case err != nil:
		add("state format", "fail", "cannot read %s: %v", s.path, err)
		return out
	}
	v := versionOf(b)
	if v < 2 {
		if _, err := decodeV1(b); err != nil {
			add("state format", "fail", "%s: %v", s.path, err)
			return out
		}
		add("state format", "ok", "version 1 (one file, %d bytes): converted to version %d by the next write", len(b), FormatVersion)
		return out
	}
	for _, f := range []string{StateFile, StateFile + PrevSuffix} {
		b, err := os.ReadFile(filepath.Join(s.root, f))
		if err != nil {
			continue // state.json was read above; a missing .prev is reported by reads
		}
		if !isManifest(b) {
			continue
		}
		man, err := decodeManifest(b)
		if err != nil {
			add("state format", "fail", "%s: %v", filepath.Join(s.root, f), err)
			continue
		}
		entries, problems := 0, []string{}
		deltas, unreadable := 0, 0 // unreadable: a read failed, as it would for a rebuild
		for p, ref := range man.Shards {
			if ref.hasDelta() {
				deltas++
			}
			ids := map[string]bool{}
			for k, r := range ref.fileRefs() {
				// A pack holds many shards: name the one that is bad.
				name := fmt.Sprintf("shard %s (%s)", p, filepath.Join(s.root, ShardDir, r.File))
				if isPackName(r.File) {
					name = fmt.Sprintf("shard %s (%s at offset %d)", p, filepath.Join(s.root, ShardDir, r.File), r.Offset)
				}
				if k == 1 {
					name = "delta of " + name
				}
				_, lines, err := readShardFile(s.root, p, r, k == 0, nil, nil)
				switch {
				case errors.Is(err, fs.ErrNotExist):
					problems = append(problems, name+": missing")
				case err != nil:
					problems = append(problems, fmt.Sprintf("%s: %v", name, err))
					if !errors.Is(err, ErrCorrupt) {
						unreadable++
					}
				default:
					for _, cl := range lines.lines {
						ids[cl.id] = true
					}
				}
			}
			entries += len(ids)
		}
		slices.Sort(problems)
		if f == StateFile && v < FormatVersion {
			add("state format", "ok", "version %d: manifest of %d bytes, %d shards, %d entries, commit %d; version %d from the next write", v, len(b), len(man.Shards), entries, man.Serial, FormatVersion)
		} else if f == StateFile {
			add("state format", "ok", "version %d: manifest of %d bytes, %d shards (%d with a delta), %d entries, commit %d", v, len(b), len(man.Shards), deltas, entries, man.Serial)
		}
		switch {
		case len(problems) > 0 && f == StateFile && unreadable > 0:
			// A rebuild would fail on the same read: say what to fix.
			add("state shards", "fail", "%d of %d shards named by %s cannot be read or are bad (nothing was changed; fix what the errors say, such as the files' permissions or the filesystem, then run doctor again): %s", len(problems), len(man.Shards), s.path, strings.Join(problems, "; "))
		case len(problems) > 0 && f == StateFile:
			add("state shards", "fail", "%d of %d shards named by %s are bad (run 'depcache doctor --rebuild'): %s", len(problems), len(man.Shards), s.path, strings.Join(problems, "; "))
		case len(problems) > 0 && prevMovedOn(filepath.Join(s.root, f), b):
			// A commit replaced .prev while we read it, and retired the
			// files only the old one named: not a problem.
		case len(problems) > 0:
			add("previous state shards", "warn", "%d of %d shards named by %s are bad: %s", len(problems), len(man.Shards), filepath.Join(s.root, f), strings.Join(problems, "; "))
		case f == StateFile:
			add("state shards", "ok", "all %d shards are there and parse", len(man.Shards))
		}
	}
	unnamed, _, err := s.unnamedShards()
	if err != nil {
		add("unreferenced shards", "warn", "not checked: %v", err)
	} else if len(unnamed) > 0 {
		var size int64
		for n := range unnamed {
			fi, err := os.Stat(filepath.Join(s.root, ShardDir, n))
			if errors.Is(err, fs.ErrNotExist) {
				// Listed by a mount's stale directory cache (sshfs),
				// deleted since.
				delete(unnamed, n)
				continue
			}
			if err == nil {
				size += fi.Size()
			}
		}
		grace := s.opts.ShardGrace
		if grace <= 0 {
			grace = 10 * time.Minute
		}
		if len(unnamed) > 0 {
			add("unreferenced shards", "warn", "%d files (%d bytes) in %s that no manifest names, left by interrupted commits: a holder deletes them once they are %s older than the last commit, or stayed so for %s",
				len(unnamed), size, filepath.Join(s.root, ShardDir), grace, grace)
		}
	}
	if foreign := foreignInShardDir(s.root); len(foreign) > 0 {
		add("foreign files", "warn", "not depcache's (not shard files by name, or not regular files), never deleted by any command: %s in %s; move them out of the cache root (one that a manifest names as a shard keeps the state unreadable until then)",
			strings.Join(foreign, ", "), filepath.Join(s.root, ShardDir))
	}
	return out
}

// prevMovedOn reports whether the file at name no longer holds b.
func prevMovedOn(name string, b []byte) bool {
	now, err := os.ReadFile(name)
	return err == nil && !bytes.Equal(now, b)
}

// foreignInShardDir lists what state.d holds that depcache never writes
// there: names that are not a shard file's, or not regular files. No
// holder deletes them (only unnamed shard files are litter).
func foreignInShardDir(root string) []string {
	ents, err := os.ReadDir(filepath.Join(root, ShardDir))
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		// .nfsXXXX: an NFS client's name for a file deleted while open,
		// gone once it is closed.
		if (!isShardFile(e.Name()) || !e.Type().IsRegular()) && !strings.HasPrefix(e.Name(), ".nfs") {
			out = append(out, e.Name())
		}
	}
	return out
}

// Holder returns the content of the state lock (its holder's record), or
// "" if it is free.
func (s *Store) Holder() string {
	b, err := os.ReadFile(s.lock.path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// ErrLockHeld means a lock was left alone: its holder is alive, renewed
// it, or changed hands since it was shown.
var ErrLockHeld = errors.New("the lock is held")

// BreakHolder removes the state lock if its content is still holder (what
// the operator was shown) and its holder is stale: a dead process of this
// machine at once; any other holder (another host's, or a live one of this
// machine, stopped or stuck) only once BreakStale watched its lock
// unchanged for the lease, as a waiter would (breaking it at once would
// let two writers in: the holder may be alive and at its commit).
// A dead local holder's lock is moved aside and read back, so that a lock
// taken in between is put back, not removed.
func (s *Store) BreakHolder(ctx context.Context, holder string) error {
	p := s.lock.path
	procs := s.lock.opts.Processes
	var h struct {
		Process
		Nonce string `json:"nonce"`
	}
	local := json.Unmarshal([]byte(holder), &h) == nil && procs.Self().SameMachine(h.Process)
	if local {
		alive, err := procs.Alive(h.Process)
		if err != nil {
			return fmt.Errorf("cannot tell whether the lock's holder, %s, is alive: not breaking it: %w: %w", h.Process, ErrLockHeld, err)
		}
		// A live one is judged as a waiter judges it (a stopped holder
		// is broken after the lease), below.
		local = !alive
	}
	if cur, err := os.ReadFile(p); err != nil || strings.TrimSpace(string(cur)) != holder {
		return fmt.Errorf("the lock changed hands since it was shown; left it alone: %w", ErrLockHeld)
	}
	if !local {
		wctx, cancel := context.WithTimeout(ctx, 2*s.lock.opts.Lease+s.lock.opts.Lease/2)
		defer cancel()
		broken, why, err := s.lock.BreakStale(wctx)
		switch {
		case err != nil:
			return err
		case !broken:
			return fmt.Errorf("not broken: %s: %w", why, ErrLockHeld)
		}
		return nil
	}
	aside := p + ".broken-by-doctor"
	if err := os.Rename(p, aside); err != nil {
		return err
	}
	b, err := os.ReadFile(aside)
	if err == nil && strings.TrimSpace(string(b)) != holder {
		if lerr := os.Link(aside, p); lerr != nil {
			return fmt.Errorf("the lock changed hands while breaking it and could not be restored: %w", lerr)
		}
		os.Remove(aside)
		return fmt.Errorf("the lock changed hands meanwhile; left it alone: %w", ErrLockHeld)
	}
	return os.Remove(aside)
}

var _ Inspector = (*Store)(nil)
