package attest

import (
	"context"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Static is a configured, unverified identity for local use (a laptop, CI) where no Workload
// API runs. Its identities have Attested false and Source SourceStatic, so policy and audit
// can tell them apart from attested ones. It is always ready and never expires.
type Static struct {
	id Identity
}

var _ Source = (*Static)(nil)

// NewStatic returns a Static source for id, which must be a SPIFFE ID with a non-root path
// (e.g. spiffe://example.org/ns/dev/sa/agent), as an X509-SVID's would be.
func NewStatic(id string) (*Static, error) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return nil, fmt.Errorf("attest: static identity %q: %w", id, err)
	}
	if sid.Path() == "" {
		return nil, fmt.Errorf("attest: static identity %q: %w", id,
			errors.New("a workload SPIFFE ID must have a path, e.g. spiffe://example.org/ns/dev/sa/agent"))
	}
	return &Static{id: Identity{
		SPIFFEID:    sid.String(),
		TrustDomain: sid.TrustDomain().Name(),
		Attested:    false,
		Source:      SourceStatic,
	}}, nil
}

// Identify returns the configured identity.
func (s *Static) Identify(context.Context, Peer) (Identity, error) { return s.id, nil }

// Ready is always true.
func (s *Static) Ready() bool { return true }

// Close does nothing.
func (s *Static) Close() error { return nil }
