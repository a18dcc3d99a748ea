package manager

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Failpoints stop a process at a named step so that a crash test can kill
// it exactly there (etcd's gofail is the model, without the code
// generation). DEPCACHE_FAILPOINT=NAME or NAME:N stops the N-th time (the
// first by default) the process reaches NAME: it prints "failpoint NAME" on
// stderr and blocks until it is killed. Unset, a failpoint costs a
// comparison.
var failpoints = parseFailpoint(os.Getenv("DEPCACHE_FAILPOINT"))

type failpointSet struct {
	name string
	nth  int
	mu   sync.Mutex
	hits int
}

func parseFailpoint(v string) *failpointSet {
	if v == "" {
		return nil
	}
	name, n, _ := strings.Cut(v, ":")
	nth, err := strconv.Atoi(n)
	if err != nil || nth < 1 {
		nth = 1
	}
	return &failpointSet{name: name, nth: nth}
}

// failpoint blocks forever at the configured step.
func failpoint(name string) {
	f := failpoints
	if f == nil || f.name != name {
		return
	}
	f.mu.Lock()
	f.hits++
	stop := f.hits == f.nth
	f.mu.Unlock()
	if stop {
		fmt.Fprintf(os.Stderr, "failpoint %s\n", name)
		select {}
	}
}
