package ca

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/escrowproxy/escrow/config"
)

// File names written by WriteFiles (defined in config, shared with the injector).
const (
	CAFile     = config.CACertFile
	BundleFile = config.TrustBundleFile
)

// systemRootFiles are the well-known Linux locations of the system's PEM root bundle, in the
// order SystemRootsPEM tries them. Environment variables (SSL_CERT_FILE) are deliberately not
// read: in a pod they may point at escrow's own bundle.
var systemRootFiles = []string{
	"/etc/ssl/certs/ca-certificates.crt",                // Debian, Ubuntu, Alpine, Arch
	"/etc/pki/tls/certs/ca-bundle.crt",                  // Fedora, RHEL 6
	"/etc/ssl/ca-bundle.pem",                            // openSUSE
	"/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", // RHEL 7+, CentOS
	"/etc/ssl/cert.pem",                                 // Alpine, macOS-like layouts
}

// SystemRootsPEM returns the contents of the first existing system root bundle. If none exists
// it returns nil and a nil error (the trust bundle then holds only the pod CA); a bundle that
// exists but cannot be read is an error.
func SystemRootsPEM() ([]byte, error) {
	return readFirst(systemRootFiles)
}

func readFirst(paths []string) ([]byte, error) {
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err == nil {
			return b, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("ca: read system roots: %w", err)
		}
	}
	return nil, nil
}

// WriteFiles writes dir/ca.crt (the pod CA only) and dir/trust-bundle.pem (the system roots,
// then the pod CA), each atomically (a temporary file in dir, fsync, rename), with mode 0644,
// creating dir with mode 0755 if it is missing. The two files are replaced one after the other,
// not together.
//
// Only CERTIFICATE PEM blocks are ever written: caPEM must hold at least one and nothing else
// (a private key passed by mistake is an error), and anything else in systemRoots (comments,
// other block types) is dropped.
func WriteFiles(dir string, caPEM []byte, systemRoots []byte) error {
	ca, err := caCertsPEM(caPEM)
	if err != nil {
		return err
	}
	var bundle bytes.Buffer
	for rest := systemRoots; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if err := pem.Encode(&bundle, b); err != nil {
			return fmt.Errorf("ca: encode system root: %w", err)
		}
	}
	bundle.Write(ca)

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("ca: create %s: %w", dir, err)
	}
	if err := writeAtomic(dir, CAFile, ca, 0o644); err != nil {
		return err
	}
	return writeAtomic(dir, BundleFile, bundle.Bytes(), 0o644)
}

// caCertsPEM re-encodes caPEM's certificates, refusing anything that is not a certificate.
func caCertsPEM(caPEM []byte) ([]byte, error) {
	var out bytes.Buffer
	n := 0
	for rest := caPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			if len(bytes.TrimSpace(rest)) != 0 {
				return nil, errors.New("ca: CA PEM has trailing data that is not a PEM block")
			}
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("ca: CA PEM holds a %q block; only certificates are written", b.Type)
		}
		if _, err := x509.ParseCertificate(b.Bytes); err != nil {
			return nil, fmt.Errorf("ca: CA PEM: %w", err)
		}
		if err := pem.Encode(&out, &pem.Block{Type: "CERTIFICATE", Bytes: b.Bytes}); err != nil {
			return nil, fmt.Errorf("ca: encode CA: %w", err)
		}
		n++
	}
	if n == 0 {
		return nil, errors.New("ca: CA PEM holds no certificate")
	}
	return out.Bytes(), nil
}

func writeAtomic(dir, name string, data []byte, perm os.FileMode) (err error) {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	if err = os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	// Make the rename durable. Best effort: some filesystems refuse fsync on a directory.
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
