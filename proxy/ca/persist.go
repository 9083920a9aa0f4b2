package ca

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Files LoadOrNew keeps in its key directory, both with mode 0600.
const (
	// KeyFile holds the CA's private key (PKCS #8, PEM).
	KeyFile = "ca.key"
	// KeyDirCertFile holds the CA certificate that goes with KeyFile (PEM).
	KeyDirCertFile = "ca.crt"
)

// LoadOrNew returns the CA kept in keyDir when there is a usable one, and otherwise a new CA that
// it saves there; reused says which. An empty keyDir means New: nothing is read or written.
//
// A kept CA is reused only if its key and certificate parse, belong together, the certificate is
// a CA certificate, and at least half of its lifetime (NotBefore to NotAfter) remains by o.Now.
// The half-life rule keeps a restarted escrow on the CA its agents already trust for most of the
// CA's life, and replaces it while plenty of time is left rather than reusing one that would
// expire (and stop every interception) shortly after the restart. Anything unusable (missing,
// corrupt, mismatched, past half-life) is replaced, not an error; an I/O error other than "does
// not exist" is an error, as is failing to save the new CA.
//
// keyDir is meant to be a memory-backed volume that only escrow's container mounts (the
// Kubernetes injector provides one). The key is written only there, atomically (a temporary file
// in keyDir, then a rename), never with wider permissions than 0600; keyDir is created with mode
// 0700 if missing. Errors never carry key material.
func LoadOrNew(o Options, keyDir string) (c *CA, reused bool, err error) {
	c, reused, save, err := Prepare(o, keyDir)
	if err != nil {
		return nil, false, err
	}
	if err := save(); err != nil {
		return nil, false, err
	}
	return c, reused, nil
}

// Prepare is LoadOrNew without the write: it returns the CA (reused from keyDir or new) and save,
// which keeps a new CA in keyDir (a no-op for a reused one or without keyDir). A start calls save
// only once nothing else can fail, so a start that fails never replaces the CA kept for, and
// trusted by the agents of, an escrow that is still running.
func Prepare(o Options, keyDir string) (c *CA, reused bool, save func() error, err error) {
	none := func() error { return nil }
	if keyDir == "" {
		c, err = New(o)
		return c, false, none, err
	}
	c, err = newShell(o)
	if err != nil {
		return nil, false, nil, err
	}
	key, cert, err := loadKeyPair(keyDir)
	if err != nil {
		return nil, false, nil, err
	}
	if key != nil && usable(cert, c.now()) {
		c.setKeyPair(key, cert)
		return c, true, none, nil
	}
	if err := c.generate(o); err != nil {
		return nil, false, nil, err
	}
	return c, false, func() error { return saveKeyPair(keyDir, c.key, c.cert) }, nil
}

// usable reports whether a kept CA certificate may be reused at now: at least half its lifetime
// is left (and it is already valid, allowing for the usual backdating).
func usable(cert *x509.Certificate, now time.Time) bool {
	life := cert.NotAfter.Sub(cert.NotBefore)
	if life <= 0 || now.Add(skew).Before(cert.NotBefore) {
		return false
	}
	return cert.NotAfter.Sub(now) >= life/2
}

// loadKeyPair reads the kept key and certificate. It returns nil values and no error when they
// are missing or unusable, so the caller makes a new CA.
func loadKeyPair(dir string) (*ecdsa.PrivateKey, *x509.Certificate, error) {
	keyPEM, err := os.ReadFile(filepath.Join(dir, KeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("ca: read kept CA key: %w", err)
	}
	certPEM, err := os.ReadFile(filepath.Join(dir, KeyDirCertFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("ca: read kept CA certificate: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	cb, _ := pem.Decode(certPEM)
	if kb == nil || kb.Type != "PRIVATE KEY" || cb == nil || cb.Type != "CERTIFICATE" {
		return nil, nil, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, nil
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, nil
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil || !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, nil, nil
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(&key.PublicKey) {
		return nil, nil, nil
	}
	// A certificate that someone else signed (or that was tampered with) is not ours.
	if err := cert.CheckSignatureFrom(cert); err != nil {
		return nil, nil, nil
	}
	return key, cert, nil
}

// saveKeyPair writes the key, then the certificate. A crash between the two leaves a pair that
// does not match, which the next start replaces.
func saveKeyPair(dir string, key *ecdsa.PrivateKey, cert *x509.Certificate) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("ca: create key directory: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("ca: encode CA key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	clear(der)
	defer clear(keyPEM)
	if err := writeAtomic(dir, KeyFile, keyPEM, 0o600); err != nil {
		return err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	return writeAtomic(dir, KeyDirCertFile, certPEM, 0o600)
}
