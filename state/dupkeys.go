package state

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// checkRepeatedKeys reports the first key that the object at the top-level
// field of b (a JSON document) repeats: "entries" of a shard or of a
// format 1 state, "shards" of a manifest. encoding/json keeps the last of
// them and drops the others without a word, so a shard holding one entry
// on two lines, or a manifest naming one shard twice, read as whichever
// came last. The line-by-line readers refuse those by their order (and
// fall back to the whole decode, which calls this); a key repeated inside
// one entry's line is read alike by both.
func checkRepeatedKeys(b []byte, field string) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil // not an object: the decode says what it is
	}
	var skip json.RawMessage
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil
		}
		if k, _ := kt.(string); k != field {
			if dec.Decode(&skip) != nil {
				return nil
			}
			continue
		}
		if t, err := dec.Token(); err != nil || t != json.Delim('{') {
			return nil
		}
		seen := map[string]bool{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return nil
			}
			k, _ := kt.(string)
			if seen[k] {
				return fmt.Errorf("%q repeated in %q", k, field)
			}
			seen[k] = true
			if dec.Decode(&skip) != nil {
				return nil
			}
		}
		return nil
	}
	return nil
}
