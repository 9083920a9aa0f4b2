//go:build unix

package scrub

import (
	"syscall"
	"testing"
	"time"
)

// cpuNow is the CPU time (user and system) the test process has used so far: on a shared
// machine it varies far less than wall time.
func cpuNow(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
