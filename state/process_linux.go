package state

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// System returns the real [Processes] of this machine, read from /proc.
func System() (Processes, error) {
	host, err := os.Hostname()
	if err != nil {
		return nil, fmt.Errorf("hostname: %w", err)
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return nil, fmt.Errorf("boot id: %w", err)
	}
	ns, err := os.Readlink("/proc/self/ns/pid")
	if err != nil {
		return nil, fmt.Errorf("pid namespace: %w", err)
	}
	pid := os.Getpid()
	start, err := startTime(pid)
	if err != nil {
		return nil, err
	}
	return &system{self: Process{
		Host:      host,
		BootID:    strings.TrimSpace(string(boot)),
		PIDNS:     ns,
		PID:       pid,
		StartTime: start,
	}}, nil
}

type system struct{ self Process }

func (s *system) Self() Process { return s.self }

func (s *system) Alive(p Process) (bool, error) {
	if !s.self.SameMachine(p) {
		return false, fmt.Errorf("process %v is not on this machine", p)
	}
	if p.Same(s.self) {
		return true, nil
	}
	st, zombie, err := procStat(p.PID)
	if vanished(err) {
		// With /proc mounted hidepid, another user's live process is
		// invisible there: only kill(2)'s ESRCH proves it gone.
		if kerr := unix.Kill(p.PID, 0); kerr == nil || errors.Is(kerr, unix.EPERM) {
			return true, nil
		}
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if st != p.StartTime {
		return false, nil
	}
	// A zombie has exited; only its parent has not reaped it yet. But the
	// leader of a multi-threaded process shows as a zombie as soon as it
	// exits itself, while its other threads may still be finishing a
	// system call (an unlink of the very lock being judged): the process is
	// gone only when its leader is the last task left.
	if zombie {
		tasks, err := os.ReadDir("/proc/" + strconv.Itoa(p.PID) + "/task")
		if vanished(err) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		return len(tasks) > 1, nil
	}
	return true, nil
}

// vanished reports whether a read of /proc/PID failed because the process
// is gone: its directory no longer exists, or it was reaped between the
// open and the read (ESRCH), which leaves nothing to read either. Every
// /proc read races with the process's exit; neither is "cannot tell".
func vanished(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) || errors.Is(err, errEmptyStat)
}

// errEmptyStat: /proc/PID/stat read as empty, as it does for a process
// reaped after the open.
var errEmptyStat = errors.New("empty /proc stat file")

func startTime(pid int) (uint64, error) {
	st, _, err := procStat(pid)
	return st, err
}

// procStat reads the start time (field 22) and whether the process is a
// zombie (field 3) from /proc/PID/stat.
func procStat(pid int) (start uint64, zombie bool, err error) {
	f, err := statFields(pid)
	if err != nil {
		return 0, false, err
	}
	// f[0] is field 3 (state), so field 22 is f[19].
	if len(f) < 20 {
		return 0, false, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	v, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("/proc/%d/stat: start time: %w", pid, err)
	}
	return v, f[0] == "Z" || f[0] == "X", nil
}

// ParentPID returns the parent of process pid of this pid namespace
// (field 4 of /proc/PID/stat).
func ParentPID(pid int) (int, error) {
	f, err := statFields(pid)
	if err != nil {
		return 0, err
	}
	if len(f) < 2 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: parent: %w", pid, err)
	}
	return ppid, nil
}

// statFields returns the fields of /proc/PID/stat from field 3 on. The
// command name (field 2) may hold spaces and parentheses, so fields are
// counted after its last ')'.
func statFields(pid int) ([]string, error) {
	b, err := readFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil, err
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("/proc/%d/stat: %w", pid, errEmptyStat)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("/proc/%d/stat: no command field", pid)
	}
	return strings.Fields(string(b[i+1:])), nil
}
