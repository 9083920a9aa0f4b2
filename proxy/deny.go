package proxy

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// Reason is a stable, machine-readable reason for a decision. It is sent to the agent (body
// "error" and header X-Escrow-Reason), written to the audit record and used as a metric label, so
// the set is closed: add a value here, never build one from input.
type Reason string

// Reasons.
const (
	ReasonAllowed               Reason = "allowed"
	ReasonBadRequest            Reason = "bad_request"
	ReasonUnknownDestination    Reason = "unknown_destination"
	ReasonHostMismatch          Reason = "host_mismatch"
	ReasonIdentityUnavailable   Reason = "identity_unavailable"
	ReasonPolicyDenied          Reason = "policy_denied"
	ReasonPolicyError           Reason = "policy_error"
	ReasonPolicyUnavailable     Reason = "policy_unavailable"
	ReasonCredentialUnavailable Reason = "credential_unavailable"
	ReasonPlaintextCredential   Reason = "plaintext_credential_refused"
	ReasonEgressDenied          Reason = "egress_denied"
	ReasonUpstreamUnavailable   Reason = "upstream_unavailable"
	ReasonUpstreamTimeout       Reason = "upstream_timeout"
	ReasonShuttingDown          Reason = "shutting_down"
	ReasonMethodNotAllowed      Reason = "method_not_allowed"
	ReasonAuditUnavailable      Reason = "audit_unavailable"
	ReasonResponseUnscannable   Reason = "response_unscannable"
	ReasonDelegationInvalid     Reason = "delegation_invalid"
	// ReasonDelegationUnavailable: a delegation token was presented but escrow does not hold
	// the keys to check it yet (no JWT bundles from the Workload API, an unreachable OIDC
	// issuer). escrow's outage, not the caller's mistake: 503, retry later.
	ReasonDelegationUnavailable Reason = "delegation_unavailable"
	// ReasonRevoked: the caller's identity, or the route's credential, is revoked (the control
	// plane's kill switch). A decision, not an outage: 403, and retrying does not help.
	ReasonRevoked Reason = "revoked"
	// ReasonAgentClosed is not a denial: an allowed response was cut short because the agent
	// went away. It only appears in audit records and metrics.
	ReasonAgentClosed Reason = "agent_closed"
)

// ReasonHeader carries the reason of a denial. escrow removes it from upstream responses, so an
// upstream cannot forge an escrow denial.
const ReasonHeader = "X-Escrow-Reason"

// RequestIDHeader carries the audit record's request_id on every response escrow forwards or
// makes, so an agent's log line can be matched to its record. An upstream's own is replaced.
const RequestIDHeader = "X-Escrow-Request-Id"

type denial struct {
	status  int
	message string
}

// denials maps each reason to its status and fixed message. Messages never carry internal error
// text: details go to the audit record and the log, not to the agent.
var denials = map[Reason]denial{
	ReasonBadRequest:            {http.StatusBadRequest, "the request could not be parsed as a proxy request"},
	ReasonUnknownDestination:    {http.StatusForbidden, "the destination is not configured in escrow"},
	ReasonHostMismatch:          {http.StatusMisdirectedRequest, "the Host header does not match the CONNECT destination"},
	ReasonIdentityUnavailable:   {http.StatusServiceUnavailable, "the workload identity is not available"},
	ReasonPolicyDenied:          {http.StatusForbidden, "denied by policy"},
	ReasonPolicyError:           {http.StatusForbidden, "denied: the policy could not be evaluated for this request"},
	ReasonPolicyUnavailable:     {http.StatusServiceUnavailable, "no policy is loaded"},
	ReasonCredentialUnavailable: {http.StatusServiceUnavailable, "the credential for this destination is not available"},
	ReasonPlaintextCredential:   {http.StatusForbidden, "refusing to send a credential over plain HTTP; use https"},
	ReasonEgressDenied:          {http.StatusForbidden, "the destination address is not allowed"},
	ReasonUpstreamUnavailable:   {http.StatusBadGateway, "the upstream could not be reached"},
	ReasonUpstreamTimeout:       {http.StatusGatewayTimeout, "the upstream did not answer in time"},
	ReasonShuttingDown:          {http.StatusServiceUnavailable, "escrow is shutting down"},
	ReasonMethodNotAllowed:      {http.StatusMethodNotAllowed, "this method is never sent with a credential"},
	ReasonAuditUnavailable:      {http.StatusServiceUnavailable, "audit records cannot be written; escrow serves no request it cannot record"},
	ReasonDelegationInvalid:     {http.StatusProxyAuthRequired, "the delegation token in Proxy-Authorization is missing or does not verify"},
	ReasonDelegationUnavailable: {http.StatusServiceUnavailable, "the keys to verify the delegation token are not available yet; retry later"},
	ReasonRevoked:               {http.StatusForbidden, "access has been revoked for this workload or this destination's credential"},
	ReasonResponseUnscannable:   {http.StatusBadGateway, "the upstream's response is compressed although escrow asked for none, so it cannot be checked for the credential"},
}

// Status returns the HTTP status escrow answers with for r.
func (r Reason) Status() int {
	if d, ok := denials[r]; ok {
		return d.status
	}
	return http.StatusForbidden
}

type denialBody struct {
	Error     Reason `json:"error"`
	Message   string `json:"message"`
	RequestID string `json:"request_id"`
}

// writeDenial answers the agent with the reason's status, a JSON body and X-Escrow-Reason.
// message replaces the reason's default message when set; it is always a fixed text.
func writeDenial(w http.ResponseWriter, reason Reason, message, requestID string) int64 {
	d, ok := denials[reason]
	if !ok {
		d = denial{http.StatusForbidden, "denied"}
	}
	if message != "" {
		d.message = message
	}
	body, _ := json.Marshal(denialBody{Error: reason, Message: d.message, RequestID: requestID})
	body = append(body, '\n')
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set(ReasonHeader, string(reason))
	h.Set("Cache-Control", "no-store")
	if requestID != "" {
		h.Set(RequestIDHeader, requestID)
	}
	if reason == ReasonDelegationInvalid {
		// RFC 9110 §11.7.1: a 407 says how to authenticate to the proxy.
		h.Set("Proxy-Authenticate", "Bearer")
	}
	w.WriteHeader(d.status)
	_, _ = w.Write(body)
	return int64(len(body))
}
