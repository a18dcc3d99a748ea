package state

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

func benchState(n int) *State {
	st := New()
	for i := range n {
		k := Key{Kind: Bundle, Source: fmt.Sprintf("https://bench.invalid/bundle/%d.tar.gz", i)}
		st.Put(&Entry{Key: k, Stage: Ready, Path: "entries/" + k.ID() + "-g1/content", SizeBytes: 1 << 20, Generation: 1, Created: t0, LastUsed: t0})
	}
	return st
}

// BenchmarkLayout: the CPU cost of a read and a write of a state of 1,000
// entries of which one changed since the cache was filled, without I/O.
func BenchmarkLayout(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		st := benchState(n)
		data, cache, err := encodeLines(nil, st, nil)
		if err != nil {
			b.Fatal(err)
		}
		one := st.Sorted()[n/2]
		one.Generation++
		changed, _, _ := encodeLines(nil, st, cache)
		b.Run(fmt.Sprintf("decode/entries=%d", n), func(b *testing.B) {
			for b.Loop() {
				if _, _, ok := decodeLines(changed, cache); !ok {
					b.Fatal("refused")
				}
			}
		})
		b.Run(fmt.Sprintf("encode/entries=%d", n), func(b *testing.B) {
			got, c2, _ := decodeLines(data, cache)
			e := got.Entries[one.Key.ID()].Clone()
			e.Generation++
			got.Put(e)
			for b.Loop() {
				if _, _, err := encodeLines(nil, got, c2); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkNamedReadOfBase: a read of one entry of a shard of 100,000
// entries' size (about 400 lines, 140 KB) that this process never saw,
// checking its other lines as JSON (a shard whose lines a write may carry
// over undecoded) or trusting them (a base, see deltaMinBase), and the
// SHA-256 that both pay.
func BenchmarkNamedReadOfBase(b *testing.B) {
	st := benchState(100000)
	var es []idEntry
	for _, e := range st.Sorted() {
		if id := e.Key.ID(); id[:2] == "3f" {
			es = append(es, idEntry{id, e})
		}
	}
	slices.SortFunc(es, func(x, y idEntry) int { return strings.Compare(x.id, y.id) })
	data, _, err := encodeShard("3f", es, nil)
	if err != nil {
		b.Fatal(err)
	}
	want := es[len(es)/2].id
	need := func(id string) bool { return id == want }
	b.Logf("%d entries, %d bytes", len(es), len(data))
	for _, trust := range []bool{false, true} {
		b.Run(fmt.Sprintf("trust=%t", trust), func(b *testing.B) {
			for b.Loop() {
				if _, err := decodeShardFor("3f", data, nil, need, trust); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("sha256", func(b *testing.B) {
		for b.Loop() {
			shortHash(data)
		}
	})
}
