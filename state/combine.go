package state

import (
	"context"
	"crypto/rand"
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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Combining across processes.
//
// Every get and release is a commit, and a commit costs its few device
// flushes however little it changes; on a busy host the processes queue at
// the lock for one commit each. So a process that finds the lock taken
// leaves its operation, as data (a Proposal), in a spool private to this
// machine (host, boot and pid namespace) and this user, and keeps trying the
// lock. Whichever process of the machine takes the lock next claims every
// proposal it finds, applies them with its own operations in one commit,
// and answers each proposer through the proposer's FIFO before it releases
// the lock. A proposer that wins the lock first withdraws its proposal and
// applies it itself.
//
// What the lock guarantees is untouched: a proposal is applied only under
// the lock, inside a fenced commit, by the code registered for its op name
// (Serve), which the proposer would have run itself; the format does not
// change. The claim and the withdrawal are both the unlink of the proposal
// file, so exactly one of them succeeds, and a proposal is applied by at
// most one holder. A holder answers before it unlocks, so a proposer that
// holds the lock and finds its proposal claimed but not answered knows that
// its holder died or was fenced, after its commit or before it: it applies
// the proposal again with Again set, and the applier settles from the state
// whether the first application landed.
//
// The spool is on this machine only (under os.TempDir), never on the shared
// filesystem: proposals cost the file server nothing, and a holder serves
// only processes whose liveness it can check. On a shared root each host
// combines its own processes.

// Proposal is an UpdateEntries operation given as data, so that another
// process holding the lock can apply it (see Combiner).
type Proposal struct {
	// Op names the Applier that applies it: a name and a version
	// ("depcache.request/1"), changed whenever what it does changes, so
	// that a holder of another build never applies it differently.
	Op string `json:"op"`
	// IDs are the entries it reads and writes (key IDs).
	IDs []string `json:"ids"`
	// Args are the Applier's input.
	Args json.RawMessage `json:"args"`
	// Again is set when the proposer applies it after a holder claimed it
	// and vanished without answering: that holder may have committed it.
	Again bool `json:"-"`
}

// Applier applies a Proposal in a Txn over its IDs, like an UpdateEntries
// callback: pure, maybe run more than once, and an error leaves the state
// unchanged. Its result is handed back to the proposer. A holder that gets
// an error applying another process's proposal hands it back unapplied, and
// the proposer applies it itself, so that errors keep their types.
type Applier func(tx *Txn, p Proposal) (changed bool, result []byte, err error)

// Combiner is the optional interface of a Backend whose processes can
// apply each other's writes in one commit.
type Combiner interface {
	// Serve registers apply for proposals named op: this store applies
	// them, its own and other processes', with it.
	Serve(op string, apply Applier)
	// Propose applies p, registered by Serve, like UpdateEntries, and
	// returns the Applier's result. Another process that holds the lock
	// may apply it in its own commit.
	Propose(ctx context.Context, p Proposal) ([]byte, error)
}

// CombineStats counts a store's proposals.
type CombineStats struct {
	// Proposed: proposals this store left in the spool.
	Proposed uint64
	// AnsweredByOthers: of those, the ones another process applied.
	AnsweredByOthers uint64
	// ServedOthers: other processes' proposals this store applied.
	ServedOthers uint64
}

const (
	proposalSuffix = ".req"
	fifoSuffix     = ".fifo"
	resultSuffix   = ".done"
	// maxServed bounds the proposals one hold applies: a hold serving a
	// crowd must not grow without end.
	maxServed = 64
	// maxProposalBytes bounds what a holder reads of a proposal file.
	maxProposalBytes = 1 << 20
	// inlineResult: an answer up to this size is written to the FIFO in one
	// write, which the kernel keeps whole (PIPE_BUF is 4096); a larger one
	// goes to a file beside it.
	inlineResult = 4000
	// Answer frames: a result inline, a result in the .done file, or
	// declined (not applied: apply it yourself).
	frameResult   = 'R'
	frameFile     = 'F'
	frameDeclined = 'D'
	// staleSpool is the age past which a spool file of a live process is
	// litter all the same (a proposer waits far less than the lock's
	// lease).
	staleSpool = 10 * time.Minute
)

type combiner struct {
	mu       sync.Mutex
	appliers map[string]Applier

	once sync.Once
	dir  string // the spool; "" while combining is off
	self Process

	proposed, answered, served atomic.Uint64
	swept                      atomic.Int64 // unix nanos of the last litter sweep
}

// onDisk is a proposal file's content.
type onDisk struct {
	V        int             `json:"v"`
	Proposer Process         `json:"proposer"`
	Op       string          `json:"op"`
	IDs      []string        `json:"ids"`
	Args     json.RawMessage `json:"args"`
}

// Serve registers apply for proposals named op.
func (s *Store) Serve(op string, apply Applier) {
	c := &s.comb
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.appliers == nil {
		c.appliers = map[string]Applier{}
	}
	c.appliers[op] = apply
}

func (s *Store) applier(op string) Applier {
	c := &s.comb
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.appliers[op]
}

// told passes a combining event to Options.OnCombine.
func (s *Store) told(event string) {
	if s.opts.OnCombine != nil {
		s.opts.OnCombine(event)
	}
}

// CombineStats reports this store's proposals so far.
func (s *Store) CombineStats() CombineStats {
	return CombineStats{Proposed: s.comb.proposed.Load(), AnsweredByOthers: s.comb.answered.Load(), ServedOthers: s.comb.served.Load()}
}

// Propose applies p like UpdateEntries, through the Applier registered for
// p.Op, and returns its result. While another process of this machine holds
// the lock, that process may apply it.
func (s *Store) Propose(ctx context.Context, p Proposal) ([]byte, error) {
	apply := s.applier(p.Op)
	if apply == nil {
		return nil, fmt.Errorf("state: no applier for proposals %q (Serve registers one)", p.Op)
	}
	op := &batchOp{ids: p.IDs, prop: &p}
	op.fn = EntriesFunc(p.IDs, func(tx *Txn) (bool, error) {
		changed, result, err := apply(tx, *op.prop)
		op.result = result
		return changed, err
	})
	err := s.batched(ctx, op)
	return op.result, err
}

// spool returns the spool directory, "" when combining is off: turned off
// (Options.NoCombine, DEPCACHE_COMBINE=0), a machine we cannot tell apart,
// or no private directory to be had.
func (s *Store) spool() string {
	c := &s.comb
	c.once.Do(func() {
		if s.opts.NoCombine || os.Getenv("DEPCACHE_COMBINE") == "0" {
			return
		}
		self := s.lock.opts.Processes.Self()
		if self.BootID == "" || self.PIDNS == "" || self.PID <= 0 {
			return
		}
		sum := sha256.Sum256([]byte(self.Host + "\x00" + self.BootID + "\x00" + self.PIDNS + "\x00" + s.path))
		var base string
		var err error
		for _, b := range slices.Compact([]string{spoolBase(), os.TempDir()}) {
			// A /dev/shm this user may not write falls back to the
			// temporary directory, as every process of the user does.
			base = filepath.Join(b, "depcache-"+strconv.Itoa(os.Geteuid()))
			if err = privateDir(base); err == nil {
				break
			}
		}
		if err != nil {
			s.lock.opts.Log.WithError(err).Debug("not combining operations with other processes")
			return
		}
		// The root's own directory is made by its first proposer (post):
		// a store that never waits leaves nothing in the temporary
		// directory. Inside base, which only we can write, it is ours.
		c.dir, c.self = filepath.Join(base, hex.EncodeToString(sum[:10])), self
	})
	return c.dir
}

// spoolBase is the directory the machine's spools go under: /dev/shm when
// it is a tmpfs and TMPDIR does not name another place, else
// os.TempDir(). A proposal is a FIFO and a file made, renamed and removed;
// on an ext4 /tmp each of those is journaled metadata, and eight workers
// at 10,000 entries served 5-15 % more get+release pairs with the spool in
// memory (BENCHMARKS.md). Processes that disagree on it (one with TMPDIR
// set) do not combine with each other, and lose nothing else.
func spoolBase() string {
	if os.Getenv("TMPDIR") == "" && isTmpfs(shmDir) {
		return shmDir
	}
	return os.TempDir()
}

// shmDir is the usual mount point of a machine's shared-memory tmpfs.
var shmDir = "/dev/shm"

// privateDir makes dir, or checks that it is a directory of this user that
// nobody else can write: a spool in a shared /tmp must not be another
// user's, nor a symbolic link to somewhere else.
func privateDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%s: not a directory private to uid %d (mode %s)", dir, os.Geteuid(), fi.Mode())
	}
	return nil
}

// pending is one proposal of this process: posted at the first wait for
// the lock, answered through its FIFO.
type pending struct {
	s      *Store
	p      *Proposal
	base   string // spool path without suffix; "" until posted
	fifo   *os.File
	frame  []byte // the answer, once read
	buf    []byte // what read reads into
	failed bool   // posting failed: wait as if not combining
	// claimed: a holder took the proposal (its file is gone), so the
	// answer comes before that holder unlocks.
	claimed bool
}

// claimedWait is how long a proposer whose proposal a holder claimed
// sleeps on its FIFO between looks at the lock. The holder answers before
// it unlocks, so the looks find nothing until then, and each takes CPU
// from that holder (on 2 cores, 8 waiters' polls cost about as much as the
// holds they wait for). They are kept, at the slowest poll, only to
// notice a holder that died after its claim.
const claimedWait = maxPoll

// wait is the Lock's waitFunc: it posts the proposal at the first call and
// then sleeps on the FIFO, so that an answer ends the wait at once.
func (pd *pending) wait(ctx context.Context, d time.Duration) (bool, error) {
	if pd.base == "" && !pd.failed {
		if err := pd.post(); err != nil {
			pd.failed = true
			pd.s.lock.opts.Log.WithError(err).Debug("posting a proposal")
		}
	}
	if pd.base == "" {
		return false, sleep(ctx, d)
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if pd.claimed {
		d = max(d, claimedWait)
	}
	if pd.read(d) {
		return true, nil
	}
	if !pd.claimed && d < claimedWait && pd.taken() {
		pd.claimed = true
		return pd.read(claimedWait - d), nil
	}
	return false, nil
}

// taken reports whether a holder claimed the posted proposal: its file is
// gone, and only a claim or our own withdrawal unlinks it.
func (pd *pending) taken() bool {
	return errors.Is(unix.Access(pd.base+proposalSuffix, unix.F_OK), unix.ENOENT)
}

func (pd *pending) post() error {
	dir := pd.s.spool()
	self := pd.s.comb.self
	var nonce [8]byte
	if _, err := io.ReadFull(rand.Reader, nonce[:]); err != nil {
		return err
	}
	base := filepath.Join(dir, fmt.Sprintf("%d-%s", self.PID, hex.EncodeToString(nonce[:])))
	b, err := json.Marshal(onDisk{V: 1, Proposer: self, Op: pd.p.Op, IDs: pd.p.IDs, Args: pd.p.Args})
	if err != nil {
		return err
	}
	err = unix.Mkfifo(base+fifoSuffix, 0o600)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.Mkdir(dir, 0o700); err == nil || errors.Is(err, fs.ErrExist) {
			if err == nil {
				// A root's first proposer on this machine (or the first
				// since its spool was swept): the time to sweep the
				// others', once the proposal is posted.
				defer sweepSpoolsOnce(filepath.Dir(dir), dir)
			}
			err = unix.Mkfifo(base+fifoSuffix, 0o600)
		}
	}
	if err != nil {
		return err
	}
	// Read and write: with a writer of our own the FIFO never reads as
	// closed, so a read waits for the holder's answer (or the deadline).
	f, err := os.OpenFile(base+fifoSuffix, os.O_RDWR|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0)
	if err != nil {
		os.Remove(base + fifoSuffix)
		return err
	}
	tmp := base + ".tmp"
	err = writeNew(tmp, b)
	if err == nil {
		err = os.Rename(tmp, base+proposalSuffix)
	}
	if err != nil {
		os.Remove(tmp)
		f.Close()
		os.Remove(base + fifoSuffix)
		return err
	}
	pd.base, pd.fifo = base, f
	pd.s.comb.proposed.Add(1)
	pd.s.told("proposed")
	return nil
}

// read waits up to d for the answer (d == 0: only looks) and reports
// whether it came.
func (pd *pending) read(d time.Duration) bool {
	if pd.frame != nil {
		return true
	}
	if pd.fifo == nil {
		return false
	}
	if pd.buf == nil {
		pd.buf = make([]byte, inlineResult+1) // once: a waiter reads at every poll
	}
	buf := pd.buf
	var n int
	if d > 0 {
		pd.fifo.SetReadDeadline(time.Now().Add(d))
		n, _ = pd.fifo.Read(buf)
	} else if rc, err := pd.fifo.SyscallConn(); err == nil {
		// A deadline already past fails a Read, and a raw read too,
		// before they read: clear it, and look without waiting.
		pd.fifo.SetReadDeadline(time.Time{})
		rc.Read(func(fd uintptr) bool {
			n, _ = unix.Read(int(fd), buf)
			return true
		})
	}
	if n <= 0 {
		return false
	}
	pd.frame = buf[:n]
	return true
}

// answer returns the answer read: applied with its result, or declined.
func (pd *pending) answer() (result []byte, applied bool, err error) {
	switch pd.frame[0] {
	case frameResult:
		return pd.frame[1:], true, nil
	case frameFile:
		b, err := os.ReadFile(pd.base + resultSuffix)
		if err != nil {
			// Applied and committed, but its result is lost: no way to
			// apply it again as if it were not.
			return nil, true, fmt.Errorf("state: the result of proposal %s, which another process applied: %w", pd.base, err)
		}
		return b, true, nil
	}
	return nil, false, nil
}

// withdraw takes back a posted proposal; false if a holder claimed it.
func (pd *pending) withdraw() bool {
	if pd.base == "" {
		return true
	}
	err := os.Remove(pd.base + proposalSuffix)
	return err == nil || !errors.Is(err, fs.ErrNotExist)
}

// close removes the proposal's files.
func (pd *pending) close() {
	if pd == nil || pd.base == "" {
		return
	}
	pd.fifo.Close()
	os.Remove(pd.base + fifoSuffix)
	os.Remove(pd.base + resultSuffix)
	pd.base, pd.fifo = "", nil
}

// served is another process's proposal claimed by this hold.
type served struct {
	base   string
	fd     int  // the proposer's FIFO, open for writing while open
	open   bool // (claimOne opens it; reply or close closes it)
	p      Proposal
	apply  Applier
	result []byte
	ok     bool // applied without error
}

// claim takes up to maxServed proposals of live processes of this machine
// from the spool; the unlink of a proposal file is the claim. The caller's
// own proposal, if any, was withdrawn or claimed before.
func (s *Store) claim() []*served {
	dir := s.spool()
	if dir == "" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	var out []*served
	for _, name := range names {
		if len(out) == maxServed {
			break
		}
		base, ok := strings.CutSuffix(name, proposalSuffix)
		if !ok {
			continue
		}
		if sv := s.claimOne(filepath.Join(dir, base)); sv != nil {
			out = append(out, sv)
		}
	}
	if now := time.Now(); now.UnixNano()-s.comb.swept.Load() > int64(time.Minute) {
		s.comb.swept.Store(now.UnixNano())
		s.sweepSpool(dir, names, now)
	}
	return out
}

func (s *Store) claimOne(base string) *served {
	b, err := readSmall(base+proposalSuffix, maxProposalBytes)
	if err != nil {
		return nil
	}
	var od onDisk
	if json.Unmarshal(b, &od) != nil || od.V != 1 {
		// Another build's proposal, or half of one: its proposer applies
		// it itself once it has the lock.
		return nil
	}
	self := s.comb.self
	if !od.Proposer.SameMachine(self) {
		return nil
	}
	for _, id := range od.IDs {
		if _, ok := shardOf(id); !ok {
			return nil // the proposer's own commit refuses it, with its error
		}
	}
	// The proposer holds its FIFO open for reading from before it posts
	// until its lead returns, after its proposal was withdrawn or claimed,
	// so a FIFO with no reader (ENXIO) or none at all, under a posted
	// proposal, is a proposer gone. That is its liveness, without /proc,
	// and no pid reuse can fool it. The descriptor is kept for the answer:
	// at most maxServed of them, through the hold.
	fd, err := unix.Open(base+fifoSuffix, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
		os.Remove(base + proposalSuffix)
		os.Remove(base + fifoSuffix)
		return nil
	}
	if err != nil {
		return nil
	}
	apply := s.applier(od.Op)
	if err := os.Remove(base + proposalSuffix); err != nil {
		unix.Close(fd)
		return nil // withdrawn meanwhile
	}
	sv := &served{base: base, fd: fd, open: true, p: Proposal{Op: od.Op, IDs: od.IDs, Args: od.Args}, apply: apply}
	if apply == nil {
		s.reply(sv, []byte{frameDeclined})
		return nil
	}
	return sv
}

// run applies sv to st; false if it changed nothing or failed (then it is
// declined).
func (sv *served) run(st *State) bool {
	sv.ok, sv.result = false, nil
	var result []byte
	changed, panicked, err := runOp(EntriesFunc(sv.p.IDs, func(tx *Txn) (bool, error) {
		c, r, err := sv.apply(tx, sv.p)
		result = r
		return c, err
	}), st)
	if panicked != nil || err != nil {
		return false
	}
	sv.ok, sv.result = true, result
	return changed
}

// answer tells every served proposer its outcome: its result if the hold
// committed (or had nothing to commit), declined otherwise. It runs before
// the lock is released.
func (s *Store) answer(svs []*served, committed bool) {
	for _, sv := range svs {
		switch {
		case !committed || !sv.ok:
			s.reply(sv, []byte{frameDeclined})
		case len(sv.result) < inlineResult:
			s.reply(sv, append([]byte{frameResult}, sv.result...))
		default:
			if err := os.WriteFile(sv.base+resultSuffix, sv.result, 0o600); err != nil {
				// Committed: the proposer must not apply it as new. Say
				// nothing; it applies it again (Again) under the lock.
				sv.close()
				continue
			}
			s.reply(sv, []byte{frameFile})
		}
		if sv.ok && committed {
			s.comb.served.Add(1)
			s.told("served")
		}
	}
}

// reply writes one answer frame to a proposer's FIFO, and closes it; a
// proposer gone meanwhile (EPIPE: nobody reads) is no error. The Go
// runtime turns the SIGPIPE of a write to a descriptor other than 1 or 2
// into that EPIPE, unless the program asked for SIGPIPE (signal.Notify):
// an embedder that does gets one for such a proposer.
func (s *Store) reply(sv *served, frame []byte) {
	if !sv.open {
		fd, err := unix.Open(sv.base+fifoSuffix, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return // ENXIO: gone
		}
		sv.fd, sv.open = fd, true
	}
	unix.Write(sv.fd, frame)
	sv.close()
}

// close closes the proposer's FIFO, if open.
func (sv *served) close() {
	if sv.open {
		unix.Close(sv.fd)
		sv.open = false
	}
}

// sweepSpool removes the files of proposers that are gone: a process
// killed while waiting leaves its FIFO behind.
func (s *Store) sweepSpool(dir string, names []string, now time.Time) {
	self := s.comb.self
	for _, name := range names {
		pid, _, ok := strings.Cut(name, "-")
		n, err := strconv.Atoi(pid)
		if !ok || err != nil {
			continue
		}
		p := filepath.Join(dir, name)
		fi, err := os.Lstat(p)
		if err != nil {
			continue
		}
		gone := now.Sub(fi.ModTime()) > staleSpool && !proposerListening(dir, name)
		if !gone {
			// Without its start time, a pid alone cannot say the process
			// is gone when it was reused; only age can then. A pid that
			// does not exist is gone.
			gone = unix.Kill(n, 0) == unix.ESRCH
		}
		if gone && n != self.PID {
			os.Remove(p)
		}
	}
}

// proposerListening reports whether a live proposer holds open the FIFO
// of spool file name (of any suffix): see claimOne. A proposer waiting
// behind a long hold changes nothing in the spool, so age alone cannot
// tell its files from litter.
func proposerListening(dir, name string) bool {
	base := name
	for _, suffix := range []string{proposalSuffix, fifoSuffix, resultSuffix, ".tmp"} {
		if b, ok := strings.CutSuffix(name, suffix); ok {
			base = b
			break
		}
	}
	fd, err := unix.Open(filepath.Join(dir, base+fifoSuffix), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false // ENXIO: nobody reads; ENOENT: no FIFO
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFIFO // not a file left in its place
}

// sweptSpools: sweepSpoolsOnce has run in this process.
var sweptSpools atomic.Bool

// sweepSpoolsOnce is sweepSpools, at most once per process: a CI job that
// makes thousands of roots must not read the base directory each time.
func sweepSpoolsOnce(base, keep string) {
	if sweptSpools.CompareAndSwap(false, true) {
		sweepSpools(base, keep, time.Now())
	}
}

// sweepSpools removes the spool directories in base, but keep, that were
// last changed staleSpool ago and in which no proposer listens, with the
// files in them that are as old: one is made for each root, host, boot and
// pid namespace, and nothing else removes them, so a machine that ran many
// roots (tests, CI jobs) kept thousands. rmdir removes only an empty
// directory, and a proposer that finds its spool gone makes it again. base
// is private to this user (privateDir); each directory is opened without
// following a link, and its files are removed relative to it.
func sweepSpools(base, keep string, now time.Time) {
	d, err := os.Open(base)
	if err != nil {
		return
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	for _, name := range names {
		p := filepath.Join(base, name)
		if p == keep {
			continue
		}
		if fi, err := os.Lstat(p); err != nil || !fi.IsDir() || now.Sub(fi.ModTime()) <= staleSpool {
			continue
		}
		sweepSpoolDir(p, now)
	}
}

func sweepSpoolDir(p string, now time.Time) {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	dir := os.NewFile(uintptr(fd), p)
	defer dir.Close()
	files, _ := dir.Readdirnames(-1)
	for _, f := range files {
		if proposerListening(p, f) {
			return
		}
	}
	for _, f := range files {
		var st unix.Stat_t
		if unix.Fstatat(fd, f, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && now.Sub(time.Unix(st.Mtim.Unix())) > staleSpool {
			unix.Unlinkat(fd, f, 0)
		}
	}
	unix.Rmdir(p)
}

// readSmall reads a file of at most limit bytes without following a
// symbolic link or blocking on a FIFO.
func readSmall(name string, limit int64) ([]byte, error) {
	return readFileFlags(name, unix.O_NOFOLLOW|unix.O_NONBLOCK, int(limit))
}
