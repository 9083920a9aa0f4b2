// Package k8s_test checks escrow's Kubernetes delivery with real parts: the Helm chart rendered
// and linted by a real helm, its manifests applied to a real kube-apiserver (with etcd), the real
// `escrow webhook` binary registered from the chart's MutatingWebhookConfiguration, and the
// Grafana dashboard's queries checked against the real /metrics output of escrow. With no kubelet,
// podsim_test.go plays one: the injected pod runs in a network namespace of its own, and real curl
// and Python requests, given only the agent container's injected environment, reach an API
// through escrow with the credential. fleet_test.go runs docs/walkthrough.md as written: the
// chart with the control plane, a real SPIRE issuing the controller's and the sidecar's
// X509-SVIDs, and a Revocation that denies the agent within seconds (`make test-fleet`).
//
// The tests need helm, kube-apiserver, kubectl and etcd: test/k8s/tools.sh builds them once into
// a cache and prints the directory. With ESCROW_K8S_TOOLS unset every test here skips (so plain
// `go test ./...` needs none of them); with it set, a missing tool is a failure. `make test-k8s`
// sets it.
package k8s_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// toolsEnv names the directory holding helm, kube-apiserver, kubectl and etcd.
const toolsEnv = "ESCROW_K8S_TOOLS"

var (
	repoRoot  string
	chartDir  string
	buildOnce sync.Once
	escrowBin string
	buildErr  error
	buildDir  string
)

func TestMain(m *testing.M) {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
	chartDir = filepath.Join(repoRoot, "charts", "escrow")
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// tool returns the path of a real part, skipping the test when ESCROW_K8S_TOOLS is unset and
// failing it when the tool is missing from that directory.
func tool(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv(toolsEnv)
	if dir == "" {
		t.Skipf("%s is not set: run `make test-k8s` (test/k8s/tools.sh builds helm, kube-apiserver, kubectl and etcd once)", toolsEnv)
	}
	p := filepath.Join(dir, name)
	st, err := os.Stat(p)
	if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		t.Fatalf("%s=%s but %s is missing or not executable (run test/k8s/tools.sh): %v", toolsEnv, dir, name, err)
	}
	return p
}

// escrow returns the escrow binary: ESCROW_BIN when set, else built once from this tree with the
// image's flags.
func escrow(t testing.TB) string {
	t.Helper()
	tool(t, "helm") // same gate as every other test here
	if p := os.Getenv("ESCROW_BIN"); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("ESCROW_BIN=%s: %v", p, err)
		}
		return p
	}
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "escrow-k8s-bin-")
		if buildErr != nil {
			return
		}
		escrowBin = filepath.Join(buildDir, "escrow")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=k8s-test", "-o", escrowBin, "./cmd/escrow")
		cmd.Dir = repoRoot
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/escrow: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return escrowBin
}

// run runs a command with a deadline and returns its stdout; stderr is in the error.
func run(t testing.TB, stdin []byte, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

func mustRun(t testing.TB, stdin []byte, name string, args ...string) string {
	t.Helper()
	out, err := run(t, stdin, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// process is a started child, stopped (SIGTERM, then SIGKILL) at the end of the test.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  *bytes.Buffer
	mu   *sync.Mutex
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func start(t testing.TB, name string, args ...string) *process {
	t.Helper()
	p := &process{cmd: exec.Command(name, args...), done: make(chan struct{}), log: &bytes.Buffer{}, mu: &sync.Mutex{}}
	p.cmd.SysProcAttr = dieWithParent()
	p.cmd.Stdout = lockedWriter{p.mu, p.log}
	p.cmd.Stderr = lockedWriter{p.mu, p.log}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- %s log (last 4 KiB):\n%s", filepath.Base(name), tail(p.output(), 4096))
		}
	})
	return p
}

func (p *process) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) stop() {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// eventually polls f every 100ms until it returns nil or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
