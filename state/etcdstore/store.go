package etcdstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/depcache/depcache/state"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var (
	// ErrBadURL means a --state URL is not etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
	ErrBadURL = errors.New("bad etcd state URL")
	// ErrUnavailable means the cluster did not answer in time (no
	// endpoint reachable, no leader, no quorum). It never wraps
	// context.DeadlineExceeded: a request timeout of the store is not the
	// caller's deadline.
	// errors.Is(err, state.ErrUnavailable) holds for it too.
	ErrUnavailable error = unavailable{}
	// ErrTooBig means one commit would exceed etcd's limits on one
	// transaction (operations or request bytes). A commit is atomic, so
	// it is refused rather than split; nothing is written.
	ErrTooBig = errors.New("commit too big for one etcd transaction")
	// ErrOutcomeUnknown means a commit's answer was lost and reading it
	// back did not settle whether it applied before the settle timeout.
	ErrOutcomeUnknown = errors.New("etcd commit outcome unknown")
	// ErrRootMismatch means the prefix describes the content of another
	// root than the one given (their IDs differ).
	ErrRootMismatch = errors.New("etcd prefix belongs to another root")
	// ErrNestedPrefix means the prefix lies inside another depcache
	// prefix, or holds one: their keys would mix (each would read the
	// other's as its own, and a rebuild of the outer would delete the
	// inner). It wraps ErrBadURL.
	ErrNestedPrefix = fmt.Errorf("%w: nested depcache prefixes", ErrBadURL)
	// ErrInvalidState means a callback built a state that fails
	// state.State.Validate; it is not committed.
	ErrInvalidState = errors.New("refusing to commit an invalid state")
	// ErrContention means a commit kept conflicting with others' and the
	// store gave up retrying it.
	ErrContention = errors.New("etcd commit kept conflicting")
)

// Limits of one etcd transaction with the server's defaults
// (--max-txn-ops 128, --max-request-bytes 1.5 MiB).
const (
	MaxTxnOps       = 128
	MaxRequestBytes = 1536 * 1024
)

const (
	pageSize      = 1000
	maxAttempts   = 1000
	committedMark = "committed"
	abortedMark   = "aborted"
	// Commit records live on a lease of recordTTL, used for commits only
	// while at least half of it is left: far longer than any settling.
	recordTTL    = 10 * time.Minute
	readChunkIDs = 40 // named entries read per transaction (3 ops each)
)

// Options configure Open.
type Options struct {
	// Endpoints are the cluster's client endpoints, HOST:PORT.
	Endpoints []string
	// Prefix is where this state lives: every key is under Prefix + "/".
	// It must start with "/" and have no empty, "." or ".." component.
	Prefix string
	// TLS, when set, is used to reach the endpoints.
	TLS *tls.Config
	// Username and Password authenticate when Username is set.
	Username, Password string
	// DialTimeout bounds Open's first request. Default 2 s.
	DialTimeout time.Duration
	// RequestTimeout bounds each request. Default 5 s.
	RequestTimeout time.Duration
	// SettleTimeout bounds reading back a commit whose answer was lost.
	// Default 6 × RequestTimeout.
	SettleTimeout time.Duration
	// Root, when set, is the cache root whose content this prefix
	// describes: Open refuses a prefix bound to another root
	// (ErrRootMismatch), and the first commit binds an unbound one (the
	// root's ID file ROOT/root-id, made then if missing, and the prefix's
	// key PREFIX/root-id).
	Root string
	// AdoptRoot lets an unbound prefix bind a root that already has an
	// ID and published content (bound to a prefix before: one that was
	// lost, or that the root moves from). Without it Open refuses such a
	// root (ErrRootMismatch): two prefixes describing one root's content
	// would each evict what the other's runs use. doctor --rebuild sets
	// it: a rebuild onto an unbound prefix is how a root moves.
	AdoptRoot bool
	// Perms are the modes of the root's ID file. Zero: state.DefaultPerms.
	Perms state.Perms
	// Client, when set, is used instead of dialling Endpoints; Close
	// leaves it open.
	Client *clientv3.Client
}

// Stats count what a Store did, for measurements and tests.
type Stats struct {
	Commits   int64 // transactions that applied
	Conflicts int64 // transactions refused by a compare: the callback ran again
	Settled   int64 // commits whose lost answer was read back
	Lists     int64 // watches that listed their entries to cover the revisions before they began
	Sessions  int64 // sessions started: more than one means a lease ended under this store
}

// Store is a state.Backend on etcd. It is safe for concurrent use; every
// instance, in this process or another, sees the others' commits.
type Store struct {
	cli     *clientv3.Client
	owned   bool
	l       layout
	name    string
	timeout time.Duration
	settle  time.Duration
	// tls is Options.TLS, to tell an endpoint that is not etcd (notEtcd).
	tls *tls.Config
	// adoptRoot: Options.AdoptRoot.
	adoptRoot bool

	root   string
	perms  state.Perms
	rootID string      // the root's ID, once read or made
	bound  atomic.Bool // the prefix is known to carry rootID
	idMu   sync.Mutex

	leaseMu sync.Mutex
	lease   clientv3.LeaseID // of the commit records; 0: none yet
	leaseAt time.Time        // when it was granted, on our clock

	// The session whose lease holds the dependents bound to this process
	// (see lease.go), kept alive until Close ends life.
	life     context.Context
	endLife  context.CancelFunc
	sessMu   sync.Mutex
	sessTTL  time.Duration
	leasing  bool // LeaseDependents was called
	sess     *concurrency.Session
	sessions atomic.Int64

	// Owner leases (lease.go).
	ownMu    sync.Mutex
	ownerTTL time.Duration     // 0: owners are not leased
	lapsed   map[string]uint64 // entry ID -> generation whose owner lease ended

	commits, conflicts, settled, lists atomic.Int64
	seen                               atomic.Int64 // highest revision seen in an answer: Mark
}

// ParseURL splits etcd://HOST:PORT[,HOST:PORT...]/PREFIX into its endpoints
// and its prefix ("/PREFIX", without a trailing slash). Errors wrap
// ErrBadURL.
func ParseURL(u string) (endpoints []string, prefix string, err error) {
	bad := func(format string, args ...any) ([]string, string, error) {
		return nil, "", fmt.Errorf("%q: %w: "+format+" (want etcd://HOST:PORT[,HOST:PORT...]/PREFIX)", append([]any{u, ErrBadURL}, args...)...)
	}
	rest, ok := strings.CutPrefix(u, "etcd://")
	if !ok {
		return bad("not an etcd:// URL")
	}
	hosts, path, _ := strings.Cut(rest, "/")
	if hosts == "" {
		return bad("no endpoint")
	}
	for _, h := range strings.Split(hosts, ",") {
		if strings.Contains(h, "@") {
			return bad("endpoint %q: credentials do not go in the URL (use --etcd-user, and DEPCACHE_ETCD_PASSWORD for the password)", h)
		}
		host, port, err := net.SplitHostPort(h)
		if err != nil {
			return bad("endpoint %q: %v", h, err)
		}
		n, err := strconv.Atoi(port)
		switch {
		case host == "" || err != nil || strings.Trim(port, "0123456789") != "":
			return bad("endpoint %q: want HOST:PORT", h)
		case strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '/' || r == '\\' }):
			return bad("endpoint %q: host %q has a space or control character", h, host)
		case n < 1 || n > 65535:
			return bad("endpoint %q: port %d out of range (1 to 65535)", h, n)
		}
		endpoints = append(endpoints, h)
	}
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		// Taken literally, they would name another prefix than the one
		// meant.
		return bad("%q: a query or fragment is no part of a prefix", path[i:])
	}
	prefix = "/" + strings.TrimSuffix(path, "/")
	if err := checkPrefix(prefix); err != nil {
		return bad("%v", err)
	}
	return endpoints, prefix, nil
}

func checkPrefix(p string) error {
	if p == "/" || p == "" {
		return errors.New("no prefix: give the state a prefix of its own")
	}
	if !strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") {
		return fmt.Errorf("prefix %q: must start and must not end with /", p)
	}
	for _, c := range strings.Split(p[1:], "/") {
		if c == "" || c == "." || c == ".." {
			return fmt.Errorf("prefix %q: empty, . or .. component", p)
		}
		if strings.TrimSpace(c) != c {
			// Taken as written, "/x " is another prefix than the "/x"
			// meant, and nothing would show the difference.
			return fmt.Errorf("prefix %q: component %q begins or ends with a space", p, c)
		}
	}
	if err := state.CheckText("prefix", p); err != nil {
		return err
	}
	if strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("prefix %q: control character", p)
	}
	return nil
}

// Open connects to the cluster and checks that it answers within
// DialTimeout, that the prefix's layout is one this package reads, and,
// with Root set, that the prefix is not bound to another root.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if err := checkPrefix(opts.Prefix); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadURL, err)
	}
	opts.setDefaults()
	s := &Store{cli: opts.Client, l: layout{opts.Prefix}, timeout: opts.RequestTimeout,
		settle: opts.SettleTimeout, root: opts.Root, adoptRoot: opts.AdoptRoot, perms: opts.Perms, tls: opts.TLS}
	s.life, s.endLife = context.WithCancel(context.WithoutCancel(ctx))
	if s.cli == nil {
		cli, err := dial(ctx, opts)
		if err != nil {
			return nil, err
		}
		s.cli, s.owned = cli, true
	}
	s.name = "etcd://" + strings.Join(s.cli.Endpoints(), ",") + s.l.p
	if err := s.probe(ctx, opts.DialTimeout); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// setDefaults fills in the options left zero.
func (o *Options) setDefaults() {
	if o.DialTimeout <= 0 {
		o.DialTimeout = 2 * time.Second
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 5 * time.Second
	}
	if o.SettleTimeout <= 0 {
		o.SettleTimeout = 6 * o.RequestTimeout
	}
	if o.Perms == (state.Perms{}) {
		o.Perms = state.DefaultPerms()
	}
}

// dial makes the client of opts (its DialTimeout set).
func dial(ctx context.Context, opts Options) (*clientv3.Client, error) {
	if len(opts.Endpoints) == 0 {
		return nil, fmt.Errorf("%w: no endpoints", ErrBadURL)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            opts.Endpoints,
		DialTimeout:          opts.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		TLS:                  opts.TLS,
		Username:             opts.Username,
		Password:             opts.Password,
		Logger:               zap.NewNop(),
		Context:              context.WithoutCancel(ctx),
	})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && opts.Username != "" {
			// With credentials the client authenticates as it dials: a
			// cluster that does not answer is unavailable, not the
			// caller's own deadline passing.
			if why := notEtcd(ctx, opts.Endpoints, opts.TLS); why != "" {
				return nil, fmt.Errorf("etcd %s: %w: %s", strings.Join(opts.Endpoints, ","), ErrUnavailable, why)
			}
			return nil, fmt.Errorf("etcd %s: %w: no answer within %s (authenticating as %s): %v",
				strings.Join(opts.Endpoints, ","), ErrUnavailable, opts.DialTimeout, opts.Username, err)
		}
		return nil, fmt.Errorf("etcd %s: %w", strings.Join(opts.Endpoints, ","), err)
	}
	return cli, nil
}

// unavailable is ErrUnavailable: its own message, and state's sentinel
// for a store that may answer again.
type unavailable struct{}

func (unavailable) Error() string        { return "etcd cluster unavailable" }
func (unavailable) Is(target error) bool { return target == state.ErrUnavailable }

// probe reads the format and root-id keys within d.
func (s *Store) probe(ctx context.Context, d time.Duration) error {
	pctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), d)
	defer cancel()
	ops := []clientv3.Op{clientv3.OpGet(s.l.format()), clientv3.OpGet(s.l.rootID())}
	ancestors := ancestorPrefixes(s.l.p)
	for _, a := range ancestors {
		ops = append(ops, clientv3.OpGet(layout{p: a}.format(), clientv3.WithCountOnly()))
	}
	// An election in progress (no leader for a second or so) is waited
	// out within d, as every read of the store waits it out.
	var resp *clientv3.TxnResponse
	err := s.readUntil(ctx, time.Now().Add(d), func(rctx context.Context) (err error) {
		resp, err = s.cli.Txn(rctx).Then(ops...).Commit()
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", s, ctx.Err())
		}
		// The client hands "no leader" and its kin over as etcd's own
		// errors, not as gRPC statuses: transient knows both.
		if errors.Is(err, context.DeadlineExceeded) || transient(err) || status.Code(err) == codes.DeadlineExceeded {
			// The gRPC client retries an endpoint that answers, but not
			// HTTP/2, as one that cannot be reached: say which it is.
			if why := notEtcd(ctx, s.cli.Endpoints(), s.tls); why != "" {
				return fmt.Errorf("%s: %w: %s", s, ErrUnavailable, why)
			}
			return fmt.Errorf("%s: %w: no answer within %s: %v", s, ErrUnavailable, d, err)
		}
		if status.Code(err) == codes.Unimplemented {
			// HTTP/2 and gRPC, but not etcd's service.
			return fmt.Errorf("%s: %w: the endpoints do not answer as etcd: a gRPC server without etcd's KV service answered (%v)", s, ErrUnavailable, err)
		}
		return fmt.Errorf("%s: %w", s, err)
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		if _, err := decodeFormat(kvs[0].Value); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	for i, a := range ancestors {
		if resp.Responses[2+i].GetResponseRange().Count > 0 {
			return fmt.Errorf("%s: %w: prefix %s lies inside the depcache prefix %s (it has %s): give each cache a prefix that neither holds nor lies in another's",
				s, ErrNestedPrefix, s.l.p, a, layout{p: a}.format())
		}
	}
	if len(resp.Responses[0].GetResponseRange().Kvs) == 0 {
		// Not a cache (yet): one that holds another's keys would read
		// them as its own, or show that one as empty. Refused at once,
		// by every command, not only at a first commit.
		inner, err := s.nestedPrefix(pctx)
		if err != nil {
			return err
		}
		if inner != "" {
			return fmt.Errorf("%s: %w: prefix %s holds the depcache prefix %s: give each cache a prefix that neither holds nor lies in another's",
				s, ErrNestedPrefix, s.l.p, inner)
		}
	}
	if s.root == "" {
		return nil
	}
	if err := s.checkNoFileState(); err != nil {
		return fmt.Errorf("%s: %w", s, err)
	}
	var bound string
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		bound = string(kvs[0].Value)
	}
	id, err := readRootID(s.root)
	if err != nil {
		return err
	}
	var boundBy string // the prefix that recorded the root's ID, as the root says
	if bound == "" && id != "" && !s.adoptRoot {
		if boundBy, err = readRootPrefix(s.root); err != nil {
			return err
		}
	}
	switch {
	case bound == "" && id != "" && !s.adoptRoot && boundBy != "" && boundBy != s.l.p:
		return fmt.Errorf("%w: root %s has ID %s and is bound to the prefix %s (%s), but %s records no root: "+
			"refusing to let a second prefix describe its content, whose first would take this one's for orphans. Use --state with %s, or, to move the root here, rebuild it here: depcache doctor --rebuild",
			ErrRootMismatch, s.root, id, boundBy, filepath.Join(s.root, RootPrefixFile), s, boundBy)
	case bound == "" && id != "" && !s.adoptRoot && boundBy == "" && hasContent(s.root):
		return fmt.Errorf("%w: root %s has ID %s and published content, but %s records no root: the root is bound to another prefix (or this one was lost); "+
			"refusing to let a second prefix describe its content. Use the root's own --state, or, to move the root here (its prefix was lost, or a move was cut short), rebuild it here: depcache doctor --rebuild",
			ErrRootMismatch, s.root, id, s)
	case bound == "":
	case id == "":
		return fmt.Errorf("%w: %s belongs to the root with ID %s, but root %s has no ID file (%s): it is another root",
			ErrRootMismatch, s, bound, s.root, rootIDFile(s.root))
	case id != bound:
		return fmt.Errorf("%w: %s belongs to the root with ID %s, but root %s has ID %s", ErrRootMismatch, s, bound, s.root, id)
	default:
		s.rootID = id
		s.bound.Store(true)
	}
	return nil
}

// ancestorPrefixes returns the proper ancestors of prefix p ("/a/b/c":
// "/a", "/a/b").
func ancestorPrefixes(p string) []string {
	var out []string
	for i := 1; i < len(p); i++ {
		if p[i] == '/' {
			out = append(out, p[:i])
		}
	}
	return out
}

// nestedPrefix returns a depcache prefix that lies inside this one (a
// format key under it other than its own), "" if none. It reads every key
// under the prefix (keys only): for a first commit, when the prefix holds
// no state of its own, and for a rebuild.
func (s *Store) nestedPrefix(ctx context.Context) (string, error) {
	inner, _, err := s.nestedPrefixAt(ctx)
	return inner, err
}

// nestedPrefixAt is nestedPrefix, and the revision of its first read: a
// key under the prefix that changed after it was not seen.
func (s *Store) nestedPrefixAt(ctx context.Context) (string, int64, error) {
	from, end := s.l.p+"/", clientv3.GetPrefixRangeEnd(s.l.p+"/")
	rev := int64(0)
	for {
		var r *clientv3.GetResponse
		err := s.read(ctx, func(rctx context.Context) (err error) {
			r, err = s.cli.Get(rctx, from, clientv3.WithRange(end), clientv3.WithKeysOnly(), clientv3.WithLimit(pageSize))
			return err
		})
		if err != nil {
			return "", 0, s.fail(ctx, "looking for prefixes inside this one", err)
		}
		if rev == 0 {
			rev = r.Header.Revision
		}
		for _, kv := range r.Kvs {
			if k := string(kv.Key); k != s.l.format() && strings.HasSuffix(k, "/format") && !s.ownKey(k) {
				return strings.TrimSuffix(k, "/format"), rev, nil
			}
		}
		if !r.More || len(r.Kvs) == 0 {
			return "", rev, nil
		}
		from = string(r.Kvs[len(r.Kvs)-1].Key) + "\x00"
	}
}

// firstCommitHook, when set (by tests), runs in a first commit's plan
// after it looked for nested prefixes, before its transaction.
var firstCommitHook func()

// outerPrefix returns a depcache prefix that this one lies inside (an
// ancestor with a format key), "" if none.
func (s *Store) outerPrefix(ctx context.Context) (string, error) {
	ancestors := ancestorPrefixes(s.l.p)
	if len(ancestors) == 0 {
		return "", nil
	}
	ops := make([]clientv3.Op, 0, len(ancestors))
	for _, a := range ancestors {
		ops = append(ops, clientv3.OpGet(layout{p: a}.format(), clientv3.WithCountOnly()))
	}
	var resp *clientv3.TxnResponse
	err := s.read(ctx, func(rctx context.Context) (err error) {
		resp, err = s.cli.Txn(rctx).Then(ops...).Commit()
		return err
	})
	if err != nil {
		return "", s.fail(ctx, "looking for prefixes this one lies inside", err)
	}
	for i, a := range ancestors {
		if resp.Responses[i].GetResponseRange().Count > 0 {
			return a, nil
		}
	}
	return "", nil
}

// ownKey reports whether k, which ends in "/format", is a key of this
// prefix's own layout: an entry or owner key of an entry whose ID ends
// so (none does: entries are named by key IDs).
func (s *Store) ownKey(k string) bool {
	// Entries are named by key IDs (32 hex digits); "P/e/format" is the
	// format key of a prefix P/e, not an entry. Dependent names are hex
	// in their keys.
	if id, _, _, err := s.l.parseStateKey(k); err == nil && isKeyID(id) {
		return true
	}
	if id, ok := s.l.parseOwnerKey(k); ok && isKeyID(id) {
		return true
	}
	// Commit records, sweeper candidates and named locks are named in
	// hex: none ends in "/format".
	return false
}

func isKeyID(id string) bool {
	return len(id) == 32 && strings.Trim(id, "0123456789abcdef") == ""
}

// explainCorrupt returns err, or, when the keys that made the prefix's
// state unreadable (those sn read) are another prefix's inside it, an
// error saying so. It reads nothing more.
func (s *Store) explainCorrupt(sn *snapshot, err error) error {
	if !errors.Is(err, state.ErrCorrupt) {
		return err
	}
	inner := ""
	if _, ok := sn.entries["format"]; ok {
		inner = s.l.p + "/e" // its format key reads as an entry "format"
	}
	for _, k := range sn.stray {
		if strings.HasSuffix(k, "/format") {
			inner = strings.TrimSuffix(k, "/format")
		}
	}
	if inner != "" {
		return fmt.Errorf("%s: %w: the depcache prefix %s lies inside %s, and its keys read as this one's: give each cache a prefix that neither holds nor lies in another's (%v)", s, ErrNestedPrefix, inner, s.l.p, err)
	}
	return err
}

// hasContent reports whether root has published content (ROOT/entries
// is not empty).
func hasContent(root string) bool {
	f, err := os.Open(filepath.Join(root, "entries"))
	if err != nil {
		return false
	}
	defer f.Close()
	names, _ := f.Readdirnames(1)
	return len(names) > 0
}

// Close revokes the session's lease, which removes the dependents bound
// to this process at once, and releases the client, unless it was given
// in Options. A store that is never closed leaves nothing behind: its
// commit records and its session's dependents expire with their leases.
func (s *Store) Close() error {
	s.endSession()
	s.endLife()
	if s.owned {
		return s.cli.Close()
	}
	return nil
}

// String names the store: etcd://HOST:PORT,.../PREFIX.
func (s *Store) String() string { return s.name }

// Client returns the store's etcd client.
func (s *Store) Client() *clientv3.Client { return s.cli }

// EntryKey returns the etcd key of the entry with the given ID (a
// state.Key's ID), for tools that watch it: its value is the entry's
// JSON, without its dependents, and every change of the entry or its
// dependents puts it.
func (s *Store) EntryKey(id string) string { return s.l.entry(id) }

// Stats returns what this instance did so far.
func (s *Store) Stats() Stats {
	return Stats{Commits: s.commits.Load(), Conflicts: s.conflicts.Load(), Settled: s.settled.Load(), Lists: s.lists.Load(), Sessions: s.sessions.Load()}
}

// saw notes a revision an answer carried, for Mark.
func (s *Store) saw(rev int64) {
	for {
		cur := s.seen.Load()
		if rev <= cur || s.seen.CompareAndSwap(cur, rev) {
			return
		}
	}
}

func (s *Store) rctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(clientv3.WithRequireLeader(ctx), s.timeout)
}

// read runs the request do, each try under its own request context, and
// tries again after a failure that a new try can outlive: a leader change
// or election, or a member that went away (the client then moves to
// another). do must be idempotent: a read, which changes nothing, or a
// request whose repeat is harmless (a lease grant, whose spare, never
// used, expires by itself; a keep-alive; a put-if-absent of our own key).
// A commit is never retried here (see send). The tries end within the
// store's timeout, so that a cluster that stays unavailable is still
// reported as one after that long.
func (s *Store) read(ctx context.Context, do func(context.Context) error) error {
	return s.readUntil(ctx, time.Now().Add(s.timeout), do)
}

// readUntil is read with the tries ending by deadline.
func (s *Store) readUntil(ctx context.Context, deadline time.Time, do func(context.Context) error) error {
	delay := 10 * time.Millisecond
	for {
		// Every try ends by the one deadline, so that the reads end within
		// the timeout that an ErrUnavailable names.
		rctx, cancel := context.WithDeadline(clientv3.WithRequireLeader(ctx), deadline)
		err := do(rctx)
		cancel()
		if err == nil || ctx.Err() != nil || !transient(err) || time.Now().Add(delay).After(deadline) {
			return err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// transient reports whether a request failed in a way that a new try may
// not: every answer that etcd gives the code Unavailable (no leader, a
// leader change, a proposal that timed out in an election, a member
// stopping or unhealthy), or a member that cannot be reached. A
// request's own timeout is not transient: it already spent the budget.
func transient(err error) bool {
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code() == codes.Unavailable
	}
	return status.Code(err) == codes.Unavailable && !errors.Is(err, context.DeadlineExceeded)
}

// fail wraps a request's error: the caller's own end as such, the store's
// request timeout as ErrUnavailable.
func (s *Store) fail(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %s: %w", s, what, ctx.Err())
	}
	if errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded {
		return fmt.Errorf("%s: %s: %w: no answer within %s", s, what, ErrUnavailable, s.timeout)
	}
	if transient(err) {
		return fmt.Errorf("%s: %s: %w: %v", s, what, ErrUnavailable, err)
	}
	return fmt.Errorf("%s: %s: %w", s, what, err)
}

// kvRev is a key's value and mod revision as read.
type kvRev struct {
	val []byte
	mod int64
}

// snapshot is what one read saw, at one revision.
type snapshot struct {
	rev     int64
	whole   bool
	named   []string // UpdateEntries: the IDs read
	entries map[string]kvRev
	deps    map[string]map[string][]byte
	owners  map[string]ownerKV // owner keys (lease.go), by entry ID
	stray   []string           // keys in the state's range that are not entry or dependent keys
	head    kvRev
	gen     kvRev
	format  kvRev
	x       int64
	rootID  string // PREFIX/root-id, "" if absent
}

func newSnapshot() *snapshot {
	return &snapshot{entries: map[string]kvRev{}, deps: map[string]map[string][]byte{}, owners: map[string]ownerKV{}}
}

func (sn *snapshot) add(l layout, kv *mvccpb.KeyValue) {
	if id, ok := l.parseOwnerKey(string(kv.Key)); ok {
		gen, _ := strconv.ParseUint(string(kv.Value), 10, 64)
		sn.owners[id] = ownerKV{gen: gen, lease: clientv3.LeaseID(kv.Lease)}
		return
	}
	id, name, dep, err := l.parseStateKey(string(kv.Key))
	switch {
	case err != nil:
		sn.stray = append(sn.stray, string(kv.Key))
	case dep:
		if sn.deps[id] == nil {
			sn.deps[id] = map[string][]byte{}
		}
		sn.deps[id][name] = kv.Value
	default:
		sn.entries[id] = kvRev{kv.Value, kv.ModRevision}
	}
}

func one(r *clientv3.GetResponse) (kvRev, bool) {
	if len(r.Kvs) == 0 {
		return kvRev{}, false
	}
	return kvRev{r.Kvs[0].Value, r.Kvs[0].ModRevision}, true
}

func rangeResp(op *clientv3.TxnResponse, i int) *clientv3.GetResponse {
	return (*clientv3.GetResponse)(op.Responses[i].GetResponseRange())
}

// metaOps are the gets of the keys besides entries that every read takes.
func (s *Store) metaOps() []clientv3.Op {
	return []clientv3.Op{clientv3.OpGet(s.l.header()), clientv3.OpGet(s.l.format()),
		clientv3.OpGet(s.l.removals()), clientv3.OpGet(s.l.rootID()), clientv3.OpGet(s.l.generation())}
}

func (sn *snapshot) meta(resp *clientv3.TxnResponse, at int) {
	sn.head, _ = one(rangeResp(resp, at))
	sn.format, _ = one(rangeResp(resp, at+1))
	x, _ := one(rangeResp(resp, at+2))
	sn.x = x.mod
	if r, ok := one(rangeResp(resp, at+3)); ok {
		sn.rootID = string(r.val)
	}
	sn.gen, _ = one(rangeResp(resp, at+4))
}

// readWhole reads every state key at one revision.
func (s *Store) readWhole(ctx context.Context) (*snapshot, error) {
	start, end := s.l.stateRange()
	var resp *clientv3.TxnResponse
	err := s.read(ctx, func(rctx context.Context) (err error) {
		resp, err = s.cli.Txn(rctx).Then(append([]clientv3.Op{clientv3.OpGet(start, clientv3.WithRange(end), clientv3.WithLimit(pageSize))}, s.metaOps()...)...).Commit()
		return err
	})
	if err != nil {
		return nil, s.fail(ctx, "reading the state", err)
	}
	sn := newSnapshot()
	sn.whole, sn.rev = true, resp.Header.Revision
	s.saw(sn.rev)
	sn.meta(resp, 1)
	page := rangeResp(resp, 0)
	for {
		for _, kv := range page.Kvs {
			sn.add(s.l, kv)
		}
		if !page.More || len(page.Kvs) == 0 {
			return sn, nil
		}
		from := string(page.Kvs[len(page.Kvs)-1].Key) + "\x00"
		err = s.read(ctx, func(rctx context.Context) (err error) {
			page, err = s.cli.Get(rctx, from, clientv3.WithRange(end), clientv3.WithRev(sn.rev), clientv3.WithLimit(pageSize))
			return err
		})
		if err != nil {
			return nil, s.fail(ctx, "reading the state", err)
		}
	}
}

// readEntries reads the named entries, their dependents and the header at
// one revision.
func (s *Store) readEntries(ctx context.Context, ids []string) (*snapshot, error) {
	sn := newSnapshot()
	sn.named = ids
	for i := 0; i == 0 || i < len(ids); i += readChunkIDs {
		chunk := ids[i:min(i+readChunkIDs, len(ids))]
		var ops []clientv3.Op
		var rev []clientv3.OpOption
		if i > 0 {
			rev = []clientv3.OpOption{clientv3.WithRev(sn.rev)}
		} else {
			ops = s.metaOps()
		}
		for _, id := range chunk {
			ops = append(ops, clientv3.OpGet(s.l.entry(id), rev...),
				clientv3.OpGet(s.l.deps(id), append([]clientv3.OpOption{clientv3.WithPrefix()}, rev...)...),
				clientv3.OpGet(s.l.owner(id), rev...))
		}
		var resp *clientv3.TxnResponse
		err := s.read(ctx, func(rctx context.Context) (err error) {
			resp, err = s.cli.Txn(rctx).Then(ops...).Commit()
			return err
		})
		if err != nil {
			return nil, s.fail(ctx, "reading entries", err)
		}
		at := 0
		if i == 0 {
			sn.rev = resp.Header.Revision
			s.saw(sn.rev)
			sn.meta(resp, 0)
			at = len(s.metaOps())
		}
		for j := range chunk {
			for k := range 3 {
				for _, kv := range rangeResp(resp, at+3*j+k).Kvs {
					sn.add(s.l, kv)
				}
			}
		}
	}
	return sn, nil
}

// decode assembles the snapshot's state. Errors wrap state.ErrCorrupt or
// state.ErrUnsupportedVersion.
func (s *Store) decode(sn *snapshot) (*state.State, map[string]*state.Entry, error) {
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("%s (revision %d): %w: "+format, append([]any{s, sn.rev, state.ErrCorrupt}, args...)...)
	}
	st := state.New()
	if sn.format.mod != 0 {
		if _, err := decodeFormat(sn.format.val); err != nil {
			return nil, nil, fmt.Errorf("%s: %w", s, err)
		}
	} else if len(sn.entries) > 0 || sn.head.mod != 0 || sn.gen.mod != 0 {
		return nil, nil, corrupt("state keys without the format key %s", s.l.format())
	}
	if err := decodeHeader(sn.head.val, sn.gen.val, st); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", s, err)
	}
	if len(sn.stray) > 0 {
		return nil, nil, corrupt("keys that are neither entries nor dependents: %s", strings.Join(sn.stray[:min(len(sn.stray), 5)], ", "))
	}
	orig := make(map[string]*state.Entry, len(sn.entries))
	for id, kv := range sn.entries {
		e, err := decodeEntry(kv.val)
		if err != nil {
			return nil, nil, corrupt("entry %s: %v", s.l.entry(id), err)
		}
		if deps := sn.deps[id]; len(deps) > 0 {
			e.Dependents = make(map[string]state.Dependent, len(deps))
			for name, b := range deps {
				var d state.Dependent
				if err := strict(b, &d); err != nil {
					return nil, nil, corrupt("dependent %s: %v", s.l.dep(id, name), err)
				}
				e.Dependents[name] = d
			}
		}
		st.Entries[id], orig[id] = e, e
	}
	s.noteOwners(sn, st)
	for id := range sn.deps {
		if _, ok := sn.entries[id]; !ok {
			return nil, nil, corrupt("dependents under %s of an entry that does not exist", s.l.deps(id))
		}
	}
	if err := st.Validate(); err != nil {
		return nil, nil, corrupt("%v", err)
	}
	return st, orig, nil
}

// View returns the state at one revision.
func (s *Store) View(ctx context.Context) (*state.State, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	sn, err := s.readWhole(ctx)
	if err != nil {
		return nil, err
	}
	st, _, err := s.decode(sn)
	if err != nil {
		return nil, s.explainCorrupt(sn, err)
	}
	return st, nil
}

// Exists reports whether the prefix's format key exists: whether any
// commit was made under it.
func (s *Store) Exists(ctx context.Context) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	var resp *clientv3.GetResponse
	err := s.read(ctx, func(rctx context.Context) (err error) {
		resp, err = s.cli.Get(rctx, s.l.format(), clientv3.WithCountOnly())
		return err
	})
	if err != nil {
		return false, s.fail(ctx, "reading the format key", err)
	}
	return resp.Count > 0, nil
}

// Update is a read-modify-write of the whole state: one read at one
// revision, fn, and one transaction that applies only if no entry or
// dependent changed, none was removed, and the header did not change since
// that revision. On a conflict fn runs again on a fresh read.
func (s *Store) Update(ctx context.Context, fn func(*state.State) (bool, error)) error {
	return s.update(ctx, s.readWhole, func(st *state.State) (bool, error) { return fn(st) })
}

// UpdateBatched is Update: each caller's commit is its own transaction.
func (s *Store) UpdateBatched(ctx context.Context, fn func(*state.State) (bool, error)) error {
	return s.Update(ctx, fn)
}

// UpdateEntries reads only the named entries, their dependents and the
// header, and commits only if none of them changed since: its cost does
// not grow with the number of entries, and commits on other entries do not
// conflict with it (unless they change the header: a new generation).
func (s *Store) UpdateEntries(ctx context.Context, ids []string, fn func(*state.Txn) (bool, error)) error {
	named := slices.Clone(ids)
	slices.Sort(named)
	named = slices.Compact(named)
	for _, id := range named {
		if err := checkID(id); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	if len(named)+5 > MaxTxnOps {
		return fmt.Errorf("%s: %w: %d entries named in one UpdateEntries, at most %d", s, ErrTooBig, len(named), MaxTxnOps-5)
	}
	read := func(ctx context.Context) (*snapshot, error) { return s.readEntries(ctx, named) }
	return s.update(ctx, read, state.EntriesFunc(named, fn))
}

// update is the retry loop of every read-modify-write.
func (s *Store) update(ctx context.Context, read func(context.Context) (*snapshot, error), fn func(*state.State) (bool, error)) error {
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		sn, err := read(ctx)
		if err != nil {
			return err
		}
		st, orig, err := s.decode(sn)
		if err != nil {
			return s.explainCorrupt(sn, err)
		}
		changed, err := fn(st)
		if err != nil || !changed {
			return err
		}
		st.NoteGenerations()
		if err := st.Validate(); err != nil {
			return fmt.Errorf("%s: %w: %w", s, ErrInvalidState, err)
		}
		ok, err := s.commit(ctx, sn, st, orig)
		if err != nil || ok {
			return err
		}
		if attempt >= maxAttempts {
			return fmt.Errorf("%s: %w: gave up after %d attempts", s, ErrContention, attempt+1)
		}
		if err := backoff(ctx, attempt); err != nil {
			return err
		}
	}
}

// backoff waits a random time that grows with attempt (up to 64 ms), so
// that conflicting writers spread out.
func backoff(ctx context.Context, attempt int) error {
	d := time.Duration(mrand.Int64N(int64(100*time.Microsecond)<<min(attempt, 10) + 1))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// txn is one planned commit.
type txn struct {
	cmps  []clientv3.Cmp
	ops   []clientv3.Op
	bytes int
	nonce string // key of its commit record
}

func (t *txn) put(k string, v []byte, opts ...clientv3.OpOption) {
	t.ops = append(t.ops, clientv3.OpPut(k, string(v), opts...))
	t.bytes += len(k) + len(v) + 16
}

func (t *txn) del(k string, opts ...clientv3.OpOption) {
	t.ops = append(t.ops, clientv3.OpDelete(k, opts...))
	t.bytes += 2*len(k) + 16
}

func (t *txn) cmp(c clientv3.Cmp) {
	t.cmps = append(t.cmps, c)
	t.bytes += 2*len(c.KeyBytes()) + 24
}

// plan builds the transaction that turns what sn read into st. orig holds
// the entries as decoded (an entry fn left as it was is not re-encoded);
// nil compares every entry's bytes. It returns nil when nothing changes.
func (s *Store) plan(ctx context.Context, sn *snapshot, st *state.State, orig map[string]*state.Entry) (*txn, error) {
	t := &txn{}
	var scope []string
	if sn.whole {
		scope = make([]string, 0, len(sn.entries)+len(st.Entries))
		for id := range sn.entries {
			scope = append(scope, id)
		}
		for id := range sn.deps {
			scope = append(scope, id)
		}
		for id := range st.Entries {
			scope = append(scope, id)
		}
		slices.Sort(scope)
		scope = slices.Compact(scope)
	} else {
		scope = sn.named
	}
	removed := false
	for _, id := range scope {
		ne := st.Entries[id]
		old, had := sn.entries[id]
		oldDeps := sn.deps[id]
		if ne == nil {
			if had || len(oldDeps) > 0 {
				t.del(s.l.entry(id))
				t.del(s.l.deps(id), clientv3.WithPrefix())
				removed = true
			}
			if _, ok := sn.owners[id]; ok {
				t.del(s.l.owner(id))
			}
			continue
		}
		if had && orig != nil && orig[id] == ne {
			continue
		}
		var oldEntry *state.Entry
		if orig != nil {
			oldEntry = orig[id]
		} else if had {
			oldEntry, _ = decodeEntry(old.val)
		}
		if err := s.planOwner(ctx, t, sn, id, ne, oldEntry); err != nil {
			return nil, err
		}
		body, err := encodeEntry(ne)
		if err != nil {
			return nil, fmt.Errorf("%s: encoding entry %s: %w", s, id, err)
		}
		changed := !had || !bytes.Equal(body, old.val)
		names := make([]string, 0, len(ne.Dependents))
		for name := range ne.Dependents {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			b, err := jsonMarshal(ne.Dependents[name])
			if err != nil {
				return nil, fmt.Errorf("%s: encoding dependent %q of %s: %w", s, name, id, err)
			}
			if ob, ok := oldDeps[name]; !ok || !bytes.Equal(b, ob) {
				var opts []clientv3.OpOption
				if lease, err := s.depLease(ctx, ne.Dependents[name]); err != nil {
					return nil, err
				} else if lease != 0 {
					opts = append(opts, clientv3.WithLease(lease))
				}
				t.put(s.l.dep(id, name), b, opts...)
				changed = true
			}
		}
		for name := range oldDeps {
			if _, ok := ne.Dependents[name]; !ok {
				t.del(s.l.dep(id, name))
				changed = true
			}
		}
		if changed {
			// Also when only dependents changed: the entry key's
			// revision versions the entry with its dependents.
			t.put(s.l.entry(id), body)
		}
	}
	for _, k := range sn.stray {
		t.del(k)
	}
	hb, gb, err := encodeHeader(st)
	if err != nil {
		return nil, fmt.Errorf("%s: encoding the header: %w", s, err)
	}
	differs := func(kv kvRev, b []byte) bool {
		return kv.mod == 0 && string(b) != "{}" || kv.mod != 0 && !bytes.Equal(b, kv.val)
	}
	if differs(sn.head, hb) {
		t.put(s.l.header(), hb)
	}
	genWritten := differs(sn.gen, gb)
	if genWritten {
		t.put(s.l.generation(), gb)
	}
	if len(t.ops) == 0 {
		return nil, nil
	}
	t.nonce = s.l.nonce(newNonce())
	if removed {
		t.put(s.l.removals(), []byte(t.nonce))
	}
	if sn.format.mod == 0 {
		// The first commit under the prefix: it must neither hold another
		// cache's prefix nor lie inside one. Two such prefixes begun at
		// once each looked before the other existed: the compares below
		// let only the first to commit through, and the other's next try
		// finds it.
		inner, seen, err := s.nestedPrefixAt(ctx)
		if err != nil {
			return nil, err
		} else if inner != "" {
			return nil, fmt.Errorf("%s: %w: the depcache prefix %s lies inside %s: give each cache a prefix that neither holds nor lies in another's", s, ErrNestedPrefix, inner, s.l.p)
		}
		outer, err := s.outerPrefix(ctx)
		if err != nil {
			return nil, err
		} else if outer != "" {
			return nil, fmt.Errorf("%s: %w: prefix %s lies inside the depcache prefix %s (it has %s): give each cache a prefix that neither holds nor lies in another's",
				s, ErrNestedPrefix, s.l.p, outer, layout{p: outer}.format())
		}
		if firstCommitHook != nil {
			firstCommitHook()
		}
		under := s.l.p + "/"
		t.cmp(clientv3.Compare(clientv3.ModRevision(under).WithRange(clientv3.GetPrefixRangeEnd(under)), "<", seen+1))
		for _, a := range ancestorPrefixes(s.l.p) {
			t.cmp(clientv3.Compare(clientv3.CreateRevision(layout{p: a}.format()), "=", 0))
		}
		fb, _ := jsonMarshal(format{Version: FormatVersion})
		t.put(s.l.format(), fb)
	}
	// Binding an unbound prefix puts the root's ID; it is read, or made,
	// only after the size check below, so that a commit too big to send
	// leaves no ID file behind (which would bind the root for nothing).
	bindAt := -1
	checkBound := false
	if s.root != "" && !s.bound.Load() {
		if sn.rootID == "" {
			bindAt = len(t.ops)
			t.put(s.l.rootID(), make([]byte, 32))
			t.cmp(clientv3.Compare(clientv3.CreateRevision(s.l.rootID()), "=", 0))
		} else {
			checkBound = true
		}
	}
	lease, err := s.recordLease(ctx)
	if err != nil {
		return nil, err
	}
	t.ops = append(t.ops, clientv3.OpPut(t.nonce, committedMark, clientv3.WithLease(lease)))
	t.bytes += len(t.nonce) + 32
	t.cmp(clientv3.Compare(clientv3.CreateRevision(t.nonce), "=", 0))
	if sn.whole {
		start, end := s.l.stateRange()
		t.cmp(clientv3.Compare(clientv3.ModRevision(start).WithRange(end), "<", sn.rev+1))
		t.cmp(clientv3.Compare(clientv3.ModRevision(s.l.removals()), "=", sn.x))
	} else {
		for _, id := range sn.named {
			t.cmp(clientv3.Compare(clientv3.ModRevision(s.l.entry(id)), "=", sn.entries[id].mod))
		}
	}
	t.cmp(clientv3.Compare(clientv3.ModRevision(s.l.header()), "=", sn.head.mod))
	if sn.whole || genWritten {
		// Raising the generation must not lose another raise; a commit
		// that does not raise it depends on no more than that no
		// generation it wrote exceeds the one it saw.
		t.cmp(clientv3.Compare(clientv3.ModRevision(s.l.generation()), "=", sn.gen.mod))
	}
	t.cmp(clientv3.Compare(clientv3.ModRevision(s.l.format()), "=", sn.format.mod))
	if len(t.ops) > MaxTxnOps || len(t.cmps) > MaxTxnOps || t.bytes > MaxRequestBytes-16*1024 {
		return nil, fmt.Errorf("%s: %w: %d operations, %d compares, about %d bytes (limits %d operations, %d bytes); nothing was written",
			s, ErrTooBig, len(t.ops), len(t.cmps), t.bytes, MaxTxnOps, MaxRequestBytes)
	}
	switch {
	case bindAt >= 0:
		id, err := s.ensureRootID()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s, err)
		}
		// Recorded before the commit that binds: a prefix that fails to
		// commit may try again, and a second one is refused meanwhile.
		if err := s.recordRootPrefix(); err != nil {
			return nil, fmt.Errorf("%s: %w", s, err)
		}
		t.ops[bindAt] = clientv3.OpPut(s.l.rootID(), id)
	case checkBound:
		if err := s.checkBoundTo(sn.rootID); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// commit plans and sends one transaction. It returns false, nil when a
// compare failed (fn must run again).
func (s *Store) commit(ctx context.Context, sn *snapshot, st *state.State, orig map[string]*state.Entry) (bool, error) {
	t, err := s.plan(ctx, sn, st, orig)
	if err != nil || t == nil {
		return t == nil && err == nil, err
	}
	ok, err := s.send(ctx, t)
	if ok {
		s.commits.Add(1)
		if s.root != "" {
			s.bound.Store(true)
		}
	} else if err == nil {
		s.conflicts.Add(1)
	}
	return ok, err
}

// send sends t; a lost answer is settled by reading back its commit record.
func (s *Store) send(ctx context.Context, t *txn) (bool, error) {
	rctx, cancel := s.rctx(ctx)
	resp, err := s.cli.Txn(rctx).If(t.cmps...).Then(t.ops...).Commit()
	cancel()
	if err == nil {
		s.saw(resp.Header.Revision)
		return resp.Succeeded, nil
	}
	if errors.Is(err, rpctypes.ErrGRPCLeaseNotFound) || errors.Is(err, rpctypes.ErrLeaseNotFound) {
		// A lease expired under us (a long pause): the records' (take
		// a new one), the session's (its dependents are gone: start a
		// new session) or a dependent's own. Run fn again.
		s.leaseMu.Lock()
		s.lease = 0
		s.leaseMu.Unlock()
		s.checkSession(ctx)
		return false, nil
	}
	if definite(err) {
		if errors.Is(err, rpctypes.ErrGRPCTooManyOps) || errors.Is(err, rpctypes.ErrGRPCRequestTooLarge) ||
			errors.Is(err, rpctypes.ErrTooManyOps) || errors.Is(err, rpctypes.ErrRequestTooLarge) {
			return false, fmt.Errorf("%s: %w: %w", s, ErrTooBig, err)
		}
		return false, s.fail(ctx, "commit", err)
	}
	s.settled.Add(1)
	ok, serr := s.settleNonce(ctx, t.nonce)
	if serr != nil {
		return false, fmt.Errorf("%s: commit: %v; %w", s, err, serr)
	}
	if !ok {
		if ctx.Err() != nil {
			return false, fmt.Errorf("%s: commit: %w", s, ctx.Err())
		}
		// Fenced: it can never apply. Run fn again.
	}
	return ok, nil
}

// definite reports whether err says the server refused the request, so
// that it certainly did not apply.
func definite(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.ResourceExhausted, codes.PermissionDenied, codes.Unauthenticated,
		codes.FailedPrecondition, codes.OutOfRange, codes.Unimplemented, codes.NotFound:
		return true
	}
	return false
}

// settleNonce finds out whether the commit whose record is nonce applied.
// If it did not, it makes sure it never will: it creates the record
// itself, marked aborted, which fails the commit's compare on it. The
// caller's context may have ended: settling goes on for up to the settle
// timeout regardless, since the caller must learn the outcome.
func (s *Store) settleNonce(ctx context.Context, nonce string) (bool, error) {
	sctx := context.WithoutCancel(ctx)
	deadline := time.Now().Add(s.settle)
	var last error
	for attempt := 0; time.Now().Before(deadline); attempt++ {
		lease, err := s.recordLease(sctx)
		if err != nil {
			last = err
			_ = backoff(sctx, attempt+4)
			continue
		}
		rctx, cancel := s.rctx(sctx)
		resp, err := s.cli.Txn(rctx).
			If(clientv3.Compare(clientv3.CreateRevision(nonce), "=", 0)).
			Then(clientv3.OpPut(nonce, abortedMark, clientv3.WithLease(lease))).
			Else(clientv3.OpGet(nonce)).Commit()
		cancel()
		if err == nil {
			if resp.Succeeded {
				return false, nil
			}
			r, _ := one(rangeResp(resp, 0))
			return string(r.val) == committedMark, nil
		}
		last = err
		_ = backoff(sctx, attempt+4)
	}
	return false, outcomeUnknown(fmt.Sprintf("reading back %s for %s", nonce, s.settle), last)
}

// outcomeUnknown is the error of a commit whose answer was lost and whose
// read-back (what) failed with err. It wraps ErrUnavailable too when the
// read-back failed for want of the cluster (no leader, no quorum, no
// member reachable in time), which is what an operator then has to fix.
func outcomeUnknown(what string, err error) error {
	if errors.Is(err, ErrUnavailable) || transient(err) || errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded {
		return fmt.Errorf("%w: %w: %s: %v", ErrOutcomeUnknown, ErrUnavailable, what, err)
	}
	return fmt.Errorf("%w: %s: %v", ErrOutcomeUnknown, what, err)
}

// recordLease returns the lease of this store's commit records, granting a
// new one when less than half of the current one's TTL is left on our
// clock. Records, and the aborted marks that fence lost commits, thus
// outlive any settling by minutes and then vanish by themselves.
func (s *Store) recordLease(ctx context.Context) (clientv3.LeaseID, error) {
	s.leaseMu.Lock()
	defer s.leaseMu.Unlock()
	if s.lease != 0 && time.Since(s.leaseAt) < recordTTL/2 {
		return s.lease, nil
	}
	at := time.Now()
	g, err := s.grant(ctx, int64(recordTTL/time.Second))
	if err != nil {
		return 0, s.fail(ctx, "granting the commit records' lease", err)
	}
	s.lease, s.leaseAt = g.ID, at
	return g.ID, nil
}

// grant grants a lease of secs, trying again as read does.
func (s *Store) grant(ctx context.Context, secs int64) (g *clientv3.LeaseGrantResponse, err error) {
	err = s.read(ctx, func(rctx context.Context) (err error) {
		g, err = s.cli.Grant(rctx, secs)
		return err
	})
	return g, err
}

func newNonce() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Reset replaces every state key under the prefix with what fn builds, in
// one transaction (ErrTooBig when that does not fit). fn gets the current
// state as last when it parses. The replaced keys stay readable at the
// revision Replaced.LastFile names until the cluster compacts it.
// MaxGeneration never goes down, so that no generation is reused.
func (s *Store) Reset(ctx context.Context, fn func(st, last *state.State) error) (state.Replaced, error) {
	var rep state.Replaced
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		sn, err := s.readWhole(ctx)
		if err != nil {
			return rep, err
		}
		if inner, err := s.nestedPrefix(ctx); err != nil {
			return rep, err
		} else if inner != "" {
			// Its keys look like strays of this prefix: a rebuild would
			// delete them.
			return rep, fmt.Errorf("%s: %w: the depcache prefix %s lies inside %s; nothing was changed: move one of them to a prefix of its own first", s, ErrNestedPrefix, inner, s.l.p)
		}
		rep = state.Replaced{}
		oldMax := uint64(0)
		if last, _, derr := s.decode(sn); derr == nil {
			rep.Last = last
			rep.LastFile = fmt.Sprintf("%s at revision %d", s, sn.rev)
			oldMax = last.MaxGeneration
		} else if sn.format.mod != 0 || len(sn.entries) > 0 || sn.head.mod != 0 || sn.gen.mod != 0 || len(sn.stray) > 0 {
			rep.UnreadableErr = derr
			rep.Unreadable = fmt.Sprintf("%s at revision %d", s, sn.rev)
			var h header
			if strict(sn.gen.val, &h) == nil {
				oldMax = h.MaxGeneration
			}
		}
		st := state.New()
		if err := fn(st, rep.Last); err != nil {
			return rep, err
		}
		st.NoteGenerations()
		st.MaxGeneration = max(st.MaxGeneration, oldMax)
		if err := st.Validate(); err != nil {
			return rep, fmt.Errorf("%s: %w: %w", s, ErrInvalidState, err)
		}
		ok, err := s.commit(ctx, sn, st, nil)
		if err != nil || ok {
			return rep, err
		}
		if attempt >= maxAttempts {
			return rep, fmt.Errorf("%s: %w: gave up after %d attempts", s, ErrContention, attempt+1)
		}
		if err := backoff(ctx, attempt); err != nil {
			return rep, err
		}
	}
}

var _ state.Backend = (*Store)(nil)
