// Package kubeharness starts a real Kubernetes API server for tests: etcd and kube-apiserver
// from the binaries test/k8s/tools.sh builds (the directory it prints is ESCROW_K8S_TOOLS), both
// on loopback ports the kernel picks, with RBAC and a static admin token. There is no
// controller-manager, scheduler or kubelet: objects are admitted, validated and stored, and
// watches work, which is what controllers are tested against.
//
// Start it once per test binary (in TestMain) and share it: it takes seconds to become ready.
package kubeharness

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ToolsEnv names the directory holding etcd, kube-apiserver and kubectl.
const ToolsEnv = "ESCROW_K8S_TOOLS"

// ErrNoTools is returned by Start when ToolsEnv is unset: callers skip their tests.
var ErrNoTools = errors.New("kubeharness: " + ToolsEnv + " is not set (test/k8s/tools.sh builds the tools and prints the directory)")

const adminToken = "escrow-kubeharness-admin"

// Cluster is a running etcd + kube-apiserver.
type Cluster struct {
	// URL is the API server's https URL; Kubeconfig a file with an admin user (system:masters).
	URL, Kubeconfig string
	// Dir is a temporary directory removed by Stop.
	Dir string

	kubectl string
	procs   []*process
}

// Start starts etcd and kube-apiserver from the tools in $ESCROW_K8S_TOOLS and waits until
// kubectl can reach the API server. It returns ErrNoTools when the variable is unset.
func Start(ctx context.Context) (*Cluster, error) {
	tools := os.Getenv(ToolsEnv)
	if tools == "" {
		return nil, ErrNoTools
	}
	bin := func(name string) (string, error) {
		p := filepath.Join(tools, name)
		st, err := os.Stat(p)
		if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			return "", fmt.Errorf("kubeharness: %s=%s but %s is missing or not executable", ToolsEnv, tools, name)
		}
		return p, nil
	}
	etcdBin, err := bin("etcd")
	if err != nil {
		return nil, err
	}
	kasBin, err := bin("kube-apiserver")
	if err != nil {
		return nil, err
	}
	kubectlBin, err := bin("kubectl")
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kubeharness-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, kubectl: kubectlBin}
	ok := false
	defer func() {
		if !ok {
			c.Stop()
		}
	}()

	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	etcd, err := c.start(etcdBin, "--name", "default", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL)
	if err != nil {
		return nil, err
	}
	plain := &http.Client{Timeout: 2 * time.Second}
	if err := eventually(ctx, 30*time.Second, func() error {
		if etcd.exited() {
			return backoffStop{fmt.Errorf("etcd exited:\n%s", tail(etcd.output(), 4096))}
		}
		res, err := plain.Get(etcdURL + "/health")
		if err != nil {
			return err
		}
		res.Body.Close()
		return nil
	}); err != nil {
		return nil, fmt.Errorf("kubeharness: etcd: %w", err)
	}

	saKey := filepath.Join(dir, "sa.key")
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}), 0o600); err != nil {
		return nil, err
	}
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+`,admin,admin-uid,"system:masters"`+"\n"), 0o600); err != nil {
		return nil, err
	}
	kas, err := c.start(kasBin, "--etcd-servers="+etcdURL, "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", ports[2]), "--cert-dir="+filepath.Join(dir, "certs"),
		"--service-cluster-ip-range=10.96.0.0/24", "--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saKey, "--service-account-signing-key-file="+saKey,
		"--token-auth-file="+tokens, "--authorization-mode=RBAC")
	if err != nil {
		return nil, err
	}
	c.URL = fmt.Sprintf("https://127.0.0.1:%d", ports[2])
	// Only until the serving certificate exists; the kubeconfig below verifies it.
	insecure := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	if err := eventually(ctx, 90*time.Second, func() error {
		if kas.exited() {
			return backoffStop{fmt.Errorf("kube-apiserver exited:\n%s", tail(kas.output(), 4096))}
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", c.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
		res, err := insecure.Do(req)
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			return fmt.Errorf("/readyz: status %d", res.StatusCode)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("kubeharness: kube-apiserver: %w", err)
	}

	c.Kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, []byte(c.kubeconfigAs("")), 0o600); err != nil {
		return nil, err
	}
	if err := eventually(ctx, 30*time.Second, func() error {
		_, err := c.Kubectl(ctx, nil, "get", "namespaces")
		return err
	}); err != nil {
		return nil, err
	}
	ok = true
	return c, nil
}

// KubeconfigAs writes a kubeconfig in Dir whose requests impersonate user (e.g.
// "system:serviceaccount:ns:name"), so a process can be tested with exactly the RBAC it will
// have, and returns its path.
func (c *Cluster) KubeconfigAs(user string) (string, error) {
	f, err := os.CreateTemp(c.Dir, "kubeconfig-as-")
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := f.WriteString(c.kubeconfigAs(user)); err != nil {
		return "", err
	}
	return f.Name(), nil
}

func (c *Cluster) kubeconfigAs(user string) string {
	as := ""
	if user != "" {
		as = fmt.Sprintf(", as: %q", user)
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {token: %q%s}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, c.URL, filepath.Join(c.Dir, "certs", "apiserver.crt"), adminToken, as)
}

// RESTConfig is the admin's client config.
func (c *Cluster) RESTConfig() (*rest.Config, error) {
	return clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
}

// Kubectl runs kubectl as the admin, with stdin if not nil; stderr is in the error.
func (c *Cluster) Kubectl(ctx context.Context, stdin []byte, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.kubectl, append([]string{"--kubeconfig", c.Kubeconfig, "--request-timeout=30s"}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

// Logs returns the last n bytes of the API server's and etcd's output (for a failed test).
func (c *Cluster) Logs(n int) string {
	var b strings.Builder
	for _, p := range c.procs {
		fmt.Fprintf(&b, "--- %s:\n%s\n", filepath.Base(p.cmd.Path), tail(p.output(), n))
	}
	return b.String()
}

// Stop stops the API server and etcd (SIGINT, then SIGKILL) and removes Dir.
func (c *Cluster) Stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].stop()
	}
	c.procs = nil
	if c.Dir != "" {
		os.RemoveAll(c.Dir)
	}
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	log  bytes.Buffer
}

func (p *process) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.Write(b)
}

func (c *Cluster) start(name string, args ...string) (*process, error) {
	p := &process{cmd: exec.Command(name, args...), done: make(chan struct{})}
	p.cmd.SysProcAttr = dieWithParent()
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("kubeharness: start %s: %w", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	c.procs = append(c.procs, p)
	return p, nil
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

// backoffStop ends eventually at once.
type backoffStop struct{ error }

func eventually(ctx context.Context, within time.Duration, f func() error) error {
	deadline := time.Now().Add(within)
	var err error
	for {
		if err = f(); err == nil {
			return nil
		}
		var stop backoffStop
		if errors.As(err, &stop) {
			return stop.error
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s: %w", within, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// freePorts returns n distinct loopback ports that were free a moment ago (held together so
// the kernel does not hand out one twice).
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
