package rigtest

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Etcd returns the client endpoints of the etcd rig (etcd-up.sh:
// DEPCACHE_ETCD_ENDPOINTS), skipping t, or failing it under CI, when the
// rig is not running. Until t ends it holds a shared claim on the rig, so
// that no fault test (EtcdFaults) of another test process, go test running
// packages in parallel, stops members under it.
func Etcd(t testing.TB) []string {
	t.Helper()
	eps := strings.Split(Env(t, "DEPCACHE_ETCD_ENDPOINTS"), ",")
	claimRig(t, syscall.LOCK_SH)
	return eps
}

// EtcdFaults is Etcd for a test that stops, pauses or kills the rig's
// members: its claim is exclusive, so it waits for the other tests that
// use the rig and they wait for it.
func EtcdFaults(t testing.TB) []string {
	t.Helper()
	eps := strings.Split(Env(t, "DEPCACHE_ETCD_ENDPOINTS"), ",")
	claimRig(t, syscall.LOCK_EX)
	return eps
}

// claimRig takes a flock of how on a file beside the rig, released when t
// ends. One process holds one kind of claim: a test that asks again, or
// a fault test after a shared one, keeps the strongest it already has.
func claimRig(t testing.TB, how int) {
	t.Helper()
	name := filepath.Join(os.TempDir(), "depcache-etcd-rig.lock")
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		t.Fatalf("claiming the etcd rig: %v", err)
	}
	// A new open file description per claim: flock locks belong to it, so
	// claims of one process's tests are separate too.
	if err := syscall.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		t.Fatalf("claiming the etcd rig: %v", err)
	}
	t.Cleanup(func() { f.Close() })
}
