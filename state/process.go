package state

import "fmt"

// Process identifies one process across hosts, boots and pid namespaces.
// A pid means something only together with the boot and the pid namespace
// it was read in; StartTime tells a reused pid from the original.
type Process struct {
	Host   string `json:"host"`
	BootID string `json:"boot_id"`
	PIDNS  string `json:"pid_ns"`
	PID    int    `json:"pid"`
	// StartTime is the process start time in clock ticks since boot
	// (field 22 of /proc/PID/stat).
	StartTime uint64 `json:"start_time"`
}

// Same reports whether p and q are the same process.
func (p Process) Same(q Process) bool {
	return p.SameMachine(q) && p.PID == q.PID && p.StartTime == q.StartTime
}

// SameMachine reports whether a pid written by q can be checked by p: same
// host name, same boot and same pid namespace. Containers and fake hosts
// share the boot but not the pid namespace.
func (p Process) SameMachine(q Process) bool {
	return p.BootID != "" && p.PIDNS != "" &&
		p.Host == q.Host && p.BootID == q.BootID && p.PIDNS == q.PIDNS
}

func (p Process) String() string {
	return fmt.Sprintf("pid %d on %s", p.PID, p.Host)
}

// Processes tells who we are and whether a process on our machine is alive.
// Production code uses [System]; tests substitute their own.
type Processes interface {
	// Self describes the calling process.
	Self() Process
	// Alive reports whether p, which must be on our machine (SameMachine),
	// is still running: its pid exists and has the same start time.
	Alive(p Process) (bool, error)
}
