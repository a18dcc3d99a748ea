package rigtest

import (
	"strings"
	"testing"
)

// Etcd returns the client endpoints of the etcd rig (etcd-up.sh:
// DEPCACHE_ETCD_ENDPOINTS), skipping t, or failing it under CI, when the
// rig is not running.
func Etcd(t testing.TB) []string {
	t.Helper()
	return strings.Split(Env(t, "DEPCACHE_ETCD_ENDPOINTS"), ",")
}
