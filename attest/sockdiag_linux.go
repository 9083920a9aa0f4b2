//go:build linux

package attest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// sock_diag (netlink, linux/inet_diag.h) answers "which socket has this exact 4-tuple" with a
// hash lookup in the kernel, where reading /proc/net/tcp walks every bucket of the kernel's
// TCP hash tables. It needs no privilege, and like /proc/net/tcp it sees the network
// namespace escrow runs in.

const (
	sizeofNlMsghdr      = 16
	sizeofInetDiagReqV2 = 56
	sizeofInetDiagMsg   = 72
)

// errDiagNoSocket means the kernel has no socket with that 4-tuple (or it has no inode any
// more, e.g. in TIME_WAIT); other errors mean sock_diag itself is unusable here.
var errDiagNoSocket = errors.New("no such socket")

var diagSeq atomic.Uint32

// diagInode returns the inode of the TCP socket whose local address is src and remote address
// is dst, using SOCK_DIAG_BY_FAMILY's exact lookup.
func diagInode(src, dst netip.AddrPort) (string, error) {
	family := unix.AF_INET6
	if src.Addr().Is4() && dst.Addr().Is4() {
		family = unix.AF_INET
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return "", fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 1}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)

	seq := diagSeq.Add(1)
	var req [sizeofNlMsghdr + sizeofInetDiagReqV2]byte
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(req[8:], seq)
	r := req[sizeofNlMsghdr:]
	r[0] = byte(family)
	r[1] = unix.IPPROTO_TCP
	ne.PutUint32(r[4:], 0xffffffff) // every state
	id := r[8:]                     // inet_diag_sockid
	binary.BigEndian.PutUint16(id[0:], src.Port())
	binary.BigEndian.PutUint16(id[2:], dst.Port())
	putDiagAddr(id[4:20], src.Addr())
	putDiagAddr(id[20:36], dst.Addr())
	ne.PutUint32(id[40:], 0xffffffff) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xffffffff)

	if err := unix.Sendto(fd, req[:], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return "", fmt.Errorf("sock_diag send: %w", err)
	}
	var buf [4096]byte
	for {
		n, _, err := unix.Recvfrom(fd, buf[:], 0)
		if err != nil {
			return "", fmt.Errorf("sock_diag receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return "", fmt.Errorf("sock_diag: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return "", errors.New("sock_diag: short error message")
				}
				if errno := -int32(ne.Uint32(m.Data)); errno == int32(unix.ENOENT) {
					return "", errDiagNoSocket
				} else if errno != 0 {
					return "", fmt.Errorf("sock_diag: %w", unix.Errno(errno))
				}
			case unix.SOCK_DIAG_BY_FAMILY:
				if len(m.Data) < sizeofInetDiagMsg {
					return "", errors.New("sock_diag: short reply")
				}
				inode := ne.Uint32(m.Data[68:])
				if inode == 0 {
					return "", errDiagNoSocket
				}
				return strconv.FormatUint(uint64(inode), 10), nil
			}
		}
	}
}

// putDiagAddr writes a as inet_diag_sockid does: an IPv4 address in the first word, an IPv6
// address in all four.
func putDiagAddr(dst []byte, a netip.Addr) {
	if a.Is4() {
		b := a.As4()
		copy(dst, b[:])
		return
	}
	b := a.As16()
	copy(dst, b[:])
}
