package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testPut is a proposal's args: register dependent Name on the entry of
// Source.
type testPut struct {
	Source string `json:"source"`
	Name   string `json:"name"`
}

func testKey(source string) Key { return Key{Kind: Bundle, Source: source} }

// putApplier registers a dependent, creating the entry READY; it records
// whether it was told Again, and fails for the name "fail".
func putApplier(sawAgain *bool) Applier {
	return func(tx *Txn, p Proposal) (bool, []byte, error) {
		var a testPut
		if err := json.Unmarshal(p.Args, &a); err != nil {
			return false, nil, err
		}
		if a.Name == "fail" {
			return false, nil, errTestApplier
		}
		if sawAgain != nil && p.Again {
			*sawAgain = true
		}
		k := testKey(a.Source)
		e := tx.Get(k)
		if e == nil {
			e = &Entry{Key: k, Stage: Ready, Path: "entries/x", Dependents: map[string]Dependent{}}
		} else {
			e = e.Clone()
		}
		e.Dependents[a.Name] = Dependent{Since: time.Unix(1, 0).UTC()}
		tx.Put(e)
		return true, []byte(fmt.Sprintf("%q", a.Name+" registered")), nil
	}
}

var errTestApplier = errors.New("test applier refuses")

func putProposal(source, name string) Proposal {
	b, _ := json.Marshal(testPut{Source: source, Name: name})
	return Proposal{Op: "test.put/1", IDs: []string{testKey(source).ID()}, Args: b}
}

// combineStores opens two stores of one root, as two processes of this
// machine would, both serving test.put/1 unless told otherwise.
func combineStores(t *testing.T, serveA bool) (a, b *Store) {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("TMPDIR", t.TempDir()) // a spool of the test's own
	var err error
	if a, err = Open(dir, Options{}); err != nil {
		t.Fatal(err)
	}
	if b, err = Open(dir, Options{}); err != nil {
		t.Fatal(err)
	}
	if serveA {
		a.Serve("test.put/1", putApplier(nil))
	}
	b.Serve("test.put/1", putApplier(nil))
	if a.spool() == "" || a.spool() != b.spool() {
		t.Fatalf("spools %q and %q: want one, shared", a.spool(), b.spool())
	}
	return a, b
}

// postFor posts p from s as a waiting proposer does.
func postFor(t *testing.T, s *Store, p Proposal) *pending {
	t.Helper()
	pd := &pending{s: s, p: &p}
	if err := pd.post(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pd.close)
	return pd
}

func dependentsOf(t *testing.T, s *Store, source string) []string {
	t.Helper()
	st, err := s.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	e := st.Get(testKey(source))
	if e == nil {
		return nil
	}
	var names []string
	for n := range e.Dependents {
		names = append(names, n)
	}
	return names
}

func TestCombineHolderAppliesAndAnswers(t *testing.T) {
	a, b := combineStores(t, true)
	pd := postFor(t, b, putProposal("https://h/b", "from-b"))
	// a's own operation, on another entry: its hold applies b's too.
	if _, err := a.Propose(context.Background(), putProposal("https://h/a", "from-a")); err != nil {
		t.Fatal(err)
	}
	if !pd.read(0) {
		t.Fatal("the proposer got no answer from the hold that claimed its proposal")
	}
	res, applied, err := pd.answer()
	if err != nil || !applied || string(res) != `"from-b registered"` {
		t.Fatalf("answer: %q applied=%v err=%v; want the applier's result", res, applied, err)
	}
	if got := dependentsOf(t, a, "https://h/b"); len(got) != 1 || got[0] != "from-b" {
		t.Fatalf("b's entry has dependents %v, want [from-b]", got)
	}
	if got := dependentsOf(t, a, "https://h/a"); len(got) != 1 {
		t.Fatalf("a's entry has dependents %v, want [from-a]", got)
	}
	if st := a.CombineStats(); st.ServedOthers != 1 {
		t.Fatalf("a served %d proposals, want 1", st.ServedOthers)
	}
	if _, err := os.Lstat(pd.base + proposalSuffix); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the proposal file is still there after the claim: %v", err)
	}
}

func TestCombineDeclines(t *testing.T) {
	for _, tc := range []struct {
		name   string
		serveA bool
		dep    string
	}{
		{"an applier error", true, "fail"},
		{"an op the holder does not know", false, "x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := combineStores(t, tc.serveA)
			pd := postFor(t, b, putProposal("https://h/b", tc.dep))
			if err := a.UpdateEntries(context.Background(), []string{testKey("https://h/a").ID()}, func(*Txn) (bool, error) { return false, nil }); err != nil {
				t.Fatal(err)
			}
			if !pd.read(0) {
				t.Fatal("no answer")
			}
			if _, applied, _ := pd.answer(); applied {
				t.Fatal("answered applied; want declined, for the proposer to apply it itself")
			}
			if got := dependentsOf(t, a, "https://h/b"); got != nil {
				t.Fatalf("a declined proposal changed the state: %v", got)
			}
		})
	}
}

func TestCombineSkipsDeadProposers(t *testing.T) {
	a, b := combineStores(t, true)
	pd := postFor(t, b, putProposal("https://h/b", "ghost"))
	// A proposer that dies leaves its proposal, and the kernel closes its
	// end of the FIFO: nobody reads there any more.
	pd.fifo.Close()
	pd.fifo = nil
	if err := a.UpdateEntries(context.Background(), []string{testKey("https://h/a").ID()}, func(*Txn) (bool, error) { return false, nil }); err != nil {
		t.Fatal(err)
	}
	if got := dependentsOf(t, a, "https://h/b"); got != nil {
		t.Fatalf("a dead process's proposal was applied: %v", got)
	}
	for _, suffix := range []string{proposalSuffix, fifoSuffix} {
		if _, err := os.Lstat(pd.base + suffix); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a dead process's %s file was left in the spool: %v", suffix, err)
		}
	}
}

// A hold closes every proposer's FIFO it opened, whether it applied the
// proposal or declined it.
func TestCombineHoldClosesFIFOs(t *testing.T) {
	for _, dep := range []string{"ok", "fail"} {
		t.Run(dep, func(t *testing.T) {
			a, b := combineStores(t, true)
			var pds []*pending
			for i := range 10 {
				pds = append(pds, postFor(t, b, putProposal(fmt.Sprintf("https://h/%d", i), dep)))
			}
			before := openFDs(t)
			if err := a.UpdateEntries(context.Background(), []string{testKey("https://h/a").ID()}, func(*Txn) (bool, error) { return false, nil }); err != nil {
				t.Fatal(err)
			}
			if after := openFDs(t); after != before {
				t.Fatalf("%d descriptors open after the hold, %d before", after, before)
			}
			for i, pd := range pds {
				if !pd.read(0) {
					t.Fatalf("proposal %d: no answer", i)
				}
				if _, applied, _ := pd.answer(); applied != (dep == "ok") {
					t.Fatalf("proposal %d: applied %v", i, applied)
				}
			}
		})
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	return len(fds)
}

// A proposal claimed by a holder that vanished before answering is applied
// by its proposer once it has the lock, told Again.
func TestProposeAgainAfterAnUnansweredClaim(t *testing.T) {
	a, b := combineStores(t, true)
	sawAgain := false
	b.Serve("test.put/1", putApplier(&sawAgain))
	unlock := holdLock(t, a)
	var wg sync.WaitGroup
	var res []byte
	var perr error
	wg.Go(func() { res, perr = b.Propose(context.Background(), putProposal("https://h/b", "again")) })
	req := awaitProposal(t, b.spool())
	if err := os.Remove(req); err != nil { // the claim of a holder that then died
		t.Fatal(err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if perr != nil || string(res) != `"again registered"` {
		t.Fatalf("Propose: %q, %v", res, perr)
	}
	if !sawAgain {
		t.Fatal("the applier was not told Again")
	}
	if got := dependentsOf(t, a, "https://h/b"); len(got) != 1 {
		t.Fatalf("dependents %v, want [again]", got)
	}
}

// A proposer waiting behind the lock gets its answer from the holder's
// commit without taking the lock itself.
func TestProposeAnsweredWhileWaiting(t *testing.T) {
	a, b := combineStores(t, true)
	unlock := holdLock(t, a)
	var wg sync.WaitGroup
	var res []byte
	var perr error
	wg.Go(func() { res, perr = b.Propose(context.Background(), putProposal("https://h/b", "waiting")) })
	awaitProposal(t, b.spool())
	// Serve it as a holder would, while b's Lock still waits: claim,
	// apply in a commit, answer, with the lock held by hold.
	svs := a.claim()
	if len(svs) != 1 {
		t.Fatalf("claimed %d proposals, want 1", len(svs))
	}
	st, err := a.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !svs[0].run(st) {
		t.Fatal("the proposal changed nothing")
	}
	a.answer(svs, true)
	wg.Wait()
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	if perr != nil || string(res) != `"waiting registered"` {
		t.Fatalf("Propose: %q, %v", res, perr)
	}
	if got := b.CombineStats(); got.AnsweredByOthers != 1 {
		t.Fatalf("stats %+v, want 1 answered by others", got)
	}
}

// Many proposers over three stores of one root: every operation lands once.
func TestCombineManyProposers(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("TMPDIR", t.TempDir())
	var stores []*Store
	for range 3 {
		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		s.Serve("test.put/1", putApplier(nil))
		stores = append(stores, s)
	}
	const per = 40
	var wg sync.WaitGroup
	errs := make(chan error, 3*per)
	for i, s := range stores {
		wg.Go(func() {
			for j := range per {
				if _, err := s.Propose(context.Background(), putProposal(fmt.Sprintf("https://h/%d", j%5), fmt.Sprintf("s%d-%d", i, j))); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := 0
	for j := range 5 {
		total += len(dependentsOf(t, stores[0], fmt.Sprintf("https://h/%d", j)))
	}
	if total != 3*per {
		t.Fatalf("%d dependents registered, want %d", total, 3*per)
	}
	var served, answered uint64
	for _, s := range stores {
		st := s.CombineStats()
		served, answered = served+st.ServedOthers, answered+st.AnsweredByOthers
	}
	if served != answered {
		t.Fatalf("%d proposals served, %d answered: every served one is answered once", served, answered)
	}
	t.Logf("%d of %d operations applied by another store", served, 3*per)
}

// holdLock takes s's state lock as another process would, and returns
// its unlock.
func holdLock(t *testing.T, s *Store) func() error {
	t.Helper()
	hold, err := NewLock(s.lock.Path(), LockOptions{})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := hold.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return unlock
}

func awaitProposal(t *testing.T, dir string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		names, _ := filepath.Glob(filepath.Join(dir, "*"+proposalSuffix))
		if len(names) == 1 {
			return names[0]
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("no proposal appeared in the spool")
	return ""
}

func TestPrivateDirRefusesOthers(t *testing.T) {
	base := t.TempDir()
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(open, 0o777)
	link := filepath.Join(base, "link")
	if err := os.Symlink(base, link); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{open, link} {
		if err := privateDir(d); err == nil || !strings.Contains(err.Error(), "not a directory private") {
			t.Errorf("privateDir(%s) = %v, want a refusal", d, err)
		}
	}
	if err := privateDir(filepath.Join(base, "new")); err != nil {
		t.Fatal(err)
	}
}

// An answer is seen by a look without waiting after a wait that timed out
// (a past read deadline failed every later read, so a proposer that took
// the lock missed its answer and applied its proposal again).
func TestAnswerSeenAfterAWaitTimedOut(t *testing.T) {
	a, b := combineStores(t, true)
	pd := postFor(t, b, putProposal("https://h/b", "late"))
	if pd.read(time.Millisecond) {
		t.Fatal("an answer before anyone answered")
	}
	a.reply(&served{base: pd.base}, []byte{frameResult, 'x'})
	if !pd.read(0) {
		t.Fatal("the answer was not seen")
	}
	if res, applied, err := pd.answer(); !applied || err != nil || string(res) != "x" {
		t.Fatalf("answer %q, %v, %v", res, applied, err)
	}
}

// Options.OnCombine hears of what a store proposed, and of what it served.
func TestOnCombineEvents(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("TMPDIR", t.TempDir())
	var mu sync.Mutex
	events := map[string]int{}
	open := func() *Store {
		s, err := Open(dir, Options{OnCombine: func(e string) { mu.Lock(); events[e]++; mu.Unlock() }})
		if err != nil {
			t.Fatal(err)
		}
		s.Serve("test.put/1", putApplier(nil))
		return s
	}
	a, b := open(), open()
	pd := postFor(t, b, putProposal("https://h/b", "x"))
	if _, err := a.Propose(context.Background(), putProposal("https://h/a", "y")); err != nil {
		t.Fatal(err)
	}
	if !pd.read(0) {
		t.Fatal("no answer")
	}
	mu.Lock()
	defer mu.Unlock()
	if events["proposed"] != 1 || events["served"] != 1 {
		t.Fatalf("events %v, want one proposed and one served", events)
	}
}

// A root's first proposer sweeps the spools of other roots that nobody
// changed for staleSpool, litter and all, and leaves the rest.
func TestFirstProposerSweepsOldSpools(t *testing.T) {
	a, b := combineStores(t, true)
	base := filepath.Dir(a.spool())
	old := time.Now().Add(-time.Hour)
	mk := func(name string, mtime time.Time, file bool) string {
		p := filepath.Join(base, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if file {
			f := filepath.Join(p, "1-00.fifo")
			if err := os.WriteFile(f, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(f, mtime, mtime); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		return p
	}
	oldEmpty := mk("oldempty", old, false)
	oldLitter := mk("oldlitter", old, true)
	newEmpty := mk("newempty", time.Now(), false)
	newFull := mk("newfull", time.Now(), true)
	// A proposer of another root that has waited an hour behind a long
	// hold, still listening on its FIFO: nothing of its spool goes.
	waiting := mk("waiting", time.Now(), false)
	fifo := filepath.Join(waiting, "2-00"+fifoSuffix)
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	listener, err := os.OpenFile(fifo, os.O_RDWR|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	req := filepath.Join(waiting, "2-00"+proposalSuffix)
	if err := os.WriteFile(req, []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{fifo, req, waiting} {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	sweptSpools.Store(false)                       // once per process, and other tests of this one made spools
	postFor(t, b, putProposal("https://h/b", "x")) // makes this root's spool
	for _, p := range []string{oldEmpty, oldLitter} {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s, an hour old, is still there: %v", filepath.Base(p), err)
		}
	}
	for _, p := range []string{newEmpty, newFull, filepath.Join(newFull, "1-00.fifo"), a.spool(), fifo, req} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("%s: %v; want it kept", filepath.Base(p), err)
		}
	}
}

// A proposer whose proposal a holder claimed sleeps on its FIFO for
// claimedWait, not for the lock's poll: the holder answers before it
// unlocks, so looks at the lock meanwhile only take its CPU. An unclaimed
// one waits only the poll it was given, and an answer still ends either.
func TestClaimedProposerWaitsOnItsFIFO(t *testing.T) {
	a, b := combineStores(t, true)
	ctx := context.Background()

	free := postFor(t, b, putProposal("https://h/free", "free"))
	if answered, err := free.wait(ctx, time.Millisecond); answered || err != nil {
		t.Fatalf("unclaimed wait: answered=%v err=%v, want a timeout", answered, err)
	}
	if free.claimed {
		t.Fatal("a proposal whose file is still there was taken as claimed")
	}

	pd := postFor(t, b, putProposal("https://h/b", "claimed"))
	sv := a.claimOne(pd.base)
	if sv == nil {
		t.Fatal("the holder did not claim the proposal")
	}
	defer sv.close()
	start := time.Now()
	if answered, err := pd.wait(ctx, time.Millisecond); answered || err != nil {
		t.Fatalf("claimed wait: answered=%v err=%v, want a timeout", answered, err)
	}
	if waited := time.Since(start); !pd.claimed || waited < claimedWait {
		t.Fatalf("claimed=%v after a wait of %s: want the claim seen and a wait of at least %s", pd.claimed, waited, claimedWait)
	}
	a.reply(sv, []byte{frameResult, 'x'})
	if answered, err := pd.wait(ctx, time.Millisecond); !answered || err != nil {
		t.Fatalf("after the answer: answered=%v err=%v", answered, err)
	}
	if res, applied, err := pd.answer(); !applied || err != nil || string(res) != "x" {
		t.Fatalf("answer %q, %v, %v", res, applied, err)
	}
}

// The spool goes to /dev/shm's tmpfs unless TMPDIR names a place, and to
// os.TempDir() where there is no tmpfs to be had.
func TestSpoolBase(t *testing.T) {
	t.Setenv("TMPDIR", "")
	if isTmpfs(shmDir) {
		if got := spoolBase(); got != shmDir {
			t.Fatalf("spoolBase() = %q with no TMPDIR and a tmpfs at %s", got, shmDir)
		}
	}
	old := shmDir
	shmDir = t.TempDir() // not a tmpfs here, or at worst one: then skip that half
	t.Cleanup(func() { shmDir = old })
	if !isTmpfs(shmDir) {
		if got := spoolBase(); got != os.TempDir() {
			t.Fatalf("spoolBase() = %q with no tmpfs, want os.TempDir() %q", got, os.TempDir())
		}
	}
	dir := t.TempDir()
	t.Setenv("TMPDIR", dir)
	if got := spoolBase(); got != dir {
		t.Fatalf("spoolBase() = %q with TMPDIR=%s", got, dir)
	}
}

// A spool base where this user cannot have a private directory (a
// /dev/shm mounted read-only, or a foreign depcache-UID there) falls back
// to os.TempDir(), where combining still works.
func TestSpoolFallsBackToTempDir(t *testing.T) {
	t.Setenv("TMPDIR", "")
	old := shmDir
	t.Cleanup(func() { shmDir = old })
	if isTmpfs(old) {
		blocked, err := os.MkdirTemp(old, "depcache-test-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(blocked) })
		// A file where the private directory would be.
		if err := os.WriteFile(filepath.Join(blocked, "depcache-"+strconv.Itoa(os.Geteuid())), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		shmDir = blocked
	}
	s, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir := s.spool()
	if dir == "" || !strings.HasPrefix(dir, filepath.Join(os.TempDir(), "depcache-")) {
		t.Fatalf("spool %q: want one under %s", dir, os.TempDir())
	}
}
