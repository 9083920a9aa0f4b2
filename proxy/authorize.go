package proxy

import (
	"context"
	"errors"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/policy"
)

// Record kinds.
const (
	kindRequest = "request" // a plain or intercepted HTTP request
	kindTunnel  = "tunnel"  // a blind CONNECT tunnel, recorded when it closes
	kindConnect = "connect" // a CONNECT refused before it became a tunnel or an interception, or an intercepted connection that carried no request
)

// actionConnect is the policy action of a blind tunnel (see docs/policy.md).
const actionConnect = "connect"

// policyReason maps the engine's reasons to the proxy's, explicitly: a new policy reason must be
// added here (and to denials) before the agent can see it; until then it is policy_denied.
func policyReason(r policy.Reason) Reason {
	switch r {
	case policy.ReasonAllowed:
		return ReasonAllowed
	case policy.ReasonError:
		return ReasonPolicyError
	case policy.ReasonUnavailable:
		return ReasonPolicyUnavailable
	default:
		return ReasonPolicyDenied
	}
}

// verdict is the outcome of the authorize step: who is calling and whether the call may
// proceed. Reason is ReasonAllowed when it may; otherwise the denial to answer with, and Cause
// the internal error behind it (logged, never sent to the agent).
type verdict struct {
	Identity attest.Identity
	// Presented is the delegation token the caller presented, once it verified ("" without
	// one): credential providers that exchange it (RFC 8693) pass it on.
	Presented credential.Presented
	// Input is the decided input as the policy saw it (identity, time, caller, delegation
	// filled in): the base of any further decision about the same request.
	Input  policy.Input
	Reason Reason
	Cause  error
}

// authorize is the attest → policy step shared by requests and tunnels: it establishes the
// caller's identity and asks the policy about in (whose Identity and Time it fills in), and
// records both on rec. Each failure is a denial: no identity, no policy, an evaluation error.
//
// A revocation in force (st.revoked) that covers the identity or the route's credential is a
// denial before the policy is asked, in every mode: it is the operator's kill switch.
func (p *Proxy) authorize(ctx context.Context, rec *audit.Record, peer attest.Peer, in policy.Input, st *state) verdict {
	id, err := p.id.Identify(ctx, peer)
	if err != nil {
		return verdict{Reason: ReasonIdentityUnavailable, Cause: err}
	}
	setIdentity(rec, id)
	if name, ok := st.revoked.covers(id.SPIFFEID, in.Credential); ok {
		rec.Revocation = name
		return verdict{Identity: id, Reason: ReasonRevoked}
	}
	var presented credential.Presented
	if p.deleg != nil {
		// Whom the caller acts for: a token that does not verify is a denial, never ignored.
		d, err := p.deleg.VerifyHeader(ctx, peer.ProxyAuthorization, id.SPIFFEID)
		if errors.Is(err, attest.ErrDelegationUnavailable) {
			return verdict{Identity: id, Reason: ReasonDelegationUnavailable, Cause: err}
		}
		if err != nil {
			return verdict{Identity: id, Reason: ReasonDelegationInvalid, Cause: err}
		}
		if d != nil {
			// VerifyHeader parsed the same header: this cannot fail for a token that verified.
			raw, err := attest.ParseProxyAuthorization(peer.ProxyAuthorization)
			if err != nil {
				return verdict{Identity: id, Reason: ReasonDelegationInvalid, Cause: err}
			}
			presented = credential.Presented(raw)
			in.Delegation = d
			rec.DelegationSubject, rec.DelegationActors, rec.DelegationTokenID = d.Subject, d.Actors, d.TokenID
		}
	}
	if c := in.Caller; c != nil {
		rec.CallerPID, rec.CallerUID, rec.CallerExe = c.PID, c.UID, c.Exe
	}
	in.Identity, in.Time = id, p.now()
	return verdict{Identity: id, Presented: presented, Input: in, Reason: p.decide(ctx, rec, in, st.mode)}
}

// decide asks the policy about in, records the outcome on rec, and returns ReasonAllowed or the
// denial. Report mode lets through what the policy denied or could not evaluate, and records it
// as would_deny; it never lets through a request when no policy is loaded.
func (p *Proxy) decide(ctx context.Context, rec *audit.Record, in policy.Input, mode config.PolicyMode) Reason {
	start := p.now()
	d := p.pol.Decide(ctx, in)
	rec.PolicyDur = p.now().Sub(start)
	p.metrics.PolicyEval.Observe(rec.PolicyDur.Seconds())
	rec.PolicyIDs = d.PolicyIDs
	if len(d.Errors) > 0 {
		p.log.Warn("policy evaluation errors", zap.String("request_id", rec.RequestID), zap.Strings("errors", d.Errors))
	}
	if d.Allow {
		return ReasonAllowed
	}
	reason := policyReason(d.Reason)
	if mode == config.PolicyModeReport && d.Overridable() {
		rec.WouldDeny, rec.Reason = true, string(reason)
		p.log.Info("report mode: would deny", zap.String("request_id", rec.RequestID),
			zap.String("reason", string(reason)), zap.Strings("policy_ids", d.PolicyIDs))
		return ReasonAllowed
	}
	return reason
}

func setIdentity(rec *audit.Record, id attest.Identity) {
	rec.SPIFFEID, rec.Attested, rec.IdentitySrc = id.SPIFFEID, id.Attested, id.Source
}

// bestEffortIdentity fills the record's identity for denials that happen before attestation, so
// the audit trail still says who tried.
func (p *Proxy) bestEffortIdentity(ctx context.Context, peer attest.Peer, rec *audit.Record) {
	if id, err := p.id.Identify(ctx, peer); err == nil {
		setIdentity(rec, id)
	}
}
