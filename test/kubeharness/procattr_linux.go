//go:build linux

package kubeharness

import "syscall"

// dieWithParent makes the kernel kill a child (etcd, kube-apiserver) if the test process dies
// (a test timeout, a crash), so nothing is left listening.
func dieWithParent() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
