//go:build linux

package attest

import (
	"errors"
	"net"
	"net/netip"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// clientSocket dials ln and returns the client's local and remote addresses and its socket
// inode, as fstat reports it.
func clientSocket(t testing.TB, network, addr string) (src, dst netip.AddrPort, inode string) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Skipf("listen %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	_ = raw.Control(func(fd uintptr) { err = unix.Fstat(int(fd), &st) })
	if err != nil {
		t.Fatal(err)
	}
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort(), strconv.FormatUint(st.Ino, 10)
}

func TestSocketInode_SockDiagAndProcTablesAgree(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{{"tcp4", "127.0.0.1:0"}, {"tcp6", "[::1]:0"}} {
		t.Run(tc.network, func(t *testing.T) {
			src, dst, want := clientSocket(t, tc.network, tc.addr)
			got, err := diagInode(src, dst)
			if err != nil || got != want {
				t.Fatalf("sock_diag: %q, %v; want %q", got, err, want)
			}
			f := NewProcessFinder(ProcessFinderOptions{})
			f.useSockDiag = false
			if got, err := f.socketInode(src, dst); err != nil || got != want {
				t.Fatalf("/proc/net tables: %q, %v; want %q", got, err, want)
			}
			// The reverse direction is escrow's own accepted socket, a different inode.
			if rev, err := diagInode(dst, src); err != nil || rev == want {
				t.Fatalf("reverse lookup: %q, %v", rev, err)
			}
		})
	}
}

func TestSocketInode_SockDiagUnknownSocket(t *testing.T) {
	_, err := diagInode(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"))
	if !errors.Is(err, errDiagNoSocket) {
		t.Fatalf("err = %v, want errDiagNoSocket", err)
	}
}

// BenchmarkSocketInode compares the two ways of finding the client socket's inode, side by
// side: go test ./attest -run XXX -bench SocketInode
func BenchmarkSocketInode(b *testing.B) {
	src, dst, want := clientSocket(b, "tcp4", "127.0.0.1:0")
	for _, mode := range []struct {
		name    string
		sockDia bool
	}{{"sock_diag", true}, {"proc_net_tcp", false}} {
		b.Run(mode.name, func(b *testing.B) {
			f := NewProcessFinder(ProcessFinderOptions{})
			f.useSockDiag = mode.sockDia
			b.ReportAllocs()
			for b.Loop() {
				if got, err := f.socketInode(src, dst); err != nil || got != want {
					b.Fatalf("%q, %v", got, err)
				}
			}
		})
	}
}
