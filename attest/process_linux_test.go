//go:build linux

package attest_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest"
)

// peerClientSrc is a small client: it connects to its argument (host:port, or unix:<path>),
// says hello, and exits when the server answers. It is a different executable from curl.
const peerClientSrc = `package main

import (
	"net"
	"os"
	"strings"
)

func main() {
	network, addr := "tcp", os.Args[1]
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", p
	}
	c, err := net.Dial(network, addr)
	if err != nil {
		os.Exit(2)
	}
	c.Write([]byte("hello\n"))
	b := make([]byte, 1)
	c.Read(b)
}
`

const nobody = 65534

var (
	peerClientOnce sync.Once
	peerClientPath string
	peerClientErr  error
)

// peerClient builds peerClientSrc once per test binary, in a directory every user may read,
// so it can also run under another uid.
func peerClient(t testing.TB) string {
	t.Helper()
	peerClientOnce.Do(func() {
		dir, err := os.MkdirTemp("", "attest-peer")
		if err != nil {
			peerClientErr = err
			return
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			peerClientErr = err
			return
		}
		src := filepath.Join(dir, "main.go")
		if err := os.WriteFile(src, []byte(peerClientSrc), 0o644); err != nil {
			peerClientErr = err
			return
		}
		peerClientPath = filepath.Join(dir, "peerclient")
		cmd := exec.Command("go", "build", "-o", peerClientPath, src)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=", "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			peerClientErr = errors.New("go build: " + err.Error() + ": " + string(out))
		}
	})
	if peerClientErr != nil {
		t.Fatalf("build the peer client: %v", peerClientErr)
	}
	return peerClientPath
}

func fileSHA256(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

type peerCase struct {
	name  string
	cmd   *exec.Cmd
	exe   string
	uid   uint32
	gid   uint32
	reply string
}

// startPeer starts cmd, accepts its connection on ln, and returns the accepted connection.
func startPeer(t *testing.T, ln net.Listener, cmd *exec.Cmd) net.Conn {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := ln.Accept(); ch <- res{c, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("accept: %v", r.err)
		}
		t.Cleanup(func() { r.c.Close() })
		// Wait for the first bytes, so the client has finished connecting in every sense.
		_ = r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := bufio.NewReader(r.c).ReadString('\n'); err != nil {
			t.Fatalf("read from %s: %v", cmd.Path, err)
		}
		return r.c
	case <-time.After(20 * time.Second):
		t.Fatalf("%s did not connect", cmd.Path)
		return nil
	}
}

func asUser(cmd *exec.Cmd, uid uint32) *exec.Cmd {
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	return cmd
}

// peers returns the real clients the tests identify: curl, and the Go client (under another
// uid when the tests run as root, so the uid differs too).
func peers(t *testing.T, target, unixPath string) []peerCase {
	t.Helper()
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl not installed")
	}
	curl, _ = filepath.EvalSymlinks(curl)
	goClient := peerClient(t)
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	goUID, goGID := uid, gid
	if uid == 0 {
		goUID, goGID = nobody, nobody
	}
	curlArgs := []string{"-s", "-m", "10", "-H", "X-Hello: 1", "http://" + target + "/"}
	goArg := target
	if unixPath != "" {
		curlArgs = []string{"-s", "-m", "10", "--unix-socket", unixPath, "http://escrow/"}
		goArg = "unix:" + unixPath
	}
	gc := exec.Command(goClient, goArg)
	if goUID != uid {
		asUser(gc, goUID)
	}
	return []peerCase{
		{name: "curl", cmd: exec.Command(curl, curlArgs...), exe: curl, uid: uid, gid: gid, reply: "HTTP/1.0 204 No Content\r\n\r\n"},
		{name: "go client", cmd: gc, exe: goClient, uid: goUID, gid: goGID, reply: "x"},
	}
}

func checkProcess(t *testing.T, got *attest.Process, pc peerCase) {
	t.Helper()
	if got.PID != pc.cmd.Process.Pid {
		t.Errorf("%s: PID = %d, want %d", pc.name, got.PID, pc.cmd.Process.Pid)
	}
	if got.Exe != pc.exe {
		t.Errorf("%s: Exe = %q, want %q", pc.name, got.Exe, pc.exe)
	}
	if want := fileSHA256(t, pc.exe); got.SHA256 != want {
		t.Errorf("%s: SHA256 = %q, want %q", pc.name, got.SHA256, want)
	}
	if got.UID != pc.uid || got.GID != pc.gid {
		t.Errorf("%s: UID/GID = %d/%d, want %d/%d", pc.name, got.UID, got.GID, pc.uid, pc.gid)
	}
	if got.StartTime == 0 {
		t.Errorf("%s: StartTime is zero", pc.name)
	}
}

func TestProcessFinder_IdentifiesEachRealTCPClient(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6", "dual-stack"} {
		t.Run(network, func(t *testing.T) {
			addr, lnNet := "127.0.0.1:0", "tcp4"
			switch network {
			case "tcp6":
				addr, lnNet = "[::1]:0", "tcp6"
			case "dual-stack":
				addr, lnNet = "[::]:0", "tcp" // a client on 127.0.0.1 arrives as ::ffff:127.0.0.1
			}
			ln, err := net.Listen(lnNet, addr)
			if err != nil {
				t.Skipf("listen %s: %v", addr, err)
			}
			defer ln.Close()
			target := ln.Addr().String()
			if network == "dual-stack" {
				target = net.JoinHostPort("127.0.0.1", strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
			}
			f := attest.NewProcessFinder(attest.ProcessFinderOptions{})
			for _, pc := range peers(t, target, "") {
				conn := startPeer(t, ln, pc.cmd)
				got, err := f.FromConn(context.Background(), conn)
				if err != nil {
					t.Fatalf("%s: FromConn: %v", pc.name, err)
				}
				checkProcess(t, got, pc)
				_, _ = conn.Write([]byte(pc.reply))
				conn.Close()
				if err := pc.cmd.Wait(); err != nil {
					t.Errorf("%s exited: %v", pc.name, err)
				}
			}
		})
	}
}

func TestProcessFinder_IdentifiesEachRealUnixClient(t *testing.T) {
	dir, err := os.MkdirTemp("", "attest-unix")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	_ = os.Chmod(dir, 0o755)
	path := filepath.Join(dir, "proxy.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_ = os.Chmod(path, 0o777)
	f := attest.NewProcessFinder(attest.ProcessFinderOptions{})
	for _, pc := range peers(t, "", path) {
		conn := startPeer(t, ln, pc.cmd)
		got, err := f.FromConn(context.Background(), conn)
		if err != nil {
			t.Fatalf("%s: FromConn: %v", pc.name, err)
		}
		checkProcess(t, got, pc)
		_, _ = conn.Write([]byte(pc.reply))
		conn.Close()
		_ = pc.cmd.Wait()
	}
}

func TestProcessFinder_GoneClientIsNotFound(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(peerClient(t), ln.Addr().String())
	conn := startPeer(t, ln, cmd)
	local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	remote := conn.RemoteAddr().(*net.TCPAddr).AddrPort()
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	conn.Close()
	// The client's socket is closed: no process may be reported for it, in particular not
	// escrow itself or whichever process reuses the port.
	f := attest.NewProcessFinder(attest.ProcessFinderOptions{})
	if p, err := f.FromTCP(context.Background(), local, remote); !errors.Is(err, attest.ErrProcessNotFound) {
		t.Fatalf("FromTCP after the client exited = %+v, %v; want ErrProcessNotFound", p, err)
	}
}

func TestProcessFinder_InProcessClientIsEscrowItself(t *testing.T) {
	// The peer socket lives in this very process: found (last) among escrow's own fds.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p, err := attest.NewProcessFinder(attest.ProcessFinderOptions{}).FromConn(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	if p.PID != os.Getpid() || p.Exe != self {
		t.Fatalf("got %+v, want this process (%d, %s)", p, os.Getpid(), self)
	}
}

func TestProcessFinder_OtherConnTypesAreNotFound(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	_, err := attest.NewProcessFinder(attest.ProcessFinderOptions{}).FromConn(context.Background(), a)
	if !errors.Is(err, attest.ErrProcessNotFound) {
		t.Fatalf("FromConn(pipe) = %v, want ErrProcessNotFound", err)
	}
}

// BenchmarkProcessFinder_FromTCP measures one lookup for a real client process: "cold" with a
// new finder each time (a scan of every process and the executable hashed), "warm" with the
// finder the proxy keeps (the client's pid tried first, the hash cached).
func BenchmarkProcessFinder_FromTCP(b *testing.B) {
	if runtime.GOOS != "linux" {
		b.Skip("linux only")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(peerClient(b), ln.Addr().String())
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	conn, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	remote := conn.RemoteAddr().(*net.TCPAddr).AddrPort()
	ctx := context.Background()
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			if _, err := attest.NewProcessFinder(attest.ProcessFinderOptions{}).FromTCP(ctx, local, remote); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("warm", func(b *testing.B) {
		f := attest.NewProcessFinder(attest.ProcessFinderOptions{})
		if _, err := f.FromTCP(ctx, local, remote); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := f.FromTCP(ctx, local, remote); err != nil {
				b.Fatal(err)
			}
		}
	})
}
