package state

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"
)

// threeLineShard returns a shard file of three entries of one shard, with
// their IDs in order.
func threeLineShard(t *testing.T) (string, []byte, []string) {
	t.Helper()
	st := richState(2000)
	var p string
	var es []idEntry
	for _, ie := range sortedEntries(st, nil) {
		if p == "" {
			p = ie.id[:2]
		}
		if ie.id[:2] == p && len(es) < 3 {
			es = append(es, ie)
		}
	}
	if len(es) < 3 {
		t.Fatal("no shard with three entries")
	}
	b, _, err := encodeShard(p, es, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p, bytes.Clone(b), []string{es[0].id, es[1].id, es[2].id}
}

// TestLazyDecodeMergedLine: a hand edit that puts two entries on one line
// is still the shard a whole decode reads (three entries), also when a
// read needs only the first: a line is left undecoded only if it holds
// exactly one member.
func TestLazyDecodeMergedLine(t *testing.T) {
	p, b, ids := threeLineShard(t)
	// The separator between the second and third lines.
	lines := bytes.SplitAfter(b, []byte("\n"))
	if len(lines) != 6 { // header, three entries, end, ""
		t.Fatalf("%d lines: %q", len(lines), b)
	}
	merged := bytes.Join([][]byte{lines[0], lines[1], bytes.TrimSuffix(lines[2], []byte("\n")), lines[3], lines[4]}, nil)
	whole, err := decodeShard(p, merged, nil, nil)
	if err != nil || len(whole.lines) != 3 {
		t.Fatalf("whole decode of the merged shard: %v, %v", whole, err)
	}
	part, err := decodeShard(p, merged, nil, func(id string) bool { return id == ids[0] })
	if err != nil || len(part.lines) != 3 {
		t.Fatalf("decode of the first entry only: %d lines, %v; want the 3 a whole decode reads", len(part.lines), err)
	}
}

// TestUndecodedLineUnreadable: a write that carries a line over undecoded
// and cannot read its shard file again fails with errUndecodedUnreadable
// (the commit then decodes the shard whole), never writing a shard
// without the line.
func TestUndecodedLineUnreadable(t *testing.T) {
	p, b, ids := threeLineShard(t)
	c, err := decodeShard(p, b, nil, func(id string) bool { return id == ids[0] })
	if err != nil || c.lazy != 2 {
		t.Fatalf("decode of the first entry only: %d undecoded, %v", c.lazy, err)
	}
	c.detach(c.src, filepath.Join(t.TempDir(), "gone.json"), 0, false)
	c.src = nil // as for a shard past keepShardBytes
	es := []idEntry{{ids[0], c.lines[0].e}, {ids[1], nil}, {ids[2], nil}}
	if _, _, err := encodeShard(p, es, c); !errors.Is(err, errUndecodedUnreadable) {
		t.Fatalf("encode with the shard file gone: %v, want errUndecodedUnreadable", err)
	}
}
