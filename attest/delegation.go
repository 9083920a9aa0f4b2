package attest

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/escrowproxy/escrow/config"
)

// ErrDelegationInvalid means a delegation token was required but absent, or was presented and
// failed verification (malformed, bad signature, unknown key, disallowed algorithm, wrong
// audience, expired or not yet valid, unknown issuer, a chain deeper than allowed, a may_act
// mismatch, or its issuer's keys could not be fetched). The proxy answers 407
// delegation_invalid with "Proxy-Authenticate: Bearer". The wrapped cause is for logs: it never
// contains the token.
var ErrDelegationInvalid = errors.New("attest: delegation invalid")

// delegationAlgorithms are the signature algorithms a delegation token may use: asymmetric
// only. "none" and HMAC are never accepted; HMAC in particular would let anyone holding the
// issuer's public key (everyone) sign tokens if that key were used as the HMAC secret.
var delegationAlgorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512,
	jose.PS256, jose.PS384, jose.PS512,
	jose.ES256, jose.ES384, jose.ES512,
	jose.EdDSA,
}

const (
	// maxTokenBytes bounds a presented token; IdP tokens with many group claims stay well below.
	maxTokenBytes = 16 << 10
	// maxTokenIDBytes bounds a jti used as TokenID in audit records.
	maxTokenIDBytes = 128
	// DefaultDelegationSkew is the clock skew allowed on exp, nbf and iat.
	DefaultDelegationSkew = 30 * time.Second
)

// DelegationOptions are what a DelegationVerifier needs besides its config.
type DelegationOptions struct {
	// JWTBundles verifies JWT-SVIDs for a spiffe issuer; pass (*SPIFFE).JWTBundles(). Required
	// when the config lists a spiffe issuer.
	JWTBundles jwtbundle.Source
	// HTTPClient fetches JWKS and OIDC discovery documents; nil means a client with a 10s
	// timeout. Inject one to control proxies, TLS roots and dialing.
	HTTPClient *http.Client
	// Now is the clock for exp/nbf/iat and key refreshes; nil means time.Now.
	Now func() time.Time
	// Skew is the clock skew allowed on exp, nbf and iat; 0 means DefaultDelegationSkew.
	Skew time.Duration
	// KeyRefreshInterval is the least time between two fetches of one issuer's keys (a token
	// with an unknown kid triggers a fetch, at most this often); 0 means 30s.
	KeyRefreshInterval time.Duration
	// KeyTTL is how long fetched keys are used before they are fetched again; 0 means 1h.
	KeyTTL time.Duration
}

// DelegationVerifier verifies the delegation tokens agents present (see VerifyHeader). It is
// built once from the config's delegation block and is safe for concurrent use.
type DelegationVerifier struct {
	audience string
	maxDepth int
	required bool
	now      func() time.Time
	skew     time.Duration
	bundles  jwtbundle.Source // nil without a spiffe issuer
	oidc     map[string]*oidcKeys
}

// NewDelegationVerifier builds a verifier for cfg (already validated by the config package).
// It does no I/O: OIDC keys are fetched on first use.
func NewDelegationVerifier(cfg config.Delegation, opts DelegationOptions) (*DelegationVerifier, error) {
	v := &DelegationVerifier{
		audience: cfg.Audience,
		maxDepth: cfg.MaxActors(),
		required: cfg.Required,
		now:      opts.Now,
		skew:     opts.Skew,
		oidc:     make(map[string]*oidcKeys),
	}
	if v.audience == "" {
		return nil, errors.New("attest: delegation.audience must not be empty")
	}
	if v.maxDepth < 0 {
		return nil, fmt.Errorf("attest: delegation.max_depth %d must not be negative", v.maxDepth)
	}
	if v.now == nil {
		v.now = time.Now
	}
	if v.skew <= 0 {
		v.skew = DefaultDelegationSkew
	}
	client := opts.HTTPClient
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	refresh, ttl := opts.KeyRefreshInterval, opts.KeyTTL
	if refresh <= 0 {
		refresh = 30 * time.Second
	}
	if ttl <= 0 {
		ttl = time.Hour
	}
	if len(cfg.Issuers) == 0 {
		return nil, errors.New("attest: delegation.issuers must list at least one issuer")
	}
	for i, is := range cfg.Issuers {
		switch {
		case is.SPIFFE != nil && is.OIDC == nil:
			if opts.JWTBundles == nil {
				return nil, fmt.Errorf("attest: delegation.issuers[%d].spiffe needs the SPIFFE Workload API's JWT bundles", i)
			}
			v.bundles = opts.JWTBundles
		case is.OIDC != nil && is.SPIFFE == nil:
			o := is.OIDC
			if o.Issuer == "" {
				return nil, fmt.Errorf("attest: delegation.issuers[%d].oidc.issuer must not be empty", i)
			}
			if _, dup := v.oidc[o.Issuer]; dup {
				return nil, fmt.Errorf("attest: delegation.issuers[%d].oidc.issuer %q is listed twice", i, o.Issuer)
			}
			c := client
			if o.CAFile != "" {
				var err error
				if c, err = clientWithRoots(client, o.CAFile); err != nil {
					return nil, fmt.Errorf("attest: delegation.issuers[%d].oidc.ca_file: %w", i, err)
				}
			}
			v.oidc[o.Issuer] = &oidcKeys{
				cfg: *o, client: c, now: v.now, refresh: refresh, ttl: ttl,
			}
		default:
			return nil, fmt.Errorf("attest: delegation.issuers[%d] must set exactly one of spiffe, oidc", i)
		}
	}
	return v, nil
}

// clientWithRoots returns a copy of client whose TLS roots are the system's plus the PEM
// certificates in caFile (an issuer behind a private CA).
func clientWithRoots(client *http.Client, caFile string) (*http.Client, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("no PEM certificate found")
	}
	var tr *http.Transport
	switch t := client.Transport.(type) {
	case nil:
		tr = http.DefaultTransport.(*http.Transport).Clone()
	case *http.Transport:
		tr = t.Clone()
	default:
		return nil, fmt.Errorf("the HTTP client's transport %T cannot take extra roots", t)
	}
	if tr.TLSClientConfig == nil {
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	tr.TLSClientConfig.RootCAs = pool
	c := *client
	c.Transport = tr
	return &c, nil
}

// Required reports whether a request without a token is to be denied.
func (v *DelegationVerifier) Required() bool { return v.required }

// VerifyHeader verifies the delegation token in a Proxy-Authorization header value (see
// ParseProxyAuthorization) presented by the workload whose SPIFFE ID is workload (used for
// may_act; "" if unknown). An empty header yields (nil, nil), or ErrDelegationInvalid when the
// config requires a token. Every failure wraps ErrDelegationInvalid.
func (v *DelegationVerifier) VerifyHeader(ctx context.Context, proxyAuthorization, workload string) (*Delegation, error) {
	if strings.TrimSpace(proxyAuthorization) == "" {
		if v.required {
			return nil, fmt.Errorf("%w: no delegation token presented and one is required", ErrDelegationInvalid)
		}
		return nil, nil
	}
	token, err := ParseProxyAuthorization(proxyAuthorization)
	if err != nil {
		return nil, err
	}
	return v.Verify(ctx, token, workload)
}

// Verify verifies a compact JWT and returns the delegation chain it carries:
//
//   - The token is signed with an allowed algorithm (RS/PS/ES 256/384/512 or EdDSA; never
//     none or HMAC) by a key of the issuer it names. A token whose iss is a configured OIDC
//     issuer is verified against that issuer's JWKS; otherwise, with a spiffe issuer
//     configured, a token whose sub is a SPIFFE ID is verified as a JWT-SVID against the
//     Workload API's JWT bundles (go-spiffe's jwtsvid.ParseAndValidate).
//   - aud contains the configured audience; exp is present and, with nbf and iat, holds at
//     Now within the allowed skew; sub is present.
//   - The chain is RFC 8693's nested act claim: the outermost act is the nearest actor (the
//     direct caller), each nested act the one before it. Every act must be an object with a
//     non-empty sub. More actors than max_depth fail.
//   - may_act (RFC 8693 4.4), when present, names who may act for the subject: with an act
//     chain, the nearest actor's sub (and iss, when both carry one) must equal may_act's;
//     without one, the token is the subject's own, presented by the workload itself, so
//     workload must equal may_act's sub, and it becomes the one actor (depth 1).
//
// Every failure wraps ErrDelegationInvalid, but for one: when escrow lacks the keys to check the
// token (see ErrDelegationUnavailable), the error wraps that instead.
func (v *DelegationVerifier) Verify(ctx context.Context, token, workload string) (*Delegation, error) {
	d, err := v.verify(ctx, token, workload)
	if err != nil {
		if errors.Is(err, ErrDelegationUnavailable) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", ErrDelegationInvalid, err)
	}
	return d, nil
}

// Ready reports whether the verifier holds what it needs to check a JWT-SVID: with a spiffe
// issuer, the Workload API's JWT bundles (they arrive shortly after the first SVID; until
// then every token would be unverifiable). OIDC issuers' keys are fetched on first use and do
// not hold readiness back.
func (v *DelegationVerifier) Ready() error {
	if h, ok := v.bundles.(interface{ held() bool }); ok && !h.held() {
		return errors.New("no JWT bundles from the SPIFFE Workload API yet")
	}
	return nil
}

func (v *DelegationVerifier) verify(ctx context.Context, token, workload string) (*Delegation, error) {
	if len(token) > maxTokenBytes {
		return nil, fmt.Errorf("token is larger than %d bytes", maxTokenBytes)
	}
	tok, err := jwt.ParseSigned(token, delegationAlgorithms)
	if err != nil {
		return nil, fmt.Errorf("not a signed JWT with an allowed algorithm: %w", err)
	}
	if len(tok.Headers) != 1 {
		return nil, errors.New("token must have exactly one signature")
	}
	var unverified jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return nil, fmt.Errorf("claims: %w", err)
	}

	var (
		std    jwt.Claims
		claims map[string]any
		issuer string
	)
	if keys, ok := v.oidc[unverified.Issuer]; ok && unverified.Issuer != "" {
		if claims, err = keys.verify(ctx, tok, &std); err != nil {
			return nil, err
		}
		issuer = std.Issuer
	} else if v.bundles != nil && strings.HasPrefix(unverified.Subject, "spiffe://") {
		if id, err := spiffeid.FromString(unverified.Subject); err == nil {
			if _, err := v.bundles.GetJWTBundleForTrustDomain(id.TrustDomain()); errors.Is(err, ErrUnavailable) {
				return nil, fmt.Errorf("%w: %w", ErrDelegationUnavailable, err)
			}
		}
		svid, err := jwtsvid.ParseAndValidate(token, v.bundles, []string{v.audience})
		if err != nil {
			return nil, fmt.Errorf("JWT-SVID: %w", err)
		}
		claims = svid.Claims
		// The signature is verified: the unverified claims are now the verified ones.
		std = unverified
		std.Subject = svid.ID.String()
		issuer = std.Issuer
		if issuer == "" {
			issuer = svid.ID.TrustDomain().IDString()
		}
	} else {
		if unverified.Issuer == "" {
			return nil, errors.New("token has no iss and is not a JWT-SVID of an accepted trust domain")
		}
		return nil, fmt.Errorf("issuer %q is not accepted", truncate(unverified.Issuer, 256))
	}

	if std.Subject == "" {
		return nil, errors.New("token has no sub")
	}
	if std.Expiry == nil {
		return nil, errors.New("token has no exp")
	}
	if err := std.ValidateWithLeeway(jwt.Expected{AnyAudience: jwt.Audience{v.audience}, Time: v.now()}, v.skew); err != nil {
		return nil, fmt.Errorf("claims: %w", err)
	}

	actors, err := readActors(claims, v.maxDepth)
	if err != nil {
		return nil, err
	}
	if actors, err = applyMayAct(claims, actors, workload); err != nil {
		return nil, err
	}
	if len(actors) > v.maxDepth {
		return nil, fmt.Errorf("delegation chain has %d actors, more than max_depth %d", len(actors), v.maxDepth)
	}
	return &Delegation{
		Subject: std.Subject,
		Actors:  actors,
		Issuer:  issuer,
		TokenID: tokenID(std.ID, token),
	}, nil
}

// readActors reads the nested act claims, nearest actor first. It stops reading one past
// maxDepth, so a hostile nesting costs nothing.
func readActors(claims map[string]any, maxDepth int) ([]string, error) {
	var actors []string
	cur, ok := claims["act"]
	for ok && cur != nil {
		m, isObj := cur.(map[string]any)
		if !isObj {
			return nil, errors.New("act claim is not an object")
		}
		sub, _ := m["sub"].(string)
		if sub == "" {
			return nil, errors.New("act claim has no sub")
		}
		actors = append(actors, sub)
		if len(actors) > maxDepth {
			return nil, fmt.Errorf("delegation chain has more than max_depth %d actors", maxDepth)
		}
		cur, ok = m["act"]
	}
	return actors, nil
}

// applyMayAct enforces a top-level may_act claim (see Verify).
func applyMayAct(claims map[string]any, actors []string, workload string) ([]string, error) {
	raw, ok := claims["may_act"]
	if !ok {
		return actors, nil
	}
	m, isObj := raw.(map[string]any)
	if !isObj {
		return nil, errors.New("may_act claim is not an object")
	}
	sub, _ := m["sub"].(string)
	if sub == "" {
		return nil, errors.New("may_act claim has no sub")
	}
	if len(actors) > 0 {
		if actors[0] != sub {
			return nil, fmt.Errorf("the nearest actor %q is not the one may_act allows", truncate(actors[0], 256))
		}
		if iss, _ := m["iss"].(string); iss != "" {
			act := claims["act"].(map[string]any) // readActors checked it
			if actIss, _ := act["iss"].(string); actIss != "" && actIss != iss {
				return nil, errors.New("the nearest actor's iss is not the one may_act allows")
			}
		}
		return actors, nil
	}
	if workload == "" || workload != sub {
		return nil, errors.New("token is presented by a workload that may_act does not allow")
	}
	return []string{workload}, nil
}

// tokenID names a token in audit records without its value: its jti when that is short
// printable ASCII, else a hash prefix.
func tokenID(jti, token string) string {
	if jti != "" && len(jti) <= maxTokenIDBytes && printableASCII(jti) {
		return jti
	}
	sum := sha256.Sum256([]byte(token))
	return "sha256:" + hex.EncodeToString(sum[:8])
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// ParseProxyAuthorization extracts the delegation token from a Proxy-Authorization header
// value. Two forms are accepted:
//
//   - "Bearer <jwt>", what a client configured with a header sends;
//   - "Basic base64(<user>:<jwt>)", what curl, Python requests, Node and most HTTP clients send
//     when the credentials are in the proxy URL (http://delegation:<jwt>@127.0.0.1:15480). The
//     user name is ignored (any, e.g. "delegation"); the JWT is the password. A JWT given as
//     the user name with an empty password (http://<jwt>@127.0.0.1:15480) is accepted too.
//
// The scheme is case-insensitive. Anything else, or a value that is not a compact JWS, fails
// with ErrDelegationInvalid; the error never repeats the value.
func ParseProxyAuthorization(h string) (string, error) {
	h = strings.TrimSpace(h)
	scheme, rest, _ := strings.Cut(h, " ")
	rest = strings.TrimSpace(rest)
	var token string
	switch {
	case strings.EqualFold(scheme, "Bearer"):
		token = rest
	case strings.EqualFold(scheme, "Basic"):
		if len(rest) > 2*maxTokenBytes {
			return "", fmt.Errorf("%w: Proxy-Authorization is too large", ErrDelegationInvalid)
		}
		dec, err := base64.StdEncoding.DecodeString(rest)
		if err != nil {
			return "", fmt.Errorf("%w: Proxy-Authorization Basic credentials are not base64", ErrDelegationInvalid)
		}
		user, pass, ok := strings.Cut(string(dec), ":")
		if !ok {
			return "", fmt.Errorf("%w: Proxy-Authorization Basic credentials have no ':'", ErrDelegationInvalid)
		}
		token = pass
		if token == "" {
			token = user
		}
	default:
		return "", fmt.Errorf("%w: Proxy-Authorization scheme must be Bearer or Basic", ErrDelegationInvalid)
	}
	if !compactJWS(token) {
		return "", fmt.Errorf("%w: Proxy-Authorization does not carry a compact JWT", ErrDelegationInvalid)
	}
	return token, nil
}

// compactJWS reports whether s has the shape of a compact JWS: three non-empty base64url
// segments (header, payload, signature), within the size limit.
func compactJWS(s string) bool {
	if len(s) == 0 || len(s) > maxTokenBytes {
		return false
	}
	parts := 0
	seg := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if seg == 0 {
				return false
			}
			parts++
			seg = 0
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			seg++
		default:
			return false
		}
	}
	return parts == 2 && seg > 0
}
