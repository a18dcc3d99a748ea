package state

import (
	"os/exec"
	"sync"
	"testing"
)

// TestAliveRacesWithExit: judging processes that exit and are reaped while
// they are being judged never answers "cannot tell": a process that
// disappears during the check (its /proc files vanish between the open and
// the read, ESRCH) is gone. About 1 check in 2,000 used to fail that way.
func TestAliveRacesWithExit(t *testing.T) {
	sys, err := System()
	if err != nil {
		t.Fatal(err)
	}
	self := sys.Self()
	const procs = 1000
	var wg sync.WaitGroup
	errs := make(chan error, procs)
	checks := 0
	var mu sync.Mutex
	for range procs {
		cmd := exec.Command("true")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		p := self
		p.PID = cmd.Process.Pid
		start, err := startTime(p.PID)
		if err != nil {
			// Already exited and reaped? Not with Wait still to come.
			t.Fatalf("start time of a child not yet waited for: %v", err)
		}
		p.StartTime = start
		done := make(chan struct{})
		wg.Add(2)
		go func() {
			defer wg.Done()
			defer close(done)
			cmd.Wait() // reaps it while the checker runs; its exit status is not the point
		}()
		go func() {
			defer wg.Done()
			n := 0
			for {
				alive, err := sys.Alive(p)
				n++
				if err != nil {
					errs <- err
					break
				}
				if !alive {
					break
				}
			}
			<-done
			mu.Lock()
			checks += n
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("Alive of an exiting process: %v", err)
	}
	if checks < procs {
		t.Fatalf("only %d checks of %d processes", checks, procs)
	}
	t.Logf("%d checks of %d exiting processes", checks, procs)
}
