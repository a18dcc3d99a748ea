//go:build !linux

package state

import (
	"os"
	"syscall"
)

// fallocate is not there: allocate writes zeros.
func fallocate(*os.File, int64, int64) error { return syscall.EOPNOTSUPP }
