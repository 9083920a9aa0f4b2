package harness

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
)

// VaultOptions configure StartVault.
type VaultOptions struct {
	// Env is added to Vault's environment.
	Env []string
}

// Vault is a running Vault server in dev mode (in-memory storage, unsealed, KV version 2
// mounted at secret/) serving HTTPS on loopback with a certificate from the CA Vault generates
// for itself (-dev-tls).
type Vault struct {
	// URL is https://127.0.0.1:P.
	URL  string
	Addr string
	// CAFile is the CA of Vault's certificate.
	CAFile string
	// RootToken is the dev root token (test setup and inspection only; never an agent's).
	RootToken string

	proc *Process
}

// StartVault starts Vault in dev mode and waits until it is unsealed and active.
func StartVault(t testing.TB, o VaultOptions) *Vault {
	t.Helper()
	bin := Bin(t, "vault")
	dir := ShortTempDir(t)
	certDir := filepath.Join(dir, "tls")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		t.Fatal(err)
	}
	v := &Vault{
		Addr:      fmt.Sprintf("127.0.0.1:%d", FreePort(t)),
		CAFile:    filepath.Join(certDir, "vault-ca.pem"),
		RootToken: "vault-root-" + randomHex(t, 12),
	}
	v.URL = "https://" + v.Addr
	// HOME is the temporary directory: dev mode stores the root token in ~/.vault-token. VAULT_*
	// settings of this machine must not reach the server.
	env := []string{"HOME=" + dir}
	for _, kv := range CleanEnv() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "VAULT_") || k == "HOME" {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, o.Env...)
	v.proc = StartProcess(t, ProcessOptions{Name: "vault", Path: bin, Dir: dir, Env: env, Args: []string{
		"server", "-dev", "-dev-tls", "-dev-tls-cert-dir=" + certDir,
		"-dev-listen-address=" + v.Addr, "-dev-root-token-id=" + v.RootToken, "-log-level=info",
	}})
	Eventually(t, 60*time.Second, "Vault /v1/sys/health", func() error {
		if v.proc.Exited() {
			t.Fatalf("harness: vault exited (%v):\n%s", v.proc.Err(), tailBytes(v.proc.Output(), 8<<10))
		}
		// Read the CA each time: Vault may not have finished writing it on an earlier try.
		pem, err := os.ReadFile(v.CAFile)
		if err != nil {
			return err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return fmt.Errorf("no certificate in %s yet", v.CAFile)
		}
		c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
		defer c.CloseIdleConnections()
		// 200 only when initialized, unsealed and active.
		res, err := c.Get(v.URL + "/v1/sys/health")
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return fmt.Errorf("%s", res.Status)
		}
		return nil
	})
	return v
}

// Client is Vault's Go client with the root token, for test setup and inspection.
func (v *Vault) Client(t testing.TB) *vaultapi.Client {
	t.Helper()
	cfg := vaultapi.DefaultConfig()
	cfg.Address = v.URL
	if err := cfg.ConfigureTLS(&vaultapi.TLSConfig{CACert: v.CAFile}); err != nil {
		t.Fatalf("harness: vault client TLS: %v", err)
	}
	cfg.MaxRetries = 0
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		t.Fatalf("harness: vault client: %v", err)
	}
	c.ClearNamespace()
	c.SetToken(v.RootToken)
	return c
}

// Process is the Vault child process.
func (v *Vault) Process() *Process { return v.proc }
