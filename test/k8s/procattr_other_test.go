//go:build !linux

package k8s_test

import "syscall"

func dieWithParent() *syscall.SysProcAttr { return nil }
