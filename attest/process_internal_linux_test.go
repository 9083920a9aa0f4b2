//go:build linux

package attest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeProc is a procfs tree with one TCP socket owned by one process. The file formats follow
// proc(5) and the kernel's tcp4_seq_show / tcp6_seq_show.
type fakeProc struct {
	root, exe string
	pid       int
}

const (
	fakeInode     = "424242"
	fakeTCPHeader = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)

func statLine(pid int, start uint64) string {
	// Field 2 has spaces and a ')' to prove the parser finds the last one.
	return fmt.Sprintf("%d (evil) comm) S 1 %d %d 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 %d 1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n",
		pid, pid, pid, start)
}

func newFakeProc(t *testing.T, tcp, tcp6 string) *fakeProc {
	t.Helper()
	fp := &fakeProc{root: t.TempDir(), pid: 4242}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(fp.root, "net"), 0o755))
	must(os.WriteFile(filepath.Join(fp.root, "net", "tcp"), []byte(fakeTCPHeader+tcp), 0o644))
	if tcp6 != "" {
		must(os.WriteFile(filepath.Join(fp.root, "net", "tcp6"), []byte(fakeTCPHeader+tcp6), 0o644))
	}
	dir := filepath.Join(fp.root, "4242")
	must(os.MkdirAll(filepath.Join(dir, "fd"), 0o755))
	must(os.Symlink("/dev/null", filepath.Join(dir, "fd", "0")))
	must(os.Symlink("socket:["+fakeInode+"]", filepath.Join(dir, "fd", "7")))
	must(os.WriteFile(filepath.Join(dir, "stat"), []byte(statLine(4242, 987654)), 0o644))
	must(os.WriteFile(filepath.Join(dir, "status"), []byte("Name:\tagent\nUmask:\t0022\nState:\tS (sleeping)\n"+
		"Uid:\t1000\t1001\t1001\t1001\nGid:\t2000\t2002\t2002\t2002\nGroups:\t\n"), 0o644))
	fp.exe = filepath.Join(t.TempDir(), "agent-bin")
	must(os.WriteFile(fp.exe, []byte("#!/bin/true\nversion 1\n"), 0o755))
	must(os.Symlink(fp.exe, filepath.Join(dir, "exe")))
	// A process that holds other sockets only.
	other := filepath.Join(fp.root, "77")
	must(os.MkdirAll(filepath.Join(other, "fd"), 0o755))
	must(os.Symlink("socket:[1]", filepath.Join(other, "fd", "3")))
	must(os.WriteFile(filepath.Join(other, "stat"), []byte(statLine(77, 5)), 0o644))
	return fp
}

func sha(b string) string { s := sha256.Sum256([]byte(b)); return hex.EncodeToString(s[:]) }

// The rows: the agent's socket 127.0.0.1:40000 -> 127.0.0.1:15480, and escrow's accepted side.
const (
	agentRow  = "   0: 0100007F:9C40 0100007F:3C78 01 00000000:00000000 00:00000000 00000000  1001        0 " + fakeInode + " 1 0000000000000000 20 4 30 10 -1\n"
	escrowRow = "   1: 0100007F:3C78 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 20 4 30 10 -1\n"
	// [::1]:40000 -> [::1]:15480 and ::ffff:127.0.0.1:40001 -> ::ffff:127.0.0.1:15480.
	agentRow6   = "   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:3C78 01 00000000:00000000 00:00000000 00000000  1001        0 " + fakeInode + " 1 0000000000000000 20 4 30 10 -1\n"
	agentRowV4M = "   1: 0000000000000000FFFF00000100007F:9C41 0000000000000000FFFF00000100007F:3C78 01 00000000:00000000 00:00000000 00000000  1001        0 " + fakeInode + " 1 0000000000000000 20 4 30 10 -1\n"
)

var (
	escrowAddr = netip.MustParseAddrPort("127.0.0.1:15480")
	agentAddr  = netip.MustParseAddrPort("127.0.0.1:40000")
)

func TestProcessFinder_ReadsProcFormats(t *testing.T) {
	fp := newFakeProc(t, escrowRow+agentRow, agentRow6+agentRowV4M)
	want := &Process{PID: 4242, UID: 1001, GID: 2002, Exe: fp.exe, SHA256: sha("#!/bin/true\nversion 1\n"), StartTime: 987654}
	for _, tc := range []struct{ name, local, remote string }{
		{"tcp", "127.0.0.1:15480", "127.0.0.1:40000"},
		{"tcp6", "[::1]:15480", "[::1]:40000"},
		{"tcp6 v4-mapped", "[::ffff:127.0.0.1]:15480", "[::ffff:127.0.0.1]:40001"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := NewProcessFinder(ProcessFinderOptions{ProcRoot: fp.root})
			got, err := f.FromTCP(context.Background(), netip.MustParseAddrPort(tc.local), netip.MustParseAddrPort(tc.remote))
			if err != nil {
				t.Fatal(err)
			}
			if *got != *want {
				t.Fatalf("got %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestProcessFinder_EscrowsOwnSideIsNotTheCaller(t *testing.T) {
	// Only escrow's accepted row exists (the client already closed): the lookup must not match
	// it the wrong way round.
	fp := newFakeProc(t, escrowRow, "")
	f := NewProcessFinder(ProcessFinderOptions{ProcRoot: fp.root})
	if p, err := f.FromTCP(context.Background(), escrowAddr, agentAddr); !errors.Is(err, ErrProcessNotFound) {
		t.Fatalf("got %+v, %v; want ErrProcessNotFound", p, err)
	}
}

func TestProcessFinder_TimeWaitSocketIsNotFound(t *testing.T) {
	fp := newFakeProc(t, strings.Replace(agentRow, " "+fakeInode+" ", " 0 ", 1), "")
	f := NewProcessFinder(ProcessFinderOptions{ProcRoot: fp.root})
	if p, err := f.FromTCP(context.Background(), escrowAddr, agentAddr); !errors.Is(err, ErrProcessNotFound) {
		t.Fatalf("got %+v, %v; want ErrProcessNotFound", p, err)
	}
}

func TestProcessFinder_PidReusedDuringLookupIsNotFound(t *testing.T) {
	fp := newFakeProc(t, agentRow, "")
	f := NewProcessFinder(ProcessFinderOptions{ProcRoot: fp.root})
	// While the process is described, it exits and another starts under the same pid.
	f.afterDescribe = func(pid int) {
		if err := os.WriteFile(filepath.Join(fp.root, "4242", "stat"), []byte(statLine(4242, 987999)), 0o644); err != nil {
			t.Error(err)
		}
	}
	p, err := f.FromTCP(context.Background(), escrowAddr, agentAddr)
	if !errors.Is(err, ErrProcessNotFound) || !strings.Contains(err.Error(), "pid reused") {
		t.Fatalf("got %+v, %v; want ErrProcessNotFound (pid reused)", p, err)
	}
	// Without the change the same finder finds it: the guard, not the tree, failed it.
	f.afterDescribe = nil
	if err := os.WriteFile(filepath.Join(fp.root, "4242", "stat"), []byte(statLine(4242, 987654)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := f.FromTCP(context.Background(), escrowAddr, agentAddr); err != nil {
		t.Fatal(err)
	}
}

func TestProcessFinder_HashFollowsTheExecutableFile(t *testing.T) {
	fp := newFakeProc(t, agentRow, "")
	f := NewProcessFinder(ProcessFinderOptions{ProcRoot: fp.root})
	p1, err := f.FromTCP(context.Background(), escrowAddr, agentAddr)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.hashes) != 1 {
		t.Fatalf("hash cache has %d entries after one lookup, want 1", len(f.hashes))
	}
	// Replaced in place (same inode, same size): mtime/ctime change, so the hash is recomputed.
	if err := os.WriteFile(fp.exe, []byte("#!/bin/true\nversion 2\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	p2, err := f.FromTCP(context.Background(), escrowAddr, agentAddr)
	if err != nil {
		t.Fatal(err)
	}
	if p1.SHA256 == p2.SHA256 || p2.SHA256 != sha("#!/bin/true\nversion 2\n") {
		t.Fatalf("hash after the executable changed = %s (before %s)", p2.SHA256, p1.SHA256)
	}
}

func TestProcessFinder_UnreadableExeLeavesHashEmpty(t *testing.T) {
	fp := newFakeProc(t, agentRow, "")
	if err := os.Remove(fp.exe); err != nil {
		t.Fatal(err)
	}
	p, err := NewProcessFinder(ProcessFinderOptions{ProcRoot: fp.root}).FromTCP(context.Background(), escrowAddr, agentAddr)
	if err != nil {
		t.Fatal(err)
	}
	if p.SHA256 != "" || p.Exe != fp.exe {
		t.Fatalf("got %+v; want the exe path and no hash", p)
	}
}

func TestProcessFinder_RecentPIDsAreMostRecentFirstAndBounded(t *testing.T) {
	f := NewProcessFinder(ProcessFinderOptions{})
	for pid := 1; pid <= recentMax+5; pid++ {
		f.noteRecent(pid)
	}
	f.noteRecent(10)
	got := f.recentPIDs()
	if len(got) != recentMax || got[0] != 10 || got[1] != recentMax+5 {
		t.Fatalf("recent = %v", got)
	}
	seen := map[int]bool{}
	for _, p := range got {
		if seen[p] {
			t.Fatalf("recent has %d twice: %v", p, got)
		}
		seen[p] = true
	}
}

func TestProcAddrFormats(t *testing.T) {
	if got := procAddr4(netip.MustParseAddrPort("10.1.2.3:443")); got != "0302010A:01BB" {
		t.Errorf("procAddr4 = %s", got)
	}
	if got := procAddr6(netip.MustParseAddrPort("[::1]:80")); got != "00000000000000000000000001000000:0050" {
		t.Errorf("procAddr6 = %s", got)
	}
}
