package etcdstore

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"github.com/depcache/depcache/state/rigtest"
	"github.com/depcache/depcache/transitions"
	"github.com/sirupsen/logrus"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// heldSource is a Source whose fetches wait until open is closed, and
// count themselves.
type heldSource struct {
	open    chan struct{}
	fetches atomic.Int64
}

func (h *heldSource) Fetch(ctx context.Context, src string, w io.Writer, total func(int64)) error {
	h.fetches.Add(1)
	select {
	case <-h.open:
	case <-ctx.Done():
		return ctx.Err()
	}
	b := []byte("content of " + src)
	total(int64(len(b)))
	_, err := w.Write(b)
	return err
}

// polling hides a store's Watcher: the manager polls it as it does the
// file store.
type polling struct{ state.Backend }

func quiet() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

// startManagers starts n managers on root, each with a store of its own
// (its own client) on endpoints under prefix, fetching https:// through
// src. stop stops them and closes their stores.
func startManagers(tb testing.TB, n int, root string, endpoints []string, prefix string, src manager.Source, watch bool, adjust func(*manager.Config)) (ms []*manager.Manager, stop func()) {
	tb.Helper()
	var stops []func()
	stop = func() {
		for _, f := range stops {
			f()
		}
		stops = nil
	}
	tb.Cleanup(stop)
	for range n {
		s, err := Open(context.Background(), Options{Endpoints: endpoints, Prefix: prefix, Root: root})
		if err != nil {
			tb.Fatal(err)
		}
		stops = append(stops, func() { s.Close() })
		var b state.Backend = s
		if !watch {
			b = polling{s}
		}
		cfg := manager.Config{Root: root, State: b, Log: quiet(), Sources: map[string]manager.Source{"https": src},
			Policy: transitions.Policy{FailureCooldown: time.Hour}}
		if adjust != nil {
			adjust(&cfg)
		}
		m, err := manager.New(cfg)
		if err != nil {
			tb.Fatal(err)
		}
		mstop, err := m.Start(context.Background())
		if err != nil {
			tb.Fatal(err)
		}
		stops = append([]func(){func() { _ = mstop() }}, stops...) // managers before their stores
		ms = append(ms, m)
	}
	return ms, stop
}

// fanIn has every manager get key and wait for it; the download is held
// until every Get returned. It returns when each waiter returned, with the
// times at which they did, and fails tb unless all got the same READY
// path.
func fanIn(tb testing.TB, ms []*manager.Manager, key state.Key, src *heldSource) []time.Time {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var got sync.WaitGroup
	var waited sync.WaitGroup
	at := make([]time.Time, len(ms))
	paths := make([]string, len(ms))
	errs := make([]error, len(ms))
	for i, m := range ms {
		got.Add(1)
		waited.Add(1)
		go func() {
			defer waited.Done()
			_, err := m.Get(ctx, "job", key)
			got.Done()
			if err != nil {
				errs[i] = err
				return
			}
			e, err := m.Wait(ctx, key)
			at[i], paths[i], errs[i] = time.Now(), e.Path, err
		}()
	}
	got.Wait()
	close(src.open)
	waited.Wait()
	for i, err := range errs {
		if err != nil {
			tb.Fatalf("waiter %d: %v", i, err)
		}
		if paths[i] == "" || paths[i] != paths[0] {
			tb.Fatalf("waiter %d got path %q, waiter 0 %q", i, paths[i], paths[0])
		}
	}
	return at
}

// TestColdFanIn: many managers, each with its own client, wait for one
// download that one of them runs. Their poll interval is an hour, so only
// the watch can tell them of the publish: that they all return READY at
// all shows it did, without timing anything.
func TestColdFanIn(t *testing.T) {
	m := etcdtest.Start(t)
	root := t.TempDir()
	src := &heldSource{open: make(chan struct{})}
	ms, _ := startManagers(t, 8, root, []string{m.Endpoint}, "/fanin", src, true, func(c *manager.Config) {
		c.PollInterval = time.Hour
		c.CleanupInterval = time.Hour
	})
	fanIn(t, ms, state.Key{Kind: state.Bundle, Source: "https://example.com/fanin"}, src)
	if n := src.fetches.Load(); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}
}

// readySeen watches the entry of key from a client of its own and
// delivers when it is first seen READY.
func readySeen(tb testing.TB, cli *clientv3.Client, l layout, key state.Key) (<-chan time.Time, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan time.Time, 1)
	wch := cli.Watch(ctx, l.entry(key.ID()))
	var done sync.WaitGroup
	done.Add(1)
	go func() {
		defer done.Done()
		for wr := range wch {
			for _, ev := range wr.Events {
				if e, err := decodeEntry(ev.Kv.Value); err == nil && e.Stage == state.Ready {
					out <- time.Now()
					return
				}
			}
		}
	}()
	// The watch must exist before the publish: wait for a round trip
	// through the same client.
	if _, err := cli.Get(ctx, l.entry(key.ID())); err != nil {
		tb.Fatal(err)
	}
	return out, func() { cancel(); done.Wait() }
}

// BenchmarkColdFanIn: 4 or 32 managers (own clients) wait for one download;
// the figures are from the publish, as a watcher of the entry key saw it,
// to each waiter's return: p50 and the last waiter. "watch" uses the
// store's Watcher, "poll" hides it (the loop polls every 250 ms, the
// default).
func BenchmarkColdFanIn(b *testing.B) {
	for _, where := range []string{"embedded", "rig"} {
		for _, n := range []int{4, 32} {
			for _, mode := range []string{"watch", "poll"} {
				b.Run(fmt.Sprintf("%s/%d/%s", where, n, mode), func(b *testing.B) {
					var eps []string
					prefix := "/bench-fanin-" + runID()
					if where == "rig" {
						eps = rigtest.Etcd(b)
						b.Cleanup(func() { deletePrefix(b, eps, prefix) })
					} else {
						eps = []string{etcdtest.Start(b).Endpoint}
					}
					benchFanIn(b, eps, prefix, n, mode == "watch")
				})
			}
		}
	}
}

func benchFanIn(b *testing.B, eps []string, prefix string, n int, watch bool) {
	root := b.TempDir()
	var lat []time.Duration
	obs := open(b, eps, prefix)
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		src := &heldSource{open: make(chan struct{})}
		ms, stopAll := startManagers(b, n, filepath.Join(root, fmt.Sprint(i)), eps, fmt.Sprintf("%s/%d", prefix, i), src, watch, nil)
		key := state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://example.com/fanin/%d", i)}
		seen, stop := readySeen(b, obs.Client(), layout{fmt.Sprintf("%s/%d", prefix, i)}, key)
		b.StartTimer()
		at := fanIn(b, ms, key, src)
		b.StopTimer()
		published := <-seen
		stop()
		stopAll()
		for _, t := range at {
			lat = append(lat, max(t.Sub(published), 0))
		}
		if n := src.fetches.Load(); n != 1 {
			b.Fatalf("%d fetches, want 1", n)
		}
		b.StartTimer()
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2])/1e6, "ms-p50-after-publish")
	b.ReportMetric(float64(lat[len(lat)-1])/1e6, "ms-max-after-publish")
}
