//go:build linux

package attest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Finding which process holds a socket through /proc/<pid>/fdinfo rather than /proc/<pid>/fd.
//
// For a process of another uid, /proc/<pid>/fd is a directory of mode 0500 owned by that uid,
// so listing it needs CAP_DAC_OVERRIDE (or DAC_READ_SEARCH) on top of the CAP_SYS_PTRACE that
// reading its links needs. /proc/<pid>/fdinfo is guarded by the ptrace access check alone
// (PTRACE_MODE_READ_FSCREDS): Linux 5.14 made the directory 0555 and its files readable to a
// process that passes the check (commit 7bc3fa0172a4, "procfs: allow reading fdinfo with
// PTRACE_MODE_READ"), and added the `ino:` line (commit 3845f256a8b5, "procfs/dmabuf: add
// inode number to /proc/*/fdinfo"); Linux 5.18 put the same check on listing the directory
// (commit 1927e498aee1, "procfs: prevent unprivileged processes accessing fdinfo dir"; since
// 6.10 both live in proc_fdinfo_permission). So CAP_SYS_PTRACE alone finds the socket here.
//
// `ino:` is an inode number within the file's filesystem: a regular file, a pipe or an
// eventfd can have the socket's number too. sockfs is one kernel-internal mount shared by
// every socket of every network namespace, and fdinfo's `mnt_id:` names the mount, so a
// descriptor is the socket only if its mnt_id is sockfs's, learnt from a socket escrow itself
// opens (sockfsMount). Mount ids are global (not per mount namespace), so escrow's view and
// the agent's agree.

// fdInfo is the header the kernel writes at the start of every /proc/<pid>/fdinfo/<n>
// (fs/proc/fd.c, seq_show), before anything specific to the kind of file:
//
//	pos:	<file position>
//	flags:	0<open flags, octal>
//	mnt_id:	<mount id>
//	ino:	<inode number>
type fdInfo struct {
	pos   int64
	flags uint32
	mntID uint32
	ino   uint64
}

// fdInfoMax bounds how much of an fdinfo file is read: the header is under 100 bytes; what
// follows it (epoll's watched descriptors, inotify's watches, locks) is not needed.
const fdInfoMax = 256

var errFDInfo = errors.New("malformed fdinfo")

// parseFDInfo parses the header of an fdinfo file: exactly the lines pos, flags, mnt_id and ino,
// in that order, each ending in a newline, at the start of b. What follows is ignored: it is
// written by the file's own code, and a file-specific line must never be taken for the header.
// A header without ino (Linux before 5.14) or cut short (b truncated inside it) is an error.
func parseFDInfo(b []byte) (fdInfo, error) {
	var info fdInfo
	for i, key := range [...]string{"pos", "flags", "mnt_id", "ino"} {
		line, rest, ok := bytes.Cut(b, []byte{'\n'})
		if !ok {
			return fdInfo{}, fmt.Errorf("%w: no complete %s line", errFDInfo, key)
		}
		b = rest
		name, value, ok := bytes.Cut(line, []byte{':'})
		if !ok || string(name) != key {
			return fdInfo{}, fmt.Errorf("%w: line %d is not %s", errFDInfo, i+1, key)
		}
		value = bytes.TrimLeft(value, "\t ")
		var err error
		switch key {
		case "pos":
			info.pos, err = strconv.ParseInt(string(value), 10, 64)
		case "flags":
			var v uint64
			v, err = strconv.ParseUint(string(value), 8, 32)
			info.flags = uint32(v)
		case "mnt_id":
			var v uint64
			v, err = strconv.ParseUint(string(value), 10, 31) // printed with %i: never negative for a real mount
			info.mntID = uint32(v)
		case "ino":
			info.ino, err = strconv.ParseUint(string(value), 10, 64)
		}
		if err != nil {
			return fdInfo{}, fmt.Errorf("%w: %s: %w", errFDInfo, key, err)
		}
	}
	return info, nil
}

// readFDInfo reads the header of the fdinfo file at path into buf and parses it.
func readFDInfo(path string, buf *[fdInfoMax]byte) (fdInfo, error) {
	return readFDInfoAt(unix.AT_FDCWD, path, buf)
}

// readFDInfoAt is readFDInfo of name in the directory open as dirfd (a lookup of one name,
// not of the whole /proc/<pid>/fdinfo/<n> path per descriptor).
func readFDInfoAt(dirfd int, name string, buf *[fdInfoMax]byte) (fdInfo, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fdInfo{}, err
	}
	defer unix.Close(fd)
	// One read: procfs fills it from a single seq_file show.
	n, err := unix.Read(fd, buf[:])
	if err != nil {
		return fdInfo{}, err
	}
	return parseFDInfo(buf[:n])
}

// sockfsMountOf returns the mount id of sockfs as procfs at root reports it, from the fdinfo
// of a socket this process opens for the purpose.
func sockfsMountOf(root string) (uint32, error) {
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("attest: open a socket to find sockfs: %w", err)
	}
	defer unix.Close(s)
	var buf [fdInfoMax]byte
	info, err := readFDInfo(filepath.Join(root, "self", "fdinfo", strconv.Itoa(s)), &buf)
	if err != nil {
		return 0, fmt.Errorf("attest: read the fdinfo of escrow's own socket: %w", err)
	}
	return info.mntID, nil
}

// fdScan is what a look at one process's file descriptors found.
type fdScan int

const (
	fdNotHeld    fdScan = iota // read them all; none is the socket
	fdHeld                     // one is the socket
	fdUnreadable               // they could not be read: denied, or the process is gone
)

// holdsByLink looks for target ("socket:[<inode>]") among the links in /proc/<pid>/fd.
func (f *ProcessFinder) holdsByLink(pid int, target string) fdScan {
	dir := filepath.Join(f.root, strconv.Itoa(pid), "fd")
	d, err := os.Open(dir)
	if err != nil {
		return fdUnreadable
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return fdUnreadable
	}
	var buf [64]byte
	for _, name := range names {
		n, err := unix.Readlink(dir+"/"+name, buf[:])
		switch {
		case err == nil:
			if string(buf[:n]) == target {
				return fdHeld
			}
		case isDenied(err):
			// The directory could be listed (CAP_DAC_OVERRIDE) but not the links (the ptrace
			// access check): the same denial as an unreadable directory.
			return fdUnreadable
		}
		// Otherwise the descriptor was closed meanwhile.
	}
	return fdNotHeld
}

// holdsByFDInfo looks for the socket whose inode is ino among /proc/<pid>/fdinfo/*: a
// descriptor on the sockfs mount with that inode number.
func (f *ProcessFinder) holdsByFDInfo(pid int, ino uint64) fdScan {
	sockfs, err := f.sockfsMount()
	if err != nil {
		return fdUnreadable
	}
	d, err := os.Open(filepath.Join(f.root, strconv.Itoa(pid), "fdinfo"))
	if err != nil {
		return fdUnreadable
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return fdUnreadable
	}
	dirfd := int(d.Fd())
	var buf [fdInfoMax]byte
	for _, name := range names {
		info, err := readFDInfoAt(dirfd, name, &buf)
		switch {
		case err == nil:
			if info.ino == ino && info.mntID == sockfs {
				return fdHeld
			}
		case isDenied(err):
			return fdUnreadable
		}
		// Otherwise closed meanwhile, or a header without ino (before Linux 5.14): not a match.
	}
	return fdNotHeld
}

func isDenied(err error) bool {
	return errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM)
}

// sockfsMount returns sockfs's mount id (sockfsMountOf), found once; a failure is not
// remembered, so a passing shortage of descriptors does not disable the fdinfo lookup.
func (f *ProcessFinder) sockfsMount() (uint32, error) {
	f.sockfsMu.Lock()
	defer f.sockfsMu.Unlock()
	if f.sockfsKnown {
		return f.sockfs, nil
	}
	id, err := sockfsMountOf(f.root)
	if err != nil {
		return 0, err
	}
	f.sockfs, f.sockfsKnown = id, true
	return id, nil
}
