package credential

import (
	"context"
	"errors"
	"fmt"
)

// NewBrokered returns the provider of a credential whose token escrow controller mints (config
// broker: {}): each Fetch asks d.Broker, so the provider's root secret (a GitHub App private key,
// an OAuth client secret) never reaches the pod.
//
// The controller authorizes the sidecar's X509-SVID, not the calling process, so the token is
// the pod's whoever calls in it: the provider is Shared (one entry per name, one mint per
// expiry). The answer must carry an expiry: a brokered token is short-lived by design, and the
// Manager refreshes it ahead of that expiry like any other.
func NewBrokered(d Deps) (Provider, error) {
	if d.Broker == nil {
		return nil, errors.New("credential: broker: no connection to escrow controller (broker: {} needs xds)")
	}
	return &brokered{b: d.Broker}, nil
}

type brokered struct{ b Broker }

// Kind is "broker".
func (p *brokered) Kind() string { return "broker" }

// Shared is true: the controller mints for the pod's identity, not the caller's.
func (p *brokered) Shared() bool { return true }

func (p *brokered) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	tok, err := p.b.Mint(ctx, BrokerRequest{Name: args.Name, Scope: args.Scope})
	if err != nil {
		return Token{}, fmt.Errorf("broker: %w", err)
	}
	if tok.ExpiresAt().IsZero() {
		return Token{}, errors.New("broker: the controller's token has no expiry")
	}
	return tok.withName(args.Name), nil
}
