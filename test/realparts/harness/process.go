package harness

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Environment variables of the gate.
const (
	// BinEnv names the directory holding the real parts (test/tools/realparts.sh prints it).
	BinEnv = "ESCROW_REALPARTS_BIN"
	// RequireEnv=1 makes a missing BinEnv a failure instead of a skip.
	RequireEnv = "ESCROW_REALPARTS_REQUIRE"
)

// Bin returns the path of the real part name (spire-server, spire-agent,
// oidc-discovery-provider, dex, minio, vault) in the ESCROW_REALPARTS_BIN directory. With the variable
// unset it skips the test (fails it when ESCROW_REALPARTS_REQUIRE=1); a part missing from the
// directory is a failure.
func Bin(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv(BinEnv)
	if dir == "" {
		msg := fmt.Sprintf("%s is not set: run `make test-realparts` (test/tools/realparts.sh builds SPIRE, dex, MinIO and Vault once and prints the directory to export)", BinEnv)
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("%s=1 but %s", RequireEnv, msg)
		}
		t.Skip(msg)
	}
	p := filepath.Join(dir, name)
	st, err := os.Stat(p)
	if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		t.Fatalf("%s=%s but %s is missing or not executable (run test/tools/realparts.sh): %v", BinEnv, dir, name, err)
	}
	return p
}

// ProcessOptions describe a child process for StartProcess.
type ProcessOptions struct {
	// Name labels the process in logs; default: the program's base name.
	Name string
	Path string
	Args []string
	// Env is the complete environment; nil means this process's environment without proxy
	// variables (see CleanEnv).
	Env []string
	Dir string
	// Stdout, if set, also receives the child's stdout (e.g. to parse records line by line).
	Stdout io.Writer
	// LogLimit bounds the output kept in memory (the newest bytes are kept); default 4 MiB.
	LogLimit int
	// Credential, if set, runs the child as that user (PostgreSQL refuses to run as root).
	Credential *syscall.Credential
}

// Process is a started child. Its stdout and stderr are kept together (newest LogLimit bytes).
// It is stopped when the test ends, and its output's tail is logged if the test failed.
type Process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set before done is closed

	mu      sync.Mutex
	log     bytes.Buffer
	limit   int
	changed chan struct{} // closed and replaced on every write
}

// StartProcess starts a child and registers its stop (and the logging of its output when the test
// failed) with t.Cleanup.
func StartProcess(t testing.TB, o ProcessOptions) *Process {
	t.Helper()
	if o.Name == "" {
		o.Name = filepath.Base(o.Path)
	}
	if o.Env == nil {
		o.Env = CleanEnv()
	}
	if o.LogLimit == 0 {
		o.LogLimit = 4 << 20
	}
	p := &Process{name: o.Name, done: make(chan struct{}), limit: o.LogLimit, changed: make(chan struct{})}
	p.cmd = exec.Command(o.Path, o.Args...)
	p.cmd.Env = o.Env
	p.cmd.Dir = o.Dir
	p.cmd.Stdout = p
	if o.Stdout != nil {
		p.cmd.Stdout = io.MultiWriter(p, o.Stdout)
	}
	p.cmd.Stderr = p
	p.cmd.SysProcAttr = dieWithParent()
	if o.Credential != nil {
		if p.cmd.SysProcAttr == nil {
			p.cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		p.cmd.SysProcAttr.Credential = o.Credential
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("harness: start %s: %v", o.Name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("--- %s (pid %d) output, last 8 KiB:\n%s", p.name, p.Pid(), tailBytes(p.Output(), 8<<10))
		}
	})
	return p
}

// Write keeps the output (io.Writer for the child's stdout and stderr).
func (p *Process) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.log.Write(b)
	if over := p.log.Len() - p.limit; over > 0 {
		p.log.Next(over)
	}
	close(p.changed)
	p.changed = make(chan struct{})
	return len(b), nil
}

// Name is the label given at start.
func (p *Process) Name() string { return p.name }

// Pid is the child's process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Output returns what the child wrote so far (stdout and stderr interleaved).
func (p *Process) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// WaitOutput waits until the output contains substr, the process exits, or timeout passes.
func (p *Process) WaitOutput(t testing.TB, substr string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		p.mu.Lock()
		found := strings.Contains(p.log.String(), substr)
		ch := p.changed
		p.mu.Unlock()
		if found {
			return
		}
		select {
		case <-ch:
		case <-p.done:
			if !strings.Contains(p.Output(), substr) {
				t.Fatalf("harness: %s exited (%v) before writing %q; output:\n%s", p.name, p.err, substr, tailBytes(p.Output(), 8<<10))
			}
			return
		case <-deadline:
			t.Fatalf("harness: %s did not write %q within %v; output:\n%s", p.name, substr, timeout, tailBytes(p.Output(), 8<<10))
		}
	}
}

// Exited reports whether the child has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Done is closed when the child has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the child's exit status once Done is closed (nil for exit code 0).
func (p *Process) Err() error {
	<-p.done
	return p.err
}

// Stop sends SIGTERM and waits up to 10 seconds, then kills. It is safe to call more than once.
func (p *Process) Stop() {
	if p.Exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.Kill()
	}
}

// Kill sends SIGKILL and waits for the exit.
func (p *Process) Kill() {
	if p.Exited() {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// CleanEnv is this process's environment without proxy, CA-bundle and SPIFFE variables (the
// machine's own settings must not leak into a real part or a client), plus extra.
func CleanEnv(extra ...string) []string {
	drop := map[string]bool{
		"HTTP_PROXY": true, "HTTPS_PROXY": true, "ALL_PROXY": true, "NO_PROXY": true,
		"SSL_CERT_FILE": true, "SSL_CERT_DIR": true, "REQUESTS_CA_BUNDLE": true, "CURL_CA_BUNDLE": true,
		"GIT_SSL_CAINFO": true, "NODE_EXTRA_CA_CERTS": true, "AWS_CA_BUNDLE": true,
		"NODE_USE_ENV_PROXY": true, "SPIFFE_ENDPOINT_SOCKET": true,
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if drop[strings.ToUpper(k)] {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// FreePort returns a loopback TCP port that was free a moment ago, for programs that must be
// told their port in advance.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("harness: free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ShortTempDir is a temporary directory with a short path (Unix socket paths are limited to
// 107 bytes, and t.TempDir includes the test's name), removed when the test ends.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "rp-")
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Eventually calls f every 100ms until it returns nil; after timeout it fails the test with the
// last error.
func Eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func tailBytes(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
