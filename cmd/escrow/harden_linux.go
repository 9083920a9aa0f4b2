//go:build linux

package main

import "golang.org/x/sys/unix"

// lockMemory makes this process non-dumpable, as ssh-agent and gpg-agent do: no core dump (which
// would hold credentials and the CA key), and /proc/<pid>/{environ,mem,fd,maps} and ptrace are
// refused to every process without CAP_SYS_PTRACE, including processes of escrow's own user: an
// agent that runs as the same uid cannot read escrow's secrets out of its memory.
func lockMemory() error {
	return unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
}
