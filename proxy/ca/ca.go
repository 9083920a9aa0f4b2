// Package ca is the per-pod certificate authority escrow uses to intercept TLS: it signs a leaf
// certificate for each upstream host the agent connects to, and writes the CA certificate and a
// trust bundle for the agent's containers.
//
// The CA's private key is generated in New and lives only in this process's memory; New never
// writes it anywhere, and a restarted escrow has a new CA (and rewrites the trust files).
// LoadOrNew is the one exception, chosen by the caller: it keeps the key in a directory meant to
// be a memory-backed volume visible only to escrow, so that a restarted escrow container in the
// same pod reuses the CA the agent already trusts (see persist.go).
//
// Name constraints (permitting only the configured upstream hosts) would bound the damage of a
// leaked key, but the upstream set changes at runtime and the key never leaves memory, so the
// CA is unconstrained for now.
package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"
)

// Defaults.
const (
	// DefaultLeafTTL is a leaf's validity when Options.LeafTTL is zero.
	DefaultLeafTTL = 24 * time.Hour
	// DefaultCATTL is the CA's validity when Options.CATTL is zero. The key exists only for the
	// life of the process, so the validity mostly bounds how long a copied CA certificate stays
	// meaningful; a year outlasts any reasonable pod. Leaves never outlive the CA, and Leaf
	// fails once the CA has expired.
	DefaultCATTL = 365 * 24 * time.Hour
	// DefaultMaxLeaves caps the leaf cache. A cached leaf holds about 3.6 KB of heap, so a
	// full cache is under 4 MB however many names a wildcard upstream lets the agent use; a
	// pod talks to far fewer intercepted hosts, and an evicted leaf costs one re-mint (~0.1 ms).
	DefaultMaxLeaves = 1000
	// skew backdates NotBefore, for clocks that disagree a little.
	skew = time.Minute
)

// Options configures New.
type Options struct {
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// LeafTTL is each leaf certificate's validity; zero means DefaultLeafTTL.
	LeafTTL time.Duration
	// CATTL is the CA certificate's validity; zero means DefaultCATTL.
	CATTL time.Duration
	// Name is the CA's subject common name; empty means "escrow pod CA <hostname>".
	Name string
}

// CA is a per-pod certificate authority. It is safe for concurrent use.
type CA struct {
	now     func() time.Time
	leafTTL time.Duration

	key      *ecdsa.PrivateKey
	cert     *x509.Certificate // parsed; never handed out (callers get a fresh copy)
	certPEM  []byte
	notAfter time.Time

	flight    singleflight.Group
	mu        sync.RWMutex
	leaves    map[string]*leafEntry
	maxLeaves int
	mints     atomic.Int64 // leaves signed, for tests
}

type leafEntry struct {
	cert    *tls.Certificate
	renewAt time.Time // re-mint from here on: less than a third of the lifetime remains
}

// New generates the CA key (ECDSA P-256, in memory only) and its self-signed certificate.
func New(o Options) (*CA, error) {
	c, err := newShell(o)
	if err != nil {
		return nil, err
	}
	return c, c.generate(o)
}

// newShell is a CA without its key and certificate: the options checked and defaulted.
func newShell(o Options) (*CA, error) {
	if o.LeafTTL < 0 || o.CATTL < 0 {
		return nil, errors.New("ca: negative TTL")
	}
	c := &CA{
		now:       o.Now,
		leafTTL:   o.LeafTTL,
		leaves:    make(map[string]*leafEntry),
		maxLeaves: DefaultMaxLeaves,
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.leafTTL == 0 {
		c.leafTTL = DefaultLeafTTL
	}
	return c, nil
}

// generate makes a new key and self-signed certificate for c.
func (c *CA) generate(o Options) error {
	caTTL := o.CATTL
	if caTTL == 0 {
		caTTL = DefaultCATTL
	}
	name := o.Name
	if name == "" {
		name = "escrow pod CA"
		if h, err := os.Hostname(); err == nil && h != "" {
			name += " " + h
		}
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("ca: generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return err
	}
	now := c.now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"escrow"}},
		NotBefore:             now.Add(-skew),
		NotAfter:              now.Add(caTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("ca: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("ca: parse CA certificate: %w", err)
	}
	c.setKeyPair(key, cert)
	return nil
}

// setKeyPair installs the CA's key and its (parsed) certificate.
func (c *CA) setKeyPair(key *ecdsa.PrivateKey, cert *x509.Certificate) {
	c.key = key
	c.cert = cert
	c.notAfter = cert.NotAfter
	c.certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
}

// Certificate returns a copy of the CA certificate.
func (c *CA) Certificate() *x509.Certificate {
	cert, err := x509.ParseCertificate(c.cert.Raw)
	if err != nil { // cannot happen: it parsed in New
		panic("ca: reparse CA certificate: " + err.Error())
	}
	return cert
}

// CertPEM returns the CA certificate in PEM form (a copy).
func (c *CA) CertPEM() []byte { return bytes.Clone(c.certPEM) }

// Pool returns a new pool holding only the CA certificate.
func (c *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Certificate())
	return p
}

// Leaf returns a certificate for host (a DNS name or an IP literal) signed by the CA, with the
// CA certificate as Certificate[1] and Leaf set. Leaves are cached per host and re-minted when
// less than a third of their lifetime remains; concurrent callers for one host share one
// signing. The returned value is shared: callers must not modify it.
func (c *CA) Leaf(host string) (*tls.Certificate, error) {
	now := c.now()
	// Fast path: host as given is usually already the canonical cache key.
	if cert := c.cached(host, now); cert != nil {
		return cert, nil
	}
	key, ip, err := canonicalHost(host)
	if err != nil {
		return nil, err
	}
	if cert := c.cached(key, now); cert != nil {
		return cert, nil
	}
	v, err, _ := c.flight.Do(key, func() (any, error) {
		now := c.now()
		if cert := c.cached(key, now); cert != nil { // minted while we waited for the flight
			return cert, nil
		}
		e, err := c.mint(key, ip, now)
		if err != nil {
			return nil, err
		}
		c.store(key, e)
		return e.cert, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*tls.Certificate), nil
}

func (c *CA) cached(key string, now time.Time) *tls.Certificate {
	c.mu.RLock()
	e := c.leaves[key]
	c.mu.RUnlock()
	if e == nil || !now.Before(e.renewAt) {
		return nil
	}
	return e.cert
}

func (c *CA) store(key string, e *leafEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.leaves[key]; !ok && len(c.leaves) >= c.maxLeaves {
		// Evict one entry; map iteration starts at a random place, so this is random eviction.
		for k := range c.leaves {
			delete(c.leaves, k)
			break
		}
	}
	c.leaves[key] = e
}

func (c *CA) mint(host string, ip netip.Addr, now time.Time) (*leafEntry, error) {
	if !now.Before(c.notAfter) {
		return nil, fmt.Errorf("ca: the pod CA expired at %s", c.notAfter.UTC().Format(time.RFC3339))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate leaf key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	notBefore := now.Add(-skew)
	notAfter := now.Add(c.leafTTL)
	if notAfter.After(c.notAfter) {
		notAfter = c.notAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if len(host) <= 64 { // RFC 5280 upper bound for a common name
		tmpl.Subject.CommonName = host
	}
	if ip.IsValid() {
		tmpl.IPAddresses = []net.IP{ip.AsSlice()}
	} else {
		tmpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign leaf for %s: %w", host, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse leaf for %s: %w", host, err)
	}
	c.mints.Add(1)
	lifetime := leaf.NotAfter.Sub(leaf.NotBefore)
	return &leafEntry{
		cert: &tls.Certificate{
			Certificate: [][]byte{der, c.cert.Raw},
			PrivateKey:  key,
			Leaf:        leaf,
		},
		renewAt: leaf.NotAfter.Add(-lifetime / 3),
	}, nil
}

// canonicalHost validates host and returns its cache key (lower case, no trailing dot) and, for
// an IP literal, the address.
func canonicalHost(host string) (string, netip.Addr, error) {
	if h, ok := strings.CutPrefix(host, "["); ok {
		host, _ = strings.CutSuffix(h, "]")
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return "", netip.Addr{}, fmt.Errorf("ca: invalid host %q: zoned address", host)
		}
		return ip.String(), ip, nil
	}
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	if !validDNSName(h) {
		return "", netip.Addr{}, fmt.Errorf("ca: invalid host %q", host)
	}
	return h, netip.Addr{}, nil
}

// validDNSName accepts lower-case LDH names (underscores allowed, as real host names use them),
// labels of 1-63 bytes, at most 253 bytes in all. No wildcards: leaves name concrete hosts.
func validDNSName(h string) bool {
	if len(h) == 0 || len(h) > 253 {
		return false
	}
	for label := range strings.SplitSeq(h, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			b := label[i]
			if !('a' <= b && b <= 'z' || '0' <= b && b <= '9' || b == '-' || b == '_') {
				return false
			}
		}
	}
	return true
}

var serialLimit = new(big.Int).Lsh(big.NewInt(1), 128)

func randomSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, serialLimit)
	if err != nil {
		return nil, fmt.Errorf("ca: serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil // never zero
}
