package etcdstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/state/storetest"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// open opens a store on endpoints under prefix, closed by t's cleanup.
func open(t testing.TB, endpoints []string, prefix string, mod ...func(*Options)) *Store {
	t.Helper()
	// Open's first request waits longer than its default 2 s: CI shares a
	// 2-core machine whose load can hold a healthy cluster's answer back.
	opts := Options{Endpoints: endpoints, Prefix: prefix, DialTimeout: 20 * time.Second}
	for _, m := range mod {
		m(&opts)
	}
	s, err := Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func runID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// conformance runs storetest on endpoints, each name under a prefix of
// its own below base.
func conformance(t *testing.T, endpoints []string, base string) {
	var mu sync.Mutex
	prefixes := map[string]string{}
	storetest.Run(t, func(t *testing.T, name string) state.Backend {
		mu.Lock()
		p, ok := prefixes[t.Name()+"/"+name]
		if !ok {
			p = fmt.Sprintf("%s/%d", base, len(prefixes))
			prefixes[t.Name()+"/"+name] = p
		}
		mu.Unlock()
		return open(t, endpoints, p)
	})
}

// TestConformanceEmbedded runs the Backend conformance suite on a real
// etcd member embedded in the test process.
func TestConformanceEmbedded(t *testing.T) {
	m := etcdtest.Start(t)
	conformance(t, []string{m.Endpoint}, "/conformance")
}

// TestConformanceRig runs it on the 3-member cluster of the etcd rig.
func TestConformanceRig(t *testing.T) {
	eps := rigtest.Etcd(t)
	base := "/depcache-test/" + runID()
	t.Cleanup(func() { deletePrefix(t, eps, base) })
	conformance(t, eps, base)
}

func deletePrefix(t testing.TB, eps []string, p string) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Log(err)
		return
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, p+"/", clientv3.WithPrefix()); err != nil {
		t.Log(err)
	}
}

func testKey(i int) state.Key {
	return state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://example.com/etcdstore/%d", i)}
}

func testEntry(i int) *state.Entry {
	return &state.Entry{Key: testKey(i), Stage: state.Downloading, Generation: uint64(i + 1),
		Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func put(t testing.TB, s state.Backend, es ...*state.Entry) {
	t.Helper()
	err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		for _, e := range es {
			st.Put(e)
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func keys(t testing.TB, cli *clientv3.Client, prefix string) map[string]string {
	t.Helper()
	resp, err := cli.Get(context.Background(), prefix+"/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		out[strings.TrimPrefix(string(kv.Key), prefix)] = string(kv.Value)
	}
	return out
}

func TestParseURL(t *testing.T) {
	good := []struct {
		in     string
		eps    []string
		prefix string
	}{
		{"etcd://127.0.0.1:2379/depcache", []string{"127.0.0.1:2379"}, "/depcache"},
		{"etcd://a:1,b:2,[::1]:3/team/ci/", []string{"a:1", "b:2", "[::1]:3"}, "/team/ci"},
	}
	for _, g := range good {
		eps, p, err := ParseURL(g.in)
		if err != nil || strings.Join(eps, " ") != strings.Join(g.eps, " ") || p != g.prefix {
			t.Errorf("ParseURL(%q) = %v %q %v", g.in, eps, p, err)
		}
	}
	for _, in := range []string{"http://a:1/p", "etcd://a:1", "etcd://a:1/", "etcd:///p", "etcd://a/p", "etcd://a:0/p",
		"etcd://a:1,/p", "etcd://a:1/p//q", "etcd://a:1/p/../q", "etcd://a:1/p\x00", "etcd://a:x/p",
		"etcd://a:1/p?x=y", "etcd://a:1/p#frag", "etcd://u:pw@a:1/p", "etcd://a:99999/p",
		"etcd://a b:1/p", "etcd://a:+1/p", "etcd://a:-1/p", "etcd://a\tb:1/p", "etcd://a:1/p ", "etcd://a:1/ p/q", "etcd://a:1/p /q"} {
		if _, _, err := ParseURL(in); !errors.Is(err, ErrBadURL) {
			t.Errorf("ParseURL(%q): %v, want ErrBadURL", in, err)
		}
	}
	for in, want := range map[string]string{
		"etcd://a:99999/p":  "port 99999 out of range",
		"etcd://u:pw@a:1/p": "credentials do not go in the URL",
		"etcd://a:1/p?x=y":  "query or fragment",
		"etcd://a b:1/p":    "space or control character",
		"etcd://a:+1/p":     "want HOST:PORT",
		"etcd://a:1/p ":     "begins or ends with a space",
	} {
		if _, _, err := ParseURL(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseURL(%q): %v, want it to say %q", in, err, want)
		}
	}
}

// TestLayout checks the keys a commit writes: dependents named by the hex
// of their names, whatever the names hold.
func TestLayout(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/layout")
	e := testEntry(1)
	names := []string{"job/1", "../../x", "名前", "a\x00b"}
	e.Dependents = map[string]state.Dependent{}
	for _, n := range names {
		e.Dependents[n] = state.Dependent{Since: e.Created}
	}
	put(t, s, e)
	got := keys(t, s.Client(), "/layout")
	id := testKey(1).ID()
	want := []string{"/format", "/g", "/e/" + id, "/root-id"}
	for _, n := range names {
		want = append(want, "/d/"+id+"/"+hex.EncodeToString([]byte(n)))
	}
	for _, k := range want[:3] {
		if _, ok := got[k]; !ok {
			t.Errorf("no key %s in %v", k, got)
		}
	}
	for _, k := range want[4:] {
		if _, ok := got[k]; !ok {
			t.Errorf("no dependent key %s", k)
		}
	}
	if _, ok := got[want[3]]; ok {
		t.Error("a store without a root wrote a root ID")
	}
	if strings.Contains(got["/e/"+id], "dependents") {
		t.Errorf("the entry's value holds its dependents: %s", got["/e/"+id])
	}
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !st.Get(testKey(1)).Equal(e) {
		t.Errorf("read back %+v, want %+v", st.Get(testKey(1)), e)
	}
	// Releasing every dependent and then the entry leaves no keys of it.
	err = s.UpdateEntries(context.Background(), []string{id}, func(tx *state.Txn) (bool, error) {
		tx.Delete(testKey(1))
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for k := range keys(t, s.Client(), "/layout") {
		if strings.Contains(k, id) {
			t.Errorf("key %s left after the entry was deleted", k)
		}
	}
}

// TestCommitsConflictOnlyOnWhatTheyRead: an UpdateEntries commit is not
// refused by a commit on another entry, but is by one on its own; a
// whole-state commit is refused by any change, a removal included.
func TestCommitsConflictOnlyOnWhatTheyRead(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	a := open(t, []string{m.Endpoint}, "/conflicts")
	b := open(t, []string{m.Endpoint}, "/conflicts")
	put(t, a, testEntry(1), testEntry(2), testEntry(3))
	bump := func(s *Store, i int) {
		t.Helper()
		err := s.UpdateEntries(ctx, []string{testKey(i).ID()}, func(tx *state.Txn) (bool, error) {
			c := tx.Get(testKey(i)).Clone()
			c.Progress.Heartbeat++
			tx.Put(c)
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// commitAfter reads as read does, lets other run, then tries to commit
	// a heartbeat bump of entry i on what it read.
	commitAfter := func(read func(context.Context) (*snapshot, error), i int, other func()) bool {
		t.Helper()
		sn, err := read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		st, orig, err := a.decode(sn)
		if err != nil {
			t.Fatal(err)
		}
		c := st.Get(testKey(i)).Clone()
		c.Progress.Heartbeat += 100
		st.Put(c)
		other()
		ok, err := a.commit(ctx, sn, st, orig)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	entries := func(i int) func(context.Context) (*snapshot, error) {
		return func(ctx context.Context) (*snapshot, error) { return a.readEntries(ctx, []string{testKey(i).ID()}) }
	}
	if !commitAfter(entries(1), 1, func() { bump(b, 2) }) {
		t.Error("an UpdateEntries commit on entry 1 was refused after a commit on entry 2")
	}
	if commitAfter(entries(1), 1, func() { bump(b, 1) }) {
		t.Error("an UpdateEntries commit on entry 1 applied over another commit on entry 1")
	}
	if commitAfter(a.readWhole, 1, func() { bump(b, 3) }) {
		t.Error("a whole-state commit applied over a commit on another entry")
	}
	if commitAfter(a.readWhole, 1, func() {
		if err := b.UpdateEntries(ctx, []string{testKey(3).ID()}, func(tx *state.Txn) (bool, error) {
			tx.Delete(testKey(3))
			return true, nil
		}); err != nil {
			t.Fatal(err)
		}
	}) {
		t.Error("a whole-state commit applied over the removal of an entry it read")
	}
	// Dependents: a release on one dependent conflicts with a release
	// of another dependent of the same entry (both may decide the entry
	// has no dependent left).
	withDeps := testEntry(4)
	withDeps.Dependents = map[string]state.Dependent{"x": {}, "y": {}}
	put(t, a, withDeps)
	sn, err := a.readEntries(ctx, []string{testKey(4).ID()})
	if err != nil {
		t.Fatal(err)
	}
	st, orig, _ := a.decode(sn)
	c := st.Get(testKey(4)).Clone()
	delete(c.Dependents, "x")
	st.Put(c)
	if err := b.UpdateEntries(ctx, []string{testKey(4).ID()}, func(tx *state.Txn) (bool, error) {
		c := tx.Get(testKey(4)).Clone()
		delete(c.Dependents, "y")
		tx.Put(c)
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	if ok, err := a.commit(ctx, sn, st, orig); ok || err != nil {
		t.Errorf("a release of x applied over a release of y it did not see: %v, %v", ok, err)
	}
}

// TestTooBig: a commit beyond one transaction's limits is refused whole.
func TestTooBig(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/toobig")
	put(t, s, testEntry(0))
	err := s.Update(ctx, func(st *state.State) (bool, error) {
		for i := range 200 {
			st.Put(testEntry(i + 1))
		}
		return true, nil
	})
	if !errors.Is(err, ErrTooBig) {
		t.Errorf("200 new entries in one commit: %v, want ErrTooBig", err)
	}
	err = s.UpdateEntries(ctx, []string{testKey(0).ID()}, func(tx *state.Txn) (bool, error) {
		c := tx.Get(testKey(0)).Clone()
		c.Message = strings.Repeat("x", 2<<20)
		tx.Put(c)
		return true, nil
	})
	if !errors.Is(err, ErrTooBig) {
		t.Errorf("a 2 MiB entry: %v, want ErrTooBig", err)
	}
	st, err := s.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Entries) != 1 || st.Get(testKey(0)).Message != "" {
		t.Errorf("a refused commit wrote: %d entries", len(st.Entries))
	}
	// A first commit too big to send, from a root that has no ID yet (a
	// move from the file store): the root is left without one, so that
	// it is still the file store's.
	root := t.TempDir()
	fresh := open(t, []string{m.Endpoint}, "/toobig-root", func(o *Options) { o.Root = root })
	err = fresh.Update(ctx, func(st *state.State) (bool, error) {
		for i := range 200 {
			st.Put(testEntry(i))
		}
		return true, nil
	})
	if !errors.Is(err, ErrTooBig) {
		t.Errorf("a first commit of 200 entries: %v, want ErrTooBig", err)
	}
	if _, err := os.Stat(filepath.Join(root, RootIDFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused first commit left the root an ID file: %v", err)
	}
}

// TestSettle: a commit record read back says whether its commit applied,
// and one that did not can never apply afterwards.
func TestSettle(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/settle")
	sn, err := s.readEntries(ctx, []string{testKey(1).ID()})
	if err != nil {
		t.Fatal(err)
	}
	st, orig, _ := s.decode(sn)
	st.Put(testEntry(1))
	tx, err := s.plan(ctx, sn, st, orig)
	if err != nil {
		t.Fatal(err)
	}
	// The answer to tx is "lost": settle before sending it.
	if ok, err := s.settleNonce(ctx, tx.nonce); ok || err != nil {
		t.Fatalf("settling a commit never sent: %v, %v", ok, err)
	}
	if ok, err := s.send(ctx, tx); ok || err != nil {
		t.Errorf("a commit settled as not applied applied later: %v, %v", ok, err)
	}
	if st, _ := s.View(ctx); len(st.Entries) != 0 {
		t.Errorf("the fenced commit wrote %d entries", len(st.Entries))
	}
	// A commit that applied settles as applied.
	tx, err = s.plan(ctx, sn, st, orig)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := s.send(ctx, tx); !ok || err != nil {
		t.Fatalf("commit: %v, %v", ok, err)
	}
	if ok, err := s.settleNonce(ctx, tx.nonce); !ok || err != nil {
		t.Errorf("settling a commit that applied: %v, %v", ok, err)
	}
	// Commit records vanish by themselves: they are on a lease.
	resp, err := s.Client().Get(ctx, s.l.noncePrefix(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if kv.Lease == 0 {
			t.Errorf("commit record %s is on no lease", kv.Key)
		}
	}
	if len(resp.Kvs) != 2 {
		t.Errorf("%d commit records, want 2 (one aborted, one committed)", len(resp.Kvs))
	}
}

// TestCorrupt: a value that does not parse is an error naming its key,
// the callback is not called and nothing is deleted; Reset replaces it.
func TestCorrupt(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/corrupt")
	put(t, s, testEntry(1), testEntry(2))
	bad := s.l.entry(testKey(2).ID())
	if _, err := s.Client().Put(ctx, bad, `{"key":`); err != nil {
		t.Fatal(err)
	}
	if _, err := s.View(ctx); !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), bad) {
		t.Errorf("View of a corrupt entry: %v", err)
	}
	called := false
	if err := s.Update(ctx, func(*state.State) (bool, error) { called = true; return true, nil }); !errors.Is(err, state.ErrCorrupt) || called {
		t.Errorf("Update on a corrupt state: %v, called %v", err, called)
	}
	if got := keys(t, s.Client(), "/corrupt"); got["/e/"+testKey(2).ID()] != `{"key":` || len(got) < 4 {
		t.Errorf("keys after refusing a corrupt state: %v", got)
	}
	rep, err := s.Reset(ctx, func(st, last *state.State) error {
		if last != nil {
			t.Error("Reset handed over a state that does not parse")
		}
		st.Put(testEntry(3))
		return nil
	})
	if err != nil || !errors.Is(rep.UnreadableErr, state.ErrCorrupt) {
		t.Fatalf("Reset: %v, unreadable %v", err, rep.UnreadableErr)
	}
	st, err := s.View(ctx)
	if err != nil || len(st.Entries) != 1 || st.Get(testKey(3)) == nil || st.MaxGeneration < 3 {
		t.Errorf("after Reset: %v, %+v", err, st)
	}
	// A newer layout is refused by name, at Open already.
	if _, err := s.Client().Put(ctx, s.l.format(), `{"version":99}`); err != nil {
		t.Fatal(err)
	}
	if _, err := s.View(ctx); !errors.Is(err, state.ErrUnsupportedVersion) {
		t.Errorf("View of a newer layout: %v", err)
	}
	if _, err := Open(ctx, Options{Endpoints: []string{m.Endpoint}, Prefix: "/corrupt"}); !errors.Is(err, state.ErrUnsupportedVersion) {
		t.Errorf("Open of a newer layout: %v", err)
	}
}

// TestRootID: the first commit binds the prefix to its root; another root
// is refused, naming both IDs.
func TestRootID(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	eps := []string{m.Endpoint}
	rootA, rootB := filepath.Join(t.TempDir(), "a"), t.TempDir()
	a := open(t, eps, "/bound", func(o *Options) { o.Root = rootA })
	put(t, a, testEntry(1))
	b, err := os.ReadFile(filepath.Join(rootA, RootIDFile))
	if err != nil {
		t.Fatal(err)
	}
	idA := strings.TrimSpace(string(b))
	if got := keys(t, a.Client(), "/bound")["/root-id"]; got != idA {
		t.Fatalf("prefix root ID %q, root's %q", got, idA)
	}
	// The same root opens again; another one does not.
	open(t, eps, "/bound", func(o *Options) { o.Root = rootA })
	_, err = Open(ctx, Options{Endpoints: eps, Prefix: "/bound", Root: rootB})
	if !errors.Is(err, ErrRootMismatch) || !strings.Contains(err.Error(), idA) || !strings.Contains(err.Error(), rootB) {
		t.Errorf("a root without an ID on a bound prefix: %v", err)
	}
	if err := os.WriteFile(filepath.Join(rootB, RootIDFile), []byte(strings.Repeat("b", 32)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = Open(ctx, Options{Endpoints: eps, Prefix: "/bound", Root: rootB})
	if !errors.Is(err, ErrRootMismatch) || !strings.Contains(err.Error(), idA) || !strings.Contains(err.Error(), strings.Repeat("b", 32)) {
		t.Errorf("a root with another ID: %v", err)
	}
	// Two roots racing to bind one new prefix: one wins, the other's
	// commit is refused.
	rootC := filepath.Join(t.TempDir(), "c")
	c := open(t, eps, "/race", func(o *Options) { o.Root = rootC })
	d := open(t, eps, "/race", func(o *Options) { o.Root = rootB })
	put(t, c, testEntry(1))
	if err := d.Update(ctx, func(st *state.State) (bool, error) { st.Put(testEntry(2)); return true, nil }); !errors.Is(err, ErrRootMismatch) {
		t.Errorf("a commit from another root on a prefix bound meanwhile: %v", err)
	}
}

// TestRootBoundElsewhere: a root that has an ID and published content is
// bound to its prefix; another, unbound prefix is refused for it (both
// would describe its content, and each would evict what the other's runs
// hold), unless AdoptRoot (a forced rebuild onto a prefix that was lost).
func TestRootBoundElsewhere(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	eps := []string{m.Endpoint}
	root := filepath.Join(t.TempDir(), "r")
	a := open(t, eps, "/home", func(o *Options) { o.Root = root })
	put(t, a, testEntry(1))
	// Even before any content, a second prefix is refused, naming the
	// first: the root records which one binds it. An rm of the last entry
	// left such a root, and the first prefix then moved the second's
	// content to trash as orphans.
	if _, err := Open(ctx, Options{Endpoints: eps, Prefix: "/early", Root: root}); !errors.Is(err, ErrRootMismatch) || !strings.Contains(err.Error(), "bound to the prefix /home") {
		t.Errorf("a second prefix for an empty root bound to /home: %v", err)
	}
	// A first commit that crashed after the root's ID and its record
	// were written, before the prefix recorded the ID: the same prefix
	// opens and binds it.
	crashed := filepath.Join(t.TempDir(), "c")
	c := open(t, eps, "/crashed", func(o *Options) { o.Root = crashed })
	if _, err := c.ensureRootID(); err != nil {
		t.Fatal(err)
	}
	if err := c.recordRootPrefix(); err != nil {
		t.Fatal(err)
	}
	put(t, open(t, eps, "/crashed", func(o *Options) { o.Root = crashed }), testEntry(1))
	if err := os.MkdirAll(filepath.Join(root, "entries", "x-g1"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := Open(ctx, Options{Endpoints: eps, Prefix: "/second", Root: root})
	if !errors.Is(err, ErrRootMismatch) || !strings.Contains(err.Error(), root) || !strings.Contains(err.Error(), "doctor --rebuild") {
		t.Errorf("a second prefix for a root bound to another: %v", err)
	}
	b := open(t, eps, "/second", func(o *Options) { o.Root = root; o.AdoptRoot = true })
	put(t, b, testEntry(2))
	open(t, eps, "/home", func(o *Options) { o.Root = root }) // its own prefix still opens
}

// TestFileStoreRootRefused: a root that holds the file store's state is
// refused at Open (its content is the file store's, which this prefix's
// start-up would move aside as orphans), and at the first commit when the
// file store began the root after this store opened it, which then leaves
// no root ID behind; AdoptRoot (the rebuild that moves a root to etcd)
// takes it.
func TestFileStoreRootRefused(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	eps := []string{m.Endpoint}
	fileRoot := func(root string) {
		t.Helper()
		fs, err := state.Open(root, state.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := fs.Update(ctx, func(st *state.State) (bool, error) { st.Put(testEntry(9)); return true, nil }); err != nil {
			t.Fatal(err)
		}
	}
	root := t.TempDir()
	fileRoot(root)
	_, err := Open(ctx, Options{Endpoints: eps, Prefix: "/onfile", Root: root})
	if !errors.Is(err, state.ErrBoundElsewhere) || !strings.Contains(err.Error(), filepath.Join(root, state.StateFile)) || !strings.Contains(err.Error(), "doctor --rebuild") {
		t.Errorf("a file store's root: %v, want ErrBoundElsewhere naming its state.json and the move", err)
	}
	// Begun by the file store after this store's Open: refused at the
	// first commit, and the ID it made is taken back.
	late := t.TempDir()
	s := open(t, eps, "/late", func(o *Options) { o.Root = late })
	fileRoot(late)
	if err := s.Update(ctx, func(st *state.State) (bool, error) { st.Put(testEntry(1)); return true, nil }); !errors.Is(err, state.ErrBoundElsewhere) {
		t.Errorf("a first commit on a root the file store began meanwhile: %v, want ErrBoundElsewhere", err)
	}
	if _, err := os.Lstat(filepath.Join(late, RootIDFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused commit left the root ID: %v", err)
	}
	if err := state.CheckUnbound(late); err != nil {
		t.Errorf("the file store's root is refused to it now: %v", err)
	}
	if got := keys(t, s.Client(), "/late"); len(got) != 0 {
		t.Errorf("the refused commit wrote %v", got)
	}
	a := open(t, eps, "/adopt", func(o *Options) { o.Root = root; o.AdoptRoot = true })
	put(t, a, testEntry(2))
}

// TestNestedPrefix: a prefix inside another cache's prefix, or holding
// one, is refused (their keys would mix), and a rebuild of the outer one
// deletes nothing of the inner one.
func TestNestedPrefix(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	eps := []string{m.Endpoint}
	outer := open(t, eps, "/nest", func(o *Options) { o.Root = t.TempDir() })
	put(t, outer, testEntry(1))
	for _, p := range []string{"/nest/e", "/nest/inner", "/nest/a/b"} {
		if _, err := Open(ctx, Options{Endpoints: eps, Prefix: p, Root: t.TempDir()}); !errors.Is(err, ErrNestedPrefix) || !errors.Is(err, ErrBadURL) {
			t.Errorf("%s inside /nest: %v, want ErrNestedPrefix", p, err)
		}
	}
	// The inner one first: the outer one is refused at its Open (every
	// command: ls showed the inner one's cache as empty), and, opened
	// before the inner one was made, at its first commit and its rebuild.
	late := open(t, eps, "/deep", func(o *Options) { o.Root = t.TempDir() })
	inner := open(t, eps, "/deep/e", func(o *Options) { o.Root = t.TempDir() })
	put(t, inner, testEntry(1))
	before := len(keys(t, inner.Client(), "/deep/e"))
	for _, p := range []string{"/deep"} {
		if _, err := Open(ctx, Options{Endpoints: eps, Prefix: p, Root: t.TempDir()}); !errors.Is(err, ErrNestedPrefix) || !strings.Contains(err.Error(), "holds the depcache prefix /deep/e") {
			t.Errorf("Open of %s, which holds /deep/e: %v, want ErrNestedPrefix", p, err)
		}
	}
	if err := late.Update(ctx, func(st *state.State) (bool, error) { st.Put(testEntry(2)); return true, nil }); !errors.Is(err, ErrNestedPrefix) {
		t.Errorf("a first commit on a prefix holding another: %v", err)
	}
	if _, err := late.Reset(ctx, func(st, last *state.State) error { return nil }); !errors.Is(err, ErrNestedPrefix) {
		t.Errorf("a rebuild of a prefix holding another: %v", err)
	}
	if after := len(keys(t, inner.Client(), "/deep/e")); after != before {
		t.Errorf("the inner prefix has %d keys, had %d", after, before)
	}
	// A dependent named "format" is not another prefix.
	own := open(t, eps, "/depnamed", func(o *Options) { o.Root = t.TempDir() })
	e := testEntry(3)
	e.Dependents = map[string]state.Dependent{"format": {Since: time.Now()}}
	put(t, own, e)
	if _, err := own.Reset(ctx, func(st, last *state.State) error { st.Put(last.Get(e.Key).Clone()); return nil }); err != nil {
		t.Errorf("a rebuild of a prefix with a dependent named format: %v", err)
	}
}

// TestNestedPrefixesBegunAtOnce: of two nested prefixes whose first
// commits each looked before the other existed, only the first to commit
// binds; the other's commit is refused (its transaction's compares fail,
// and its next try finds the first). An inner prefix opened before the
// outer one was made is refused at its first commit too.
func TestNestedPrefixesBegunAtOnce(t *testing.T) {
	ctx := context.Background()
	m := etcdtest.Start(t)
	eps := []string{m.Endpoint}
	t.Cleanup(func() { firstCommitHook = nil })
	for _, tc := range []struct{ first, second string }{
		{"/r1", "/r1/in"}, // the outer one commits while the inner one plans
		{"/r2/in", "/r2"}, // and the other way round
	} {
		first := open(t, eps, tc.first, func(o *Options) { o.Root = t.TempDir() })
		second := open(t, eps, tc.second, func(o *Options) { o.Root = t.TempDir() })
		firstCommitHook = func() {
			firstCommitHook = nil
			put(t, first, testEntry(1))
		}
		err := second.Update(ctx, func(st *state.State) (bool, error) { st.Put(testEntry(2)); return true, nil })
		if !errors.Is(err, ErrNestedPrefix) {
			t.Errorf("%s committed while %s planned its first commit: %v, want ErrNestedPrefix", tc.first, tc.second, err)
		}
		if got := keys(t, second.Client(), tc.second)["/format"]; got != "" {
			t.Errorf("%s has a format key: %q", tc.second, got)
		}
		if _, err := first.View(ctx); err != nil {
			t.Errorf("%s, which bound first: %v", tc.first, err)
		}
	}
	// Opened before the outer one was made: refused at its first commit.
	early := open(t, eps, "/r3/in", func(o *Options) { o.Root = t.TempDir() })
	put(t, open(t, eps, "/r3", func(o *Options) { o.Root = t.TempDir() }), testEntry(1))
	if err := early.Update(ctx, func(st *state.State) (bool, error) { st.Put(testEntry(2)); return true, nil }); !errors.Is(err, ErrNestedPrefix) || !strings.Contains(err.Error(), "lies inside the depcache prefix /r3") {
		t.Errorf("a first commit inside a prefix made since its Open: %v, want ErrNestedPrefix", err)
	}
}

// TestUnreachable: no cluster answers: Open fails within its dial
// timeout, naming the endpoint, and the error is not the caller's deadline.
func TestUnreachable(t *testing.T) {
	start := time.Now()
	_, err := Open(context.Background(), Options{Endpoints: []string{"127.0.0.1:1"}, Prefix: "/x", DialTimeout: 300 * time.Millisecond})
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Errorf("Open of an unreachable endpoint: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Open took %s with a 300ms dial timeout", d)
	}
}

// TestChecks: doctor's checks on a live member, and no lock to break.
func TestChecks(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/checks")
	var names []string
	for _, c := range s.Checks(context.Background()) {
		names = append(names, c.Name)
		if c.Status != "ok" {
			t.Errorf("check %s: %s: %s", c.Name, c.Status, c.Detail)
		}
	}
	for _, want := range []string{"etcd " + m.Endpoint, "etcd " + m.Endpoint + " database", "etcd leader", "etcd alarms", "etcd compaction"} {
		if !strings.Contains(strings.Join(names, "|"), want) {
			t.Errorf("no check %q in %v", want, names)
		}
	}
	if s.Holder() != "" || !errors.Is(s.BreakHolder(context.Background(), "x"), ErrNoLock) {
		t.Error("the etcd store claims a lock")
	}
}

// Which failures a read tries again: only those a new try can outlive.
func TestTransient(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{rpctypes.ErrLeaderChanged, true},
		{rpctypes.ErrGRPCLeaderChanged, true},
		{rpctypes.ErrNoLeader, true},
		{rpctypes.ErrGRPCNoLeader, true},
		{status.Error(codes.Unavailable, "connection refused"), true},
		{fmt.Errorf("wrapped: %w", rpctypes.ErrLeaderChanged), true},
		{rpctypes.ErrTimeoutDueToLeaderFail, true},
		{rpctypes.ErrTimeoutDueToConnectionLost, true},
		{rpctypes.ErrTimeout, true},
		{rpctypes.ErrGRPCTimeout, true},
		{rpctypes.ErrStopped, true},
		{rpctypes.ErrUnhealthy, true},
		{rpctypes.ErrTimeoutWaitAppliedIndex, true},
		{fmt.Errorf("campaigning: %w", rpctypes.ErrTimeout), true},
		{rpctypes.ErrCompacted, false},
		{rpctypes.ErrLeaseNotFound, false},
		{context.DeadlineExceeded, false},
		{status.Error(codes.DeadlineExceeded, "timeout"), false},
		{rpctypes.ErrGRPCTooManyOps, false},
		{rpctypes.ErrPermissionDenied, false},
		{errors.New("something else"), false},
	}
	for _, tt := range tests {
		if got := transient(tt.err); got != tt.want {
			t.Errorf("transient(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

// TestCompactionCheck: doctor tells a cluster that keeps all its history
// (a warning once it is long) from one that compacts, and finds the
// oldest revision it still serves.
func TestCompactionCheck(t *testing.T) {
	m := etcdtest.Start(t)
	s := open(t, []string{m.Endpoint}, "/compaction")
	ctx := context.Background()
	for i := range 20 {
		if _, err := s.Client().Put(ctx, fmt.Sprintf("/compaction-test/%d", i), "x"); err != nil {
			t.Fatal(err)
		}
	}
	c := s.compactionCheck(ctx)
	if c.Status != "ok" || !strings.Contains(c.Detail, "never compacted") {
		t.Errorf("a young cluster never compacted: %+v, want ok saying so", c)
	}
	old := compactionWarnRevisions
	compactionWarnRevisions = 10
	t.Cleanup(func() { compactionWarnRevisions = old })
	if c := s.compactionCheck(ctx); c.Status != "warn" || !strings.Contains(c.Detail, "auto-compaction-retention") {
		t.Errorf("a long history never compacted: %+v, want a warning naming the setting", c)
	}
	resp, err := s.Client().Put(ctx, "/compaction-test/last", "x")
	if err != nil {
		t.Fatal(err)
	}
	at := resp.Header.Revision - 7
	if _, err := s.Client().Compact(ctx, at); err != nil {
		t.Fatal(err)
	}
	c = s.compactionCheck(ctx)
	want := fmt.Sprintf("compacted up to revision %d: 8 revisions", at) // at itself, and the 7 after it
	if c.Status != "ok" || !strings.Contains(c.Detail, want) {
		t.Errorf("after a compaction at %d: %+v, want ok with %q", at, c, want)
	}
}
