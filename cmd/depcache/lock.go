package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	"github.com/spf13/cobra"
)

// minLockLease is the shortest --lease of lock: a renewal, every third of
// the lease, must fit in it with room to spare on a slow shared
// filesystem.
const minLockLease = time.Second

// maxLockLease is the longest --lease: a holder on another host that dies
// keeps the lock for the lease, and twice it must not overflow a deadline.
const maxLockLease = 24 * time.Hour

// checkLockLease refuses a --lease outside [minLockLease, maxLockLease].
func checkLockLease(lease time.Duration) error {
	if lease < minLockLease || lease > maxLockLease {
		return fmt.Errorf("--lease %s: %w: must be from %s to %s", lease, errBadFlag, minLockLease, maxLockLease)
	}
	return nil
}

const lockUsage = "depcache lock NAME [--timeout DUR] [--lease DUR] -- CMD [ARGS...]"

// checkLockName refuses a NAME that is empty, too long, not valid UTF-8 or
// has control characters. NAME is hashed into the file name, so any other
// string is safe.
func checkLockName(name string) error {
	if err := state.CheckText("lock NAME", name); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if name == "" {
		return usageErrorf("empty lock NAME: %s", lockUsage)
	}
	if len(name) > 1024 || strings.ContainsFunc(name, unicode.IsControl) {
		return usageErrorf("lock NAME %.40q: want 1 to 1024 printable characters", name)
	}
	return nil
}

// openNamedLock makes ROOT/locks and returns the lock of NAME and its token
// file. It records NAME next to the lock, for `depcache locks`.
func openNamedLock(g *globals, name string, lease time.Duration) (*state.Lock, string, error) {
	perms := state.DefaultPerms()
	if g.group {
		perms = state.GroupPerms()
	}
	if err := state.CheckUnbound(g.rootPath()); err != nil {
		return nil, "", err // its hosts lock through the etcd store
	}
	if err := state.CheckLayout(g.rootPath(), []string{state.LocksDir}, nil); err != nil {
		return nil, "", err
	}
	if err := perms.MkdirAll(filepath.Join(g.rootPath(), state.LocksDir)); err != nil {
		return nil, "", fmt.Errorf("lock %q: %w", name, err)
	}
	lockPath, tokenPath, nameFile := state.NamedLockPaths(g.rootPath(), name)
	if err := recordLockName(nameFile, name, perms); err != nil {
		return nil, "", fmt.Errorf("lock %q: %w", name, err)
	}
	l, err := state.NewLock(lockPath, state.LockOptions{Lease: lease, Perm: perms.File, Log: g.log, What: fmt.Sprintf("lock %q", name)})
	if err != nil {
		return nil, "", err
	}
	return l, tokenPath, nil
}

// recordLockName writes NAME to nameFile unless it is there. It links a
// complete private file to the name, never renames over it: on sshfs a
// rename over a file that a process of the same mount has open is two
// renames on the server (the target to a hidden name first), and two
// lockers on two mounts doing that at once make one of them fail with
// ENOENT. The content is NAME, the same for every writer, so a name that
// exists is done; one that does not read back as NAME is left alone (only
// `locks` reads it).
func recordLockName(nameFile, name string, perms state.Perms) error {
	_, err := os.Stat(nameFile)
	if err == nil {
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	rnd := make([]byte, 8)
	if _, err := rand.Read(rnd); err != nil {
		return err
	}
	tmp := nameFile + ".tmp-" + hex.EncodeToString(rnd) // pids repeat across hosts
	if err := perms.WriteFile(tmp, []byte(name)); err != nil {
		os.Remove(tmp)
		return err
	}
	defer os.Remove(tmp)
	if err := os.Link(tmp, nameFile); err != nil && !state.LinkExists(err) {
		return err
	}
	return nil
}

// diskFull wraps manager.ErrDiskFull around err when it is a write to
// root's full filesystem (state.DiskFull: also sshfs's EIO with no room
// left), so that it is told as one (kind disk_full).
func diskFull(root string, err error) error {
	if err != nil && !errors.Is(err, manager.ErrDiskFull) && state.DiskFull(root, err) {
		return fmt.Errorf("%w: %w", manager.ErrDiskFull, err)
	}
	return err
}

// lockHold is one hold of a named lock, on either store.
type lockHold interface {
	// token draws the hold's fencing token.
	token() (uint64, error)
	// renew keeps the hold alive: an error wrapping state.ErrLockLost
	// says it is gone, any other that this renewal did not happen. It
	// gives up at ctx's end where it can.
	renew(ctx context.Context) error
	// release gives the lock up; an error wrapping state.ErrLockLost says
	// it had been lost.
	release() error
	// lost is closed when the hold is known to be gone without a renewal
	// (nil: only renew tells).
	lost() <-chan struct{}
}

// namedLockAcquirer returns the function that takes the lock name: on the
// etcd store a lock under its prefix, which excludes across hosts with no
// shared filesystem; else a lease lock in ROOT/locks.
func namedLockAcquirer(g *globals, name string, lease time.Duration) (func(context.Context) (lockHold, error), error) {
	g.state.locksOnly = true
	st, err := g.stateStore()
	if err != nil {
		return nil, err
	}
	if es, ok := st.(*etcdstore.Store); ok {
		return func(ctx context.Context) (lockHold, error) {
			if pid, ok := enclosingEtcdHolder(ctx, es, name); ok {
				tellNested(ctx, g, name, pid)
			}
			l, err := es.LockNamed(ctx, name, lease)
			if err != nil {
				return nil, err
			}
			return etcdHold{l}, nil
		}, nil
	}
	l, tokenPath, err := openNamedLock(g, name, lease)
	if err != nil {
		return nil, diskFull(g.rootPath(), err)
	}
	lockPath, _, _ := state.NamedLockPaths(g.rootPath(), name)
	return func(ctx context.Context) (lockHold, error) {
		if pid, ok := enclosingHolder(lockPath); ok {
			tellNested(ctx, g, name, pid)
		}
		s, err := l.Acquire(ctx)
		if err != nil {
			return nil, diskFull(g.rootPath(), err)
		}
		return fileHold{s, tokenPath}, nil
	}, nil
}

// fileHold is a hold of a lease lock in the root; its token is drawn from
// the token file beside it.
type fileHold struct {
	s         *state.Lease
	tokenPath string
}

func (h fileHold) token() (uint64, error)      { return h.s.NextToken(h.tokenPath) }
func (h fileHold) renew(context.Context) error { return h.s.Renew() }
func (h fileHold) release() error              { return h.s.Release() }
func (h fileHold) lost() <-chan struct{}       { return nil }

// etcdHold is a hold of a lock on etcd: the client renews its lease by
// itself, so a renewal only checks that the hold is still ours.
type etcdHold struct{ l *etcdstore.NamedLock }

func (h etcdHold) token() (uint64, error)          { return h.l.Token(), nil }
func (h etcdHold) renew(ctx context.Context) error { return h.l.Check(ctx) }
func (h etcdHold) release() error                  { return h.l.Release(context.Background()) }

// lost is closed as soon as the client learns that etcd ended the lease,
// so that CMD is ended without waiting for the next check.
func (h etcdHold) lost() <-chan struct{} { return h.l.Lost() }

// splitLockArgs parses lock's command line after its first argument,
// NAME, as run parses its own: lock's flags (and the global ones) may come
// before NAME and between NAME and CMD; without "--", CMD starts at the
// first argument after NAME, and every argument from there on is CMD's,
// flags and "--" included. (With interspersed flags, "lock N sh -c x"
// was refused for sh's -c, and "lock N cmd --timeout 5s" took the
// --timeout from cmd.) args is what cobra left after the flags before
// NAME; helped: --help came after NAME, and was shown.
func splitLockArgs(cmd *cobra.Command, args []string) (name string, argv []string, helped bool, err error) {
	if len(args) == 0 || cmd.Flags().ArgsLenAtDash() == 0 {
		return "", nil, false, usageErrorf("missing NAME: %s", lockUsage)
	}
	name = args[0]
	// The flag set stops at the first argument that is not a flag (it is
	// not interspersed), and "--" ends it: what it leaves is CMD.
	if err := cmd.Flags().Parse(args[1:]); err != nil {
		return "", nil, false, fmt.Errorf("%w: %w", errUsage, err)
	}
	if h, _ := cmd.Flags().GetBool("help"); h {
		return "", nil, true, cmd.Help()
	}
	argv = cmd.Flags().Args()
	if len(argv) == 0 || argv[0] == "" {
		if err := checkLockName(name); err != nil {
			return "", nil, false, err
		}
		return "", nil, false, usageErrorf("missing CMD: %s", lockUsage)
	}
	return name, argv, false, nil
}

func newLockCmd(g *globals) *cobra.Command {
	var timeout, lease time.Duration
	var (
		name   string
		argv   []string
		helped bool
	)
	cmd := &cobra.Command{
		Use: "lock NAME [--timeout DUR] [--lease DUR] -- CMD [ARGS...]",
		Example: `  depcache lock docker-cleanup -- docker system prune -f
  depcache lock build-myimage --timeout 10m -- ./build-if-missing.sh
  depcache lock nightly -- sh -c 'echo "token $DEPCACHE_LOCK_TOKEN"; ./job'`,
		Short: "Run CMD holding the cross-host lease lock NAME, with a fencing token",
		Long: `lock takes the lock NAME (ROOT/locks/<sha256(NAME)[:32]>.lock), the same kind
of lock as the state lock, safe across hosts on a shared root, and runs CMD
while it holds it. While CMD runs, lock renews the lease every third of
--lease, so a long CMD is never broken. CMD gets DEPCACHE_LOCK_TOKEN, a
fencing token that increases with every acquisition of NAME, and
DEPCACHE_LOCK_NAME. SIGINT, SIGTERM and SIGHUP are forwarded to CMD; if lock
dies, CMD gets SIGKILL.

A waiter breaks a holder on its own machine at once when the holder's process
is gone, and a holder on another host once the lock stayed unchanged for
--lease on the waiter's own clock: every user of NAME should give the same
--lease. A lock of NAME that the holder of NAME runs (nested in its CMD) says
at once that it waits for its own enclosing holder.

With --state etcd://..., the lock is on etcd instead (PREFIX/locks/...): it
excludes every host that uses the prefix, with no shared filesystem, on a
lease of its own that etcd times (--lease, in whole seconds); a holder that
dies or is cut off loses it when etcd ends that lease, and the token is the
etcd revision at which the lock was granted. The prefix's root is not
checked: hosts whose roots differ may share a prefix for their locks.

lock's flags come before or after NAME. Without --, CMD starts at the first
argument after NAME that is not one of them, and every argument from there on
is CMD's, flags and -- included, as for run.

Exit status: CMD's (128+N for a signal N); 2 bad usage; 3 --timeout passed
before the lock was taken; 75 the lease was lost while CMD ran (lock was
stopped or could not renew past the lease, and another process broke the
lock): lock says why, ends CMD (SIGTERM, then SIGKILL after 10s) and exits 75.`,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			// The flags after NAME are parsed before the root's checks
			// see them (they may be global flags: --json, --root).
			var err error
			if name, argv, helped, err = splitLockArgs(cmd, args); err != nil || helped {
				return err
			}
			return cmd.Root().PersistentPreRunE(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if helped {
				return nil
			}
			return passStatus(runLock(cmd, g, name, argv, timeout, lease))
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false) // see splitLockArgs
	f.DurationVar(&timeout, "timeout", 0, "give up waiting for the lock after this long (exit 3)")
	f.DurationVar(&lease, "lease", 30*time.Second, "how long a holder on another host must leave the lock unchanged before it is broken; the holder renews every third of it")
	return cmd
}

func runLock(cmd *cobra.Command, g *globals, name string, argv []string, timeout, lease time.Duration) (int, error) {
	if timeout < 0 {
		return 0, fmt.Errorf("--timeout %s: %w: must not be negative", timeout, errBadFlag)
	}
	if err := checkLockLease(lease); err != nil {
		return 0, err
	}
	if err := rootNotFile(g); err != nil {
		return 0, err
	}
	if err := checkLockName(name); err != nil {
		return 0, err
	}
	acquire, err := namedLockAcquirer(g, name, lease)
	if err != nil {
		return 0, err
	}
	sigs, stopSigs := notifySignals()
	defer stopSigs()

	ctx, cancel := context.WithCancel(context.WithoutCancel(cmd.Context()))
	defer cancel()
	if timeout > 0 {
		var c context.CancelFunc
		ctx, c = context.WithTimeout(ctx, timeout)
		defer c()
	}
	var interrupted os.Signal
	watching := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case interrupted = <-sigs:
			cancel()
		case <-watching:
		}
	}()
	s, err := acquire(ctx)
	close(watching)
	<-watched
	if interrupted != nil {
		if s != nil {
			s.release()
		}
		return 0, fmt.Errorf("%w while waiting for lock %q", &interruptedError{sig: interrupted}, name)
	}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return 0, fmt.Errorf("lock %q not acquired within --timeout %s: %w", name, timeout, err)
		}
		return 0, fmt.Errorf("lock %q: %w", name, err)
	}
	tok, err := s.token()
	if err != nil {
		s.release()
		return 0, fmt.Errorf("lock %q: drawing the fencing token: %w", name, err)
	}
	c, err := startChild(argv, []string{"DEPCACHE_LOCK_TOKEN=" + strconv.FormatUint(tok, 10), "DEPCACHE_LOCK_NAME=" + name},
		cmd.InOrStdin(), g.stdout, g.stderr)
	if err != nil {
		s.release()
		return 0, err
	}
	every := lease / 3
	renew := time.NewTicker(every)
	defer renew.Stop()
	lastRenewal := time.Now() // monotonic: a stop of this process counts
	// A renewal runs beside this loop, so that one that hangs (an etcd
	// cut off answers after its 5 s request timeout; a file server may
	// never) neither holds up signals and CMD's exit nor lets CMD run
	// past what the last renewal vouches for: guard fires two thirds of a
	// lease after it, renewed or not.
	guard := time.NewTimer(lease * 2 / 3)
	defer guard.Stop()
	type renewal struct {
		began time.Time // what it vouches for: the hold was renewed after this
		err   error
	}
	renewed := make(chan renewal, 1)
	renewing := false
	renewCtx, cancelRenew := context.WithCancel(context.Background())
	defer cancelRenew()
	// holdMu keeps a renewal and the release apart: a hold's calls are
	// not safe side by side. A release waits for a renewal in flight,
	// after CMD has been ended or has exited.
	var holdMu sync.Mutex
	release := func() error {
		cancelRenew()
		holdMu.Lock()
		defer holdMu.Unlock()
		return s.release()
	}
	lost := func(why string) error {
		if !g.json {
			// Said now: ending CMD may take its grace.
			fmt.Fprintf(g.stderr, "depcache lock: lost the lease of %q (token %d) while CMD ran: %s; ending CMD, exit %d\n", name, tok, why, exitLost)
		}
		cancelRenew()
		c.end(endGrace)
		release()
		return &lostError{msg: fmt.Sprintf("lost the lease of %q (token %d) while CMD ran: %s; CMD was ended", name, tok, why), told: !g.json}
	}
	for {
		select {
		case <-c.done:
			if err := release(); errors.Is(err, state.ErrLockLost) {
				return 0, &lostError{msg: fmt.Sprintf("the lease of %q (token %d) was lost while CMD ran, found at release: %v", name, tok, err)}
			} else if err != nil {
				fmt.Fprintf(g.stderr, "depcache lock: releasing %q: %v\n", name, err)
			}
			return c.status(), nil
		case sig := <-sigs:
			c.signal(sig)
		case <-s.lost():
			return 0, lost(fmt.Sprintf("its lease ended (this process went %s without a renewal of its own, lease %s)", time.Since(lastRenewal).Round(time.Millisecond), lease))
		case <-guard.C:
			return 0, lost(fmt.Sprintf("could not renew for %s (lease %s): no renewal returned in time", time.Since(lastRenewal).Round(time.Millisecond), lease))
		case <-renew.C:
			if !renewing {
				renewing = true
				deadline := lastRenewal.Add(lease * 2 / 3)
				go func() {
					ctx, cancel := context.WithDeadline(renewCtx, deadline)
					defer cancel()
					holdMu.Lock()
					defer holdMu.Unlock()
					began := time.Now()
					renewed <- renewal{began, s.renew(ctx)}
				}()
			}
		case r := <-renewed:
			renewing = false
			switch err := r.err; {
			case err == nil:
				lastRenewal = r.began
				guard.Reset(time.Until(lastRenewal.Add(lease * 2 / 3)))
			case errors.Is(err, state.ErrLockLost):
				return 0, lost(fmt.Sprintf("%v (this process went %s without renewing, lease %s)", err, time.Since(lastRenewal).Round(time.Millisecond), lease))
			case time.Since(lastRenewal) >= lease*2/3:
				// Others may break it at the lease: do not let CMD run on
				// past what we can vouch for.
				return 0, lost(fmt.Sprintf("could not renew for %s (lease %s): %v", time.Since(lastRenewal).Round(time.Millisecond), lease, err))
			default:
				g.log.WithError(err).WithField("lock", name).Warn("renewing the lease failed; trying again")
			}
		}
	}
}

// tellNested says that the lock name waits for its own enclosing holder,
// pid.
func tellNested(ctx context.Context, g *globals, name string, pid int) {
	hint := "; give --timeout, or take the lock once"
	if _, ok := ctx.Deadline(); ok {
		hint = ""
	}
	fmt.Fprintf(g.stderr, "depcache lock: %q is held by pid %d, which this command runs under (a 'depcache lock %s' around it): this waits until that one releases it, which it does only after this command ends%s\n",
		name, pid, name, hint)
}

// enclosingEtcdHolder is enclosingHolder for a lock on etcd, whose holder
// record names a host by its hostname and a pid: one request, and nothing
// told when it fails.
func enclosingEtcdHolder(ctx context.Context, es *etcdstore.Store, name string) (int, bool) {
	info, ok, err := es.NamedLockHolder(ctx, name)
	if err != nil || !ok {
		return 0, false
	}
	if host, err := os.Hostname(); err != nil || host != info.Host {
		return 0, false
	}
	return info.PID, isAncestor(info.PID)
}

// isAncestor reports whether pid is a parent, or a parent's parent, of
// this process.
func isAncestor(pid int) bool {
	for p, hops := os.Getppid(), 0; p > 1 && hops < 64; hops++ {
		if p == pid {
			return true
		}
		var err error
		if p, err = state.ParentPID(p); err != nil {
			break
		}
	}
	return false
}

// enclosingHolder returns the pid of the holder of the lock at path when
// it is an ancestor of this process: a lock nested in a lock of the same
// name waits for a holder that waits for it. It is only told, not
// refused: a CMD that leaves the inner lock running after it exits (sh -c
// '... &') waits legitimately.
func enclosingHolder(path string) (int, bool) {
	info, ok, err := state.ReadLockInfo(path)
	if err != nil || !ok {
		return 0, false
	}
	procs, err := state.System()
	if err != nil || !procs.Self().SameMachine(info.Process) {
		return 0, false
	}
	if alive, err := procs.Alive(info.Process); err != nil || !alive {
		return 0, false
	}
	return info.PID, isAncestor(info.PID)
}
