package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// benchFanIn starts --fanin-procs get workers at once on one cold source
// and times them until all are READY, against curl | tar of the same
// bundle. The workers take turns over --host-roots (and fake hosts, with
// --fakehost), with the state on --state when given.
//
// On etcd it also times each worker's READY from the publish: the bench
// watches the entry's key itself and takes the arrival of the put that
// made it READY as the publish, so "after the publish" is what a waiter
// adds (its watch, its reading of the entry, its return), the target of
// issue 15 (all within 50 ms).
func benchFanIn(r *report, o options) {
	dir := filepath.Join(o.root, "fanin")
	os.MkdirAll(dir, 0o755)
	src := filepath.Join(dir, "bundle.tar.gz")
	if err := bundle(src, o.faninMB); err != nil {
		fatalf("%v", err)
	}
	url, downloads, stop := serve(src)
	defer stop()
	base, err := curlTar(url, filepath.Join(dir, "curl"))
	if err != nil {
		fatalf("curl | tar: %v", err)
	}
	downloads.Store(0)
	roots := []string{dir}
	if len(o.soak.hostRoots) > 0 {
		roots = o.soak.hostRoots
	}
	sub := fmt.Sprintf("fanin-%d-%d", time.Now().UnixNano(), os.Getpid())
	ctx := context.Background()
	var stateURL string
	published := make(chan time.Time, 1)
	if o.soak.state != "" {
		if stateURL, err = faninStateURL(o.soak.state, time.Now(), os.Getpid()); err != nil {
			fatalf("%v", err)
		}
		s, err := openEtcd(ctx, stateURL, filepath.Join(roots[0], sub))
		if err != nil {
			fatalf("%v", err)
		}
		defer s.Close()
		_, prefix, _ := etcdstore.ParseURL(stateURL)
		defer cleanupOnFatal(func() {
			if err := deletePrefix(ctx, s.Client(), prefix+"/"); err != nil {
				fmt.Fprintf(os.Stderr, "depcache-bench: deleting %s: %v\n", stateURL, err)
			}
		})()
		key, err := manager.ParseKey(url, "")
		if err != nil {
			fatalf("%v", err)
		}
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		ready := make(chan struct{})
		go watchReady(wctx, s.Client(), s.EntryKey(key.ID()), ready, published)
		select {
		case <-ready:
		case <-time.After(30 * time.Second):
			fatalf("fan-in: the watch of %s was not in place after 30 s", stateURL)
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var readyAt []time.Time
	paths := map[string]int{}
	errs := make(chan error, o.faninProcs)
	for i := range o.faninProcs {
		argv := []string{os.Args[0], "--worker", "get", filepath.Join(roots[i%len(roots)], sub), url}
		if stateURL != "" {
			argv = append(argv, stateURL)
		}
		if o.soak.fakehost != "" {
			argv = append([]string{o.soak.fakehost, fmt.Sprintf("bench-host%d", i%len(roots))}, argv...)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := exec.Command(argv[0], argv[1:]...).Output()
			if err != nil {
				var stderr []byte
				if ee, ok := err.(*exec.ExitError); ok {
					stderr = ee.Stderr
				}
				errs <- fmt.Errorf("worker %d: %v: %s", i, err, stderr)
				return
			}
			var res workerResult
			if err := json.Unmarshal(out, &res); err != nil {
				errs <- fmt.Errorf("worker %d: %v: %q", i, err, out)
				return
			}
			mu.Lock()
			readyAt = append(readyAt, time.Unix(0, res.ReadyUnixNano))
			// The path as the first host reaches it: each host names
			// the same entry through its own mount.
			root := roots[i%len(roots)]
			if rel, err := filepath.Rel(root, res.Path); err == nil {
				paths[rel]++
			} else {
				paths[res.Path]++
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	close(errs)
	for err := range errs {
		fatalf("%v", err)
	}
	name := fmt.Sprintf("cold fan-in, %d procs, %d MB", o.faninProcs, o.faninMB)
	if len(roots) > 1 {
		name += fmt.Sprintf(" on %d hosts", len(roots))
	}
	fields := map[string]any{
		"procs": o.faninProcs, "mb": o.faninMB, "hosts": len(roots), "wall_s": wall.Seconds(), "curl_tar_s": base.Seconds(),
		"ratio_to_curl_tar": wall.Seconds() / base.Seconds(), "downloads": downloads.Load(), "paths": len(paths),
	}
	line := fmt.Sprintf("%6.2f s until all READY, %d download(s), %d path(s) | curl|tar %.2f s | ratio %.2f",
		wall.Seconds(), downloads.Load(), len(paths), base.Seconds(), wall.Seconds()/base.Seconds())
	if stateURL != "" {
		fields["state"] = stateURL
		select {
		case pub := <-published:
			var after []time.Duration
			for _, t := range readyAt {
				after = append(after, t.Sub(pub))
			}
			slices.Sort(after)
			fields["ready_after_publish_p50_ms"] = ms(percentile(after, 0.5))
			fields["ready_after_publish_max_ms"] = ms(after[len(after)-1])
			fields["ready_after_publish_min_ms"] = ms(after[0])
			line += fmt.Sprintf(" | READY after the publish: min %.1f ms, p50 %.1f ms, last %.1f ms",
				ms(after[0]), ms(percentile(after, 0.5)), ms(after[len(after)-1]))
		default:
			fmt.Fprintln(os.Stderr, "depcache-bench: fan-in: the watch never saw the entry READY")
		}
	}
	r.add(name, fields, line)
}

// faninStateURL is the --state URL of one fan-in run: u's prefix with a
// component unique to the run.
func faninStateURL(u string, now time.Time, pid int) (string, error) {
	out, err := getReleaseStateURL(u, now, pid, 0)
	if err != nil {
		return "", err
	}
	return strings.Replace(out, "/getrelease-", "/fanin-", 1), nil
}

// watchReady watches key and sends on published when the first put that
// makes the entry READY arrives; ready is closed once the watch is in
// place.
func watchReady(ctx context.Context, cli *clientv3.Client, key string, ready chan<- struct{}, published chan<- time.Time) {
	// The watch is in place once its created notification comes.
	wc := cli.Watch(clientv3.WithRequireLeader(ctx), key, clientv3.WithCreatedNotify())
	first := true
	for resp := range wc {
		now := time.Now()
		if first {
			close(ready)
			first = false
		}
		for _, ev := range resp.Events {
			if ev.Type != clientv3.EventTypePut {
				continue
			}
			var e state.Entry
			if json.Unmarshal(ev.Kv.Value, &e) == nil && e.Stage == state.Ready {
				published <- now
				return
			}
		}
	}
	if first {
		close(ready)
	}
}
