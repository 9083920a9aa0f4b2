package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// selfSignedPEM is a real CA certificate in PEM.
func selfSignedPEM(t *testing.T) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// osLocalWithEnv is the real machine with a fake environment.
func osLocalWithEnv(env map[string]string) Local {
	l := OSLocal()
	l.LookupEnv = func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	return l
}

func write(t *testing.T, path string, data []byte, mode os.FileMode) string {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCheckLocal_ReportsEveryMissingSecretUnreadableFileAndBadCA(t *testing.T) {
	dir := t.TempDir()
	goodCA := write(t, filepath.Join(dir, "ca.pem"), selfSignedPEM(t), 0o644)
	keyNotCA := write(t, filepath.Join(dir, "key.pem"), []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), 0o644)
	secret := write(t, filepath.Join(dir, "secret"), []byte("s3cr3t\n"), 0o600)
	empty := write(t, filepath.Join(dir, "empty"), []byte("\n"), 0o600)
	missing := filepath.Join(dir, "missing")
	policies := filepath.Join(dir, "policies")
	if err := os.Mkdir(policies, 0o755); err != nil {
		t.Fatal(err)
	}
	doc := `
identity: {spiffe: {socket: "unix:///run/spire/agent.sock"}}
ca_dir: ` + filepath.Join(dir, "ca") + `
policy: {dir: ` + policies + `}
upstreams:
  - {host: a.example, ca_file: ` + keyNotCA + `}
  - {host: b.example, ca_file: ` + goodCA + `}
credentials:
  env-missing: {static: {env: ESCROW_TEST_UNSET}}
  env-empty: {static: {env: ESCROW_TEST_EMPTY}}
  env-ok: {static: {env: ESCROW_TEST_SET}}
  file-missing: {static: {file: ` + missing + `}}
  file-empty: {static: {file: ` + empty + `}}
  file-ok: {static: {file: ` + secret + `}}
  idp: {oauth2: {token_url: "https://i.example/t", client_id: c, client_secret_file: ` + missing + `, ca_file: ` + keyNotCA + `}}
  gh: {github_app: {app_id: 1, installation_id: 2, private_key_file: ` + missing + `}}
  v: {vault: {address: "https://v.example", auth: {kubernetes: {role: r, token_file: ` + missing + `}}, secret: {kv2: {path: a, field: f}}, ca_file: ` + goodCA + `}}
`
	c, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	err = c.CheckLocal(osLocalWithEnv(map[string]string{"ESCROW_TEST_EMPTY": " ", "ESCROW_TEST_SET": "v"}))
	got := errText(err)
	wantAll(t, got,
		"credentials.env-missing.static.env: environment variable ESCROW_TEST_UNSET is not set",
		"credentials.env-empty.static.env: environment variable ESCROW_TEST_EMPTY is empty",
		"credentials.file-missing.static.file: cannot read "+missing,
		"credentials.file-empty.static.file: "+empty+" is empty",
		"credentials.idp.oauth2.client_secret_file: cannot read",
		"credentials.idp.oauth2.ca_file: "+keyNotCA+" holds no PEM certificate",
		"credentials.gh.github_app.private_key_file: cannot read",
		"credentials.v.vault.auth.kubernetes.token_file: cannot read",
		"upstreams[0].ca_file: "+keyNotCA+" holds no PEM certificate",
	)
	for _, unwanted := range []string{"env-ok", "file-ok", "upstreams[1]", "vault.ca_file", "ca_dir", "policy.dir", "s3cr3t"} {
		if strings.Contains(got, unwanted) {
			t.Errorf("reported %q, which is fine:\n%s", unwanted, got)
		}
	}
	if n := strings.Count(got, "\n  "); n != 9 {
		t.Errorf("want 9 errors at once, got %d:\n%s", n, got)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca")); !os.IsNotExist(err) {
		t.Errorf("CheckLocal created ca_dir: %v", err)
	}
}

func TestCheckLocal_CADirBelowAFileIsReported(t *testing.T) {
	dir := t.TempDir()
	file := write(t, filepath.Join(dir, "f"), []byte("x"), 0o644)
	c, err := Parse([]byte(minimal + "ca_dir: " + filepath.Join(file, "ca") + "\nca_key_dir: " + filepath.Join(file, "key") + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	l := OSLocal()
	l.Stat = func(string) (os.FileInfo, error) { return os.Stat(dir) }
	wantAll(t, errText(c.CheckLocal(l)), "ca_dir: "+filepath.Join(file, "ca")+": "+file+" is not a directory", "ca_key_dir: ")
}

func TestCheckLocal_CADirMustBeCreatableAndWritable(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root writes any directory; the permission case needs an unprivileged user")
	}
	dir := t.TempDir()
	ro := filepath.Join(dir, "ro")
	if err := os.Mkdir(ro, 0o555); err != nil {
		t.Fatal(err)
	}
	for caDir, want := range map[string]string{
		ro:                          "ca_dir: " + ro + ": not writable",
		filepath.Join(ro, "a", "b"): "ca_dir: " + filepath.Join(ro, "a", "b") + ": cannot be created: " + ro + " is not writable",
	} {
		c, err := Parse([]byte(minimal + "ca_dir: " + caDir + "\n"))
		if err != nil {
			t.Fatal(err)
		}
		l := OSLocal()
		l.Stat = func(string) (os.FileInfo, error) { return os.Stat(dir) } // policies "exist"
		if err := c.CheckLocal(l); !strings.Contains(errText(err), want) {
			t.Errorf("ca_dir %s: got %v, want %q", caDir, err, want)
		}
	}
}

func TestWritableDir_ProbesWithoutLeavingAnythingBehind(t *testing.T) {
	dir := t.TempDir()
	file := write(t, filepath.Join(dir, "f"), []byte("x"), 0o644)
	if err := writableDir(dir); err != nil {
		t.Fatalf("writable temp dir: %v", err)
	}
	if err := writableDir(filepath.Join(dir, "new", "deeper")); err != nil {
		t.Fatalf("creatable dir: %v", err)
	}
	if err := writableDir(filepath.Join(file, "sub")); err == nil || !strings.Contains(err.Error(), "is not a directory") {
		t.Errorf("below a file: %v", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("the probe left files behind: %v", entries)
	}
}

func TestLoad_ReportsFileAndMachineProblemsInOneRun(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing-secret")
	cfg := write(t, filepath.Join(dir, "escrow.yaml"), []byte(`
identity: {static: spiffe://example.org/a}
policy: {dir: `+filepath.Join(dir, "no-policies")+`, mode: strict}
ca_dir: `+filepath.Join(dir, "ca")+`
credentials:
  k: {static: {file: `+missing+`}}
  e: {static: {env: ESCROW_TEST_NOT_SET_ANYWHERE}}
upstreams: [{host: a.example, credential: k, port: 80}]
`), 0o644)
	_, err := LoadWith(cfg, osLocalWithEnv(nil))
	wantAll(t, errText(err),
		"policy.mode: want enforce or report",
		"upstreams[0].port: port 80 is plain HTTP",
		"policy.dir: cannot read",
		"credentials.k.static.file: cannot read "+missing,
		"credentials.e.static.env: environment variable ESCROW_TEST_NOT_SET_ANYWHERE is not set",
	)
}
