package etcdstore

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"github.com/depcache/depcache/transitions"
)

// ownerKey reads entry i's owner key: its generation and lease.
func ownerKey(t *testing.T, s *Store, id string) (ownerKV, bool) {
	t.Helper()
	resp, err := s.Client().Get(context.Background(), s.l.owner(id))
	if err != nil {
		t.Fatal(err)
	}
	sn := newSnapshot()
	for _, kv := range resp.Kvs {
		sn.add(s.l, kv)
	}
	o, ok := sn.owners[id]
	return o, ok
}

// TestOwnerLease: a claim puts the owner key on a lease of the owner TTL;
// the owner's progress reports renew it past that TTL; when they stop, the
// lease ends, timed by etcd, and a reader says the owner lapsed; a new
// claim gets a key of its own, and publishing deletes it.
func TestOwnerLease(t *testing.T) {
	m := etcdtest.Start(t)
	a := open(t, []string{m.Endpoint}, "/owner")
	b := open(t, []string{m.Endpoint}, "/owner")
	a.LeaseOwners(2 * time.Second)
	b.LeaseOwners(2 * time.Second)
	k := testKey(1)
	id := k.ID()
	ownerA := state.Owner{Process: state.Process{Host: "a", PID: 1}, ManagerID: "ma"}
	ownerB := state.Owner{Process: state.Process{Host: "b", PID: 2}, ManagerID: "mb"}
	update := func(s *Store, f func(e *state.Entry)) {
		t.Helper()
		err := s.UpdateEntries(context.Background(), []string{id}, func(tx *state.Txn) (bool, error) {
			e := tx.Get(k)
			if e == nil {
				e = testEntry(1)
			} else {
				e = e.Clone()
			}
			f(e)
			tx.Put(e)
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	update(a, func(e *state.Entry) { e.Owner, e.Generation = &ownerA, 5 })
	o, ok := ownerKey(t, a, id)
	if !ok || o.gen != 5 || o.lease == 0 {
		t.Fatalf("owner key after the claim: %+v %v, want generation 5 on a lease", o, ok)
	}
	if r, err := a.Client().TimeToLive(context.Background(), o.lease); err != nil || r.GrantedTTL != 2 {
		t.Fatalf("owner lease: %+v %v, want a TTL of 2 s", r, err)
	}
	// Reports for twice the TTL keep it.
	for end := time.Now().Add(4 * time.Second); time.Now().Before(end); {
		update(a, func(e *state.Entry) { e.Progress.Heartbeat++ })
		time.Sleep(300 * time.Millisecond)
	}
	if o2, ok := ownerKey(t, a, id); !ok || o2 != o {
		t.Fatalf("owner key after 4 s of reports: %+v %v, want %+v", o2, ok, o)
	}
	if _, err := b.View(context.Background()); err != nil {
		t.Fatal(err)
	}
	if b.OwnerLapsed(id, 5) {
		t.Fatal("owner lapsed while it reported")
	}
	// Silence: etcd ends the lease.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, ok := ownerKey(t, b, id); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("owner key still there 60 s after the reports stopped")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := b.View(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !b.OwnerLapsed(id, 5) || b.OwnerLapsed(id, 6) {
		t.Fatalf("after the lease ended: lapsed(5)=%v lapsed(6)=%v, want true, false", b.OwnerLapsed(id, 5), b.OwnerLapsed(id, 6))
	}
	// A late report does not revive it.
	update(a, func(e *state.Entry) { e.Progress.Heartbeat++ })
	if _, ok := ownerKey(t, a, id); ok {
		t.Fatal("a report after the lease ended revived the owner key")
	}
	// A takeover gets a key of its own; publishing deletes it.
	update(b, func(e *state.Entry) { e.Owner, e.Generation = &ownerB, 6 })
	if o, ok := ownerKey(t, b, id); !ok || o.gen != 6 {
		t.Fatalf("owner key after the takeover: %+v %v", o, ok)
	}
	if _, err := b.View(context.Background()); err != nil {
		t.Fatal(err)
	}
	if b.OwnerLapsed(id, 6) {
		t.Fatal("the new owner lapsed")
	}
	update(b, func(e *state.Entry) { e.Owner, e.Stage, e.Path = nil, state.Ready, "entries/x-g6/content" })
	if o, ok := ownerKey(t, b, id); ok {
		t.Fatalf("owner key after the publish: %+v", o)
	}
}

// stallServer serves a body; its first request sends part of it and then
// waits until release is closed.
type stallServer struct {
	*httptest.Server
	requests atomic.Int32
	release  chan struct{}
	once     sync.Once
}

func newStallServer(t *testing.T, body string) *stallServer {
	s := &stallServer{release: make(chan struct{})}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := s.requests.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		if n == 1 {
			_, _ = w.Write([]byte(body[:1]))
			w.(http.Flusher).Flush()
			select {
			case <-s.release:
			case <-r.Context().Done():
				return
			}
			_, _ = w.Write([]byte(body[1:]))
			return
		}
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(func() { s.open(); s.Close() })
	return s
}

func (s *stallServer) open() { s.once.Do(func() { close(s.release) }) }

// TestStoppedOwnerTakenOver: an owner process stopped (SIGSTOP) in the
// middle of its download stops renewing its owner lease; when etcd ends
// it, a waiter of another process takes over with no clock of its own
// timing the stall, downloads and publishes. When the old owner runs
// again, its publish is fenced: exactly one publish, and both get the
// winner's path.
func TestStoppedOwnerTakenOver(t *testing.T) {
	eps, prefix := leaseRig(t, "takeover")
	root := t.TempDir()
	srv := newStallServer(t, "the content of a dependency\n")
	src := srv.URL + "/dep"
	key, err := manager.ParseKey(src, "")
	if err != nil {
		t.Fatal(err)
	}
	h := startHolder(t, eps, prefix, root, src, time.Minute, "DT_TIMEOUT=3s")
	s := open(t, eps, prefix, func(o *Options) { o.Root = root })
	// Wait until the holder owns the download, on its lease.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if o, ok := ownerKey(t, s, key.ID()); ok && o.lease != 0 && srv.requests.Load() == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the holder never owned the download")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := h.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	m, err := manager.New(manager.Config{Root: root, State: s, Log: quiet(), ProgressInterval: 200 * time.Millisecond,
		Policy: transitions.Policy{DownloadTimeout: 3 * time.Second, FailureCooldown: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	stop, err := m.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := m.Get(ctx, "waiter", key); err != nil {
		t.Fatal(err)
	}
	e, err := m.Wait(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	won, err := m.Abs(e)
	if err != nil {
		t.Fatal(err)
	}
	if e.Generation < 2 || srv.requests.Load() < 2 {
		t.Fatalf("READY at generation %d after %d requests: want a takeover's download", e.Generation, srv.requests.Load())
	}
	if err := h.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	srv.open()
	got := h.line(t)
	if got != "READY "+won {
		t.Fatalf("the stopped owner got %q, want the winner's READY %s", got, won)
	}
	// Its Wait returns as soon as it sees the winner's READY, while its
	// own download may still be between the rename into entries/ and the
	// move back that follows a fenced commit. Its manager's stop waits for
	// every download, so count the published directories once it exited.
	if err := h.in.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.cmd.Wait(); err != nil {
		t.Fatalf("the stopped owner did not exit cleanly: %v", err)
	}
	published, err := filepath.Glob(filepath.Join(root, "entries", "*"))
	if err != nil || len(published) != 1 {
		t.Fatalf("published: %v %v, want exactly one", published, err)
	}
	if _, err := os.Stat(won); err != nil {
		t.Fatal(err)
	}
}
