//go:build linux

package attest

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// Real fdinfo files, as Linux 6.18 writes them (fs/proc/fd.c seq_show, then the file's own
// show_fdinfo): a TCP socket, a Unix socket, an epoll descriptor whose watched descriptors
// carry their own "ino:", an inotify descriptor, and a locked regular file.
const (
	fdinfoTCP   = "pos:\t0\nflags:\t02000002\nmnt_id:\t10\nino:\t1510142\n"
	fdinfoUnix  = "pos:\t0\nflags:\t02000002\nmnt_id:\t10\nino:\t1510762\nscm_fds: 0\n"
	fdinfoEpoll = "pos:\t0\nflags:\t02\nmnt_id:\t16\nino:\t1057\ntfd:        5 events:       19 data:                5  pos:0 ino:424242 sdev:9\n"
	fdinfoInot  = "pos:\t0\nflags:\t00\nmnt_id:\t16\nino:\t1057\ninotify wd:1 ino:424242 sdev:800001 mask:fce ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:42\n"
	fdinfoLock  = "pos:\t12\nflags:\t0100002\nmnt_id:\t31\nino:\t424242\nlock:\t1: POSIX  ADVISORY  WRITE 1234 00:1f:424242 0 EOF\n"
)

func TestParseFDInfo_ReadsTheKernelsHeader(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     fdInfo
	}{
		{"tcp socket", fdinfoTCP, fdInfo{pos: 0, flags: 0o2000002, mntID: 10, ino: 1510142}},
		{"unix socket", fdinfoUnix, fdInfo{pos: 0, flags: 0o2000002, mntID: 10, ino: 1510762}},
		// The watched descriptor's ino:424242 is epoll's text, not the header.
		{"epoll", fdinfoEpoll, fdInfo{pos: 0, flags: 0o2, mntID: 16, ino: 1057}},
		{"inotify", fdinfoInot, fdInfo{pos: 0, flags: 0, mntID: 16, ino: 1057}},
		{"locked file", fdinfoLock, fdInfo{pos: 12, flags: 0o100002, mntID: 31, ino: 424242}},
		{"largest values", "pos:\t-1\nflags:\t037777777777\nmnt_id:\t2147483647\nino:\t18446744073709551615\n",
			fdInfo{pos: -1, flags: 0xffffffff, mntID: 2147483647, ino: 18446744073709551615}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseFDInfo([]byte(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestParseFDInfo_RefusesWhatIsNotTheHeader(t *testing.T) {
	for _, tc := range []struct{ name, in string }{
		{"empty", ""},
		// Before Linux 5.14 there is no ino line: the socket cannot be recognized.
		{"no ino (before 5.14)", "pos:\t0\nflags:\t02\nmnt_id:\t10\n"},
		{"no ino, file text follows", "pos:\t0\nflags:\t02\nmnt_id:\t10\nscm_fds: 0\n"},
		// A read cut inside the last line must not yield a shorter number.
		{"cut inside ino", "pos:\t0\nflags:\t02\nmnt_id:\t10\nino:\t15101"},
		{"order", "flags:\t02\npos:\t0\nmnt_id:\t10\nino:\t1510142\n"},
		{"ino before mnt_id", "pos:\t0\nflags:\t02\nino:\t1510142\nmnt_id:\t10\n"},
		{"file text first", "tfd: 5 ino:1\npos:\t0\nflags:\t02\nmnt_id:\t10\nino:\t1510142\n"},
		{"key prefix", "pos:\t0\nflags:\t02\nmnt_id:\t10\ninode:\t1510142\n"},
		{"no colon", "pos:\t0\nflags:\t02\nmnt_id\t10\nino:\t1510142\n"},
		{"flags not octal", "pos:\t0\nflags:\t09\nmnt_id:\t10\nino:\t1510142\n"},
		{"negative mnt_id", "pos:\t0\nflags:\t02\nmnt_id:\t-10\nino:\t1510142\n"},
		{"mnt_id too large", "pos:\t0\nflags:\t02\nmnt_id:\t2147483648\nino:\t1510142\n"},
		{"negative ino", "pos:\t0\nflags:\t02\nmnt_id:\t10\nino:\t-1\n"},
		{"ino overflows", "pos:\t0\nflags:\t02\nmnt_id:\t10\nino:\t18446744073709551616\n"},
		{"trailing text", "pos:\t0\nflags:\t02\nmnt_id:\t10\nino:\t1510142 x\n"},
		{"empty ino", "pos:\t0\nflags:\t02\nmnt_id:\t10\nino:\t\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, err := parseFDInfo([]byte(tc.in)); !errors.Is(err, errFDInfo) {
				t.Fatalf("parseFDInfo(%q) = %+v, %v; want errFDInfo", tc.in, got, err)
			}
		})
	}
}

// The kernel's own fdinfo of a socket this process holds: ino is the socket's inode (as fstat
// and /proc/net/tcp show it), and mnt_id is sockfs's, which a regular file's is not.
func TestFDInfo_OfARealSocketNamesItsInodeAndSockfs(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	var buf [fdInfoMax]byte
	info, err := readFDInfo("/proc/self/fdinfo/"+strconv.Itoa(int(f.Fd())), &buf)
	if err != nil {
		t.Fatal(err)
	}
	if info.ino != st.Ino {
		t.Errorf("fdinfo ino = %d, fstat ino = %d", info.ino, st.Ino)
	}
	sockfs, err := sockfsMountOf("/proc")
	if err != nil {
		t.Fatal(err)
	}
	if info.mntID != sockfs {
		t.Errorf("a TCP socket's mnt_id = %d, sockfs (from a Unix socket) = %d", info.mntID, sockfs)
	}
	file, err := os.CreateTemp("", "fdinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(file.Name())
	defer file.Close()
	finfo, err := readFDInfo("/proc/self/fdinfo/"+strconv.Itoa(int(file.Fd())), &buf)
	if err != nil {
		t.Fatal(err)
	}
	if finfo.mntID == sockfs {
		t.Errorf("a regular file's mnt_id is sockfs's (%d)", sockfs)
	}
}

// fakeFDInfoProc is newFakeProc's process without a readable fd directory (as for escrow
// without CAP_DAC_OVERRIDE), whose fdinfo holds the given files.
func fakeFDInfoProc(t *testing.T, fdinfo map[string]string) *fakeProc {
	t.Helper()
	fp := newFakeProc(t, agentRow, "")
	dir := filepath.Join(fp.root, "4242")
	if err := os.RemoveAll(filepath.Join(dir, "fd")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "fdinfo"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, text := range fdinfo {
		if err := os.WriteFile(filepath.Join(dir, "fdinfo", name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return fp
}

// fakeSockfs is sockfs's mount id in the fake trees.
const fakeSockfs = 10

func fdinfoOf(mnt int, ino string) string {
	return "pos:\t0\nflags:\t02\nmnt_id:\t" + strconv.Itoa(mnt) + "\nino:\t" + ino + "\n"
}

func finderWithSockfs(root string) *ProcessFinder {
	f := NewProcessFinder(ProcessFinderOptions{ProcRoot: root})
	f.sockfs, f.sockfsKnown = fakeSockfs, true
	return f
}

func TestProcessFinder_FindsTheSocketInFDInfoWhenFDIsUnreadable(t *testing.T) {
	fp := fakeFDInfoProc(t, map[string]string{
		"0": fdinfoOf(24, "3"),
		// A regular file on another filesystem with the socket's inode number comes first.
		"3": fdinfoOf(31, fakeInode),
		"7": fdinfoOf(fakeSockfs, fakeInode) + "scm_fds: 0\n",
	})
	p, err := finderWithSockfs(fp.root).FromTCP(context.Background(), escrowAddr, agentAddr)
	if err != nil {
		t.Fatal(err)
	}
	if p.PID != 4242 || p.UID != 1001 || p.Exe != fp.exe || p.StartTime != 987654 {
		t.Fatalf("got %+v", p)
	}
}

func TestProcessFinder_FDInfoMatchesOnlyASocketOfThatInode(t *testing.T) {
	for name, fdinfo := range map[string]map[string]string{
		"same inode, another filesystem": {"3": fdinfoOf(31, fakeInode)},
		"sockfs, another inode":          {"3": fdinfoOf(fakeSockfs, fakeInode+"0")},
		"inode only in epoll's text":     {"3": strings.Replace(fdinfoEpoll, "ino:424242", "ino:"+fakeInode, 1)},
		"no ino line (before 5.14)":      {"7": "pos:\t0\nflags:\t02\nmnt_id:\t10\n"},
	} {
		t.Run(name, func(t *testing.T) {
			fp := fakeFDInfoProc(t, fdinfo)
			p, err := finderWithSockfs(fp.root).FromTCP(context.Background(), escrowAddr, agentAddr)
			if !errors.Is(err, ErrProcessNotFound) {
				t.Fatalf("got %+v, %v; want ErrProcessNotFound", p, err)
			}
		})
	}
}

func TestProcessFinder_FDInfoIsNotUsedWithoutSockfsMount(t *testing.T) {
	// Where escrow cannot learn sockfs's mount id (here: the fake tree has no self), an inode
	// number alone proves nothing: no match.
	fp := fakeFDInfoProc(t, map[string]string{"7": fdinfoOf(fakeSockfs, fakeInode)})
	p, err := NewProcessFinder(ProcessFinderOptions{ProcRoot: fp.root}).FromTCP(context.Background(), escrowAddr, agentAddr)
	if !errors.Is(err, ErrProcessNotFound) {
		t.Fatalf("got %+v, %v; want ErrProcessNotFound", p, err)
	}
}

func TestProcessFinder_FDInfoKeepsThePidReuseGuard(t *testing.T) {
	fp := fakeFDInfoProc(t, map[string]string{"7": fdinfoOf(fakeSockfs, fakeInode)})
	f := finderWithSockfs(fp.root)
	f.afterDescribe = func(pid int) {
		if err := os.WriteFile(filepath.Join(fp.root, "4242", "stat"), []byte(statLine(4242, 987999)), 0o644); err != nil {
			t.Error(err)
		}
	}
	p, err := f.FromTCP(context.Background(), escrowAddr, agentAddr)
	if !errors.Is(err, ErrProcessNotFound) || !strings.Contains(err.Error(), "pid reused") {
		t.Fatalf("got %+v, %v; want ErrProcessNotFound (pid reused)", p, err)
	}
}

func FuzzFDInfo(f *testing.F) {
	for _, s := range []string{fdinfoTCP, fdinfoUnix, fdinfoEpoll, fdinfoInot, fdinfoLock,
		"pos:\t0\nflags:\t02\nmnt_id:\t10\n", "pos:\t0\nflags:\t02\nmnt_id:\t10\nino:\t15101"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := parseFDInfo(b)
		if err != nil {
			if !errors.Is(err, errFDInfo) {
				t.Fatalf("error %v is not errFDInfo", err)
			}
			return
		}
		// A header that parses is four complete lines; what follows them never matters.
		n := 0
		for range 4 {
			i := strings.IndexByte(string(b[n:]), '\n')
			if i < 0 {
				t.Fatalf("parsed %+v from %q without four complete lines", info, b)
			}
			n += i + 1
		}
		again, err := parseFDInfo(append(b[:n:n], "ino:\t1\nmnt_id:\t2\n"...))
		if err != nil || again != info {
			t.Fatalf("the header alone with other text after it parses as %+v, %v; want %+v", again, err, info)
		}
	})
}

// BenchmarkProcessFinder_Holds compares the two ways of checking one process's descriptors
// for the socket: the links in /proc/<pid>/fd (same uid) and the headers in
// /proc/<pid>/fdinfo (CAP_SYS_PTRACE alone), on this process holding a TCP socket and 64
// other descriptors, the socket last.
func BenchmarkProcessFinder_Holds(b *testing.B) {
	for range 64 {
		f, err := os.Open(os.DevNull)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	lf, err := ln.(*net.TCPListener).File()
	if err != nil {
		b.Fatal(err)
	}
	defer lf.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(lf.Fd()), &st); err != nil {
		b.Fatal(err)
	}
	target := socket{link: "socket:[" + strconv.FormatUint(st.Ino, 10) + "]", ino: st.Ino}
	f := NewProcessFinder(ProcessFinderOptions{})
	pid := os.Getpid()
	b.Run("fd links", func(b *testing.B) {
		for b.Loop() {
			if f.holdsByLink(pid, target.link) != fdHeld {
				b.Fatal("not found")
			}
		}
	})
	b.Run("fdinfo", func(b *testing.B) {
		for b.Loop() {
			if f.holdsByFDInfo(pid, target.ino) != fdHeld {
				b.Fatal("not found")
			}
		}
	})
}
