package state

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// checkDuplicateKeys reports the first object key that b, one JSON
// document, repeats within one object, at any depth. encoding/json keeps
// the last of them and drops the others without a word: a shard holding
// one entry twice, or a manifest naming one shard twice, read as whichever
// came last. Only whole-document decodes (the slow paths) call it; the
// line-by-line ones refuse a repeated entry by its order.
func checkDuplicateKeys(b []byte) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var walk func(path string) error
	walk = func(path string) error {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		switch t {
		case json.Delim('{'):
			seen := map[string]bool{}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return err
				}
				k, _ := kt.(string)
				if seen[k] {
					return fmt.Errorf("key %q repeated in the object at %s", k, path)
				}
				seen[k] = true
				if err := walk(path + "." + k); err != nil {
					return err
				}
			}
			_, err = dec.Token() // '}'
			return err
		case json.Delim('['):
			for i := 0; dec.More(); i++ {
				if err := walk(fmt.Sprintf("%s[%d]", path, i)); err != nil {
					return err
				}
			}
			_, err = dec.Token() // ']'
			return err
		}
		return nil
	}
	if err := walk("$"); err != nil && err != io.EOF {
		return err
	}
	return nil
}
