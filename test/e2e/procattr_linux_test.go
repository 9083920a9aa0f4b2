//go:build linux

package e2e

import "syscall"

// dieWithParent makes the kernel kill escrow if the test process dies (a test timeout, a
// crash), so no proxy is ever left behind.
func dieWithParent() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
