package harness

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"
)

// MinIOOptions configure StartMinIO.
type MinIOOptions struct {
	// OpenIDConfigURL is the discovery document MinIO's STS trusts (SPIRE.DiscoveryURL):
	// AssumeRoleWithWebIdentity then takes JWT-SVIDs whose audience is ClientID. Empty: no
	// OpenID provider (root credentials only).
	OpenIDConfigURL string
	// ClientID is the audience MinIO requires of web identity tokens; default "minio".
	ClientID string
	// RolePolicy is the MinIO policy every valid web identity gets; default "readwrite".
	RolePolicy string
	// TLS serves HTTPS with a certificate from a CA of its own (MinIO.CAFile).
	TLS bool
	// Env is added to MinIO's environment (MINIO_* settings).
	Env []string
}

// MinIO is a running MinIO server (one drive in a temporary directory) on loopback.
type MinIO struct {
	// URL is http(s)://127.0.0.1:P: the S3 API and, with POST /, the STS API.
	URL  string
	Addr string
	// RoleARN is the role of the OpenID provider (for AssumeRoleWithWebIdentity's RoleArn).
	RoleARN string
	// RootUser and RootPassword are the admin credentials (test setup only; never an agent's).
	RootUser, RootPassword string
	// CAFile is the CA of MinIO's TLS certificate ("" without TLS).
	CAFile  string
	DataDir string

	proc *Process
}

var roleARN = regexp.MustCompile(`arn:minio:iam:::role/[A-Za-z0-9_-]+`)

// StartMinIO starts MinIO and waits until it is ready (and, with an OpenID provider, until it
// printed the provider's role ARN).
func StartMinIO(t testing.TB, o MinIOOptions) *MinIO {
	t.Helper()
	bin := Bin(t, "minio")
	dir := ShortTempDir(t)
	port := FreePort(t)
	if o.ClientID == "" {
		o.ClientID = "minio"
	}
	if o.RolePolicy == "" {
		o.RolePolicy = "readwrite"
	}
	m := &MinIO{
		Addr: fmt.Sprintf("127.0.0.1:%d", port), RootUser: "minioadmin",
		RootPassword: "minio-root-" + randomHex(t, 12), DataDir: filepath.Join(dir, "data"),
	}
	args := []string{"server", m.DataDir, "--address", m.Addr}
	scheme := "http"
	var roots *x509.CertPool
	if o.TLS {
		ca := NewCA(t)
		_, certFile, keyFile := ca.Leaf(t, "127.0.0.1", "localhost")
		certsDir := filepath.Join(dir, "certs")
		copyFile(t, certFile, filepath.Join(certsDir, "public.crt"))
		copyFile(t, keyFile, filepath.Join(certsDir, "private.key"))
		args = append(args, "--certs-dir", certsDir)
		m.CAFile = ca.CertFile
		roots = x509.NewCertPool()
		roots.AddCert(ca.Cert)
		scheme = "https"
	}
	m.URL = scheme + "://" + m.Addr
	env := CleanEnv(append([]string{
		"MINIO_ROOT_USER=" + m.RootUser, "MINIO_ROOT_PASSWORD=" + m.RootPassword,
		"MINIO_BROWSER=off", "MINIO_UPDATE=off", "MINIO_CI_CD=1",
	}, o.Env...)...)
	if o.OpenIDConfigURL != "" {
		env = append(env,
			"MINIO_IDENTITY_OPENID_CONFIG_URL="+o.OpenIDConfigURL,
			"MINIO_IDENTITY_OPENID_CLIENT_ID="+o.ClientID,
			"MINIO_IDENTITY_OPENID_ROLE_POLICY="+o.RolePolicy)
	}
	m.proc = StartProcess(t, ProcessOptions{Name: "minio", Path: bin, Args: args, Env: env, Dir: dir})
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	Eventually(t, 90*time.Second, "MinIO /minio/health/ready", func() error {
		if m.proc.Exited() {
			t.Fatalf("harness: minio exited (%v):\n%s", m.proc.Err(), tailBytes(m.proc.Output(), 8<<10))
		}
		res, err := c.Get(m.URL + "/minio/health/ready")
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return fmt.Errorf("%s", res.Status)
		}
		return nil
	})
	if o.OpenIDConfigURL != "" {
		Eventually(t, 30*time.Second, "MinIO's role ARN in its output", func() error {
			if arn := roleARN.FindString(m.proc.Output()); arn != "" {
				m.RoleARN = arn
				return nil
			}
			return errors.New("not printed yet")
		})
	}
	return m
}

// Process is the MinIO child process.
func (m *MinIO) Process() *Process { return m.proc }

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, string(b))
}

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
