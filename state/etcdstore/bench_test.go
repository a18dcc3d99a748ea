package etcdstore

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/state/etcdstore/etcdtest"
	"github.com/depcache/depcache/state/rigtest"
)

// getRelease is the hot path's pair of commits: register a dependent on
// an entry (creating it), then release it (removing the entry).
func getRelease(b *testing.B, s state.Backend, i int64) {
	ctx := context.Background()
	k := state.Key{Kind: state.Bundle, Source: fmt.Sprintf("https://example.com/bench/%d", i)}
	id := k.ID()
	err := s.UpdateEntries(ctx, []string{id}, func(tx *state.Txn) (bool, error) {
		e := &state.Entry{Key: k, Stage: state.Downloading, Generation: tx.MaxGeneration() + 1,
			Dependents: map[string]state.Dependent{"job": {}}}
		tx.Put(e)
		return true, nil
	})
	if err == nil {
		err = s.UpdateEntries(ctx, []string{id}, func(tx *state.Txn) (bool, error) {
			tx.Delete(k)
			return true, nil
		})
	}
	if err != nil {
		b.Error(err)
	}
}

func benchGetRelease(b *testing.B, s state.Backend) {
	var n atomic.Int64
	b.SetParallelism(4) // 4 × GOMAXPROCS goroutines
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			getRelease(b, s, n.Add(1))
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "get+release/s")
	if es, ok := s.(*Store); ok {
		b.ReportMetric(float64(es.Stats().Conflicts)/float64(b.N), "conflicts/op")
	}
}

// BenchmarkGetRelease compares the file store, an embedded etcd member and
// the rig's 3-member cluster on the same machine.
func BenchmarkGetRelease(b *testing.B) {
	b.Run("file", func(b *testing.B) {
		s, err := state.Open(b.TempDir(), state.Options{})
		if err != nil {
			b.Fatal(err)
		}
		benchGetRelease(b, s)
	})
	b.Run("embedded", func(b *testing.B) {
		m := etcdtest.Start(b)
		benchGetRelease(b, open(b, []string{m.Endpoint}, "/bench"))
	})
	b.Run("rig", func(b *testing.B) {
		eps := rigtest.Etcd(b)
		p := "/depcache-test/bench-" + runID()
		b.Cleanup(func() { deletePrefix(b, eps, p) })
		benchGetRelease(b, open(b, eps, p))
	})
}
