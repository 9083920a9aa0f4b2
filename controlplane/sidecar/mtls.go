package sidecar

import (
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"

	"github.com/escrowproxy/escrow/config"
)

// MTLS returns the transport credentials of the connection to the controller: the sidecar
// presents its X509-SVID (the controller derives the node's identity from it), and accepts the
// controller's certificate only if it verifies against the trust bundle and its SPIFFE ID is
// x.ServerID or, when that is empty, any ID of the sidecar's own trust domain. Both sources are
// read at every handshake, so rotated SVIDs and bundles are used without reconnecting by hand.
func MTLS(x *config.XDS, svids x509svid.Source, bundles x509bundle.Source) (credentials.TransportCredentials, error) {
	if x == nil || svids == nil || bundles == nil {
		return nil, errors.New("controlplane: mtls: the xds config, an X509-SVID source and a bundle source are required")
	}
	var want spiffeid.ID
	if x.ServerID != "" {
		id, err := spiffeid.FromString(x.ServerID)
		if err != nil {
			return nil, fmt.Errorf("controlplane: xds.server_id: %w", err)
		}
		want = id
	}
	authorize := func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if !want.IsZero() {
			if id != want {
				return fmt.Errorf("controlplane: the controller is %s, want %s", id, want)
			}
			return nil
		}
		own, err := svids.GetX509SVID()
		if err != nil {
			return fmt.Errorf("controlplane: no X509-SVID of our own: %w", err)
		}
		if id.TrustDomain() != own.ID.TrustDomain() {
			return fmt.Errorf("controlplane: the controller %s is not in trust domain %s", id, own.ID.TrustDomain())
		}
		return nil
	}
	return credentials.NewTLS(tlsconfig.MTLSClientConfig(svids, bundles, authorize)), nil
}
