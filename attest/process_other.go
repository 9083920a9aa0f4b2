//go:build !linux

package attest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// FromTCP is not supported on this platform: it has no /proc.
func (f *ProcessFinder) FromTCP(context.Context, netip.AddrPort, netip.AddrPort) (*Process, error) {
	return nil, fmt.Errorf("%w: process lookup is supported on Linux only", ErrProcessNotFound)
}

// FromUnix is not supported on this platform.
func (f *ProcessFinder) FromUnix(*net.UnixConn) (*Process, error) {
	return nil, fmt.Errorf("%w: process lookup is supported on Linux only", ErrProcessNotFound)
}
