//go:build linux

package k8s_test

import "syscall"

// dieWithParent makes the kernel kill a child (etcd, kube-apiserver, escrow) if the test process
// dies (a test timeout, a crash), so nothing is left listening.
func dieWithParent() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
