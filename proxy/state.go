package proxy

import (
	"context"
	"errors"
	"net"
	"reflect"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/proxy/egress"
)

// state is the part of the proxy an update replaces whole, atomically: a request loads it once
// and sees one consistent set of routes, egress rules and policy mode, however updates race.
type state struct {
	egress config.Egress // what dialer was built from
	dialer *egress.Dialer
	routes *routeTable
	mode   config.PolicyMode
	// mcpArguments puts MCP calls' arguments on their records (audit.mcp_arguments).
	mcpArguments bool
	// revoked are the revocations in force (nil: none). A config update keeps them; only
	// Sidecar.Update's Revocations replaces them.
	revoked *revocations
}

// buildState compiles cfg into a new state, reusing what prev built from the same values (the
// dialer, and routes with their connection pools). It changes nothing: the caller swaps it in.
func (p *Proxy) buildState(cfg *config.Config, prev *state) (*state, error) {
	st := &state{egress: cfg.Egress, mode: cfg.Policy.Mode, mcpArguments: cfg.Audit.MCPArguments}
	if prev != nil {
		st.revoked = prev.revoked
	}
	var prevRoutes *routeTable
	if prev != nil && reflect.DeepEqual(prev.egress, cfg.Egress) {
		st.dialer, prevRoutes = prev.dialer, prev.routes
	} else {
		st.dialer = egress.NewDialer(egress.DialerOptions{
			Rules:    egress.NewRules(egress.RulesOptions{AllowCIDRs: cfg.Egress.Allow(), Self: p.build.self}),
			Resolver: p.build.resolver,
			Dial:     p.build.dial,
			Timeout:  cfg.Egress.DialTimeout.D(),
		})
	}
	routes, err := buildRoutes(cfg, st.dialer.DialContext, p.newReverseProxy, p.build.inspect, prevRoutes)
	if err != nil {
		return nil, err
	}
	st.routes = routes
	return st, nil
}

// Update replaces the routes, egress rules and policy mode with those of cfg, atomically: a
// request in flight finishes on the state it started with, the next one sees only the new one.
// cfg must be validated; on any error nothing changes. Listener addresses, identity and CA
// settings are not the proxy's to change (Sidecar.Update refuses such changes).
func (p *Proxy) Update(cfg *config.Config) error {
	if !cfg.Validated() {
		return errors.New("proxy: update: the config was not validated")
	}
	p.updateMu.Lock()
	defer p.updateMu.Unlock()
	prev := p.state.Load()
	next, err := p.buildState(cfg, prev)
	if err != nil {
		return err
	}
	p.state.Store(next)
	// Connections of routes that are gone are closed once idle; in-flight ones finish.
	prev.routes.closeIdle(next.routes)
	return nil
}

// Dial dials through the current egress rules: the same checks as upstream requests. It is what
// credential providers' HTTP client dials with.
func (p *Proxy) Dial() dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		return p.state.Load().dialer.DialContext(ctx, network, addr)
	}
}
