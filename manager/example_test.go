package manager_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/depcache/depcache/manager"
)

// Embedding depcache in a Go runner: one manager per process, a dependent
// per run, Wait with the run's context, Release when the run ends.
func Example() {
	root, _ := os.MkdirTemp("", "depcache-example-")
	defer os.RemoveAll(root)
	src, _ := filepath.Abs("../testdata/bundles/hello.tar.gz")

	m, err := manager.New(manager.Config{Root: root}) // Log, Metrics, policy: see Config
	if err != nil {
		panic(err)
	}
	stop, err := m.Start(context.Background()) // reconciles the root, then runs the loop
	if err != nil {
		panic(err)
	}
	defer stop() // stops the loop; unfinished downloads are handed back to others

	key, err := manager.ParseKey("file://"+src, "") // or ("https://…", "<sha256>")
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // the run's deadline
	defer cancel()
	if _, err := m.Get(ctx, "run-42", key); err != nil { // bound to this process: reaped if it dies
		panic(err)
	}
	e, err := m.Wait(ctx, key) // one download across all processes; the others wait
	if ctx.Err() == nil {
		// Released once Wait has its answer (lets the sweep evict it
		// later). A shutdown keeps it: stop hands the download back,
		// resumable, where Release would drop what it fetched.
		defer m.Release(context.Background(), "run-42", key)
	}
	var failed *manager.FailedError
	switch {
	case errors.As(err, &failed):
		fmt.Println("failed:", failed.Reason)
		return
	case err != nil:
		panic(err) // ctx ended
	}
	path, _ := m.Abs(e)
	b, _ := os.ReadFile(filepath.Join(path, "hello", "README.txt"))
	fmt.Print(e.Stage, " ", string(b))
	// Output: READY hello from depcache
}
