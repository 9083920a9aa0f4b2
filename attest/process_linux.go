//go:build linux

package attest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// FromTCP finds the process at the other end of an accepted TCP connection whose local
// address (escrow's side) is local and remote address (the client's side) is remote. The
// client's socket is the one whose local address is remote and whose remote address is local:
// its inode comes from the kernel's sock_diag exact lookup (netlink; about 15x cheaper than
// reading the tables), or from the row of /proc/net/tcp (or tcp6) when sock_diag is unusable
// or ProcRoot is set. The inode leads to the process holding it. Processes that matched
// recently are tried first, then every process. If several processes hold the socket (it was
// inherited across fork), the first one found is reported.
//
// The process's start time is read before its file descriptors are checked and again after
// everything else was read; if it changed, the pid was reused meanwhile and the lookup fails
// rather than describe another process.
func (f *ProcessFinder) FromTCP(ctx context.Context, local, remote netip.AddrPort) (*Process, error) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	inode, err := f.socketInode(remote, local)
	if err != nil {
		return nil, err
	}
	ino, err := strconv.ParseUint(inode, 10, 64)
	if err != nil {
		return nil, fmt.Errorf("%w: socket inode %q: %w", ErrProcessNotFound, inode, err)
	}
	target := socket{link: "socket:[" + inode + "]", ino: ino}

	self := os.Getpid()
	tried := make(map[int]bool, recentMax)
	for _, pid := range f.recentPIDs() {
		tried[pid] = true
		if p, err := f.probe(pid, target); p != nil || err != nil {
			return p, err
		}
	}
	d, err := os.Open(f.root)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrProcessNotFound, err)
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return nil, fmt.Errorf("%w: list processes: %w", ErrProcessNotFound, err)
	}
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil || pid <= 0 || tried[pid] || pid == self {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrProcessNotFound, err)
		}
		if p, err := f.probe(pid, target); p != nil || err != nil {
			return p, err
		}
	}
	// escrow's own process holds many sockets; it is the caller only in tests.
	if !tried[self] {
		if p, err := f.probe(self, target); p != nil || err != nil {
			return p, err
		}
	}
	return nil, fmt.Errorf("%w: no readable process holds socket inode %s", ErrProcessNotFound, inode)
}

// socket is the client's socket as /proc shows it: the target of a /proc/<pid>/fd link, and
// the inode number in /proc/<pid>/fdinfo.
type socket struct {
	link string
	ino  uint64
}

// probe returns the process pid if it holds target, (nil, nil) if it does not, and an error if
// it does but changed while it was being described.
func (f *ProcessFinder) probe(pid int, target socket) (*Process, error) {
	start, err := f.startTime(pid)
	if err != nil || !f.holds(pid, target) {
		return nil, nil
	}
	p, err := f.describe(pid)
	if err != nil {
		return nil, err
	}
	if f.afterDescribe != nil {
		f.afterDescribe(pid)
	}
	if again, err := f.startTime(pid); err != nil || again != start {
		return nil, fmt.Errorf("%w: process %d exited during the lookup (pid reused)", ErrProcessNotFound, pid)
	}
	p.StartTime = start
	f.noteRecent(pid)
	return p, nil
}

// socketInode returns the inode of the TCP socket whose local address is src and remote
// address is dst, from net/tcp and net/tcp6. An IPv4 pair is also looked for in tcp6 in its
// IPv4-mapped form, for a client that used a dual-stack socket.
func (f *ProcessFinder) socketInode(src, dst netip.AddrPort) (string, error) {
	if f.useSockDiag {
		inode, err := diagInode(src, dst)
		switch {
		case err == nil:
			return inode, nil
		case errors.Is(err, errDiagNoSocket):
			return "", fmt.Errorf("%w: no socket %s -> %s in the kernel", ErrProcessNotFound, src, dst)
		}
		// sock_diag is unusable here (e.g. filtered by seccomp): read the tables instead.
	}
	type table struct{ file, src, dst string }
	var tables []table
	if src.Addr().Is4() && dst.Addr().Is4() {
		tables = append(tables, table{"tcp", procAddr4(src), procAddr4(dst)})
		m := func(ap netip.AddrPort) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
		}
		tables = append(tables, table{"tcp6", procAddr6(m(src)), procAddr6(m(dst))})
	} else {
		tables = append(tables, table{"tcp6", procAddr6(src), procAddr6(dst)})
	}
	for _, t := range tables {
		inode, err := f.scanTCPTable(filepath.Join(f.root, "net", t.file), t.src, t.dst)
		if err != nil {
			return "", err
		}
		if inode != "" {
			return inode, nil
		}
	}
	return "", fmt.Errorf("%w: no socket %s -> %s in the kernel's TCP tables", ErrProcessNotFound, src, dst)
}

// scanTCPTable returns the inode of the row with local address src and remote address dst,
// both in the table's hex form; "" if none (or if the socket has no inode any more, e.g. in
// TIME_WAIT). A missing table (no IPv6) is not an error.
func (f *ProcessFinder) scanTCPTable(path, src, dst string) (string, error) {
	file, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrProcessNotFound, err)
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	sc.Buffer(make([]byte, 0, 64<<10), 64<<10)
	for sc.Scan() {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
		line := sc.Bytes()
		var field [10][]byte
		if n := splitFields(line, field[:]); n < 10 {
			continue
		}
		if string(field[1]) != src || string(field[2]) != dst {
			continue
		}
		if inode := string(field[9]); inode != "0" {
			return inode, nil
		}
		return "", nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("%w: read %s: %w", ErrProcessNotFound, path, err)
	}
	return "", nil
}

// splitFields fills out with the first len(out) space-separated fields of line, without
// allocating, and returns how many it found.
func splitFields(line []byte, out [][]byte) int {
	n := 0
	for n < len(out) {
		line = bytes.TrimLeft(line, " \t")
		if len(line) == 0 {
			break
		}
		end := bytes.IndexAny(line, " \t")
		if end < 0 {
			end = len(line)
		}
		out[n] = line[:end]
		n++
		line = line[end:]
	}
	return n
}

// procAddr4 formats an IPv4 address and port as /proc/net/tcp does: the address's four bytes
// read as one native-endian word, in hex, then the port.
func procAddr4(ap netip.AddrPort) string {
	b := ap.Addr().As4()
	return fmt.Sprintf("%08X:%04X", binary.NativeEndian.Uint32(b[:]), ap.Port())
}

// procAddr6 formats an IPv6 address and port as /proc/net/tcp6 does: four native-endian words.
func procAddr6(ap netip.AddrPort) string {
	b := ap.Addr().As16()
	return fmt.Sprintf("%08X%08X%08X%08X:%04X",
		binary.NativeEndian.Uint32(b[0:4]), binary.NativeEndian.Uint32(b[4:8]),
		binary.NativeEndian.Uint32(b[8:12]), binary.NativeEndian.Uint32(b[12:16]), ap.Port())
}

// holds reports whether one of pid's file descriptors is target. It reads the links in
// /proc/<pid>/fd where it may (the same uid, or CAP_DAC_OVERRIDE with CAP_SYS_PTRACE), and
// otherwise the inode numbers in /proc/<pid>/fdinfo, which CAP_SYS_PTRACE alone may read
// (Linux 5.14+; see process_fdinfo_linux.go).
func (f *ProcessFinder) holds(pid int, target socket) bool {
	switch f.holdsByLink(pid, target.link) {
	case fdHeld:
		return true
	case fdNotHeld:
		return false
	}
	return f.holdsByFDInfo(pid, target.ino) == fdHeld
}

// startTime returns field 22 of /proc/<pid>/stat: the start time in clock ticks since boot.
func (f *ProcessFinder) startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(f.root, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may itself contain spaces and ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	var field [20][]byte
	if splitFields(b[i+1:], field[:]) < 20 {
		return 0, errors.New("malformed stat")
	}
	return strconv.ParseUint(string(field[19]), 10, 64) // field 22: 3 + 19
}

// describe reads pid's effective uid and gid, executable path and the executable's sha256.
func (f *ProcessFinder) describe(pid int) (*Process, error) {
	dir := filepath.Join(f.root, strconv.Itoa(pid))
	status, err := os.ReadFile(filepath.Join(dir, "status"))
	if err != nil {
		return nil, fmt.Errorf("%w: process %d: %w", ErrProcessNotFound, pid, err)
	}
	uid, uok := statusID(status, "Uid:")
	gid, gok := statusID(status, "Gid:")
	if !uok || !gok {
		return nil, fmt.Errorf("%w: process %d: malformed status", ErrProcessNotFound, pid)
	}
	p := &Process{PID: pid, UID: uid, GID: gid}
	exe := filepath.Join(dir, "exe")
	if p.Exe, err = os.Readlink(exe); err == nil {
		p.SHA256 = f.hashExe(exe)
	}
	return p, nil
}

// statusID returns the effective id (the second of real, effective, saved, filesystem) from
// the status line starting with key.
func statusID(status []byte, key string) (uint32, bool) {
	for line := range bytes.SplitSeq(status, []byte{'\n'}) {
		rest, ok := bytes.CutPrefix(line, []byte(key))
		if !ok {
			continue
		}
		var field [2][]byte
		if splitFields(rest, field[:]) < 2 {
			return 0, false
		}
		v, err := strconv.ParseUint(string(field[1]), 10, 32)
		return uint32(v), err == nil
	}
	return 0, false
}

// hashExe returns the hex sha256 of the file at path (a /proc/<pid>/exe link, which opens the
// executable even when it was deleted or lives in another mount namespace), or "" if it
// cannot be read. Hashes are cached by the file's device, inode, mtime, ctime and size, and
// concurrent lookups of one file share one read.
func (f *ProcessFinder) hashExe(path string) string {
	file, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer file.Close()
	key, ok := fileKey(file)
	if !ok {
		return ""
	}
	f.hashMu.Lock()
	sum, ok := f.hashes[key]
	f.hashMu.Unlock()
	if ok {
		return sum
	}
	v, _, _ := f.hashGroup.Do(fmt.Sprint(key), func() (any, error) {
		h := sha256.New()
		if _, err := io.Copy(h, file); err != nil {
			return "", nil
		}
		// A file written while it was read has no single hash; don't cache a mix.
		if after, ok := fileKey(file); !ok || after != key {
			return "", nil
		}
		sum := hex.EncodeToString(h.Sum(nil))
		f.hashMu.Lock()
		if len(f.hashes) >= f.hashMax {
			clear(f.hashes) // crude but bounded; executables in a pod are few
		}
		f.hashes[key] = sum
		f.hashMu.Unlock()
		return sum, nil
	})
	return v.(string)
}

func fileKey(file *os.File) (exeKey, bool) {
	var st unix.Stat_t
	if err := unix.Fstat(int(file.Fd()), &st); err != nil {
		return exeKey{}, false
	}
	return exeKey{
		dev:       uint64(st.Dev),
		ino:       uint64(st.Ino),
		mtimeNsec: st.Mtim.Nano(),
		ctimeNsec: st.Ctim.Nano(),
		size:      st.Size,
	}, true
}

// FromUnix finds the process at the other end of a Unix-socket connection escrow accepted.
// The kernel's SO_PEERCRED gives the pid, uid and gid the peer had when it connected; the
// uid and gid reported are those (not what the process may have switched to since). Where
// the kernel offers SO_PEERPIDFD (Linux 6.5+), a pidfd pinned to the connecting process
// proves, after /proc was read, that the pid was not reused meanwhile; elsewhere the start
// time is read before and after, as for TCP.
func (f *ProcessFinder) FromUnix(conn *net.UnixConn) (*Process, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrProcessNotFound, err)
	}
	var (
		cred    *unix.Ucred
		credErr error
		pidfd   = -1
	)
	err = raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr == nil {
			if pfd, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil {
				pidfd = pfd
			}
		}
	})
	if pidfd >= 0 {
		defer unix.Close(pidfd)
	}
	if err == nil {
		err = credErr
	}
	if err != nil {
		return nil, fmt.Errorf("%w: SO_PEERCRED: %w", ErrProcessNotFound, err)
	}
	if cred.Pid <= 0 {
		// The peer is in a PID namespace escrow cannot see.
		return nil, fmt.Errorf("%w: peer pid not visible", ErrProcessNotFound)
	}
	pid := int(cred.Pid)
	start, err := f.startTime(pid)
	if err != nil {
		return nil, fmt.Errorf("%w: process %d: %w", ErrProcessNotFound, pid, err)
	}
	p, err := f.describe(pid)
	if err != nil {
		return nil, err
	}
	if pidfd >= 0 {
		if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil {
			return nil, fmt.Errorf("%w: process %d exited during the lookup", ErrProcessNotFound, pid)
		}
	}
	if again, err := f.startTime(pid); err != nil || again != start {
		return nil, fmt.Errorf("%w: process %d exited during the lookup (pid reused)", ErrProcessNotFound, pid)
	}
	p.UID, p.GID, p.StartTime = cred.Uid, cred.Gid, start
	return p, nil
}
