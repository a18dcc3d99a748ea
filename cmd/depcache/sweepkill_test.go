package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/depcache/depcache/state"
)

// TestSweepKilledAtEveryStep kills a gc at each step of a sweep that
// evicts three entries (DEPCACHE_FAILPOINT stops it there): inside the
// commit's lock hold, after the commit and before the first move, after
// each move into trash, before the trash is deleted, and after each
// deletion in it. Whatever the step, no READY entry is left
// without its content, and the next sweep finishes the job: nothing left
// in entries/ or trash/, no entry left.
func TestSweepKilledAtEveryStep(t *testing.T) {
	for _, point := range []string{"sweep-before-commit", "sweep-committed", "trash-moved:1", "trash-moved:2", "trash-moved:3", "sweep-before-delete", "trash-deleted:1", "trash-deleted:2"} {
		t.Run(point, func(t *testing.T) {
			root := t.TempDir()
			srcDir := t.TempDir()
			var srcs []string
			for i := range 3 {
				p := filepath.Join(srcDir, fmt.Sprintf("dep-%d.bin", i))
				if err := os.WriteFile(p, []byte(strings.Repeat(fmt.Sprint(i), 4096)), 0o644); err != nil {
					t.Fatal(err)
				}
				srcs = append(srcs, "file://"+p)
			}
			for _, src := range srcs {
				if out, err := exec.Command(bin, "--root", root, "get", "--dependent", "job", src).CombinedOutput(); err != nil {
					t.Fatalf("get %s: %v\n%s", src, err, out)
				}
				if out, err := exec.Command(bin, "--root", root, "release", "--dependent", "job", src).CombinedOutput(); err != nil {
					t.Fatalf("release %s: %v\n%s", src, err, out)
				}
			}

			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			gc := exec.CommandContext(ctx, bin, "--root", root, "gc", "--max-size", "1", "--min-age", "0s")
			gc.Env = append(os.Environ(), "DEPCACHE_FAILPOINT="+point)
			stderr, err := gc.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := gc.Start(); err != nil {
				t.Fatal(err)
			}
			name, _, _ := strings.Cut(point, ":")
			reached := false
			sc := bufio.NewScanner(stderr)
			for sc.Scan() {
				if sc.Text() == "failpoint "+name {
					reached = true
					break
				}
			}
			if err := gc.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			werr := gc.Wait()
			if !reached {
				t.Fatalf("gc never reached failpoint %s (exit: %v)", point, werr)
			}
			var exit *exec.ExitError
			if !errors.As(werr, &exit) || exit.ExitCode() != -1 {
				t.Fatalf("gc was not killed at %s: %v", point, werr)
			}

			// No READY entry without its content, at once, before anything
			// repairs the root.
			st := readState(t, root)
			for _, e := range st.Entries {
				if e.Stage != state.Ready {
					continue
				}
				if _, err := os.Stat(filepath.Join(root, e.Path)); err != nil {
					t.Errorf("killed at %s: READY entry %s has no content: %v", point, e.Key.Source, err)
				}
			}
			if point == "sweep-before-commit" && len(st.Entries) != 3 {
				t.Errorf("killed before its commit, the sweep removed %d entries", 3-len(st.Entries))
			}
			if out, err := exec.Command(bin, "--root", root, "gc", "--max-size", "1", "--min-age", "0s").CombinedOutput(); err != nil {
				t.Fatalf("the next gc: %v\n%s", err, out)
			}
			if st := readState(t, root); len(st.Entries) != 0 {
				t.Errorf("after the next gc, %d entries are left", len(st.Entries))
			}
			for _, dir := range []string{"entries", "trash"} {
				err := filepath.WalkDir(filepath.Join(root, dir), func(p string, d fs.DirEntry, err error) error {
					if errors.Is(err, fs.ErrNotExist) {
						return nil
					}
					if err != nil {
						return err
					}
					if !d.IsDir() && d.Name() != "owner.json" {
						t.Errorf("after the next gc, content is left: %s", p)
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
