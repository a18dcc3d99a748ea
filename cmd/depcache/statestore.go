package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	"github.com/spf13/pflag"
)

// stateFlags choose the state store: the file store in the root (the
// default) or etcd (--state etcd://HOST:PORT,.../PREFIX), with etcd's TLS
// and auth flags named as etcdctl names them. The password comes only
// from the environment (DEPCACHE_ETCD_PASSWORD), never from a flag that
// ps would show.
type stateFlags struct {
	url    string
	cacert string
	cert   string
	key    string
	user   string
	// locksOnly opens the etcd store unbound to the root: `lock` and
	// `locks` coordinate hosts and touch no content, so hosts whose roots
	// differ (no shared filesystem) may share a prefix for them.
	locksOnly bool
	// adoptRoot: etcdstore.Options.AdoptRoot (doctor --rebuild).
	adoptRoot bool

	once  sync.Once
	store state.Backend
	err   error
	// etcdOpts are the options the etcd store was opened with, kept for
	// the checks doctor runs when it could not be (ClusterChecks).
	etcdOpts *etcdstore.Options
}

func (f *stateFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.url, "state", "", "state store: empty for the file store in the root, or etcd://HOST:PORT[,HOST:PORT...]/PREFIX (env DEPCACHE_STATE)")
	fs.StringVar(&f.cacert, "etcd-cacert", "", "verify the etcd servers with this CA bundle (PEM)")
	fs.StringVar(&f.cert, "etcd-cert", "", "client certificate for etcd (PEM; with --etcd-key)")
	fs.StringVar(&f.key, "etcd-key", "", "client key for etcd (PEM; with --etcd-cert)")
	fs.StringVar(&f.user, "etcd-user", "", "etcd user; the password is read from DEPCACHE_ETCD_PASSWORD")
}

// stateStore returns the store the flags choose, opened once per command:
// nil for the file store in the root (manager.Config's default).
func (g *globals) stateStore() (state.Backend, error) {
	f := &g.state
	f.once.Do(func() {
		ctx := g.ctx
		if ctx == nil {
			ctx = context.Background()
		}
		f.store, f.err = f.open(ctx, g)
	})
	return f.store, f.err
}

// closeStore closes the store the command opened, if it has a Close (the
// etcd store's client and its session): a process-bound dependent then ends
// with the command at once, not when etcd times its lease out.
func (g *globals) closeStore() {
	if c, ok := g.state.store.(io.Closer); ok && c != nil {
		if err := c.Close(); err != nil {
			g.log.WithError(err).Debug("closing the state store")
		}
	}
}

// check refuses, before anything is read, flags that cannot name a store:
// a bad URL, a TLS file that does not load, a password without a user, the
// etcd flags without --state. Every command checks them first, so that a
// bad flag is reported as one (exit 2) whatever else is wrong.
func (f *stateFlags) check() error {
	if f.url == "" || f.url == "file" {
		if f.cacert != "" || f.cert != "" || f.key != "" || f.user != "" {
			return fmt.Errorf("--etcd-* flags: %w: they need --state etcd://HOST:PORT/PREFIX", errBadFlag)
		}
		return nil
	}
	if _, _, err := etcdstore.ParseURL(f.url); err != nil {
		return fmt.Errorf("--state: %w: %w", errBadFlag, err)
	}
	if _, err := f.tls(); err != nil {
		return err
	}
	if f.user == "" && os.Getenv("DEPCACHE_ETCD_PASSWORD") != "" {
		return fmt.Errorf("DEPCACHE_ETCD_PASSWORD: %w: it needs --etcd-user", errBadFlag)
	}
	if _, pw := f.credentials(); f.user != "" && pw == "" {
		// The etcd client authenticates only with both: a user alone
		// would run unauthenticated, silently.
		return fmt.Errorf("--etcd-user %s: %w: no password: set DEPCACHE_ETCD_PASSWORD (or give USER:PASSWORD, as etcdctl --user takes it)", strings.SplitN(f.user, ":", 2)[0], errBadFlag)
	}
	return nil
}

// credentials are the etcd user and password: --etcd-user USER with
// DEPCACHE_ETCD_PASSWORD, or USER:PASSWORD as etcdctl --user takes it.
func (f *stateFlags) credentials() (user, password string) {
	if u, pw, ok := strings.Cut(f.user, ":"); ok {
		return u, pw
	}
	return f.user, os.Getenv("DEPCACHE_ETCD_PASSWORD")
}

func (f *stateFlags) open(ctx context.Context, g *globals) (state.Backend, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	if f.url == "" || f.url == "file" {
		return nil, nil
	}
	endpoints, prefix, err := etcdstore.ParseURL(f.url)
	if err != nil {
		return nil, fmt.Errorf("--state: %w: %w", errBadFlag, err)
	}
	tc, err := f.tls()
	if err != nil {
		return nil, err
	}
	root, err := filepath.Abs(g.root)
	if err != nil {
		return nil, fmt.Errorf("--root %q: %w", g.root, err)
	}
	perms := state.DefaultPerms()
	if g.group {
		perms = state.GroupPerms()
	}
	if f.locksOnly {
		root = ""
	}
	user, password := f.credentials()
	opts := etcdstore.Options{Endpoints: endpoints, Prefix: prefix, TLS: tc, Root: root, Perms: perms, AdoptRoot: f.adoptRoot,
		Username: user, Password: password}
	f.etcdOpts = &opts
	s, err := etcdstore.Open(ctx, opts)
	if err != nil {
		if errors.Is(err, etcdstore.ErrBadURL) {
			return nil, fmt.Errorf("--state: %w: %w", errBadFlag, err)
		}
		return nil, err
	}
	return s, nil
}

// tls builds the TLS configuration of the etcd flags, nil when none is set.
func (f *stateFlags) tls() (*tls.Config, error) {
	if f.cacert == "" && f.cert == "" && f.key == "" {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.cacert != "" {
		pem, err := os.ReadFile(f.cacert)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cacert: %w: %w", errBadFlag, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-cacert %s: %w: no PEM certificate in it", f.cacert, errBadFlag)
		}
		tc.RootCAs = pool
	}
	switch {
	case f.cert != "" && f.key != "":
		pair, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert %s, --etcd-key %s: %w: %w", f.cert, f.key, errBadFlag, err)
		}
		tc.Certificates = []tls.Certificate{pair}
	case f.cert != "" || f.key != "":
		return nil, fmt.Errorf("--etcd-cert and --etcd-key: %w: give both or neither (%s)", errBadFlag, strings.TrimSpace(f.cert+" "+f.key))
	}
	return tc, nil
}

// plainState is stateStore for plainConfig, which returns no error: a
// store that could not be opened answers every call with why.
func (g *globals) plainState() state.Backend {
	s, err := g.stateStore()
	switch {
	case err != nil && g.state.etcdOpts != nil && errors.Is(err, etcdstore.ErrUnavailable):
		return unreachedEtcd{unopened{err}, *g.state.etcdOpts}
	case err != nil:
		return unopened{err}
	}
	return s
}

// unreachedEtcd is an etcd store that did not answer when opened: doctor
// still gets each member's status from it (etcdstore.ClusterChecks), which
// is what an operator needs to see when the cluster has lost its quorum.
type unreachedEtcd struct {
	unopened
	opts etcdstore.Options
}

func (u unreachedEtcd) Checks(ctx context.Context) []state.Check {
	return etcdstore.ClusterChecks(ctx, u.opts)
}
func (u unreachedEtcd) Holder() string                            { return "" }
func (u unreachedEtcd) BreakHolder(context.Context, string) error { return u.err }

// unopened is a state store that failed to open.
type unopened struct{ err error }

func (u unopened) View(context.Context) (*state.State, error) { return nil, u.err }
func (u unopened) Update(context.Context, func(*state.State) (bool, error)) error {
	return u.err
}
func (u unopened) UpdateBatched(context.Context, func(*state.State) (bool, error)) error {
	return u.err
}
func (u unopened) UpdateEntries(context.Context, []string, func(*state.Txn) (bool, error)) error {
	return u.err
}
func (u unopened) Reset(context.Context, func(st, last *state.State) error) (state.Replaced, error) {
	return state.Replaced{}, u.err
}
func (u unopened) Exists(context.Context) (bool, error) { return false, u.err }
func (u unopened) String() string                       { return "state store (not opened: " + u.err.Error() + ")" }
