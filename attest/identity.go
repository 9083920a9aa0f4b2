package attest

import (
	"context"
	"errors"
	"net/netip"
	"time"
)

// Sources of an identity, as recorded in audit records and the Cedar context.
const (
	SourceSPIFFE = "spiffe"
	SourceStatic = "static"
)

// ErrUnavailable means no valid identity can be established right now (no SVID yet, the
// Workload API is unreachable, or the SVID expired). The proxy answers 503 identity_unavailable.
var ErrUnavailable = errors.New("attest: identity unavailable")

// ErrDelegationUnavailable means a delegation token could not be checked because escrow lacks
// the keys to check it (no JWT bundles from the Workload API yet, or an OIDC issuer whose keys
// cannot be fetched and none are held): escrow's outage, not the caller's mistake. The proxy
// answers 503 delegation_unavailable, never 407.
var ErrDelegationUnavailable = errors.New("attest: delegation keys unavailable")

// Identity is who is calling, as established for one request.
type Identity struct {
	// SPIFFEID is the workload's SPIFFE ID, e.g. spiffe://example.org/ns/agents/sa/coder.
	SPIFFEID string
	// TrustDomain is the SPIFFE ID's trust domain, e.g. example.org.
	TrustDomain string
	// Attested is false for a static (configured, unverified) identity.
	Attested bool
	// Source is SourceSPIFFE or SourceStatic.
	Source string
	// ExpiresAt is when the SVID backing this identity expires; zero for static identities.
	ExpiresAt time.Time
}

// Peer describes the connection a request arrived on; identity sources that look at the caller
// (process lookup, delegation tokens) read it. Fields grow as those sources arrive.
type Peer struct {
	RemoteAddr netip.AddrPort
	LocalAddr  netip.AddrPort
	// ProxyAuthorization is the raw Proxy-Authorization header the agent sent, if any.
	ProxyAuthorization string
}

// Source yields the current identity of the workload.
type Source interface {
	// Identify returns the identity for a request from peer, or an error wrapping ErrUnavailable.
	Identify(ctx context.Context, peer Peer) (Identity, error)
	// Ready reports whether an identity can be served (the first SVID has arrived).
	Ready() bool
	// Close releases the source.
	Close() error
}
