//go:build !unix

package scrub

import (
	"testing"
	"time"
)

// cpuNow is not measured off unix (no getrusage): -1 tells reportCPU to report nothing.
func cpuNow(*testing.B) time.Duration { return -1 }
