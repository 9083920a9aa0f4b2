// Package attesttest provides a SPIFFE Workload API server for tests.
//
// WorkloadAPI is a TEST SERVER. It speaks the real Workload API protocol (gRPC over a unix
// socket, go-spiffe's generated proto, the workload.spiffe.io security header), so the real
// go-spiffe client and anything built on it can be tested against it, but it attests nothing:
// every caller gets whatever SVID the test set. Never use it outside tests.
package attesttest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// JWTKeyID is the kid header of JWT-SVIDs the server signs.
const JWTKeyID = "attesttest-jwt-1"

// DefaultJWTTTL is the lifetime of issued JWT-SVIDs unless SetJWTTTL changes it.
const DefaultJWTTTL = 5 * time.Minute

// WorkloadAPI is a test server speaking the real SPIFFE Workload API protocol on a unix socket
// (see the package doc). It serves FetchX509SVID (streaming: the current SVID, then every
// change made with SetSVID), FetchJWTSVID and FetchJWTBundles; the other methods answer
// Unimplemented. Requests without the workload.spiffe.io: true header are rejected with
// InvalidArgument, as SPIRE does. Its methods are safe for concurrent use.
type WorkloadAPI struct {
	t      testing.TB
	td     spiffeid.TrustDomain
	caKey  *ecdsa.PrivateKey
	caCert *x509.Certificate
	jwtKey *ecdsa.PrivateKey
	path   string

	srvMu  sync.Mutex
	srv    *grpc.Server  // nil while stopped
	served chan struct{} // closed when srv's Serve returned
	closed bool

	mu          sync.Mutex
	id          spiffeid.ID // current SVID's ID; zero before the first SetSVID
	x509Resp    *workload.X509SVIDResponse
	changed     chan struct{} // closed and replaced on every SetSVID
	x509Streams int
	now         func() time.Time
	jwtTTL      time.Duration
	jwtCalls    int
	jwtHold     chan struct{}
}

// NewWorkloadAPI starts a Workload API test server for trust domain td (e.g. "example.org") on
// a unix socket in a temporary directory. It has no SVID until SetSVID is called: until then
// FetchX509SVID streams stay open without a message and FetchJWTSVID answers PermissionDenied,
// as a SPIRE agent does for a workload it has no entry for. The server is closed when the test
// ends.
func NewWorkloadAPI(t testing.TB, td string) *WorkloadAPI {
	t.Helper()
	trustDomain, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		t.Fatalf("attesttest: trust domain %q: %v", td, err)
	}
	w := &WorkloadAPI{
		t:       t,
		td:      trustDomain,
		changed: make(chan struct{}),
		now:     time.Now,
		jwtTTL:  DefaultJWTTTL,
	}
	w.caKey = newKey(t)
	w.jwtKey = newKey(t)
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          newSerial(t),
		Subject:               pkix.Name{Organization: []string{"attesttest"}, CommonName: "attesttest CA"},
		NotBefore:             now.Add(-24 * time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{trustDomain.ID().URL()},
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, w.caKey.Public(), w.caKey)
	if err != nil {
		t.Fatalf("attesttest: create CA: %v", err)
	}
	if w.caCert, err = x509.ParseCertificate(caDER); err != nil {
		t.Fatalf("attesttest: parse CA: %v", err)
	}

	w.path = socketPath(t)
	w.Start()
	t.Cleanup(w.Close)
	return w
}

// Start serves on the socket again after Stop, as a restarted SPIRE agent does: same trust
// domain, keys and current SVID. It does nothing if the server is running or closed.
func (w *WorkloadAPI) Start() {
	w.srvMu.Lock()
	defer w.srvMu.Unlock()
	if w.srv != nil || w.closed {
		return
	}
	ln, err := net.Listen("unix", w.path)
	if err != nil {
		w.t.Fatalf("attesttest: listen on %s: %v", w.path, err)
	}
	srv, served := grpc.NewServer(), make(chan struct{})
	workload.RegisterSpiffeWorkloadAPIServer(srv, &handler{w: w})
	go func() {
		defer close(served)
		_ = srv.Serve(ln) // returns when Stop stops the server
	}()
	w.srv, w.served = srv, served
}

// Stop stops the server, ending every open stream and refusing new connections (the socket
// file is removed), as when the SPIRE agent is stopped. Start brings it back.
func (w *WorkloadAPI) Stop() {
	w.srvMu.Lock()
	defer w.srvMu.Unlock()
	w.stopLocked()
}

func (w *WorkloadAPI) stopLocked() {
	if w.srv == nil {
		return
	}
	w.srv.Stop()
	<-w.served
	_ = os.Remove(w.path)
	w.srv, w.served = nil, nil
}

// SendNoSVID pushes an X509-SVID response that carries no SVID to every open FetchX509SVID
// stream (the Workload API no longer lists the workload's SVID), and makes new streams get
// the same until the next SetSVID.
func (w *WorkloadAPI) SendNoSVID() {
	w.mu.Lock()
	w.x509Resp = &workload.X509SVIDResponse{}
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
}

// socketPath returns a path for the socket that fits in sun_path (108 bytes on Linux).
func socketPath(t testing.TB) string {
	p := filepath.Join(t.TempDir(), "agent.sock")
	if len(p) < 100 {
		return p
	}
	dir, err := os.MkdirTemp("", "wlapi")
	if err != nil {
		t.Fatalf("attesttest: temp dir: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return filepath.Join(dir, "agent.sock")
}

// Addr is the server's address in the form the Workload API client expects: unix:///path.
func (w *WorkloadAPI) Addr() string { return "unix://" + w.path }

// TrustDomain is the trust domain the server's CA and JWT key belong to.
func (w *WorkloadAPI) TrustDomain() spiffeid.TrustDomain { return w.td }

// X509Authorities returns the CA certificate that signs the X509-SVIDs (the X.509 bundle).
func (w *WorkloadAPI) X509Authorities() []*x509.Certificate { return []*x509.Certificate{w.caCert} }

// JWTBundle returns the bundle that verifies the JWT-SVIDs the server issues, e.g. for
// jwtsvid.ParseAndValidate.
func (w *WorkloadAPI) JWTBundle() *jwtbundle.Bundle {
	return jwtbundle.FromJWTAuthorities(w.td, map[string]crypto.PublicKey{JWTKeyID: w.jwtKey.Public()})
}

// MintJWTSVID signs a JWT-SVID for id (any SPIFFE ID of the server's trust domain, e.g. another
// workload's) with the server's JWT key, as the SPIRE agent serving that workload would: sub
// id, aud, exp, iat now, kid JWTKeyID. extra claims (e.g. an RFC 8693 "act") are added; they
// may override the registered ones, so a test can also mint malformed tokens.
func (w *WorkloadAPI) MintJWTSVID(id string, aud []string, exp time.Time, extra map[string]any) string {
	w.t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: w.jwtKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", JWTKeyID))
	if err != nil {
		w.t.Fatalf("attesttest: signer: %v", err)
	}
	claims := map[string]any{"sub": id, "aud": aud, "exp": exp.Unix(), "iat": time.Now().Unix()}
	for k, v := range extra {
		claims[k] = v
	}
	token, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		w.t.Fatalf("attesttest: sign: %v", err)
	}
	return token
}

// SetSVID issues a new X509-SVID for id (a SPIFFE ID with a path) expiring at notAfter, with a
// fresh key, signed by the server's CA, and pushes it to every open FetchX509SVID stream. It
// also becomes the subject of JWT-SVIDs issued from now on. notAfter may be in the past.
func (w *WorkloadAPI) SetSVID(id string, notAfter time.Time) {
	sid, der, keyDER, err := w.mint(id, notAfter)
	if err != nil {
		w.t.Errorf("attesttest: SetSVID(%q): %v", id, err)
		return
	}
	resp := &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
		SpiffeId:    sid.String(),
		X509Svid:    der,
		X509SvidKey: keyDER,
		Bundle:      w.caCert.Raw,
	}}}
	w.mu.Lock()
	w.id = sid
	w.x509Resp = resp
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
}

// MintX509SVID issues an X509-SVID for id signed by the server's CA without serving it: another
// workload of the same trust domain (a controller the served workload talks mTLS to).
func (w *WorkloadAPI) MintX509SVID(id string, notAfter time.Time) *x509svid.SVID {
	w.t.Helper()
	_, der, keyDER, err := w.mint(id, notAfter)
	if err != nil {
		w.t.Fatalf("attesttest: MintX509SVID(%q): %v", id, err)
	}
	svid, err := x509svid.ParseRaw(der, keyDER)
	if err != nil {
		w.t.Fatalf("attesttest: MintX509SVID(%q): %v", id, err)
	}
	return svid
}

// mint makes a leaf for id with a fresh key: its DER and its PKCS#8 key.
func (w *WorkloadAPI) mint(id string, notAfter time.Time) (spiffeid.ID, []byte, []byte, error) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return spiffeid.ID{}, nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return sid, nil, nil, fmt.Errorf("generate key: %w", err)
	}
	notBefore := time.Now().Add(-time.Hour)
	if !notBefore.Before(notAfter) {
		notBefore = notAfter.Add(-time.Hour)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return sid, nil, nil, fmt.Errorf("serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"attesttest"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		URIs:                  []*url.URL{sid.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, w.caCert, key.Public(), w.caKey)
	if err != nil {
		return sid, nil, nil, fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return sid, nil, nil, fmt.Errorf("marshal key: %w", err)
	}
	return sid, der, keyDER, nil
}

// Revoke withdraws the X509-SVID, as a SPIRE agent does when the workload's registration
// entries are removed: open FetchX509SVID streams end with PermissionDenied ("no identity
// issued") and new ones get no SVID until the next SetSVID; JWT-SVID fetches are refused the
// same way.
func (w *WorkloadAPI) Revoke() {
	w.mu.Lock()
	w.x509Resp = nil
	w.id = spiffeid.ID{}
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
}

// SetClock sets the clock used for the expiry of JWT-SVIDs (exp = now() + TTL). The iat claim
// is always the wall clock, because go-spiffe's client checks iat and exp against the wall
// clock. Default time.Now.
func (w *WorkloadAPI) SetClock(now func() time.Time) {
	w.mu.Lock()
	w.now = now
	w.mu.Unlock()
}

// SetJWTTTL sets the lifetime of JWT-SVIDs issued from now on. Default DefaultJWTTTL.
func (w *WorkloadAPI) SetJWTTTL(d time.Duration) {
	w.mu.Lock()
	w.jwtTTL = d
	w.mu.Unlock()
}

// JWTSVIDCalls returns how many FetchJWTSVID requests the server has received.
func (w *WorkloadAPI) JWTSVIDCalls() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.jwtCalls
}

// X509Streams returns how many FetchX509SVID streams are open now (i.e. watching clients).
func (w *WorkloadAPI) X509Streams() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.x509Streams
}

// HoldJWTSVIDs makes FetchJWTSVID requests wait (counted, but unanswered) until release is
// called, so a test can pile up concurrent callers. release is idempotent.
func (w *WorkloadAPI) HoldJWTSVIDs() (release func()) {
	ch := make(chan struct{})
	w.mu.Lock()
	w.jwtHold = ch
	w.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			w.mu.Lock()
			if w.jwtHold == ch {
				w.jwtHold = nil
			}
			w.mu.Unlock()
			close(ch)
		})
	}
}

// Close stops the server for good (see Stop). It is idempotent and also runs when the test
// ends.
func (w *WorkloadAPI) Close() {
	w.srvMu.Lock()
	defer w.srvMu.Unlock()
	w.closed = true
	w.stopLocked()
}

type handler struct {
	workload.UnimplementedSpiffeWorkloadAPIServer // by value, as RegisterSpiffeWorkloadAPIServer requires
	w                                             *WorkloadAPI
}

func checkHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

func (h *handler) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	w := h.w
	w.mu.Lock()
	w.x509Streams++
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.x509Streams--
		w.mu.Unlock()
	}()
	var sent *workload.X509SVIDResponse
	for {
		w.mu.Lock()
		resp, changed := w.x509Resp, w.changed
		w.mu.Unlock()
		if resp == nil && sent != nil {
			// Revoked: SPIRE ends the stream this way when a workload's entries are removed.
			return status.Error(codes.PermissionDenied, "no identity issued")
		}
		if resp != nil && resp != sent {
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent = resp
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (h *handler) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	w := h.w
	w.mu.Lock()
	w.jwtCalls++
	hold := w.jwtHold
	w.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	w.mu.Lock()
	id, now, ttl := w.id, w.now, w.jwtTTL
	w.mu.Unlock()
	if id.IsZero() {
		return nil, status.Error(codes.PermissionDenied, "no identity issued")
	}
	if req.SpiffeId != "" && req.SpiffeId != id.String() {
		return nil, status.Errorf(codes.PermissionDenied, "no identity issued for %s", req.SpiffeId)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: w.jwtKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", JWTKeyID))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "signer: %v", err)
	}
	token, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  id.String(),
		Audience: jwt.Audience(req.Audience),
		Expiry:   jwt.NewNumericDate(now().Add(ttl)),
		IssuedAt: jwt.NewNumericDate(time.Now()),
	}).Serialize()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sign: %v", err)
	}
	return &workload.JWTSVIDResponse{Svids: []*workload.JWTSVID{{SpiffeId: id.String(), Svid: token}}}, nil
}

func (h *handler) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	jwks, err := h.w.JWTBundle().Marshal()
	if err != nil {
		return status.Errorf(codes.Internal, "marshal JWT bundle: %v", err)
	}
	if err := stream.Send(&workload.JWTBundlesResponse{Bundles: map[string][]byte{h.w.td.IDString(): jwks}}); err != nil {
		return err
	}
	<-ctx.Done()
	return ctx.Err()
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("attesttest: generate key: %v", err)
	}
	return k
}

func newSerial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatalf("attesttest: serial: %v", err)
	}
	return n
}
