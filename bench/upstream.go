package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"
)

// The names escrow routes in the benchmark. All of them are pinned to the loopback upstream
// with `address`, so no DNS is involved; the upstream's certificate carries every name.
const (
	hostPlain  = "plain.bench.test"
	hostAPI    = "api.bench.test"
	hostTunnel = "tunnel.bench.test"
	leafSuffix = ".leaf.bench.test" // *.leaf.bench.test: a fresh name per connection mints a leaf
)

// expect headers tell the upstream what the request must carry to count as a success, so a
// proxy that forgot its work (no credential, no injected header) shows up as errors, not speed.
const (
	expectHeader = "X-Bench-Expect"
	expectAuth   = "credential" // Authorization: Bearer <benchKey>
	expectInject = "injected"   // <injectHeader>: <injectValue>
)

const (
	injectHeader = "X-Injected"
	injectValue  = "bench"
)

// upstream is the API every proxy forwards to: plain HTTP and HTTPS on loopback, a body of
// BodySize bytes, and a Server-Sent Events endpoint.
type upstream struct {
	HTTPAddr  string
	HTTPSAddr string
	CAFile    string // PEM of the CA that signed the HTTPS certificate
	Pool      *x509.CertPool
	Rejected  atomic.Int64 // requests that did not carry what X-Bench-Expect asked for

	key  string
	body []byte
	srvs []*http.Server
}

func startUpstream(dir string, bodySize int, key string) (*upstream, error) {
	u := &upstream{key: key, body: make([]byte, bodySize)}
	for i := range u.body {
		u.body[i] = 'a' + byte(i%26)
	}
	caPEM, cert, err := upstreamCert()
	if err != nil {
		return nil, err
	}
	u.CAFile = dir + "/upstream-ca.pem"
	if err := os.WriteFile(u.CAFile, caPEM, 0o644); err != nil {
		return nil, err
	}
	u.Pool = x509.NewCertPool()
	u.Pool.AppendCertsFromPEM(caPEM)

	mux := http.NewServeMux()
	mux.HandleFunc("/v1/sse", u.sse)
	mux.HandleFunc("/", u.api)

	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		plain.Close()
		return nil, err
	}
	u.HTTPAddr, u.HTTPSAddr = plain.Addr().String(), tlsLn.Addr().String()
	// HTTP/1.1 only: the agents' connections through every proxy are HTTP/1.1, and so is
	// escrow's to the upstream; direct gets the same.
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
	for _, s := range []struct {
		ln  net.Listener
		tls bool
	}{{plain, false}, {tls.NewListener(tlsLn, tlsCfg), true}} {
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: quietLog()}
		u.srvs = append(u.srvs, srv)
		go srv.Serve(s.ln)
	}
	return u, nil
}

func (u *upstream) Close() {
	for _, s := range u.srvs {
		s.Close()
	}
}

func (u *upstream) check(r *http.Request) bool {
	switch r.Header.Get(expectHeader) {
	case expectAuth:
		return r.Header.Get("Authorization") == "Bearer "+u.key
	case expectInject:
		return r.Header.Get(injectHeader) == injectValue
	}
	return true
}

func (u *upstream) api(w http.ResponseWriter, r *http.Request) {
	if !u.check(r) {
		u.Rejected.Add(1)
		http.Error(w, "missing credential", http.StatusUnauthorized)
		return
	}
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(len(u.body))}
	w.Write(u.body)
}

// sse writes ?events= events, ?interval= apart (a Go duration), flushing each one.
func (u *upstream) sse(w http.ResponseWriter, r *http.Request) {
	if !u.check(r) {
		u.Rejected.Add(1)
		http.Error(w, "missing credential", http.StatusUnauthorized)
		return
	}
	n, _ := strconv.Atoi(r.URL.Query().Get("events"))
	interval, _ := time.ParseDuration(r.URL.Query().Get("interval"))
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	f, _ := w.(http.Flusher)
	for i := range n {
		if i > 0 {
			time.Sleep(interval)
		}
		fmt.Fprintf(w, "data: {\"i\":%d}\n\n", i)
		if f != nil {
			f.Flush()
		}
	}
}

// upstreamCert makes a throwaway CA and a server certificate for every benchmark name and
// 127.0.0.1 (peers and direct reach the upstream by address).
func upstreamCert() (caPEM []byte, cert tls.Certificate, err error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, cert, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "escrow bench upstream CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, cert, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, cert, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: hostAPI},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		DNSNames:    []string{hostAPI, hostPlain, hostTunnel, "*" + leafSuffix},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, cert, err
	}
	caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	cert = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return caPEM, cert, nil
}
