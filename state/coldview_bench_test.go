package state

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkColdView: a whole read by a store that never saw the root (a
// CLI command's first read), at 100,000 entries: 256 shards to read,
// check and decode. Run with -cpu 1,2 for what decoding them side by
// side gives (loadAll).
func BenchmarkColdView(b *testing.B) {
	for _, n := range []int{10000, 100000} {
		dir := b.TempDir()
		s, err := Open(dir, Options{})
		if err != nil {
			b.Fatal(err)
		}
		st := benchState(n)
		if err := s.Update(context.Background(), func(cur *State) (bool, error) {
			for _, e := range st.Entries {
				cur.Put(e)
			}
			return true, nil
		}); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			for b.Loop() {
				fresh, err := Open(dir, Options{})
				if err != nil {
					b.Fatal(err)
				}
				got, err := fresh.View(context.Background())
				if err != nil || len(got.Entries) != n {
					b.Fatalf("View: %d entries, %v", len(got.Entries), err)
				}
			}
		})
	}
}

// BenchmarkSorted: the entries of 100,000 in key order, as ls and every
// report list them.
func BenchmarkSorted(b *testing.B) {
	st := benchState(100000)
	for b.Loop() {
		if len(st.Sorted()) != 100000 {
			b.Fatal("short")
		}
	}
}
