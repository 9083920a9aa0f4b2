package ca

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteFiles_AtomicAndContainsBoth(t *testing.T) {
	c := newTestCA(t, Options{})
	roots := newTestCA(t, Options{Name: "fake system root 1"}).CertPEM()
	roots = append(roots, []byte("# a comment line in a distro bundle\n")...)
	roots = append(roots, newTestCA(t, Options{Name: "fake system root 2"}).CertPEM()...)
	dir := filepath.Join(t.TempDir(), "escrow")

	if err := WriteFiles(dir, c.CertPEM(), roots); err != nil {
		t.Fatal(err)
	}
	// Write twice: the second write replaces the files in place.
	if err := WriteFiles(dir, c.CertPEM(), roots); err != nil {
		t.Fatal(err)
	}

	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("dir mode %v, %v", st.Mode().Perm(), err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte("PRIVATE KEY")) {
			t.Errorf("%s holds private key material", e.Name())
		}
		info, _ := e.Info()
		if info.Mode().Perm() != 0o644 {
			t.Errorf("%s mode %v, want 0644", e.Name(), info.Mode().Perm())
		}
	}
	if strings.Join(names, ",") != "ca.crt,trust-bundle.pem" {
		t.Errorf("dir holds %v, want exactly ca.crt and trust-bundle.pem (no temp files)", names)
	}

	caCerts := parsePEMCerts(t, filepath.Join(dir, CAFile))
	if len(caCerts) != 1 || !caCerts[0].Equal(c.Certificate()) {
		t.Errorf("ca.crt holds %d certificates, want only the pod CA", len(caCerts))
	}
	bundle := parsePEMCerts(t, filepath.Join(dir, BundleFile))
	var cns []string
	for _, cert := range bundle {
		cns = append(cns, cert.Subject.CommonName)
	}
	want := []string{"fake system root 1", "fake system root 2", c.Certificate().Subject.CommonName}
	if strings.Join(cns, "|") != strings.Join(want, "|") {
		t.Errorf("bundle = %v, want %v", cns, want)
	}
	// The bundle works as a trust store for a leaf.
	pool := x509.NewCertPool()
	b, _ := os.ReadFile(filepath.Join(dir, BundleFile))
	if !pool.AppendCertsFromPEM(b) {
		t.Fatal("bundle does not parse as a pool")
	}
	leaf, _ := c.Leaf("bundle.example.com")
	if _, err := leaf.Leaf.Verify(x509.VerifyOptions{DNSName: "bundle.example.com", Roots: pool}); err != nil {
		t.Errorf("leaf does not verify against the bundle: %v", err)
	}
}

func TestWriteFiles_NoSystemRoots(t *testing.T) {
	c := newTestCA(t, Options{})
	dir := t.TempDir()
	if err := WriteFiles(dir, c.CertPEM(), nil); err != nil {
		t.Fatal(err)
	}
	if got := parsePEMCerts(t, filepath.Join(dir, BundleFile)); len(got) != 1 || !got[0].Equal(c.Certificate()) {
		t.Errorf("bundle holds %d certificates, want the pod CA only", len(got))
	}
}

func TestWriteFiles_RefusesNonCertificates(t *testing.T) {
	c := newTestCA(t, Options{})
	dir := t.TempDir()
	keyish := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte("not really")})
	for name, in := range map[string][]byte{
		"key":      append(c.CertPEM(), keyish...),
		"empty":    nil,
		"garbage":  []byte("hello"),
		"trailing": append(c.CertPEM(), []byte("junk")...),
	} {
		if err := WriteFiles(dir, in, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// Non-certificate blocks in the system roots are dropped, not written.
	roots := append([]byte(nil), keyish...)
	if err := WriteFiles(dir, c.CertPEM(), roots); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, BundleFile))
	if bytes.Contains(b, []byte("PRIVATE KEY")) {
		t.Error("a key block from systemRoots reached the bundle")
	}
}

func TestSystemRootsPEM(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.pem")
	second := filepath.Join(dir, "second.pem")
	if err := os.WriteFile(second, []byte("roots"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := readFirst([]string{missing, second}); err != nil || string(b) != "roots" {
		t.Errorf("readFirst = %q, %v", b, err)
	}
	if b, err := readFirst([]string{missing}); err != nil || b != nil {
		t.Errorf("none present: %q, %v", b, err)
	}
	if _, err := readFirst([]string{dir}); err == nil { // a directory is not a bundle
		t.Error("reading a directory succeeded")
	}
	// The real one: whatever this machine has, it must not error, and must parse if present.
	b, err := SystemRootsPEM()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > 0 && !x509.NewCertPool().AppendCertsFromPEM(b) {
		t.Error("system roots do not parse")
	}
}

func parsePEMCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			t.Fatalf("%s holds a %s block", path, blk.Type)
		}
		cert, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, cert)
	}
	return out
}
