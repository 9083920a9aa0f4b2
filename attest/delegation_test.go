package attest_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/attest/attesttest"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/internal/fakeclock"
)

const (
	delegAud = "spiffe://example.org/escrow"
	human    = "alice@example.com"
	agentA   = "spiffe://example.org/ns/agents/sa/coder"
	agentB   = "spiffe://example.org/ns/agents/sa/orchestrator"
)

var (
	rsaKeyOnce sync.Once
	rsaKey     *rsa.PrivateKey
)

// testRSAKey is generated once: RSA key generation is slow.
func testRSAKey(t testing.TB) *rsa.PrivateKey {
	rsaKeyOnce.Do(func() {
		var err error
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	return rsaKey
}

// signingKey is one key of a test issuer.
type signingKey struct {
	kid string
	alg jose.SignatureAlgorithm
	key crypto.Signer
}

func (k signingKey) public() jose.JSONWebKey {
	return jose.JSONWebKey{Key: k.key.Public(), KeyID: k.kid, Algorithm: string(k.alg), Use: "sig"}
}

// idp is an OpenID Connect issuer served over real HTTP: a discovery document and a JWKS, as
// OpenID Connect Discovery 1.0 and RFC 7517 describe. It counts JWKS fetches.
type idp struct {
	srv        *httptest.Server
	issuer     string
	mu         sync.Mutex
	keys       []signingKey
	jwksGets   atomic.Int32
	discovered atomic.Int32
	badIssuer  bool
}

func newIDP(t *testing.T, keys ...signingKey) *idp {
	t.Helper()
	p := &idp{keys: keys}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		p.discovered.Add(1)
		iss := p.issuer
		if p.badIssuer {
			iss = "https://evil.example.com"
		}
		_ = json.NewEncoder(w).Encode(map[string]string{"issuer": iss, "jwks_uri": p.srv.URL + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, r *http.Request) {
		p.jwksGets.Add(1)
		_ = json.NewEncoder(w).Encode(p.jwks())
	})
	p.srv = httptest.NewServer(mux)
	t.Cleanup(p.srv.Close)
	p.issuer = p.srv.URL
	return p
}

func (p *idp) jwks() jose.JSONWebKeySet {
	p.mu.Lock()
	defer p.mu.Unlock()
	var set jose.JSONWebKeySet
	for _, k := range p.keys {
		set.Keys = append(set.Keys, k.public())
	}
	return set
}

func (p *idp) setKeys(keys ...signingKey) {
	p.mu.Lock()
	p.keys = keys
	p.mu.Unlock()
}

func ecKey(t testing.TB, kid string) signingKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return signingKey{kid: kid, alg: jose.ES256, key: k}
}

func mint(t testing.TB, k signingKey, claims map[string]any) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", k.kid))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// claims returns valid claims from iss at now, for the human, acted for by agentA.
func claims(iss string, now time.Time) map[string]any {
	return map[string]any{
		"iss": iss, "sub": human, "aud": []string{delegAud, "other"},
		"exp": now.Add(5 * time.Minute).Unix(), "iat": now.Unix(), "nbf": now.Add(-time.Second).Unix(),
		"jti": "tok-1", "act": map[string]any{"sub": agentA},
	}
}

func with(c map[string]any, kv ...any) map[string]any {
	out := make(map[string]any, len(c))
	for k, v := range c {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == nil {
			delete(out, kv[i].(string))
			continue
		}
		out[kv[i].(string)] = kv[i+1]
	}
	return out
}

func chain(actors ...string) any {
	var act any
	for i := len(actors) - 1; i >= 0; i-- {
		m := map[string]any{"sub": actors[i]}
		if act != nil {
			m["act"] = act
		}
		act = m
	}
	return act
}

func depth(n int) *int { return &n }

func newVerifier(t testing.TB, cfg config.Delegation, opts attest.DelegationOptions) *attest.DelegationVerifier {
	t.Helper()
	if cfg.Audience == "" {
		cfg.Audience = delegAud
	}
	v, err := attest.NewDelegationVerifier(cfg, opts)
	if err != nil {
		t.Fatalf("NewDelegationVerifier: %v", err)
	}
	return v
}

func oidcCfg(p *idp, maxDepth int) config.Delegation {
	return config.Delegation{
		Issuers:  []config.DelegationIssuer{{OIDC: &config.OIDCIssuer{Issuer: p.issuer}}},
		MaxDepth: depth(maxDepth),
	}
}

// mustInvalid asserts err wraps ErrDelegationInvalid, says why, and does not repeat the token.
func mustInvalid(t *testing.T, d *attest.Delegation, err error, token, why string) {
	t.Helper()
	if !errors.Is(err, attest.ErrDelegationInvalid) {
		t.Fatalf("got %+v, %v; want ErrDelegationInvalid (%s)", d, err, why)
	}
	if d != nil {
		t.Fatalf("a Delegation came back with the error: %+v", d)
	}
	if !strings.Contains(err.Error(), why) {
		t.Fatalf("error %q does not say %q", err, why)
	}
	for _, seg := range strings.Split(token, ".") {
		if len(seg) > 8 && strings.Contains(err.Error(), seg) {
			t.Fatalf("error %q repeats part of the token", err)
		}
	}
}

// mustDelegationUnavailable: escrow could not check the token for lack of keys (503), which is never
// reported as the token being invalid (407).
func mustDelegationUnavailable(t *testing.T, d *attest.Delegation, err error, why string) {
	t.Helper()
	if !errors.Is(err, attest.ErrDelegationUnavailable) || errors.Is(err, attest.ErrDelegationInvalid) || d != nil {
		t.Fatalf("got %+v, %v; want ErrDelegationUnavailable only (%s)", d, err, why)
	}
	if !strings.Contains(err.Error(), why) {
		t.Fatalf("error %q does not say %q", err, why)
	}
}

func TestDelegation_OIDCChainIsVerifiedNearestActorFirst(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	rsaK := signingKey{kid: "rsa", alg: jose.RS256, key: testRSAKey(t)}
	psK := signingKey{kid: "ps", alg: jose.PS384, key: testRSAKey(t)}
	ecK := ecKey(t, "ec")
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	edK := signingKey{kid: "ed", alg: jose.EdDSA, key: edPriv}
	p := newIDP(t, rsaK, psK, ecK, edK)
	v := newVerifier(t, oidcCfg(p, 3), attest.DelegationOptions{Now: clk.Now})

	for _, k := range []signingKey{rsaK, psK, ecK, edK} {
		t.Run(string(k.alg), func(t *testing.T) {
			tok := mint(t, k, with(claims(p.issuer, clk.Now()), "act", chain(agentA, agentB, "user-app")))
			d, err := v.VerifyHeader(context.Background(), "Bearer "+tok, agentA)
			if err != nil {
				t.Fatal(err)
			}
			want := attest.Delegation{Subject: human, Actors: []string{agentA, agentB, "user-app"}, Issuer: p.issuer, TokenID: "tok-1"}
			if d.Subject != want.Subject || strings.Join(d.Actors, ",") != strings.Join(want.Actors, ",") ||
				d.Issuer != want.Issuer || d.TokenID != want.TokenID {
				t.Fatalf("got %+v, want %+v", d, want)
			}
		})
	}
	// Discovery happened once, and the keys were fetched once for all four.
	if n := p.discovered.Load(); n != 1 {
		t.Errorf("discovery fetched %d times, want 1", n)
	}
	if n := p.jwksGets.Load(); n != 1 {
		t.Errorf("JWKS fetched %d times, want 1", n)
	}
}

func TestDelegation_RejectsBadTokens(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	now := clk.Now()
	k := signingKey{kid: "rsa", alg: jose.RS256, key: testRSAKey(t)}
	p := newIDP(t, k)
	other := newIDP(t, ecKey(t, "ec-other"))
	v := newVerifier(t, oidcCfg(p, 2), attest.DelegationOptions{Now: clk.Now})
	good := claims(p.issuer, now)

	b64 := base64.RawURLEncoding.EncodeToString
	valid := mint(t, k, good)
	parts := strings.Split(valid, ".")
	tamperedPayload, _ := json.Marshal(with(good, "sub", "mallory"))
	pubDER, _ := x509.MarshalPKIXPublicKey(k.key.Public())

	hmacWithPublicKey := func() string {
		h := b64([]byte(`{"alg":"HS256","kid":"rsa","typ":"JWT"}`))
		body, _ := json.Marshal(good)
		in := h + "." + b64(body)
		m := hmac.New(sha256.New, pubDER)
		m.Write([]byte(in))
		return in + "." + b64(m.Sum(nil))
	}()
	algNone := b64([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + parts[1] + "."
	algNoneSigned := b64([]byte(`{"alg":"none","kid":"rsa"}`)) + "." + parts[1] + "." + parts[2]

	cases := []struct {
		name, token, why string
	}{
		{"tampered payload", parts[0] + "." + b64(tamperedPayload) + "." + parts[2], "signature"},
		{"tampered signature", parts[0] + "." + parts[1] + "." + b64([]byte("not the signature at all, not at all")), "signature"},
		{"expired", mint(t, k, with(good, "exp", now.Add(-time.Minute).Unix())), "expired"},
		{"not yet valid", mint(t, k, with(good, "nbf", now.Add(time.Minute).Unix())), "not valid yet"},
		{"issued in the future", mint(t, k, with(good, "iat", now.Add(time.Minute).Unix())), "issued in the future"},
		{"no exp", mint(t, k, with(good, "exp", nil)), "no exp"},
		{"no sub", mint(t, k, with(good, "sub", nil)), "no sub"},
		{"wrong audience", mint(t, k, with(good, "aud", "spiffe://example.org/other")), "audience"},
		{"alg none", algNone, "allowed algorithm"},
		{"alg none with a signature", algNoneSigned, "allowed algorithm"},
		{"HMAC with the issuer's public key", hmacWithPublicKey, "allowed algorithm"},
		{"unknown kid", mint(t, signingKey{kid: "nope", alg: jose.RS256, key: k.key}, good), `no key with kid "nope"`},
		{"right kid, wrong key", mint(t, signingKey{kid: "rsa", alg: jose.ES256, key: ecKey(t, "x").key}, good), "no usable key"},
		{"issuer not accepted", mint(t, ecKey(t, "ec-other"), with(good, "iss", other.issuer)), "is not accepted"},
		{"no issuer", mint(t, k, with(good, "iss", nil)), "no iss"},
		{"chain deeper than max_depth", mint(t, k, with(good, "act", chain(agentA, agentB, "third"))), "more than max_depth 2"},
		{"act not an object", mint(t, k, with(good, "act", "agent")), "act claim is not an object"},
		{"act without sub", mint(t, k, with(good, "act", map[string]any{"client_id": "x"})), "act claim has no sub"},
		{"nested act without sub", mint(t, k, with(good, "act", map[string]any{"sub": agentA, "act": map[string]any{}})), "act claim has no sub"},
		{"may_act names another actor", mint(t, k, with(good, "may_act", map[string]any{"sub": agentB})), "may_act allows"},
		{"may_act iss differs", mint(t, k, with(good, "act", map[string]any{"sub": agentA, "iss": "https://a"},
			"may_act", map[string]any{"sub": agentA, "iss": "https://b"})), "may_act allows"},
		{"may_act without act, other workload", mint(t, k, with(good, "act", nil, "may_act", map[string]any{"sub": agentB})), "may_act does not allow"},
		{"may_act not an object", mint(t, k, with(good, "may_act", agentA)), "may_act claim is not an object"},
		{"not a JWT", "abc.def.ghi", "not a signed JWT"},
		{"too large", strings.Repeat("a", 20000) + ".b.c", "larger than"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := v.Verify(context.Background(), tc.token, agentA)
			mustInvalid(t, d, err, tc.token, tc.why)
		})
	}
	// The valid token itself passes, so every failure above is the change it made.
	if _, err := v.Verify(context.Background(), valid, agentA); err != nil {
		t.Fatalf("the untouched token fails: %v", err)
	}
}

func TestDelegation_SkewAndDepthLimits(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	k := ecKey(t, "ec")
	p := newIDP(t, k)
	v := newVerifier(t, oidcCfg(p, 2), attest.DelegationOptions{Now: clk.Now, Skew: 10 * time.Second})
	c := claims(p.issuer, clk.Now())
	tok := mint(t, k, with(c, "act", chain(agentA, agentB), "exp", clk.Now().Unix()))
	// Exactly max_depth actors, exp 5s ago (inside the skew): valid.
	clk.Advance(5 * time.Second)
	d, err := v.Verify(context.Background(), tok, "")
	if err != nil || len(d.Actors) != 2 {
		t.Fatalf("depth 2 inside skew: %+v, %v", d, err)
	}
	clk.Advance(6 * time.Second) // 11s past exp
	d, err = v.Verify(context.Background(), tok, "")
	mustInvalid(t, d, err, tok, "expired")

	// max_depth 0: only the subject itself.
	v0 := newVerifier(t, oidcCfg(p, 0), attest.DelegationOptions{Now: clk.Now})
	direct := mint(t, k, with(claims(p.issuer, clk.Now()), "act", nil))
	if d, err := v0.Verify(context.Background(), direct, ""); err != nil || len(d.Actors) != 0 {
		t.Fatalf("depth 0: %+v, %v", d, err)
	}
	acted := mint(t, k, claims(p.issuer, clk.Now()))
	d, err = v0.Verify(context.Background(), acted, "")
	mustInvalid(t, d, err, acted, "max_depth 0")
}

func TestDelegation_MayActIsHonoured(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	k := ecKey(t, "ec")
	p := newIDP(t, k)
	v := newVerifier(t, oidcCfg(p, 3), attest.DelegationOptions{Now: clk.Now})
	c := claims(p.issuer, clk.Now())

	// With an act chain, the nearest actor must be the one may_act names.
	tok := mint(t, k, with(c, "may_act", map[string]any{"sub": agentA}))
	if d, err := v.Verify(context.Background(), tok, agentB); err != nil || d.Actors[0] != agentA {
		t.Fatalf("may_act matching the nearest actor: %+v, %v", d, err)
	}
	// Without one, the user's own token presented by the workload may_act names: that workload
	// is the one actor.
	own := mint(t, k, with(c, "act", nil, "may_act", map[string]any{"sub": agentA}))
	d, err := v.Verify(context.Background(), own, agentA)
	if err != nil || strings.Join(d.Actors, ",") != agentA || d.Subject != human {
		t.Fatalf("may_act naming the presenting workload: %+v, %v", d, err)
	}
	d, err = v.Verify(context.Background(), own, "")
	mustInvalid(t, d, err, own, "may_act does not allow")
}

func TestDelegation_UnknownKidRefreshesKeysAtMostOncePerInterval(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	k1, k2 := ecKey(t, "k1"), ecKey(t, "k2")
	p := newIDP(t, k1)
	cfg := oidcCfg(p, 3)
	cfg.Issuers[0].OIDC.JWKSURL = p.srv.URL + "/keys" // no discovery
	v := newVerifier(t, cfg, attest.DelegationOptions{Now: clk.Now, KeyRefreshInterval: time.Minute})
	ctx := context.Background()
	if _, err := v.Verify(ctx, mint(t, k1, claims(p.issuer, clk.Now())), ""); err != nil {
		t.Fatal(err)
	}
	if p.discovered.Load() != 0 || p.jwksGets.Load() != 1 {
		t.Fatalf("discovery %d, JWKS %d; want 0 and 1", p.discovered.Load(), p.jwksGets.Load())
	}
	// The issuer rotates to k2. Tokens with made-up kids inside the interval fetch nothing.
	p.setKeys(k1, k2)
	for i := 0; i < 20; i++ {
		bogus := mint(t, signingKey{kid: "bogus" + string(rune('a'+i)), alg: jose.ES256, key: k1.key}, claims(p.issuer, clk.Now()))
		if _, err := v.Verify(ctx, bogus, ""); !errors.Is(err, attest.ErrDelegationInvalid) {
			t.Fatal("a token with an unknown kid passed")
		}
	}
	tok2 := mint(t, k2, claims(p.issuer, clk.Now()))
	if _, err := v.Verify(ctx, tok2, ""); !errors.Is(err, attest.ErrDelegationInvalid) {
		t.Fatal("k2 verified before a refresh was allowed")
	}
	if n := p.jwksGets.Load(); n != 1 {
		t.Fatalf("JWKS fetched %d times within the refresh interval, want 1", n)
	}
	clk.Advance(time.Minute)
	if _, err := v.Verify(ctx, mint(t, k2, claims(p.issuer, clk.Now())), ""); err != nil {
		t.Fatalf("k2 after the interval: %v", err)
	}
	if n := p.jwksGets.Load(); n != 2 {
		t.Fatalf("JWKS fetched %d times, want 2", n)
	}
}

func TestDelegation_IssuerDownFailsClosedAndIsRateLimited(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	k := ecKey(t, "ec")
	var gets atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gets.Add(1)
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	v := newVerifier(t, config.Delegation{Issuers: []config.DelegationIssuer{{OIDC: &config.OIDCIssuer{Issuer: srv.URL}}}},
		attest.DelegationOptions{Now: clk.Now})
	for i := 0; i < 5; i++ {
		tok := mint(t, k, claims(srv.URL, clk.Now()))
		d, err := v.Verify(context.Background(), tok, "")
		mustDelegationUnavailable(t, d, err, "503")
	}
	if n := gets.Load(); n != 1 {
		t.Fatalf("issuer asked %d times within the refresh interval, want 1", n)
	}
}

func TestDelegation_DiscoveryMustNameTheIssuer(t *testing.T) {
	k := ecKey(t, "ec")
	p := newIDP(t, k)
	p.badIssuer = true
	v := newVerifier(t, oidcCfg(p, 3), attest.DelegationOptions{})
	tok := mint(t, k, claims(p.issuer, time.Now()))
	d, err := v.Verify(context.Background(), tok, "")
	// escrow cannot get trustworthy keys: its outage (503), whatever the token.
	mustDelegationUnavailable(t, d, err, "discovery document names issuer")
}

func TestDelegation_JWKSFileIsReadAndReReadOnUnknownKid(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	k1, k2 := ecKey(t, "k1"), ecKey(t, "k2")
	path := filepath.Join(t.TempDir(), "jwks.json")
	write := func(keys ...signingKey) {
		var set jose.JSONWebKeySet
		for _, k := range keys {
			set.Keys = append(set.Keys, k.public())
		}
		// An oct (HMAC) key in the file must be ignored, never used to verify.
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: []byte("0123456789abcdef0123456789abcdef"), KeyID: "oct", Algorithm: "HS256"})
		b, _ := json.Marshal(set)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(k1)
	iss := "https://idp.example.com"
	v := newVerifier(t, config.Delegation{Issuers: []config.DelegationIssuer{{OIDC: &config.OIDCIssuer{Issuer: iss, JWKSFile: path}}}},
		attest.DelegationOptions{Now: clk.Now})
	ctx := context.Background()
	if d, err := v.Verify(ctx, mint(t, k1, claims(iss, clk.Now())), ""); err != nil || d.Issuer != iss {
		t.Fatalf("%+v, %v", d, err)
	}
	write(k1, k2)
	clk.Advance(time.Minute)
	if _, err := v.Verify(ctx, mint(t, k2, claims(iss, clk.Now())), ""); err != nil {
		t.Fatalf("k2 after the file changed: %v", err)
	}
	// HS256 signed with the oct key's bytes: refused by the algorithm allow-list.
	h := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"HS256","kid":"oct"}`))
	body, _ := json.Marshal(claims(iss, clk.Now()))
	in := h + "." + base64.RawURLEncoding.EncodeToString(body)
	m := hmac.New(sha256.New, []byte("0123456789abcdef0123456789abcdef"))
	m.Write([]byte(in))
	hs := in + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
	d, err := v.Verify(ctx, hs, "")
	mustInvalid(t, d, err, hs, "allowed algorithm")
}

func TestDelegation_TokenIDIsJTIOrAHashNeverTheToken(t *testing.T) {
	k := ecKey(t, "ec")
	p := newIDP(t, k)
	v := newVerifier(t, oidcCfg(p, 3), attest.DelegationOptions{})
	tok := mint(t, k, with(claims(p.issuer, time.Now()), "jti", nil))
	d, err := v.Verify(context.Background(), tok, "")
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(tok))
	if want := "sha256:" + strings.ToLower(hexs(sum[:8])); d.TokenID != want {
		t.Fatalf("TokenID = %q, want %q", d.TokenID, want)
	}
	// A jti that is not short printable ASCII is not copied into audit records.
	tok = mint(t, k, with(claims(p.issuer, time.Now()), "jti", "line\nbreak"))
	if d, err = v.Verify(context.Background(), tok, ""); err != nil || !strings.HasPrefix(d.TokenID, "sha256:") {
		t.Fatalf("%+v, %v", d, err)
	}
}

func hexs(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

func TestDelegation_RequiredAndAbsent(t *testing.T) {
	p := newIDP(t, ecKey(t, "ec"))
	cfg := oidcCfg(p, 3)
	v := newVerifier(t, cfg, attest.DelegationOptions{})
	if d, err := v.VerifyHeader(context.Background(), "", agentA); d != nil || err != nil {
		t.Fatalf("no token, not required: %+v, %v; want nil, nil", d, err)
	}
	cfg.Required = true
	v = newVerifier(t, cfg, attest.DelegationOptions{})
	d, err := v.VerifyHeader(context.Background(), "  ", agentA)
	mustInvalid(t, d, err, "", "required")
	if !v.Required() {
		t.Fatal("Required() = false")
	}
}

func TestDelegation_ConfigErrors(t *testing.T) {
	p := newIDP(t, ecKey(t, "ec"))
	for _, tc := range []struct {
		name string
		cfg  config.Delegation
		opts attest.DelegationOptions
		want string
	}{
		{"no audience", config.Delegation{Issuers: oidcCfg(p, 1).Issuers}, attest.DelegationOptions{}, "audience"},
		{"no issuers", config.Delegation{Audience: delegAud}, attest.DelegationOptions{}, "at least one issuer"},
		{"spiffe without bundles", config.Delegation{Audience: delegAud, Issuers: []config.DelegationIssuer{{SPIFFE: &config.DelegationSPIFFE{}}}},
			attest.DelegationOptions{}, "JWT bundles"},
		{"both in one", config.Delegation{Audience: delegAud, Issuers: []config.DelegationIssuer{{SPIFFE: &config.DelegationSPIFFE{}, OIDC: &config.OIDCIssuer{Issuer: "https://x"}}}},
			attest.DelegationOptions{}, "exactly one"},
		{"negative depth", config.Delegation{Audience: delegAud, Issuers: oidcCfg(p, 1).Issuers, MaxDepth: depth(-1)}, attest.DelegationOptions{}, "max_depth"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := attest.NewDelegationVerifier(tc.cfg, tc.opts)
			if err == nil || !strings.HasPrefix(err.Error(), "attest: ") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want an attest: error about %q", err, tc.want)
			}
		})
	}
}

func TestParseProxyAuthorization(t *testing.T) {
	jwtLike := "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
	basic := func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }
	for _, tc := range []struct {
		name, header, want string
	}{
		{"bearer", "Bearer " + jwtLike, jwtLike},
		{"bearer lower case, spaces", "  bearer   " + jwtLike + " ", jwtLike},
		{"basic, JWT as password", basic("delegation:" + jwtLike), jwtLike},
		{"basic, any user", basic("whoever:" + jwtLike), jwtLike},
		{"basic, JWT as user", basic(jwtLike + ":"), jwtLike},
		{"basic, upper case", "BASIC " + base64.StdEncoding.EncodeToString([]byte("u:"+jwtLike)), jwtLike},
		{"digest", "Digest username=x", ""},
		{"bearer, not a JWT", "Bearer opaque-token", ""},
		{"bearer, two parts", "Bearer a.b", ""},
		{"bearer, empty segment", "Bearer a..c", ""},
		{"bearer, four parts", "Bearer a.b.c.d", ""},
		{"basic, not base64", "Basic !!!", ""},
		{"basic, no colon", basic(jwtLike), ""},
		{"basic, password not a JWT", basic("u:hunter2"), ""},
		{"scheme only", "Bearer", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := attest.ParseProxyAuthorization(tc.header)
			if tc.want == "" {
				if !errors.Is(err, attest.ErrDelegationInvalid) {
					t.Fatalf("got %q, %v; want ErrDelegationInvalid", got, err)
				}
				if strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "opaque-token") {
					t.Fatalf("error %q repeats the credential", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// TestDelegation_JWTSVIDsOfOtherWorkloads verifies JWT-SVIDs against the JWT bundles the
// Workload API streams, through the SPIFFE source's JWTBundles.
func TestDelegation_JWTSVIDsOfOtherWorkloads(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	h := startSPIFFE(t, context.Background(), w.Addr(), newClock())
	exp := h.clk.Now().Add(time.Hour)
	w.SetSVID(agentB, exp)
	h.waitUpdate(t, exp)
	bundles := h.src.JWTBundles()
	eventually(t, func() bool {
		_, err := bundles.GetJWTBundleForTrustDomain(w.TrustDomain())
		return err == nil
	}, "the JWT bundles")
	v := newVerifier(t, config.Delegation{Issuers: []config.DelegationIssuer{{SPIFFE: &config.DelegationSPIFFE{}}}, MaxDepth: depth(2)},
		attest.DelegationOptions{JWTBundles: bundles})
	ctx := context.Background()

	// A JWT-SVID the Workload API issues (here to the orchestrator) verifies: depth 0.
	tok, _, err := h.src.JWTSVID(ctx, delegAud)
	if err != nil {
		t.Fatal(err)
	}
	d, err := v.VerifyHeader(ctx, "Bearer "+tok, agentA)
	if err != nil {
		t.Fatal(err)
	}
	if d.Subject != agentB || len(d.Actors) != 0 || d.Issuer != "spiffe://example.org" || !strings.HasPrefix(d.TokenID, "sha256:") {
		t.Fatalf("got %+v", d)
	}
	// Another workload's JWT-SVID with an act chain.
	tok = w.MintJWTSVID(agentB, []string{delegAud}, time.Now().Add(time.Minute), map[string]any{"act": chain(agentA), "jti": "svid-1"})
	if d, err = v.Verify(ctx, tok, agentA); err != nil || strings.Join(d.Actors, ",") != agentA || d.TokenID != "svid-1" {
		t.Fatalf("%+v, %v", d, err)
	}

	for _, tc := range []struct{ name, token, why string }{
		{"wrong audience", w.MintJWTSVID(agentB, []string{"spiffe://example.org/other"}, time.Now().Add(time.Minute), nil), "audience"},
		{"expired", w.MintJWTSVID(agentB, []string{delegAud}, time.Now().Add(-2*time.Minute), nil), "expired"},
		{"too deep", w.MintJWTSVID(agentB, []string{delegAud}, time.Now().Add(time.Minute), map[string]any{"act": chain("a", "b", "c")}), "max_depth"},
		{"other trust domain", w.MintJWTSVID("spiffe://evil.org/x", []string{delegAud}, time.Now().Add(time.Minute), nil), "JWT-SVID"},
		{"not a SPIFFE subject", w.MintJWTSVID(agentB, []string{delegAud}, time.Now().Add(time.Minute), map[string]any{"sub": "bob"}), "not a JWT-SVID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := v.Verify(ctx, tc.token, agentA)
			mustInvalid(t, d, err, tc.token, tc.why)
		})
	}
	// Signed by a key the trust domain's bundle does not have.
	other := attesttest.NewWorkloadAPI(t, td)
	forged := other.MintJWTSVID(agentB, []string{delegAud}, time.Now().Add(time.Minute), nil)
	d, err = v.Verify(ctx, forged, agentA)
	mustInvalid(t, d, err, forged, "JWT-SVID")

	// After Close the bundles are gone: fail closed (escrow is stopping: unavailable).
	_ = h.src.Close()
	d, err = v.Verify(ctx, tok, agentA)
	mustDelegationUnavailable(t, d, err, "closed")
	if v.Ready() == nil {
		t.Error("Ready after the source closed")
	}
}

// TestDelegation_JWTSVIDBeforeTheBundlesArriveIsUnavailableNotInvalid: escrow can be ready to
// identify its workload a moment before the Workload API's JWT bundles arrive (SPIRE seen doing
// so in CI). A good token presented then is escrow's outage (503), not the caller's fault
// (407); the verifier is not Ready until the bundles are held.
func TestDelegation_JWTSVIDBeforeTheBundlesArriveIsUnavailableNotInvalid(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	w.Stop() // no bundles yet
	h := startSPIFFE(t, context.Background(), w.Addr(), newClock())
	v := newVerifier(t, config.Delegation{Issuers: []config.DelegationIssuer{{SPIFFE: &config.DelegationSPIFFE{}}}},
		attest.DelegationOptions{JWTBundles: h.src.JWTBundles()})
	tok := w.MintJWTSVID(agentB, []string{delegAud}, time.Now().Add(time.Minute), nil)
	if v.Ready() == nil {
		t.Fatal("Ready without JWT bundles")
	}
	d, err := v.Verify(context.Background(), tok, agentA)
	mustDelegationUnavailable(t, d, err, "no JWT bundles")

	w.SetSVID(agentA, h.clk.Now().Add(time.Hour))
	w.Start()
	eventually(t, func() bool { return v.Ready() == nil }, "Ready once the bundles arrive")
	if d, err := v.Verify(context.Background(), tok, agentA); err != nil || d.Subject != agentB {
		t.Fatalf("after the bundles arrived: %+v, %v", d, err)
	}
	// A trust domain the bundles do not cover is the token's problem, not escrow's.
	evil := w.MintJWTSVID("spiffe://evil.org/x", []string{delegAud}, time.Now().Add(time.Minute), nil)
	d, err = v.Verify(context.Background(), evil, agentA)
	mustInvalid(t, d, err, evil, "JWT-SVID")
}

// TestParseProxyAuthorization_RealClients shows how common clients send a delegation token
// with the credentials in the proxy URL (http://delegation:<jwt>@host:port), and that what
// they send parses back to the token.
func TestParseProxyAuthorization_RealClients(t *testing.T) {
	k := ecKey(t, "ec")
	token := mint(t, k, claims("https://idp.example.com", time.Now()))
	got := make(chan string, 4)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Get("Proxy-Authorization")
		w.WriteHeader(http.StatusNoContent)
	}))
	defer proxy.Close()
	proxyURL := strings.Replace(proxy.URL, "http://", "http://delegation:"+token+"@", 1)
	clients := map[string][]string{
		"curl":            {"curl", "-s", "-m", "10", "-x", proxyURL, "http://api.example.com/x"},
		"python requests": {"python3", "-c", "import requests,sys; requests.get('http://api.example.com/x', proxies={'http': sys.argv[1]}, timeout=10)", proxyURL},
	}
	for name, argv := range clients {
		t.Run(name, func(t *testing.T) {
			if _, err := exec.LookPath(argv[0]); err != nil {
				t.Skipf("%s not installed", argv[0])
			}
			if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%s: %v: %s", name, err, out)
			}
			h := <-got
			if !strings.HasPrefix(h, "Basic ") {
				t.Fatalf("%s sent Proxy-Authorization %.10q..., want Basic", name, h)
			}
			if tok, err := attest.ParseProxyAuthorization(h); err != nil || tok != token {
				t.Fatalf("%s: parsed %v; want the token back", name, err)
			}
		})
	}
}

func TestDelegation_OIDCIssuerBehindAPrivateCA(t *testing.T) {
	k := ecKey(t, "ec")
	mux := http.NewServeMux()
	srv := httptest.NewTLSServer(mux)
	defer srv.Close()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{"issuer": srv.URL, "jwks_uri": srv.URL + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{k.public()}})
	})
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	tok := mint(t, k, claims(srv.URL, time.Now()))

	without := newVerifier(t, config.Delegation{Issuers: []config.DelegationIssuer{{OIDC: &config.OIDCIssuer{Issuer: srv.URL}}}},
		attest.DelegationOptions{})
	d, err := without.Verify(context.Background(), tok, "")
	mustDelegationUnavailable(t, d, err, "certificate")

	withCA := newVerifier(t, config.Delegation{Issuers: []config.DelegationIssuer{{OIDC: &config.OIDCIssuer{Issuer: srv.URL, CAFile: caFile}}}},
		attest.DelegationOptions{})
	if d, err := withCA.Verify(context.Background(), tok, ""); err != nil || d.Issuer != srv.URL {
		t.Fatalf("with ca_file: %+v, %v", d, err)
	}
}
