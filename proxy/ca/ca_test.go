package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/internal/fakeclock"
)

func newTestCA(t testing.TB, o Options) *CA {
	t.Helper()
	c, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestNew_CACertificate(t *testing.T) {
	clk := fakeclock.New(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC))
	c := newTestCA(t, Options{Now: clk.Now, Name: "escrow pod CA test"})
	cert := c.Certificate()
	if !cert.IsCA || !cert.BasicConstraintsValid {
		t.Error("not a CA")
	}
	if cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Error("no KeyUsageCertSign")
	}
	if cert.MaxPathLen != 0 || !cert.MaxPathLenZero {
		t.Errorf("MaxPathLen = %d (zero=%v), want 0", cert.MaxPathLen, cert.MaxPathLenZero)
	}
	if cert.Subject.CommonName != "escrow pod CA test" {
		t.Errorf("CN = %q", cert.Subject.CommonName)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("key %T, want ECDSA P-256", cert.PublicKey)
	}
	if want := clk.Now().Add(DefaultCATTL); !cert.NotAfter.Equal(want) {
		t.Errorf("NotAfter = %v, want %v", cert.NotAfter, want)
	}
	if want := clk.Now().Add(-time.Minute); !cert.NotBefore.Equal(want) {
		t.Errorf("NotBefore = %v, want %v", cert.NotBefore, want)
	}
	// Certificate returns a copy.
	cert.Subject.CommonName = "changed"
	if c.Certificate().Subject.CommonName != "escrow pod CA test" {
		t.Error("Certificate() exposes internal state")
	}
	b, _ := pem.Decode(c.CertPEM())
	if b == nil || b.Type != "CERTIFICATE" || string(b.Bytes) != string(cert.Raw) {
		t.Error("CertPEM does not hold the CA certificate")
	}
	if strings.Contains(string(c.CertPEM()), "PRIVATE KEY") {
		t.Error("CertPEM holds a private key")
	}
	if _, err := New(Options{LeafTTL: -time.Hour}); err == nil {
		t.Error("negative TTL accepted")
	}
}

func TestNew_DistinctKeys(t *testing.T) {
	a, b := newTestCA(t, Options{}), newTestCA(t, Options{})
	if string(a.Certificate().RawSubjectPublicKeyInfo) == string(b.Certificate().RawSubjectPublicKeyInfo) {
		t.Fatal("two CAs share a key")
	}
	if !strings.HasPrefix(a.Certificate().Subject.CommonName, "escrow pod CA") {
		t.Errorf("default CN = %q", a.Certificate().Subject.CommonName)
	}
}

func TestLeaf_VerifiesForDNSNameAndIP(t *testing.T) {
	c := newTestCA(t, Options{})
	for _, tc := range []struct {
		host   string
		verify x509.VerifyOptions
	}{
		{"api.example.com", x509.VerifyOptions{DNSName: "api.example.com"}},
		{"API.Example.COM.", x509.VerifyOptions{DNSName: "api.example.com"}},
		{"127.0.0.1", x509.VerifyOptions{DNSName: "127.0.0.1"}},
		{"2606:4700::1111", x509.VerifyOptions{DNSName: "2606:4700::1111"}},
		{"[::1]", x509.VerifyOptions{DNSName: "::1"}},
	} {
		t.Run(tc.host, func(t *testing.T) {
			tc.verify.Roots = c.Pool()
			tc.verify.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			leaf, err := c.Leaf(tc.host)
			if err != nil {
				t.Fatal(err)
			}
			if leaf.Leaf == nil || len(leaf.Certificate) != 2 {
				t.Fatalf("Leaf field %v, chain length %d", leaf.Leaf != nil, len(leaf.Certificate))
			}
			if string(leaf.Certificate[1]) != string(c.Certificate().Raw) {
				t.Error("Certificate[1] is not the CA")
			}
			if _, err := leaf.Leaf.Verify(tc.verify); err != nil {
				t.Errorf("verify: %v", err)
			}
			if pub, ok := leaf.Leaf.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
				t.Errorf("leaf key %T, want ECDSA P-256", leaf.Leaf.PublicKey)
			}
			if leaf.Leaf.IsCA {
				t.Error("leaf is a CA")
			}
			if n := len(leaf.Leaf.DNSNames) + len(leaf.Leaf.IPAddresses); n != 1 {
				t.Errorf("leaf has %d SANs, want 1 (DNS %v, IP %v)", n, leaf.Leaf.DNSNames, leaf.Leaf.IPAddresses)
			}
			other := tc.verify
			other.DNSName = "other.example.com"
			if _, err := leaf.Leaf.Verify(other); err == nil {
				t.Error("leaf verifies for another name")
			}
		})
	}
	if ip, _ := c.Leaf("127.0.0.1"); len(ip.Leaf.IPAddresses) != 1 || len(ip.Leaf.DNSNames) != 0 {
		t.Error("IP literal did not get an IP SAN")
	}
	// A leaf must not verify against another CA's pool.
	other := newTestCA(t, Options{})
	leaf, _ := c.Leaf("api.example.com")
	if _, err := leaf.Leaf.Verify(x509.VerifyOptions{DNSName: "api.example.com", Roots: other.Pool()}); err == nil {
		t.Error("leaf verifies against a foreign CA")
	}
}

func TestLeaf_RejectsInvalidHosts(t *testing.T) {
	c := newTestCA(t, Options{})
	for _, h := range []string{"", ".", "a..b", "-a.com", "a-.com", "*.example.com", "a b.com", "ex\x00ample.com",
		"fe80::1%eth0", strings.Repeat("a", 64) + ".com", strings.Repeat("a.", 127) + "aa", "héllo.com"} {
		if _, err := c.Leaf(h); err == nil {
			t.Errorf("Leaf(%q) succeeded", h)
		}
	}
	if n := c.mints.Load(); n != 0 {
		t.Errorf("minted %d leaves for invalid hosts", n)
	}
}

func TestLeaf_TLSHandshake(t *testing.T) {
	c := newTestCA(t, Options{})
	for _, host := range []string{"api.example.com", "127.0.0.1"} {
		t.Run(host, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Skip(err)
			}
			defer ln.Close()
			srvErr := make(chan error, 1)
			go func() {
				conn, err := ln.Accept()
				if err != nil {
					srvErr <- err
					return
				}
				defer conn.Close()
				srv := tls.Server(conn, &tls.Config{
					GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
						name := hello.ServerName
						if name == "" { // no SNI for IP literals: the CONNECT target names the host
							name = host
						}
						return c.Leaf(name)
					},
				})
				if err := srv.HandshakeContext(context.Background()); err != nil {
					srvErr <- err
					return
				}
				_, err = io.WriteString(srv, "hello")
				srvErr <- err
			}()
			conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: host, RootCAs: c.Pool()})
			if err != nil {
				t.Fatalf("client handshake: %v", err)
			}
			defer conn.Close()
			b, err := io.ReadAll(conn)
			if err != nil || string(b) != "hello" {
				t.Errorf("read %q, %v", b, err)
			}
			if err := <-srvErr; err != nil {
				t.Errorf("server: %v", err)
			}
			if chain := conn.ConnectionState().PeerCertificates; len(chain) != 2 {
				t.Errorf("peer sent %d certificates, want 2", len(chain))
			}
		})
	}
}

func TestLeaf_ConcurrentRequestsMintOne(t *testing.T) {
	c := newTestCA(t, Options{})
	const n = 50
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		certs = make([]*tls.Certificate, n)
		errs  = make([]error, n)
	)
	for i := range n {
		wg.Go(func() {
			<-start
			certs[i], errs[i] = c.Leaf("concurrent.example.com")
		})
	}
	close(start)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if certs[i] != certs[0] {
			t.Fatalf("caller %d got a different certificate", i)
		}
	}
	if m := c.mints.Load(); m != 1 {
		t.Errorf("minted %d leaves, want 1", m)
	}
}

func TestLeaf_CachedPerHost(t *testing.T) {
	c := newTestCA(t, Options{})
	a1, _ := c.Leaf("a.example.com")
	a2, _ := c.Leaf("A.EXAMPLE.COM")
	b, _ := c.Leaf("b.example.com")
	if a1 != a2 {
		t.Error("same host (different case) minted twice")
	}
	if a1 == b {
		t.Error("two hosts share a leaf")
	}
	if m := c.mints.Load(); m != 2 {
		t.Errorf("mints = %d, want 2", m)
	}
}

func TestLeaf_TTLRespected(t *testing.T) {
	clk := fakeclock.New(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC))
	c := newTestCA(t, Options{Now: clk.Now, LeafTTL: 6 * time.Hour})
	leaf, err := c.Leaf("ttl.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if want := clk.Now().Add(6 * time.Hour); !leaf.Leaf.NotAfter.Equal(want) {
		t.Errorf("NotAfter = %v, want %v", leaf.Leaf.NotAfter, want)
	}
	if want := clk.Now().Add(-time.Minute); !leaf.Leaf.NotBefore.Equal(want) {
		t.Errorf("NotBefore = %v, want %v (a minute back)", leaf.Leaf.NotBefore, want)
	}
	if len(leaf.Leaf.ExtKeyUsage) != 1 || leaf.Leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth {
		t.Errorf("ExtKeyUsage = %v", leaf.Leaf.ExtKeyUsage)
	}
	def := newTestCA(t, Options{Now: clk.Now})
	leaf, _ = def.Leaf("ttl.example.com")
	if want := clk.Now().Add(DefaultLeafTTL); !leaf.Leaf.NotAfter.Equal(want) {
		t.Errorf("default NotAfter = %v, want %v", leaf.Leaf.NotAfter, want)
	}
}

func TestLeaf_ReissuedNearExpiry(t *testing.T) {
	clk := fakeclock.New(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC))
	c := newTestCA(t, Options{Now: clk.Now, LeafTTL: 24 * time.Hour})
	first, err := c.Leaf("renew.example.com")
	if err != nil {
		t.Fatal(err)
	}
	// Lifetime is 24h01m (NotBefore a minute back); renewal starts when < 1/3 remains.
	clk.Advance(15 * time.Hour)
	if again, _ := c.Leaf("renew.example.com"); again != first {
		t.Fatal("re-minted while more than a third of the lifetime remained")
	}
	clk.Advance(2 * time.Hour) // 17h in: 7h left of 24h01m
	second, err := c.Leaf("renew.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if second == first {
		t.Fatal("not re-minted with less than a third of the lifetime left")
	}
	if !second.Leaf.NotAfter.Equal(clk.Now().Add(24 * time.Hour)) {
		t.Errorf("new NotAfter = %v", second.Leaf.NotAfter)
	}
	if m := c.mints.Load(); m != 2 {
		t.Errorf("mints = %d, want 2", m)
	}
	if third, _ := c.Leaf("renew.example.com"); third != second {
		t.Error("the re-minted leaf was not cached")
	}
}

func TestLeaf_ClampedToCAAndFailsAfterCAExpiry(t *testing.T) {
	clk := fakeclock.New(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC))
	c := newTestCA(t, Options{Now: clk.Now, CATTL: 48 * time.Hour, LeafTTL: 24 * time.Hour})
	clk.Advance(36 * time.Hour)
	leaf, err := c.Leaf("clamp.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if caEnd := c.Certificate().NotAfter; !leaf.Leaf.NotAfter.Equal(caEnd) {
		t.Errorf("leaf NotAfter %v outlives CA %v", leaf.Leaf.NotAfter, caEnd)
	}
	clk.Advance(13 * time.Hour)
	if _, err := c.Leaf("clamp.example.com"); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("after CA expiry: %v", err)
	}
}

func TestLeaf_CacheIsBounded(t *testing.T) {
	c := newTestCA(t, Options{})
	c.maxLeaves = 5
	for i := range 20 {
		if _, err := c.Leaf(string(rune('a'+i)) + ".example.com"); err != nil {
			t.Fatal(err)
		}
	}
	c.mu.RLock()
	n := len(c.leaves)
	c.mu.RUnlock()
	if n != 5 {
		t.Errorf("cache holds %d leaves, want 5", n)
	}
}

// An agent behind a wildcard upstream can ask for any number of names: the default cap keeps
// what the cache retains small (a few MB), not proportional to the names it was asked for.
func TestLeaf_DefaultCacheRetainsAFewMegabytesAtMost(t *testing.T) {
	if testing.Short() {
		t.Skip("mints over a thousand leaves")
	}
	c := newTestCA(t, Options{})
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range DefaultMaxLeaves + 200 {
		if _, err := c.Leaf(fmt.Sprintf("h%d.example.com", i)); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	c.mu.RLock()
	n := len(c.leaves)
	c.mu.RUnlock()
	if n != DefaultMaxLeaves {
		t.Errorf("cache holds %d leaves, want the cap %d", n, DefaultMaxLeaves)
	}
	if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 8<<20 {
		t.Errorf("a full leaf cache retains %d MB of heap, want at most 8", grown>>20)
	}
	runtime.KeepAlive(c)
}

func BenchmarkLeaf_CacheHit(b *testing.B) {
	c := newTestCA(b, Options{})
	if _, err := c.Leaf("api.example.com"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Leaf("api.example.com"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkLeaf_Mint(b *testing.B) {
	c := newTestCA(b, Options{})
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		e, err := c.mint("mint.example.com", netip.Addr{}, time.Now())
		if err != nil || e == nil {
			b.Fatal(err)
		}
	}
}
