//go:build linux

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// nobody is the uid both escrow and the would-be reader run as.
const nobody = 65534

// TestEscrow_ProcessOfTheSameUserCannotReadItsEnvironmentOrMemory: escrow makes itself
// non-dumpable, so a process running as escrow's own uid (an agent started by the same user, as
// on a laptop) cannot read the secrets in its environment or memory through /proc. The same read
// against an ordinary process of that uid succeeds, which shows the check can fail.
func TestEscrow_ProcessOfTheSameUserCannotReadItsEnvironmentOrMemory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run escrow and the reader as another uid")
	}
	secret := fmt.Sprintf("sk-dumpable-%d", time.Now().UnixNano())
	dir, err := os.MkdirTemp("", "escrow-mem-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, "escrow")
	copyFile(t, escrowBin, bin, 0o755)
	pol := filepath.Join(dir, "policies")
	if err := os.MkdirAll(pol, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pol, "p.cedar"), []byte(`@id("all") permit (principal, action, resource);`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "escrow.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`listen: 127.0.0.1:0
admin: 127.0.0.1:0
ca_dir: %s
identity: {static: %s}
policy: {dir: %s}
upstreams:
  - {host: api.example.test, credential: key}
credentials:
  key: {static: {env: ESCROW_TEST_KEY}}
`, filepath.Join(dir, "ca"), staticID, pol)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, bin, pol, filepath.Join(pol, "p.cedar"), cfg} {
		if err := os.Chown(p, nobody, nobody); err != nil {
			t.Fatal(err)
		}
	}
	asNobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}, Pdeathsig: syscall.SIGKILL}
	env := escrowEnv("ESCROW_TEST_KEY=" + secret)

	cmd := exec.Command(bin, "proxy", "--config", cfg)
	cmd.Env, cmd.SysProcAttr = env, asNobody
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	listening := make(chan struct{})
	var (
		mu  sync.Mutex
		log strings.Builder
	)
	go func() {
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			mu.Lock()
			log.WriteString(sc.Text() + "\n")
			mu.Unlock()
			if !once && strings.Contains(sc.Text(), "escrow proxy listening") {
				once = true
				close(listening)
			}
		}
	}()
	select {
	case <-listening:
	case <-time.After(20 * time.Second):
		t.Fatalf("escrow did not start as uid %d within 20s", nobody)
	}

	// An ordinary process of the same uid with the same secret in its environment: readable.
	sleeper := exec.Command("sleep", "30")
	sleeper.Env, sleeper.SysProcAttr = env, asNobody
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() })

	read := func(pid int, file string) (string, error) {
		c := exec.Command("cat", fmt.Sprintf("/proc/%d/%s", pid, file))
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		out, err := c.CombinedOutput()
		return string(out), err
	}
	if out, err := read(sleeper.Process.Pid, "environ"); err != nil || !strings.Contains(out, secret) {
		t.Fatalf("control: uid %d could not read an ordinary process's environment (%v): the check below would prove nothing", nobody, err)
	}
	for _, f := range []string{"environ", "maps", "fd/0"} {
		out, err := read(cmd.Process.Pid, f)
		if err == nil || strings.Contains(out, secret) {
			t.Errorf("a process of escrow's own uid read /proc/<escrow>/%s (err %v, %d bytes)", f, err, len(out))
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Contains(log.String(), "non-dumpable") {
		t.Errorf("escrow warned it could not make itself non-dumpable:\n%s", log.String())
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
