package credential

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
)

// withRevocation returns p itself when revocationURL is empty, and otherwise p wrapped so that
// it is a Revoker: the Manager finds revocation by asserting the Revoker interface, so a
// provider without an endpoint must not have the method at all.
func withRevocation(p *oauthProvider, revocationURL string) (Provider, error) {
	if revocationURL == "" {
		return p, nil
	}
	if err := checkURL("revocation_url", revocationURL); err != nil {
		return nil, err
	}
	// Redirects are not followed: a 307 or 308 would resend the token to wherever it points.
	c := *p.client
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &revocableOAuth{oauthProvider: p, revokeURL: revocationURL, revokeClient: &c}, nil
}

// revocableOAuth is an oauth2 or token_exchange provider with an RFC 7009 revocation endpoint.
type revocableOAuth struct {
	*oauthProvider
	revokeURL    string
	revokeClient *http.Client // p.client (Deps.HTTPClient with ca_file), not following redirects
}

// Revoke revokes tok at the revocation endpoint (RFC 7009 §2.1): a form POST of
// token=<access token> and token_type_hint=access_token, the client authenticated as at the
// token endpoint. 200 is success, also for a token the server already considers invalid
// (§2.2). Anything else, 503 included (§2.2.1: the token is still valid; the Manager does not
// retry, it logs and lets the token expire), is an error naming the status and the RFC 6749
// §5.2 error code, never the token or the client's secret.
func (p *revocableOAuth) Revoke(ctx context.Context, tok Token) error {
	v := tok.Value()
	if v == "" {
		return errors.New("revocation: the token has no value")
	}
	// No subject: the assertion only authenticates the client (the pod's workload), and the
	// token being revoked carries no subject to check it against.
	cc, err := p.clientCreds(ctx, "")
	if err != nil {
		return fmt.Errorf("revocation: client authentication: %w", err)
	}
	secrets := append([]string{v}, cc.secrets...)
	req, err := cc.newRequest(ctx, p.revokeURL, url.Values{"token": {v}, "token_type_hint": {"access_token"}})
	if err != nil {
		return fmt.Errorf("revocation: %s", scrub(err.Error(), secrets...))
	}
	resp, err := p.revokeClient.Do(req)
	if err != nil {
		// The request's body and Authorization header are not part of a transport error.
		return fmt.Errorf("revocation endpoint: %s", scrub(err.Error(), secrets...))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	if err != nil {
		b = nil
	}
	return revocationError(resp.StatusCode, b, secrets...)
}

// revocationError names the status and the RFC 6749 §5.2 error a revocation endpoint answered
// (RFC 7009 §2.2.1: unsupported_token_type, invalid_client, ...), scrubbed of secrets.
func revocationError(status int, body []byte, secrets ...string) error {
	var e struct {
		Code        string `json:"error"`
		Description string `json:"error_description"`
	}
	_ = json.Unmarshal(body, &e)
	msg := fmt.Sprintf("revocation endpoint answered %d", status)
	if status == http.StatusServiceUnavailable {
		msg += " (temporarily unavailable)"
	}
	if e.Code != "" {
		msg += ": " + scrub(e.Code, secrets...)
		if e.Description != "" {
			msg += ": " + scrub(e.Description, secrets...)
		}
	}
	return &EndpointError{Status: status, Code: scrub(e.Code, secrets...), msg: msg}
}
