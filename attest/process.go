package attest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"golang.org/x/sync/singleflight"
)

// ErrProcessNotFound means the process at the other end of a connection could not be
// identified: the connection is gone, it does not come from this network or PID namespace,
// escrow may not read the process's /proc entries, or the platform has no /proc. The proxy
// then leaves the caller absent (policy decides: `context has caller` is false).
var ErrProcessNotFound = errors.New("attest: calling process not found")

// ProcessFinderOptions configures NewProcessFinder.
type ProcessFinderOptions struct {
	// ProcRoot is where procfs is mounted; "" means /proc. Tests point it at a prepared tree.
	ProcRoot string
	// HashCacheSize bounds how many executables' sha256 are cached (keyed by device, inode,
	// mtime and size); 0 means 256.
	HashCacheSize int
}

// ProcessFinder finds the process at the other end of a connection accepted by escrow, from
// the kernel: for loopback TCP, the client socket's inode (netlink sock_diag, or
// /proc/net/tcp{,6}) and the process whose file descriptors hold it; for a Unix socket,
// SO_PEERCRED (and SO_PEERPIDFD where the kernel has it). It then reads the process's uid, gid, executable and start time, and hashes the
// executable (cached). It works on Linux; elsewhere every lookup fails with ErrProcessNotFound.
//
// A lookup reads the whole socket table and, when the likely processes (those seen recently)
// do not hold the socket, every process's file descriptors, so do it once per accepted
// connection, right after Accept (while the client still holds the socket), not per request.
//
// What escrow needs to see the agent's processes: the same network namespace (a pod's
// containers share one), the same PID namespace (in Kubernetes, shareProcessNamespace: true,
// or escrow in the agent's container), and permission to read other processes' descriptors
// and executables: the same uid as the agent, or CAP_SYS_PTRACE, with which it reads
// /proc/<pid>/fdinfo (Linux 5.14+) where /proc/<pid>/fd is closed to it. Without them lookups
// fail with ErrProcessNotFound; they never guess.
//
// Its methods are safe for concurrent use.
type ProcessFinder struct {
	root string
	// useSockDiag: find socket inodes with netlink sock_diag rather than by reading
	// net/tcp{,6}; only with the real /proc, whose kernel sock_diag asks.
	useSockDiag bool

	hashMu    sync.Mutex
	hashes    map[exeKey]string
	hashMax   int
	hashGroup singleflight.Group

	recentMu sync.Mutex
	recent   []int // pids that held a peer socket recently, most recent first

	// sockfs is the mount id of the kernel's socket filesystem, once known (sockfsMount).
	sockfsMu    sync.Mutex
	sockfs      uint32
	sockfsKnown bool

	// afterDescribe, if set (tests only), runs after a process was described and before its
	// start time is read again.
	afterDescribe func(pid int)
}

// exeKey identifies one version of an executable file.
type exeKey struct {
	dev, ino  uint64
	mtimeNsec int64
	ctimeNsec int64 // a change no one can backdate, unlike mtime
	size      int64
}

// recentMax is how many recently matched pids are tried before scanning every process.
const recentMax = 16

// NewProcessFinder returns a ProcessFinder.
func NewProcessFinder(opts ProcessFinderOptions) *ProcessFinder {
	f := &ProcessFinder{
		root:    opts.ProcRoot,
		hashes:  make(map[exeKey]string),
		hashMax: opts.HashCacheSize,
	}
	if f.root == "" {
		f.root = "/proc"
		f.useSockDiag = true
	}
	if f.hashMax <= 0 {
		f.hashMax = 256
	}
	return f
}

// FromConn finds the process at the other end of conn, which must be a connection escrow
// accepted: a *net.TCPConn (loopback) or a *net.UnixConn. Any other kind fails with
// ErrProcessNotFound.
func (f *ProcessFinder) FromConn(ctx context.Context, conn net.Conn) (*Process, error) {
	switch c := conn.(type) {
	case *net.TCPConn:
		la, lok := c.LocalAddr().(*net.TCPAddr)
		ra, rok := c.RemoteAddr().(*net.TCPAddr)
		if !lok || !rok {
			return nil, fmt.Errorf("%w: connection has no TCP addresses", ErrProcessNotFound)
		}
		return f.FromTCP(ctx, la.AddrPort(), ra.AddrPort())
	case *net.UnixConn:
		return f.FromUnix(c)
	default:
		return nil, fmt.Errorf("%w: unsupported connection type %T", ErrProcessNotFound, conn)
	}
}

func (f *ProcessFinder) noteRecent(pid int) {
	f.recentMu.Lock()
	defer f.recentMu.Unlock()
	for i, p := range f.recent {
		if p == pid {
			copy(f.recent[1:i+1], f.recent[:i])
			f.recent[0] = pid
			return
		}
	}
	if len(f.recent) < recentMax {
		f.recent = append(f.recent, 0)
	}
	copy(f.recent[1:], f.recent[:len(f.recent)-1])
	f.recent[0] = pid
}

func (f *ProcessFinder) recentPIDs() []int {
	f.recentMu.Lock()
	defer f.recentMu.Unlock()
	return append([]int(nil), f.recent...)
}
