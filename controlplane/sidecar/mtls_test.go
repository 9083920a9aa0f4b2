package sidecar

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/test/bufconn"

	"github.com/escrowproxy/escrow/config"
)

// testCA is a trust domain's X.509 authority.
type testCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://" + td)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: td}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{td: spiffeid.RequireTrustDomainFromString(td), cert: cert, key: key}
}

func (ca *testCA) svid(t *testing.T, id string) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(id)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &x509svid.SVID{ID: spiffeid.RequireFromString(id), Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

func (ca *testCA) bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
}

// identityADS answers every stream with an empty bundle and reports the SPIFFE ID of the
// client's certificate: what the controller derives the node identity from.
type identityADS struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	seen chan string
}

func (a identityADS) StreamAggregatedResources(s discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	p, _ := peer.FromContext(s.Context())
	info, _ := p.AuthInfo.(credentials.TLSInfo)
	id, err := x509svid.IDFromCert(info.State.PeerCertificates[0])
	if err != nil {
		return err
	}
	a.seen <- id.String()
	if _, err := s.Recv(); err != nil {
		return err
	}
	if err := s.Send(&discovery.DiscoveryResponse{VersionInfo: "1", Nonce: "1", TypeUrl: TypeURL}); err != nil {
		return err
	}
	_, err = s.Recv()
	return err
}

// startMTLSController serves identityADS with serverSVID over mTLS, accepting clients of td.
func startMTLSController(t *testing.T, serverSVID *x509svid.SVID, bundles x509bundle.Source, td spiffeid.TrustDomain) (*bufconn.Listener, chan string) {
	t.Helper()
	lis := bufconn.Listen(1 << 16)
	seen := make(chan string, 4)
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsconfig.MTLSServerConfig(serverSVID, bundles, tlsconfig.AuthorizeMemberOf(td)))))
	discovery.RegisterAggregatedDiscoveryServiceServer(gs, identityADS{seen: seen})
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	return lis, seen
}

func dialMTLS(t *testing.T, lis *bufconn.Listener, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///escrow-controller.escrow.svc:15490",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestMTLS_TheControllerSeesTheSidecarsSVIDAndTheSidecarChecksTheControllers(t *testing.T) {
	ca := newTestCA(t, "example.org")
	const workloadID = "spiffe://example.org/ns/agents/sa/coder"
	lis, seen := startMTLSController(t, ca.svid(t, "spiffe://example.org/ns/escrow/sa/controller"), ca.bundle(), ca.td)
	client := ca.svid(t, workloadID)

	for _, serverID := range []string{"", "spiffe://example.org/ns/escrow/sa/controller"} {
		creds, err := MTLS(&config.XDS{ServerID: serverID}, client, ca.bundle())
		if err != nil {
			t.Fatal(err)
		}
		s, err := New(Options{Base: baseConfig(t, ""), Conn: dialMTLS(t, lis, creds), NodeID: "claimed-anything",
			Apply: func(context.Context, Update) error { return nil }})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		select {
		case id := <-seen:
			if id != workloadID {
				t.Fatalf("the controller saw %s, want the sidecar's SVID %s", id, workloadID)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("server_id %q: no mTLS stream reached the controller", serverID)
		}
		for s.Ready() != nil {
			<-s.Changed()
		}
		cancel()
		<-done
	}
}

func TestMTLS_RefusesAControllerThatIsNotTheOneConfigured(t *testing.T) {
	ca := newTestCA(t, "example.org")
	other := newTestCA(t, "other.org")
	client := ca.svid(t, "spiffe://example.org/ns/agents/sa/coder")
	for name, tc := range map[string]struct {
		server   *x509svid.SVID
		serverID string
		bundles  x509bundle.Source
	}{
		"another workload than server_id":          {ca.svid(t, "spiffe://example.org/ns/agents/sa/impostor"), "spiffe://example.org/ns/escrow/sa/controller", ca.bundle()},
		"another trust domain":                     {other.svid(t, "spiffe://other.org/ns/escrow/sa/controller"), "", x509bundle.NewSet(ca.bundle(), other.bundle())},
		"a certificate the bundle does not verify": {other.svid(t, "spiffe://example.org/ns/escrow/sa/controller"), "", ca.bundle()},
	} {
		t.Run(name, func(t *testing.T) {
			lis, _ := startMTLSController(t, tc.server, x509bundle.NewSet(ca.bundle(), other.bundle()), ca.td)
			creds, err := MTLS(&config.XDS{ServerID: tc.serverID}, client, tc.bundles)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			st, err := discovery.NewAggregatedDiscoveryServiceClient(dialMTLS(t, lis, creds)).StreamAggregatedResources(ctx)
			if err == nil {
				_, err = st.Recv()
			}
			if err == nil || !strings.Contains(err.Error(), "handshake") && !strings.Contains(err.Error(), "authentication") {
				t.Fatalf("stream to a controller that must be refused: %v", err)
			}
		})
	}
}

func TestMTLS_RequiresItsSources(t *testing.T) {
	if _, err := MTLS(&config.XDS{}, nil, nil); err == nil {
		t.Fatal("MTLS without sources")
	}
	ca := newTestCA(t, "example.org")
	if _, err := MTLS(&config.XDS{ServerID: "not-an-id"}, ca.svid(t, "spiffe://example.org/a"), ca.bundle()); err == nil {
		t.Fatal("MTLS with a bad server_id")
	}
}
