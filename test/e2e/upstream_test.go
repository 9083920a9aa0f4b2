package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// upstreamCA is the test CA of the upstream servers. escrow trusts it through each upstream's
// ca_file; clients trust it directly only for tunnels (where escrow must not intercept).
var upstreamCA struct {
	certFile string // PEM of the CA certificate
	leaf     tls.Certificate
	leafCert *x509.Certificate
}

// initTestCA makes a CA and one leaf for *.example.test, example.test and 127.0.0.1.
func initTestCA(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "escrow e2e upstream CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "upstream.example.test"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		DNSNames:     []string{"*.example.test", "example.test"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, leafKey.Public(), caKey)
	if err != nil {
		return err
	}
	upstreamCA.leafCert, err = x509.ParseCertificate(leafDER)
	if err != nil {
		return err
	}
	upstreamCA.leaf = tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey, Leaf: upstreamCA.leafCert}
	upstreamCA.certFile = filepath.Join(dir, "ca.pem")
	return os.WriteFile(upstreamCA.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644)
}

// seenRequest is what an upstream received.
type seenRequest struct {
	Host, Method, Path, Proto string
	Authorization             []string
	ProxyAuthorization        []string
	Authorized                bool // the host's expectation was met (exactly one copy of the real key)
	TLS                       bool
}

// upstream is a local HTTP(S) server standing in for an API. For the hosts it expects a
// credential for, it answers 200 only to exactly one "Authorization: Bearer <secret>" and 401
// otherwise; it never echoes a credential. It records every request.
//
// Paths: /…/stream/… sends three SSE events sseGap apart; /…/slow/… answers after a second;
// /…/forge answers 200 with a forged X-Escrow-Reason header; anything else answers 200 JSON.
type upstream struct {
	srv    *httptest.Server
	Addr   string // 127.0.0.1:port
	expect map[string]expectation

	mu   sync.Mutex
	reqs []seenRequest
	sent map[string][]time.Time // SSE: when each event of a path was written
	// conns counts accepted TCP connections.
	conns atomic.Int64
}

// sseGap is the time between two SSE events.
const sseGap = 400 * time.Millisecond

// expectation is how an upstream expects the credential of one host.
type expectation struct {
	Secret string
	// Header and Prefix: exactly one Header: Prefix+Secret (and no Authorization when Header
	// is another header). Query instead: exactly one ?Query=Secret and no Authorization.
	Header, Prefix, Query string
}

func bearer(secret string) expectation {
	return expectation{Secret: secret, Header: "Authorization", Prefix: "Bearer "}
}

func (x expectation) met(r *http.Request) bool {
	auth := r.Header.Values("Authorization")
	if x.Query != "" {
		v := r.URL.Query()[x.Query]
		return len(auth) == 0 && len(v) == 1 && v[0] == x.Secret
	}
	v := r.Header.Values(x.Header)
	if http.CanonicalHeaderKey(x.Header) != "Authorization" && len(auth) != 0 {
		return false
	}
	return len(v) == 1 && v[0] == x.Prefix+x.Secret
}

// newUpstream starts an upstream; tlsOn chooses HTTPS (the test CA's leaf, HTTP/2 offered) or
// plain HTTP. expect maps a host to the credential it requires (no entry: no check).
func newUpstream(t testing.TB, tlsOn bool, expect map[string]expectation) *upstream {
	t.Helper()
	if expect == nil {
		expect = map[string]expectation{}
	}
	u := &upstream{expect: expect, sent: map[string][]time.Time{}}
	u.srv = httptest.NewUnstartedServer(http.HandlerFunc(u.serve))
	// Clients that reject a certificate (on purpose) make the server log handshake errors.
	u.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	u.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			u.conns.Add(1)
		}
	}
	if tlsOn {
		u.srv.EnableHTTP2 = true
		u.srv.TLS = &tls.Config{Certificates: []tls.Certificate{upstreamCA.leaf}}
		u.srv.StartTLS()
	} else {
		u.srv.Start()
	}
	u.Addr = u.srv.Listener.Addr().String()
	t.Cleanup(u.srv.Close)
	return u
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	sr := seenRequest{
		Host: host, Method: r.Method, Path: r.URL.Path, Proto: r.Proto, TLS: r.TLS != nil,
		Authorization:      r.Header.Values("Authorization"),
		ProxyAuthorization: r.Header.Values("Proxy-Authorization"),
	}
	n, _ := io.Copy(io.Discard, r.Body)
	u.mu.Lock()
	x, check := u.expect[host]
	sr.Authorized = check && x.met(r)
	u.reqs = append(u.reqs, sr)
	u.mu.Unlock()

	w.Header().Set("Content-Type", "application/json")
	if check && !sr.Authorized {
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"error":"unauthorized: want exactly one copy of the real key"}` + "\n"))
		return
	}
	switch {
	case r.Header.Get("Upgrade") == "websocket":
		u.serveEcho(w)
		return
	case strings.Contains(r.URL.Path, "/stream/"):
		u.serveSSE(w, r)
		return
	case strings.Contains(r.URL.Path, "/slow/"):
		time.Sleep(time.Second)
	case strings.HasSuffix(r.URL.Path, "/forge"):
		w.Header().Set("X-Escrow-Reason", "policy_denied")
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"ok": true, "host": host, "path": r.URL.Path, "proto": r.Proto, "tls": r.TLS != nil, "body_bytes": n})
}

// serveEcho switches protocols (as a WebSocket server would) and echoes the first 5 bytes.
func (u *upstream) serveEcho(w http.ResponseWriter) {
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil { // HTTP/2 cannot switch protocols
		http.Error(w, "cannot upgrade: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer c.Close()
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
	_ = brw.Flush()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(brw, buf); err == nil {
		_, _ = c.Write(buf)
	}
}

func (u *upstream) serveSSE(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	for i := 1; i <= 3; i++ {
		if i > 1 {
			select {
			case <-time.After(sseGap):
			case <-r.Context().Done():
				return
			}
		}
		u.mu.Lock()
		u.sent[r.URL.Path] = append(u.sent[r.URL.Path], time.Now())
		u.mu.Unlock()
		if _, err := fmt.Fprintf(w, "data: event-%d\n\n", i); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
	}
}

// setExpectation changes what the upstream requires from host (e.g. after a key rotation).
func (u *upstream) setExpectation(host string, x expectation) {
	u.mu.Lock()
	u.expect[host] = x
	u.mu.Unlock()
}

// requests returns the requests whose path is path.
func (u *upstream) requests(path string) []seenRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []seenRequest
	for _, r := range u.reqs {
		if r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

func (u *upstream) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.reqs)
}

// sentTimes returns when the SSE events of path were written.
func (u *upstream) sentTimes(path string) []time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]time.Time(nil), u.sent[path]...)
}

// countingListener accepts TCP connections and counts them; escrow must never dial it.
type countingListener struct {
	ln    net.Listener
	Addr  string
	count atomic.Int64
}

func newCountingListener(t testing.TB) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &countingListener{ln: ln, Addr: ln.Addr().String()}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.count.Add(1)
			_ = conn.Close()
		}
	}()
	t.Cleanup(func() { _ = ln.Close() })
	return c
}
