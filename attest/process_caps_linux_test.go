//go:build linux

package attest_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/escrowproxy/escrow/attest"
)

// helperEnv makes this test binary, started again by TestProcessFinder_CapSysPtraceAloneFinds...,
// run one lookup (TestProcessFinderLookupHelper) under the uid and capabilities it was given.
const helperEnv = "ATTEST_LOOKUP_HELPER"

// lookupResult is what the helper prints.
type lookupResult struct {
	CapEff    string          `json:"cap_eff"`
	UID       int             `json:"uid"`
	FDListErr string          `json:"fd_list_err"` // listing /proc/<peer>/fd
	Process   *attest.Process `json:"process"`
	Err       string          `json:"err"`
	NotFound  bool            `json:"not_found"`
}

// TestProcessFinderLookupHelper is not a test: it is the lookup the test below runs as another
// uid with other capabilities. Outside that test it does nothing.
func TestProcessFinderLookupHelper(t *testing.T) {
	spec := os.Getenv(helperEnv)
	if spec == "" {
		return
	}
	// local remote peer-pid
	var local, remote string
	var peer int
	if _, err := fmt.Sscan(spec, &local, &remote, &peer); err != nil {
		t.Fatal(err)
	}
	var res lookupResult
	res.UID = os.Getuid()
	if status, err := os.ReadFile("/proc/self/status"); err == nil {
		for l := range strings.SplitSeq(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
				res.CapEff = strings.TrimSpace(v)
			}
		}
	}
	if _, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(peer), "fd")); err != nil {
		res.FDListErr = err.Error()
	}
	p, err := attest.NewProcessFinder(attest.ProcessFinderOptions{}).FromTCP(context.Background(),
		netip.MustParseAddrPort(local), netip.MustParseAddrPort(remote))
	res.Process = p
	if err != nil {
		res.Err, res.NotFound = err.Error(), errors.Is(err, attest.ErrProcessNotFound)
	}
	b, _ := json.Marshal(res)
	fmt.Printf("RESULT %s\n", b)
}

// TestProcessFinder_CapSysPtraceAloneFindsAnotherUsersProcess: escrow running as uid 65532
// with CAP_SYS_PTRACE and no other capability names a process of uid 1000 that holds a
// loopback TCP connection to it. The kernel refuses it /proc/<pid>/fd (mode 0500, owned by
// uid 1000: that needs CAP_DAC_OVERRIDE), so the lookup goes through /proc/<pid>/fdinfo. The
// same lookup without the capability fails: the ptrace access check is what lets it through.
func TestProcessFinder_CapSysPtraceAloneFindsAnotherUsersProcess(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("running processes as other uids needs root")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	const agentUID, escrowUID = 1000, 65532
	helper := worldExecutableCopyOfThisTest(t)

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	goClient := peerClient(t)
	peer := asUser(exec.Command(goClient, ln.Addr().String()), agentUID)
	conn := startPeer(t, ln, peer)
	local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	remote := conn.RemoteAddr().(*net.TCPAddr).AddrPort()

	lookup := func(t *testing.T, caps string) lookupResult {
		t.Helper()
		// As a container runtime would give a non-root uid a capability: inheritable, ambient
		// and bounding sets of exactly caps, and no new privileges.
		cmd := exec.Command(setpriv, "--reuid", strconv.Itoa(escrowUID), "--regid", strconv.Itoa(escrowUID), "--clear-groups",
			"--inh-caps", caps, "--ambient-caps", caps, "--bounding-set", caps, "--no-new-privs",
			helper, "-test.run=^TestProcessFinderLookupHelper$", "-test.count=1")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %s %d", helperEnv, local, remote, peer.Process.Pid))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helper under setpriv %s: %v\n%s", caps, err, out)
		}
		_, line, ok := strings.Cut(string(out), "RESULT ")
		if !ok {
			t.Fatalf("helper printed no result:\n%s", out)
		}
		line, _, _ = strings.Cut(line, "\n")
		var res lookupResult
		if err := json.Unmarshal([]byte(line), &res); err != nil {
			t.Fatalf("helper result %q: %v", line, err)
		}
		if res.UID != escrowUID {
			t.Fatalf("helper ran as uid %d, want %d", res.UID, escrowUID)
		}
		return res
	}

	t.Run("CAP_SYS_PTRACE", func(t *testing.T) {
		res := lookup(t, "-all,+sys_ptrace")
		if res.CapEff != "0000000000080000" {
			t.Fatalf("helper's effective capabilities = %s, want CAP_SYS_PTRACE only", res.CapEff)
		}
		if res.FDListErr == "" || !strings.Contains(res.FDListErr, "permission denied") {
			t.Fatalf("listing /proc/<agent>/fd: %q, want permission denied (else this test does not test fdinfo)", res.FDListErr)
		}
		if res.Err != "" {
			t.Fatalf("lookup with CAP_SYS_PTRACE alone failed: %s", res.Err)
		}
		checkProcess(t, res.Process, peerCase{name: "go client", cmd: peer, exe: goClient, uid: agentUID, gid: agentUID})
	})
	t.Run("no capability", func(t *testing.T) {
		res := lookup(t, "-all")
		if res.CapEff != "0000000000000000" {
			t.Fatalf("helper's effective capabilities = %s, want none", res.CapEff)
		}
		if !res.NotFound || res.Process != nil {
			t.Fatalf("lookup without CAP_SYS_PTRACE = %+v, %s; want ErrProcessNotFound", res.Process, res.Err)
		}
	})
	_, _ = conn.Write([]byte("x"))
}

// worldExecutableCopyOfThisTest copies the running test binary where every uid may execute it
// (the go command's build directory is root's alone).
func worldExecutableCopyOfThisTest(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "attest-helper")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	path := filepath.Join(dir, "attest.test")
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}
