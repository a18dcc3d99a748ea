package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// seedBatch is how many entries one seeding transaction writes: each is
// one put and one compare, beside a handful of the store's own keys, so
// that a batch stays within etcd's 128 operations (etcdstore.MaxTxnOps)
// and far below its 1.5 MiB request limit (an entry is about 300 bytes).
const seedBatch = 100

// seedParallel is how many seeding transactions are in flight at once.
const seedParallel = 8

// getReleaseStateURL is the --state URL of one getrelease point: u's
// prefix with a component unique to the run (its start and pid) and the
// number of entries added, so that every point starts on an empty prefix.
func getReleaseStateURL(u string, now time.Time, pid, n int) (string, error) {
	if _, _, err := etcdstore.ParseURL(u); err != nil {
		return "", fmt.Errorf("--state: %w", err)
	}
	out := fmt.Sprintf("%s/getrelease-%s-%d/%d", strings.TrimSuffix(u, "/"), now.UTC().Format("20060102T150405.000000000Z"), pid, n)
	if _, _, err := etcdstore.ParseURL(out); err != nil {
		return "", fmt.Errorf("--state: %w", err)
	}
	return out, nil
}

// openEtcd opens the etcd store of stateURL for the cache root root.
func openEtcd(ctx context.Context, stateURL, root string) (*etcdstore.Store, error) {
	eps, prefix, err := etcdstore.ParseURL(stateURL)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("root %q: %w", root, err)
	}
	s, err := etcdstore.Open(ctx, etcdstore.Options{Endpoints: eps, Prefix: prefix, Root: abs})
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", stateURL, err)
	}
	return s, nil
}

// seedEtcd writes n READY entries through the store, seedBatch to a
// transaction, seedParallel transactions at a time.
func seedEtcd(ctx context.Context, s *etcdstore.Store, n int) error {
	now := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	sem := make(chan struct{}, seedParallel)
	for lo := 0; lo < n && ctx.Err() == nil; lo += seedBatch {
		hi := min(n, lo+seedBatch)
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			ids := make([]string, 0, hi-lo)
			for i := lo; i < hi; i++ {
				ids = append(ids, benchKey(i).ID())
			}
			err := s.UpdateEntries(ctx, ids, func(tx *state.Txn) (bool, error) {
				for i := lo; i < hi; i++ {
					k := benchKey(i)
					tx.Put(&state.Entry{Key: k, Stage: state.Ready, Path: filepath.Join("entries", k.ID()+"-g1", "content"),
						SizeBytes: 1 << 20, Generation: 1, Created: now, LastUsed: now})
				}
				return true, nil
			})
			if err != nil {
				mu.Lock()
				if first == nil {
					first = fmt.Errorf("entries %d-%d: %w", lo, hi-1, err)
				}
				mu.Unlock()
				cancel()
			}
		}()
	}
	wg.Wait()
	return first
}

// etcdTxnRoundTrip is the etcd limit of a get+release: the mean round
// trip, over about d, of one bare transaction that compares a key's mod
// revision and puts it (the cheapest commit any design on etcd makes),
// on key, which it deletes afterwards.
func etcdTxnRoundTrip(ctx context.Context, cli *clientv3.Client, key string, d time.Duration) (time.Duration, error) {
	var rev int64
	var err error
	rtt := timeIt(d, func() {
		if err != nil {
			return
		}
		rctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), 5*time.Second)
		defer cancel()
		var resp *clientv3.TxnResponse
		resp, err = cli.Txn(rctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, "x")).Commit()
		switch {
		case err != nil:
			err = fmt.Errorf("bare txn on %s: %w", key, err)
		case !resp.Succeeded:
			err = fmt.Errorf("bare txn on %s: compare failed (another writer?)", key)
		default:
			rev = resp.Header.Revision
		}
	})
	if err != nil {
		return 0, err
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, derr := cli.Delete(dctx, key); derr != nil {
		return 0, fmt.Errorf("deleting %s: %w", key, derr)
	}
	return rtt, nil
}

// benchGetReleaseEtcd is benchGetRelease with the state on etcd: the
// entries are seeded under a fresh prefix of --state, every worker's
// manager uses the etcd store (its content root stays the bench root),
// the limit is a bare etcd transaction measured in the same run, and the
// prefix is deleted at the end.
func benchGetReleaseEtcd(r *report, o options, roots []string, sub string, n int) {
	ctx := context.Background()
	url, err := getReleaseStateURL(o.soak.state, time.Now(), os.Getpid(), n)
	if err != nil {
		fatalf("%v", err)
	}
	_, prefix, _ := etcdstore.ParseURL(url)
	s, err := openEtcd(ctx, url, filepath.Join(roots[0], sub))
	if err != nil {
		fatalf("%v", err)
	}
	defer s.Close()
	cli := s.Client()
	defer cleanupOnFatal(func() {
		if err := deletePrefix(ctx, cli, prefix+"/"); err != nil {
			fmt.Fprintf(os.Stderr, "depcache-bench: deleting %s: %v\n", url, err)
		}
	})()
	seedStart := time.Now()
	if err := seedEtcd(ctx, s, n); err != nil {
		fatalf("seeding %d entries on %s: %v", n, url, err)
	}
	seeded := time.Since(seedStart)
	rtt, err := etcdTxnRoundTrip(ctx, cli, prefix+"/bench-limit", o.duration/2)
	if err != nil {
		fatalf("%v", err)
	}

	ops, lat, holds, werr := runGetReleaseWorkers(o, roots, sub, n, url)
	if werr != nil {
		fatalf("%v", werr)
	}
	opsPerSec := float64(ops) / o.duration.Seconds()
	// Each of the procs × goroutines workers makes its get+release in
	// series, two commits each: at best, with no queueing in etcd, a worker
	// makes one every two bare round trips.
	workers := o.procs * o.goroutines
	limit := float64(workers) / (2 * rtt.Seconds())
	name := fmt.Sprintf("get+release, %d entries, %dx%d", n, o.procs, o.goroutines)
	if len(roots) > 1 {
		name += fmt.Sprintf(" on %d hosts", len(roots))
	}
	name += ", etcd"
	fields := map[string]any{
		"entries": n, "procs": o.procs, "goroutines": o.goroutines, "hosts": len(roots), "ops_per_sec": opsPerSec,
		"p50_ms": ms(percentile(lat, 0.5)), "p99_ms": ms(percentile(lat, 0.99)),
		"limit_ops_per_sec": limit, "ratio_to_limit": opsPerSec / limit,
		"etcd_txn_ms": ms(rtt), "seed_s": seeded.Seconds(), "state": url,
	}
	if len(holds) > 0 {
		fields["lock_hold_p50_ms"], fields["lock_hold_p99_ms"] = ms(percentile(holds, 0.5)), ms(percentile(holds, 0.99))
	}
	r.add(name, fields, fmt.Sprintf("%8.0f ops/s  p50 %6.2f ms  p99 %7.2f ms | limit %6.0f ops/s (%d workers, bare etcd txn %.2f ms)  ratio %.2f | seeded in %.1f s",
		opsPerSec, ms(percentile(lat, 0.5)), ms(percentile(lat, 0.99)), limit, workers, ms(rtt), opsPerSec/limit, seeded.Seconds()))
}

// deleteChunk is how many keys one delete request of deletePrefix removes
// at most: one request for 100,000 keys can outlast the server's request
// timeout on a loaded cluster.
const deleteChunk = 2000

// deletePrefix deletes every key that starts with p, deleteChunk keys to
// a request.
func deletePrefix(ctx context.Context, cli *clientv3.Client, p string) error {
	end := clientv3.GetPrefixRangeEnd(p)
	for {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := cli.Get(rctx, p, clientv3.WithRange(end), clientv3.WithKeysOnly(),
			clientv3.WithLimit(deleteChunk), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err == nil && len(resp.Kvs) > 0 {
			last := string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
			_, err = cli.Delete(rctx, string(resp.Kvs[0].Key), clientv3.WithRange(last))
		}
		cancel()
		if err != nil {
			return fmt.Errorf("deleting keys under %s: %w", p, err)
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
	}
}

// workerStore returns the state store of a getrelease worker: nil (the
// file store in root) without a state URL, else the etcd store.
func workerStore(ctx context.Context, stateURL, root string) (state.Backend, func(), error) {
	if stateURL == "" {
		return nil, func() {}, nil
	}
	s, err := openEtcd(ctx, stateURL, root)
	if err != nil {
		return nil, nil, err
	}
	var once sync.Once
	return s, func() { once.Do(func() { s.Close() }) }, nil
}
