package state_test

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/depcache/depcache/state"
)

// BenchmarkNamedReadOfSeenBase: a read of named entries (UpdateEntries,
// read-only) of one entry at a time, each one this store has not decoded,
// in a root of 100,000 entries (shards of about 140 KB) whose shards the
// store read before: what a get or release of a long-running process pays
// to read, before any write. Run with -benchtime=5000x so that no entry is
// read twice.
func BenchmarkNamedReadOfSeenBase(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	const n = 100000
	w := openStore(b, dir)
	if err := w.Update(ctx, func(st *state.State) (bool, error) {
		for i := range n {
			st.Put(&state.Entry{Key: bundleKey(i), Stage: state.Ready, Path: "entries/" + bundleKey(i).ID() + "-g1/content", SizeBytes: int64(i), Generation: 1,
				Dependents: map[string]state.Dependent{"some-run-" + bundleKey(i).ID()[:8]: {}}})
		}
		return true, nil
	}); err != nil {
		b.Fatal(err)
	}
	r := openStore(b, dir)
	read := func(i int) {
		k := bundleKey(i)
		if err := r.UpdateEntries(ctx, []string{k.ID()}, func(tx *state.Txn) (bool, error) {
			if tx.Get(k) == nil {
				b.Fatalf("entry %d not found", i)
			}
			return false, nil
		}); err != nil {
			b.Fatal(err)
		}
	}
	order := rand.New(rand.NewPCG(1, 2)).Perm(n)
	for _, i := range order[:2000] { // every shard seen (256, about 8 times over)
		read(i)
	}
	b.ResetTimer()
	j := 2000
	for b.Loop() {
		read(order[j%n])
		j++
	}
}
