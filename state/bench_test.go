package state_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/depcache/depcache/state"
	"github.com/google/renameio/v2"
)

// benchDirs are the roots the benchmarks run on: local disk always, the
// sshfs rig when it is up.
func benchDirs(b *testing.B) map[string]string {
	dirs := map[string]string{"local": b.TempDir()}
	if m := os.Getenv("SHAREDFS_MNT1"); m != "" {
		d, err := os.MkdirTemp(m, "bench-")
		if err == nil {
			b.Cleanup(func() { os.RemoveAll(d) })
			dirs["sshfs"] = d
		}
	}
	return dirs
}

func seed(b testing.TB, s *state.Store, n int) {
	b.Helper()
	err := s.Update(context.Background(), func(st *state.State) (bool, error) {
		for i := range n {
			st.Put(&state.Entry{Key: bundleKey(i), Stage: state.Ready, Path: fmt.Sprintf("entries/%d", i), SizeBytes: int64(i)})
		}
		return true, nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

// BenchmarkUpdate: one read-modify-write that changes one entry, with n
// entries in the state.
func BenchmarkUpdate(b *testing.B) {
	for fs, dir := range benchDirs(b) {
		for _, n := range []int{100, 1000, 10000} {
			b.Run(fmt.Sprintf("%s/entries=%d", fs, n), func(b *testing.B) {
				root := filepath.Join(dir, fmt.Sprintf("u%d", n))
				s := openStore(b, root)
				seed(b, s, n)
				info, _ := os.Stat(s.Path())
				b.SetBytes(info.Size())
				ctx := context.Background()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := s.Update(ctx, func(st *state.State) (bool, error) {
						e := st.Get(bundleKey(0)).Clone()
						e.Generation++
						st.Put(e)
						return true, nil
					}); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkDurableCommit is the limit for Update: write the same number of
// bytes to a temp file, fsync, rename over the target, fsync the directory.
func BenchmarkDurableCommit(b *testing.B) {
	for fs, dir := range benchDirs(b) {
		for _, n := range []int{100, 1000, 10000} {
			b.Run(fmt.Sprintf("%s/entries=%d", fs, n), func(b *testing.B) {
				root := filepath.Join(dir, fmt.Sprintf("c%d", n))
				s := openStore(b, root)
				seed(b, s, n)
				data, err := os.ReadFile(s.Path())
				if err != nil {
					b.Fatal(err)
				}
				target := filepath.Join(root, "raw.json")
				b.SetBytes(int64(len(data)))
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := renameio.WriteFile(target, data, 0o644, renameio.WithTempDir(root)); err != nil {
						b.Fatal(err)
					}
					d, err := os.Open(root)
					if err != nil {
						b.Fatal(err)
					}
					if err := d.Sync(); err != nil {
						b.Fatal(err)
					}
					d.Close()
				}
			})
		}
	}
}

// BenchmarkLock: an uncontended acquire and release.
func BenchmarkLock(b *testing.B) {
	for fs, dir := range benchDirs(b) {
		b.Run(fs, func(b *testing.B) {
			l, err := state.NewLock(filepath.Join(dir, "lock"), state.LockOptions{Log: quietLog()})
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				unlock, err := l.Lock(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if err := unlock(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkUpdateBatched: 8 goroutines of one process each change one
// entry of 1,000 through UpdateBatched; operations that wait together share
// a lock hold and a commit. ns/op is per operation, to compare with
// BenchmarkUpdate's entries=1000.
func BenchmarkUpdateBatched(b *testing.B) {
	for fs, dir := range benchDirs(b) {
		b.Run(fs+"/entries=1000", func(b *testing.B) {
			root := filepath.Join(dir, "batched")
			s := openStore(b, root)
			seed(b, s, 1000)
			ctx := context.Background()
			var next atomic.Int64
			b.SetParallelism(4) // 4 × GOMAXPROCS goroutines
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					k := bundleKey(int(next.Add(1) % 1000))
					if err := s.UpdateBatched(ctx, func(st *state.State) (bool, error) {
						e := st.Get(k).Clone()
						e.Generation++
						st.Put(e)
						return true, nil
					}); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkUpdateTakingTurns: eight stores on one root (eight processes'
// views) take turns changing one entry of 1,000, so each read finds seven
// lines changed since its own last write, as under 8-process contention but
// without the waiting. ns/op is one lock hold.
func BenchmarkUpdateTakingTurns(b *testing.B) {
	for fs, dir := range benchDirs(b) {
		b.Run(fs+"/entries=1000", func(b *testing.B) {
			root := filepath.Join(dir, "turns")
			stores := make([]*state.Store, 8)
			for i := range stores {
				stores[i] = openStore(b, root)
			}
			seed(b, stores[0], 1000)
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				k := bundleKey(i * 37 % 1000)
				if err := stores[i%len(stores)].Update(ctx, func(st *state.State) (bool, error) {
					e := st.Get(k).Clone()
					e.Generation++
					st.Put(e)
					return true, nil
				}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkUpdateEntries: the hot path of get and release, one entry
// changed through UpdateEntries, at growing numbers of entries. Format 2
// reads and writes the shard of that entry and the manifest only, so the
// cost should not grow with the entries.
func BenchmarkUpdateEntries(b *testing.B) {
	for fs, dir := range benchDirs(b) {
		for _, n := range []int{100, 1000, 10000, 100000} {
			b.Run(fmt.Sprintf("%s/entries=%d", fs, n), func(b *testing.B) {
				root := filepath.Join(dir, fmt.Sprintf("e%d", n))
				s := openStore(b, root)
				seed(b, s, n)
				ctx := context.Background()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					k := bundleKey(i * 7919 % n)
					if err := s.UpdateEntries(ctx, []string{k.ID()}, func(tx *state.Txn) (bool, error) {
						e := tx.Get(k).Clone()
						e.Generation++
						tx.Put(e)
						return true, nil
					}); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
