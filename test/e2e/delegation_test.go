package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Delegation tokens as real clients send them: curl and Python requests put credentials in the
// proxy URL, which they send as Proxy-Authorization: Basic on the CONNECT (user "delegation",
// the JWT as the password). escrow verifies the token (signature against the issuer's JWKS,
// audience, expiry, chain depth) and policy decides on the chain; a bad token is 407.
func TestDelegationTokensFromRealClients(t *testing.T) {
	requireClient(t, "curl")
	const issuer, audience = "http://127.0.0.1:1/idp", "spiffe://e2e.test/escrow"
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	jwks := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: "k1", Algorithm: "ES256", Use: "sig"}}}
	jb, _ := json.Marshal(jwks)
	jwksFile := filepath.Join(dir, "jwks.json")
	if err := os.WriteFile(jwksFile, jb, 0o644); err != nil {
		t.Fatal(err)
	}
	polDir := filepath.Join(dir, "policies")
	if err := os.MkdirAll(polDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Only calls made on behalf of alice, through at most two agents, may go out.
	if err := os.WriteFile(filepath.Join(polDir, "p.cedar"), []byte(`@id("for-alice")
permit (principal, action, resource)
when { context has delegation && context.delegation.subject == "alice@example.com" && context.delegation.depth <= 2 };
`), 0o644); err != nil {
		t.Fatal(err)
	}
	secret := newSecret("delegation e2e key")
	secretFile := filepath.Join(dir, "key")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	api := newUpstream(t, true, nil)
	api.setExpectation("api.example.test", bearer(secret))
	e := startEscrow(t, fmt.Sprintf(`
identity:
  static: %s
policy:
  dir: %s
delegation:
  audience: %s
  issuers:
    - oidc: {issuer: %s, jwks_file: %s}
upstreams:
  - host: api.example.test
    credential: key
    address: %s
    ca_file: %s
credentials:
  key: {static: {file: %s}}
egress:
  allow_cidrs: [127.0.0.0/8]
`, staticID, polDir, audience, issuer, jwksFile, api.Addr, upstreamCA.certFile, secretFile), escrowOptions{})

	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", "k1"))
	if err != nil {
		t.Fatal(err)
	}
	mint := func(subject string, actors []string, aud string, exp time.Time) string {
		claims := map[string]any{"iss": issuer, "sub": subject, "aud": aud, "exp": exp.Unix(), "iat": time.Now().Unix(), "jti": newSecret("jti")[:12]}
		// RFC 8693 act: nearest actor outermost.
		var act map[string]any
		for i := len(actors) - 1; i >= 0; i-- {
			a := map[string]any{"sub": actors[i]}
			if act != nil {
				a["act"] = act
			}
			act = a
		}
		if act != nil {
			claims["act"] = act
		}
		tok, err := jwt.Signed(signer).Claims(claims).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	hour := time.Now().Add(time.Hour)
	cases := []struct {
		name       string
		token      string
		wantStatus int
		wantReason string
	}{
		{"acting_for_alice_through_one_agent", mint("alice@example.com", []string{staticID}, audience, hour), http.StatusOK, ""},
		{"acting_for_bob_is_denied_by_policy", mint("bob@example.com", []string{staticID}, audience, hour), http.StatusForbidden, "policy_denied"},
		{"three_hops_is_denied_by_policy", mint("alice@example.com", []string{staticID, "spiffe://e2e.test/b", "spiffe://e2e.test/c"}, audience, hour), http.StatusForbidden, "policy_denied"},
		{"wrong_audience_is_407", mint("alice@example.com", nil, "spiffe://e2e.test/other", hour), http.StatusProxyAuthRequired, "delegation_invalid"},
		{"expired_is_407", mint("alice@example.com", nil, audience, time.Now().Add(-time.Hour)), http.StatusProxyAuthRequired, "delegation_invalid"},
		{"tampered_is_407", tamper(mint("alice@example.com", nil, audience, hour)), http.StatusProxyAuthRequired, "delegation_invalid"},
	}
	plain := e.ProxyURL
	defer func() { e.ProxyURL = plain }()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.ProxyURL = "http://delegation:" + tc.token + "@" + e.ProxyHP
			for _, cl := range []struct {
				name string
				do   func(testing.TB, *escrow, call, bool) response
			}{{"curl", doCurl}, {"python_requests", doPython}} {
				if cl.name == "python_requests" {
					requireClient(t, "python")
				}
				r := cl.do(t, e, call{URL: "https://api.example.test" + uniquePath("/v1/models", tc.name+cl.name), Headers: [][2]string{}}, false)
				status := r.Status
				if r.ConnectStatus != 0 {
					status = r.ConnectStatus
				}
				if status != tc.wantStatus {
					t.Errorf("%s: status %d (connect %d, err %q), want %d", cl.name, r.Status, r.ConnectStatus, r.Err, tc.wantStatus)
				}
				if tc.wantReason == "policy_denied" {
					checkDenial(t, r, tc.wantStatus, tc.wantReason)
				}
			}
		})
	}
	// The tokens never reach a record or a log.
	e.mu.Lock()
	logs := strings.Join(e.stdout, "\n") + strings.Join(e.stderr, "\n")
	e.mu.Unlock()
	for _, tc := range cases {
		if sig := tc.token[strings.LastIndexByte(tc.token, '.')+1:]; strings.Contains(logs, sig) {
			t.Errorf("a delegation token (%s) appears in escrow's output", tc.name)
		}
	}
	e.finish(t)
}

// tamper changes the token's payload (sub alice -> mallory) and keeps the signature.
func tamper(tok string) string {
	parts := strings.Split(tok, ".")
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	payload = []byte(strings.Replace(string(payload), "alice", "malice", 1))
	parts[1] = base64.RawURLEncoding.EncodeToString(payload)
	return strings.Join(parts, ".")
}
