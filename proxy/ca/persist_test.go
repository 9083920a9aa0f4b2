package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/internal/fakeclock"
)

func loadOrNew(t *testing.T, o Options, dir string) (*CA, bool) {
	t.Helper()
	c, reused, err := LoadOrNew(o, dir)
	if err != nil {
		t.Fatal(err)
	}
	return c, reused
}

func TestLoadOrNew_KeepsAndReuses(t *testing.T) {
	clk := fakeclock.New(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC))
	dir := filepath.Join(t.TempDir(), "key") // missing: LoadOrNew creates it
	o := Options{Now: clk.Now, Name: "test"}

	first, reused := loadOrNew(t, o, dir)
	if reused {
		t.Fatal("reused = true on an empty directory")
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o700 {
		t.Errorf("key dir mode = %o, want 700", perm)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if perm := info.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s mode = %o, want 600", e.Name(), perm)
		}
	}
	if len(names) != 2 || names[0] != KeyDirCertFile || names[1] != KeyFile {
		t.Errorf("files = %v, want exactly %s and %s (no temporary files left)", names, KeyDirCertFile, KeyFile)
	}

	// A restart (a new process) well within half the CA's life: the same CA.
	clk.Advance(30 * 24 * time.Hour)
	second, reused := loadOrNew(t, o, dir)
	if !reused {
		t.Fatal("reused = false for a valid kept CA")
	}
	if !bytes.Equal(first.CertPEM(), second.CertPEM()) {
		t.Fatal("the restarted CA has another certificate")
	}
	// What the agent trusted before the restart verifies leaves minted after it.
	leaf, err := second.Leaf("api.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Leaf.Verify(x509.VerifyOptions{Roots: first.Pool(), DNSName: "api.example.com", CurrentTime: clk.Now()}); err != nil {
		t.Fatalf("leaf from the reused CA does not verify against the old CA: %v", err)
	}
}

func TestLoadOrNew_HalfLifeEdge(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	const ttl = 10 * time.Hour
	// The certificate is backdated by skew, so its lifetime is ttl+skew and its half-life point
	// is NotAfter - (ttl+skew)/2.
	half := (ttl + skew) / 2
	for _, tc := range []struct {
		name  string
		after time.Duration
		reuse bool
	}{
		{"just before half-life", ttl - half - time.Second, true},
		{"exactly half-life", ttl - half, true},
		{"just after half-life", ttl - half + time.Second, false},
		{"expired", ttl + time.Hour, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := fakeclock.New(t0)
			dir := t.TempDir()
			o := Options{Now: clk.Now, CATTL: ttl, Name: "test"}
			first, _ := loadOrNew(t, o, dir)
			clk.Advance(tc.after)
			second, reused := loadOrNew(t, o, dir)
			if reused != tc.reuse {
				t.Fatalf("reused = %v, want %v", reused, tc.reuse)
			}
			if same := bytes.Equal(first.CertPEM(), second.CertPEM()); same != tc.reuse {
				t.Fatalf("same certificate = %v, want %v", same, tc.reuse)
			}
			if !tc.reuse {
				// The replacement was saved: the next start reuses it.
				third, reused := loadOrNew(t, o, dir)
				if !reused || !bytes.Equal(third.CertPEM(), second.CertPEM()) {
					t.Fatal("the replacement CA was not kept")
				}
				if !second.Certificate().NotAfter.Equal(clk.Now().Add(ttl).Truncate(time.Second)) {
					t.Errorf("replacement NotAfter = %v, want now+ttl", second.Certificate().NotAfter)
				}
			}
		})
	}
}

func TestLoadOrNew_ReplacesUnusable(t *testing.T) {
	clk := fakeclock.New(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC))
	o := Options{Now: clk.Now, Name: "test"}
	other := newTestCA(t, Options{Now: clk.Now, Name: "other"})
	otherKey, err := x509.MarshalPKCS8PrivateKey(other.key)
	if err != nil {
		t.Fatal(err)
	}
	rsaLike := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: []byte("junk")})

	for _, tc := range []struct {
		name   string
		mangle func(t *testing.T, dir string)
	}{
		{"key missing", func(t *testing.T, dir string) { must(t, os.Remove(filepath.Join(dir, KeyFile))) }},
		{"cert missing", func(t *testing.T, dir string) { must(t, os.Remove(filepath.Join(dir, KeyDirCertFile))) }},
		{"key garbage", func(t *testing.T, dir string) { write(t, dir, KeyFile, []byte("not pem")) }},
		{"key wrong type", func(t *testing.T, dir string) { write(t, dir, KeyFile, rsaLike) }},
		{"cert garbage", func(t *testing.T, dir string) {
			write(t, dir, KeyDirCertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("x")}))
		}},
		{"key of another CA", func(t *testing.T, dir string) {
			write(t, dir, KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: otherKey}))
		}},
		{"cert of another CA", func(t *testing.T, dir string) { write(t, dir, KeyDirCertFile, other.CertPEM()) }},
		{"not a CA certificate", func(t *testing.T, dir string) {
			c, _ := loadOrNew(t, o, dir)
			leaf, err := c.Leaf("example.com")
			if err != nil {
				t.Fatal(err)
			}
			k, err := x509.MarshalPKCS8PrivateKey(leaf.PrivateKey)
			if err != nil {
				t.Fatal(err)
			}
			write(t, dir, KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k}))
			write(t, dir, KeyDirCertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Leaf.Raw}))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			first, _ := loadOrNew(t, o, dir)
			tc.mangle(t, dir)
			second, reused := loadOrNew(t, o, dir)
			if reused || bytes.Equal(first.CertPEM(), second.CertPEM()) {
				t.Fatal("an unusable kept CA was reused")
			}
			if _, err := second.Leaf("api.example.com"); err != nil {
				t.Fatal(err)
			}
			if third, reused := loadOrNew(t, o, dir); !reused || !bytes.Equal(third.CertPEM(), second.CertPEM()) {
				t.Fatal("the replacement CA was not kept")
			}
		})
	}
}

func TestLoadOrNew_ForeignSignedCertRefused(t *testing.T) {
	// A certificate for our key but signed by someone else's key is not ours to reuse.
	clk := fakeclock.New(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC))
	dir := t.TempDir()
	first, _ := loadOrNew(t, Options{Now: clk.Now}, dir)
	signer, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := first.Certificate()
	parent := first.Certificate()
	parent.PublicKey = &signer.PublicKey
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &first.key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	write(t, dir, KeyDirCertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	if _, reused := loadOrNew(t, Options{Now: clk.Now}, dir); reused {
		t.Fatal("reused a certificate that the key did not sign")
	}
}

func TestLoadOrNew_EmptyDirWritesNothing(t *testing.T) {
	wd := t.TempDir()
	t.Chdir(wd)
	c, reused, err := LoadOrNew(Options{}, "")
	if err != nil || reused || c == nil {
		t.Fatalf("LoadOrNew(\"\") = %v, %v, %v", c, reused, err)
	}
	if ents, _ := os.ReadDir(wd); len(ents) != 0 {
		t.Fatalf("wrote %d files with no key directory", len(ents))
	}
}

func TestLoadOrNew_UnreadableIsAnError(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root reads any file")
	}
	dir := t.TempDir()
	if _, _, err := LoadOrNew(Options{}, dir); err != nil {
		t.Fatal(err)
	}
	must(t, os.Chmod(filepath.Join(dir, KeyFile), 0))
	if _, _, err := LoadOrNew(Options{}, dir); err == nil {
		t.Fatal("an unreadable key file was silently replaced")
	}
}

func TestLoadOrNew_SaveFailureIsAnError(t *testing.T) {
	dir := t.TempDir()
	blocker := filepath.Join(dir, "file")
	write(t, dir, "file", []byte("x"))
	if _, _, err := LoadOrNew(Options{}, filepath.Join(blocker, "key")); err == nil {
		t.Fatal("no error when the key directory cannot be created")
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, dir, name string, data []byte) {
	t.Helper()
	must(t, os.WriteFile(filepath.Join(dir, name), data, 0o600))
}
