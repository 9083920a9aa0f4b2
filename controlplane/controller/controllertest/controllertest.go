// Package controllertest helps test escrow's control plane: a CA that mints X509-SVIDs (real
// certificates with one spiffe:// URI SAN, as SPIRE issues them) and a raw ADS client that
// speaks to `escrow controller` over mTLS as a sidecar does, exposing versions and nonces. It
// is for tests only.
package controllertest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/escrowproxy/escrow/controlplane/bundle"
)

// CA is a trust domain's X.509 authority.
type CA struct {
	TD   spiffeid.TrustDomain
	cert *x509.Certificate
	key  crypto.Signer
}

// NewCA makes a CA for trust domain td ("example.org").
func NewCA(td string) (*CA, error) {
	t, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"test CA " + td}},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs: []*url.URL{t.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{TD: t, cert: cert, key: key}, nil
}

// Bundle is the CA as the trust domain's X.509 bundle.
func (c *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(c.TD, []*x509.Certificate{c.cert})
}

// SVID mints an X509-SVID for id (a full spiffe:// ID in the CA's trust domain, or in any
// other: the CA signs what it is asked, as a compromised or foreign one would).
func (c *CA) SVID(id string) (*x509svid.SVID, error) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{sid.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key.Public(), c.key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: sid, Certificates: []*x509.Certificate{cert}, PrivateKey: key}, nil
}

// WriteFiles writes svid's certificate, key and the CA bundle as PEM files in dir, as
// `escrow controller --svid-cert/--svid-key/--bundle` read them; it returns their paths.
func (c *CA) WriteFiles(dir string, svid *x509svid.SVID) (certFile, keyFile, bundleFile string, err error) {
	certPEM, keyPEM, err := svid.Marshal()
	if err != nil {
		return "", "", "", err
	}
	certFile, keyFile, bundleFile = filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"), filepath.Join(dir, "bundle.pem")
	bundlePEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.cert.Raw})
	for f, b := range map[string][]byte{certFile: certPEM, keyFile: keyPEM, bundleFile: bundlePEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			return "", "", "", err
		}
	}
	return certFile, keyFile, bundleFile, nil
}

// ClientTLS is the TLS config of a sidecar presenting svid and trusting the controller if its
// SVID is from the trust bundle bundle (any ID of that trust domain).
func ClientTLS(svid *x509svid.SVID, b *x509bundle.Bundle) *tls.Config {
	return tlsconfig.MTLSClientConfig(svid, b, tlsconfig.AuthorizeMemberOf(b.TrustDomain()))
}

// Client is one ADS stream to the controller, driven by hand.
type Client struct {
	Conn   *grpc.ClientConn
	Stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	NodeID string
	cancel context.CancelFunc
}

// Dial opens an ADS stream to addr with tlsConf and sends the first request (node NodeID,
// the bundle's type, the bundle's resource name).
func Dial(ctx context.Context, addr string, tlsConf *tls.Config, nodeID string) (*Client, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		cancel()
		conn.Close()
		return nil, err
	}
	c := &Client{Conn: conn, Stream: st, NodeID: nodeID, cancel: cancel}
	if err := st.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: nodeID}, TypeUrl: resource.ExtensionConfigType,
		ResourceNames: []string{bundle.ResourceName}}); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Recv waits for the next response and decodes its bundle.
func (c *Client) Recv() (*discovery.DiscoveryResponse, bundle.Bundle, error) {
	resp, err := c.Stream.Recv()
	if err != nil {
		return nil, bundle.Bundle{}, err
	}
	b, err := bundle.Decode(resp.GetResources())
	if err != nil {
		return resp, bundle.Bundle{}, err
	}
	if b.Version != resp.GetVersionInfo() {
		return resp, b, fmt.Errorf("controllertest: response version %q carries bundle version %q", resp.GetVersionInfo(), b.Version)
	}
	return resp, b, nil
}

// ACK acknowledges resp.
func (c *Client) ACK(resp *discovery.DiscoveryResponse) error {
	return c.Stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.ExtensionConfigType, ResponseNonce: resp.GetNonce(),
		VersionInfo: resp.GetVersionInfo(), ResourceNames: []string{bundle.ResourceName}})
}

// NACK rejects resp with message, keeping lastGood.
func (c *Client) NACK(resp *discovery.DiscoveryResponse, lastGood, message string) error {
	return c.Stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.ExtensionConfigType, ResponseNonce: resp.GetNonce(),
		VersionInfo: lastGood, ResourceNames: []string{bundle.ResourceName},
		ErrorDetail: &rpcstatus.Status{Code: 3, Message: message}})
}

// Close ends the stream and the connection.
func (c *Client) Close() {
	c.cancel()
	c.Conn.Close()
}
