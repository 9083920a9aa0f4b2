package k8s_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// cluster is a real kube-apiserver v1.34 with etcd, both on loopback, no controller-manager,
// no scheduler, no kubelet: objects are admitted and stored, pods never run.
type cluster struct {
	url        string
	kubeconfig string
	kubectlBin string
}

const adminToken = "escrow-k8s-test-admin"

func startCluster(t *testing.T) *cluster {
	t.Helper()
	etcdBin, kasBin, kubectlBin := tool(t, "etcd"), tool(t, "kube-apiserver"), tool(t, "kubectl")
	dir := t.TempDir()

	clientPort, peerPort := freePort(t), freePort(t)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	etcd := start(t, etcdBin, "--name", "default", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL)
	plain := &http.Client{Timeout: 2 * time.Second}
	eventually(t, 30*time.Second, "etcd /health", func() error {
		if etcd.exited() {
			t.Fatalf("etcd exited:\n%s", etcd.output())
		}
		res, err := plain.Get(etcdURL + "/health")
		if err != nil {
			return err
		}
		res.Body.Close()
		return nil
	})

	// The service account signing key, and a static admin token.
	saKey := filepath.Join(dir, "sa.key")
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}), 0o600); err != nil {
		t.Fatal(err)
	}
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+`,admin,admin-uid,"system:masters"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	kas := start(t, kasBin, "--etcd-servers="+etcdURL, "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", port), "--cert-dir="+filepath.Join(dir, "certs"),
		"--service-cluster-ip-range=10.96.0.0/24", "--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saKey, "--service-account-signing-key-file="+saKey,
		"--token-auth-file="+tokens, "--authorization-mode=RBAC")
	c := &cluster{url: fmt.Sprintf("https://127.0.0.1:%d", port), kubectlBin: kubectlBin}
	insecure := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	eventually(t, 90*time.Second, "kube-apiserver /readyz", func() error {
		if kas.exited() {
			t.Fatalf("kube-apiserver exited:\n%s", tail(kas.output(), 4096))
		}
		req, _ := http.NewRequest("GET", c.url+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
		res, err := insecure.Do(req)
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			return fmt.Errorf("status %d", res.StatusCode)
		}
		return nil
	})

	// The API server's serving certificate is self-signed into cert-dir; trust it as the CA.
	c.kubeconfig = filepath.Join(dir, "kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {token: %q}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, c.url, filepath.Join(dir, "certs", "apiserver.crt"), adminToken)
	if err := os.WriteFile(c.kubeconfig, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	// The default ServiceAccount is made by the controller-manager, which is not running.
	eventually(t, 30*time.Second, "kubectl reaches the API server", func() error {
		_, err := c.kubectlErr(nil, "get", "namespaces")
		return err
	})
	return c
}

func (c *cluster) kubectlErr(stdin []byte, args ...string) (string, error) {
	cmd := exec.Command(c.kubectlBin, append([]string{"--kubeconfig", c.kubeconfig, "--request-timeout=30s"}, args...)...)
	if stdin != nil {
		cmd.Stdin = strings.NewReader(string(stdin))
	}
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

func (c *cluster) kubectl(t testing.TB, stdin []byte, args ...string) string {
	t.Helper()
	out, err := c.kubectlErr(stdin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// namespace creates a namespace with labels and its default ServiceAccount.
func (c *cluster) namespace(t testing.TB, name string, labels ...string) {
	t.Helper()
	c.kubectl(t, nil, "create", "namespace", name)
	if len(labels) > 0 {
		c.kubectl(t, nil, append([]string{"label", "namespace", name}, labels...)...)
	}
	c.kubectl(t, nil, "create", "serviceaccount", "default", "-n", name)
}

// getPod reads a pod back from the API server.
func (c *cluster) getPod(t testing.TB, ns, name string) (pod, map[string]any) {
	t.Helper()
	out := c.kubectl(t, nil, "get", "pod", "-n", ns, name, "-o", "json")
	var p pod
	var raw map[string]any
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatal(err)
	}
	_ = json.Unmarshal([]byte(out), &raw)
	return p, raw
}
