package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// soakSource is one source of the soak's source server.
type soakSource struct {
	URL string `json:"url"`
	// Want is the content a get must give: the file itself, or the tree
	// the archive unpacks to.
	Want string `json:"want"`
	Tar  bool   `json:"tar"`
}

// soakWorkerConfig is what the soak hands each worker process.
type soakWorkerConfig struct {
	ID        int          `json:"id"`
	Bin       string       `json:"bin"` // the depcache binary
	Root      string       `json:"root"`
	State     string       `json:"state,omitempty"` // --state of every command; empty: the file store
	Deadline  time.Time    `json:"deadline"`
	Sources   []soakSource `json:"sources"`
	LoopFlags []string     `json:"loop_flags"` // for get and run
	Seed      uint64       `json:"seed"`
}

// soakWorkerResult is what a worker reports on stdout when its deadline
// has passed.
type soakWorkerResult struct {
	Cycles     int            `json:"cycles"`
	Ops        map[string]int `json:"ops"` // depcache commands run, by command
	Mismatches []string       `json:"mismatches"`
	FailedGets []failedGet    `json:"failed_gets"`
	// Problems are other failures: a release or verify that failed, a run
	// that lost its dependency, a command that hung.
	Problems []string    `json:"problems"`
	Records  []logRecord `json:"records"` // warnings and errors logged
	Other    tally       `json:"other"`   // other stderr lines of commands that succeeded
}

// soakCmdTimeout bounds one depcache command of a worker: a hang is a
// failure, not a stuck soak.
const soakCmdTimeout = 3 * time.Minute

// mismatchExit is the status the run CMD of a worker exits with when the
// content differs from the source.
const mismatchExit = 42

func workerSoak(args []string) int {
	var cfg soakWorkerConfig
	if len(args) != 1 || json.Unmarshal([]byte(args[0]), &cfg) != nil {
		fmt.Fprintln(os.Stderr, "soak worker: want one JSON argument")
		return 2
	}
	w := &soakWorker{cfg: cfg, res: soakWorkerResult{Ops: map[string]int{}, Other: tally{}, Mismatches: []string{}, FailedGets: []failedGet{}, Problems: []string{}, Records: []logRecord{}},
		rng: rand.New(rand.NewPCG(cfg.Seed, uint64(cfg.ID)))}
	for i := 0; time.Now().Before(cfg.Deadline); i++ {
		src := cfg.Sources[w.rng.IntN(len(cfg.Sources))]
		dep := fmt.Sprintf("soak-w%d-%d-%d", cfg.ID, os.Getpid(), i)
		switch n := w.rng.IntN(100); {
		case n < 40:
			w.getCycle(src, dep, false)
		case n < 80:
			w.runCycle(src)
		default:
			w.getCycle(src, dep, true)
		}
		w.res.Cycles++
	}
	if err := json.NewEncoder(os.Stdout).Encode(w.res); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

type soakWorker struct {
	cfg soakWorkerConfig
	res soakWorkerResult
	rng *rand.Rand
}

// depcache runs one depcache command and returns its stdout, its exit
// status (-1: it did not run or was killed) and the stderr lines that are
// not log records. The log records of warnings and errors are kept.
func (w *soakWorker) depcache(op string, args ...string) (stdout string, code int, rest []string) {
	w.res.Ops[op]++
	ctx, cancel := context.WithTimeout(context.Background(), soakCmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, w.cfg.Bin, depcacheArgs(w.cfg.Root, w.cfg.State, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code = 0
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		code = -1
		w.problem("%s %q: killed after %s (hung)", op, args, soakCmdTimeout)
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		code = -1
		w.problem("%s: %v", op, err)
	}
	sc := bufio.NewScanner(&errb)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if r, ok := parseRecord(op, line); ok {
			if isWarning(r.Level) {
				w.res.Records = append(w.res.Records, r)
			}
			continue
		}
		if strings.TrimSpace(line) != "" {
			rest = append(rest, line)
		}
	}
	if code == 0 {
		for _, l := range rest {
			w.res.Other[op+": "+digits.ReplaceAllString(shorten(l), "N")]++
		}
	}
	return strings.TrimSpace(out.String()), code, rest
}

func (w *soakWorker) problem(format string, args ...any) {
	w.res.Problems = append(w.res.Problems, fmt.Sprintf("worker %d: ", w.cfg.ID)+fmt.Sprintf(format, args...))
}

// getCycle: get --dependent, optionally verify while held, compare the
// path with the source while held, release.
func (w *soakWorker) getCycle(src soakSource, dep string, verify bool) {
	start := time.Now()
	getArgs := append([]string{"get", "--dependent", dep, "--timeout", "2m"}, w.cfg.LoopFlags...)
	path, code, rest := w.depcache("get", append(getArgs, src.URL)...)
	if code != 0 {
		w.res.FailedGets = append(w.res.FailedGets, failedGet{Op: "get", Source: src.URL, Start: start, End: time.Now(), Code: code, Msg: strings.Join(rest, "\n")})
		// A get that failed may still have registered the dependent.
		w.depcache("release", "release", "--ignore-missing", "--dependent", dep, src.URL)
		return
	}
	if verify {
		w.verifyHeld(src)
	}
	if err := sameContent(path, src); err != nil {
		w.res.Mismatches = append(w.res.Mismatches, fmt.Sprintf("get %s → %s: %v", src.URL, path, err))
	}
	if _, code, rest := w.depcache("release", "release", "--dependent", dep, src.URL); code != 0 {
		w.problem("release --dependent %s %s: exit %d: %s", dep, src.URL, code, strings.Join(rest, "; "))
	}
}

// verifyHeld re-hashes a held entry: it must be READY and match.
func (w *soakWorker) verifyHeld(src soakSource) {
	out, code, rest := w.depcache("verify", "--json", "verify", src.URL)
	var res []struct {
		Source  string `json:"source"`
		OK      bool   `json:"ok"`
		Verdict string `json:"verdict"`
		Detail  string `json:"detail"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || code != 0 || len(res) != 1 || !res[0].OK {
		w.problem("verify %s of a held entry: exit %d, %s %s", src.URL, code, shorten(out), strings.Join(rest, "; "))
	}
}

// runCycle: run --dep SRC -- sh -c 'cmp ...': CMD compares the path while
// run holds it.
func (w *soakWorker) runCycle(src soakSource) {
	start := time.Now()
	check := `cmp -s "$D" "$1" || exit 42`
	if src.Tar {
		check = `diff -r -q "$D" "$1" >/dev/null 2>&1 || exit 42`
	}
	args := append([]string{"run", "--timeout", "2m"}, w.cfg.LoopFlags...)
	args = append(args, "--dep", "D="+src.URL, "--", "sh", "-c", check, "sh", src.Want)
	_, code, rest := w.depcache("run", args...)
	switch code {
	case 0:
	case mismatchExit:
		w.res.Mismatches = append(w.res.Mismatches, fmt.Sprintf("run --dep D=%s: CMD found $D differs from the source", src.URL))
	case 75:
		w.problem("run --dep D=%s: a dependency was lost while CMD ran: %s", src.URL, strings.Join(rest, "; "))
	case 1, 3:
		// Before CMD started: the fetch failed (1) or timed out (3).
		w.res.FailedGets = append(w.res.FailedGets, failedGet{Op: "run", Source: src.URL, Start: start, End: time.Now(), Code: code, Msg: strings.Join(rest, "\n")})
	default:
		w.problem("run --dep D=%s: exit %d: %s", src.URL, code, strings.Join(rest, "; "))
	}
}

// sameContent compares what depcache handed out with the source.
func sameContent(path string, src soakSource) error {
	if !src.Tar {
		return sameFile(path, src.Want)
	}
	seen := 0
	err := filepath.WalkDir(src.Want, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(src.Want, p)
		seen++
		return sameFile(filepath.Join(path, rel), p)
	})
	if err != nil {
		return err
	}
	got := 0
	err = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			got++
		}
		return err
	})
	if err == nil && got != seen {
		err = fmt.Errorf("%d files, the source has %d", got, seen)
	}
	return err
}

func sameFile(got, want string) error {
	a, err := os.ReadFile(got)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(want)
	if err != nil {
		return err
	}
	if !bytes.Equal(a, b) {
		return fmt.Errorf("%s: %d bytes differ from the source's %d", got, len(a), len(b))
	}
	return nil
}

// digits: progress lines differ only in their figures.
var digits = regexp.MustCompile(`[0-9]+(\.[0-9]+)?`)

func shorten(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 300 {
		return s[:300] + "..."
	}
	return s
}
