//go:build !linux

package kubeharness

import "syscall"

func dieWithParent() *syscall.SysProcAttr { return nil }
