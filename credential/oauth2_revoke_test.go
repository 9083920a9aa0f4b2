package credential

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/escrowproxy/escrow/config"
)

// authServer is a stand-in authorization server with a token endpoint and an RFC 7009 token
// revocation endpoint, over real TLS. It follows RFC 7009: §2.1 (the revocation request is a
// POST of application/x-www-form-urlencoded with token and the optional token_type_hint, the
// client authenticated as at the token endpoint, RFC 6749 §2.3), §2.2 (200 whether or not the
// token was valid: an unknown token is no error), §2.2.1 (an error answer is RFC 6749 §5.2
// JSON, e.g. unsupported_token_type; 503 means the token could not be revoked now and is still
// valid). The token endpoint is RFC 6749 §4.4 with the client authentication of §2.3.1 and
// RFC 7523 §2.2, like oauthStandIn, and mints a new token on every call.
type authServer struct {
	t      *testing.T
	url    string // the server's base URL
	ca     string // its certificate as a ca_file
	svids  *svidIssuer
	status int // what the revocation endpoint answers (0: by the RFC)
	echo   bool

	mu      sync.Mutex
	minted  []string
	live    map[string]bool
	tokAuth []clientSeen // client authentication seen at the token endpoint, per request
	revokes []revokeSeen // revocation requests
}

// clientSeen is how a request authenticated its client.
type clientSeen struct {
	basicID, basicSecret string
	hasBasic             bool
	formID, formSecret   string
	assertionType        string
	assertionSubject     string // the verified client_assertion's subject; "" if none or invalid
}

type revokeSeen struct {
	method, contentType string
	form                url.Values
	client              clientSeen
}

func newAuthServer(t *testing.T, svids *svidIssuer) *authServer {
	a := &authServer{t: t, svids: svids, live: map[string]bool{}}
	srv, ca := tlsStandIn(t, a)
	a.url, a.ca = srv.URL, ca
	return a
}

func (a *authServer) tokenURL() string  { return a.url + "/oauth2/token" }
func (a *authServer) revokeURL() string { return a.url + "/oauth2/revoke" }

// client reads the client authentication of r (its form already parsed), verifying a client
// assertion against the token endpoint's URL as its audience (RFC 7523 §3).
func (a *authServer) client(r *http.Request) clientSeen {
	var c clientSeen
	c.basicID, c.basicSecret, c.hasBasic = r.BasicAuth()
	if c.hasBasic { // RFC 6749 §2.3.1: form-encoded before basic auth
		c.basicID, _ = url.QueryUnescape(c.basicID)
		c.basicSecret, _ = url.QueryUnescape(c.basicSecret)
	}
	c.formID, c.formSecret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	c.assertionType = r.PostForm.Get("client_assertion_type")
	if as := r.PostForm.Get("client_assertion"); as != "" && a.svids != nil {
		c.assertionSubject, _ = a.svids.verify(as, a.tokenURL())
	}
	return c
}

// authenticated reports whether c is a valid client: "agents" with clientSecret (basic or
// post), or with a valid JWT-SVID assertion.
func (c clientSeen) authenticated() bool {
	switch {
	case c.hasBasic:
		return c.basicID == "agents" && c.basicSecret == clientSecret && c.formSecret == ""
	case c.assertionType != "":
		return c.formID == "agents" && c.assertionType == AssertionTypeJWT && c.assertionSubject == subjA && c.formSecret == ""
	default:
		return c.formID == "agents" && c.formSecret == clientSecret
	}
}

func (a *authServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/x-www-form-urlencoded" || r.ParseForm() != nil {
		oauthErrorBody(w, 400, "invalid_request", "POST a form")
		return
	}
	c := a.client(r)
	a.mu.Lock()
	defer a.mu.Unlock()
	switch r.URL.Path {
	case "/oauth2/token":
		a.tokAuth = append(a.tokAuth, c)
		if !c.authenticated() {
			oauthErrorBody(w, 401, "invalid_client", "client authentication failed")
			return
		}
		tok := fmt.Sprintf("at-%d-%s", len(a.minted), strings.Repeat("x", 24))
		a.minted = append(a.minted, tok)
		a.live[tok] = true
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		body := map[string]any{"access_token": tok, "token_type": "Bearer", "expires_in": 3600}
		if r.PostForm.Get("grant_type") == GrantTokenExchange {
			body["issued_token_type"] = TokenTypeAccessToken
		}
		_ = json.NewEncoder(w).Encode(body)
	case "/oauth2/revoke":
		a.revokes = append(a.revokes, revokeSeen{method: r.Method, contentType: r.Header.Get("Content-Type"), form: r.PostForm, client: c})
		switch {
		case a.status != 0:
			desc := "try later"
			if a.echo { // a careless server that echoes what it was sent
				desc += " " + r.PostForm.Get("token") + " " + c.basicSecret + c.formSecret
			}
			oauthErrorBody(w, a.status, "temporarily_unavailable", desc)
		case !c.authenticated():
			oauthErrorBody(w, 401, "invalid_client", "client authentication failed")
		case r.PostForm.Get("token") == "":
			oauthErrorBody(w, 400, "invalid_request", "token is required")
		default:
			delete(a.live, r.PostForm.Get("token")) // §2.2: 200 for an unknown token too
			w.WriteHeader(http.StatusOK)
		}
	default:
		http.NotFound(w, r)
	}
}

func (a *authServer) revocations() []revokeSeen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.revokes)
}

func (a *authServer) isLive(tok string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.live[tok]
}

func (a *authServer) lastTokenAuth() clientSeen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.tokAuth[len(a.tokAuth)-1]
}

// revocationCase is one client authentication style, built from configuration as a sidecar
// builds it.
type revocationCase struct {
	name string
	cred func(a *authServer, secretFile string) config.Credential
}

var revocationCases = []revocationCase{
	{"oauth2 client_secret_basic", func(a *authServer, sf string) config.Credential {
		return config.Credential{OAuth2: &config.OAuth2{TokenURL: a.tokenURL(), RevocationURL: a.revokeURL(), ClientID: "agents",
			ClientSecretFile: sf, AuthStyle: config.AuthStyleBasic, CAFile: a.ca}}
	}},
	{"oauth2 client_secret_post", func(a *authServer, sf string) config.Credential {
		return config.Credential{OAuth2: &config.OAuth2{TokenURL: a.tokenURL(), RevocationURL: a.revokeURL(), ClientID: "agents",
			ClientSecretFile: sf, AuthStyle: config.AuthStylePost, CAFile: a.ca}}
	}},
	{"oauth2 private_key_jwt (JWT-SVID)", func(a *authServer, _ string) config.Credential {
		return config.Credential{OAuth2: &config.OAuth2{TokenURL: a.tokenURL(), RevocationURL: a.revokeURL(), ClientID: "agents",
			ClientAssertion: &config.TokenSource{JWTSVID: &config.JWTSVID{Audience: a.tokenURL()}}, CAFile: a.ca}}
	}},
	{"token_exchange client_secret_basic", func(a *authServer, sf string) config.Credential {
		return config.Credential{TokenExchange: &config.TokenExchange{TokenURL: a.tokenURL(), RevocationURL: a.revokeURL(), ClientID: "agents",
			ClientSecretFile: sf, AuthStyle: config.AuthStyleBasic, CAFile: a.ca,
			SubjectToken: &config.TokenSource{JWTSVID: &config.JWTSVID{Audience: "https://idp.example.com"}}}}
	}},
}

func TestOAuthRevocation_DroppedTokensAreRevokedPerRFC7009WithTheTokenEndpointsClientAuth(t *testing.T) {
	for _, tc := range revocationCases {
		t.Run(tc.name, func(t *testing.T) {
			svids := newSVIDIssuer(t, subjA)
			a := newAuthServer(t, svids)
			p, err := NewProvider("idp", tc.cred(a, writeSecret(t, clientSecret)), testDeps(svids))
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := p.(Revoker); !ok {
				t.Fatalf("%T with revocation_url is not a Revoker", p)
			}
			m := NewManager(map[string]Provider{"idp": p}, Options{})

			// A Revocation of the workload drops its token (ForgetSubject) and revokes it.
			first := get(t, m, Request{Name: "idp", Subject: subjA})
			tokenAuth := a.lastTokenAuth()
			if !tokenAuth.authenticated() {
				t.Fatalf("token endpoint saw %+v", tokenAuth)
			}
			if n := m.ForgetSubject(subjA); n != 1 {
				t.Fatalf("ForgetSubject dropped %d tokens", n)
			}
			m.waitBackground()
			revs := a.revocations()
			if len(revs) != 1 {
				t.Fatalf("%d revocation requests; want 1", len(revs))
			}
			r := revs[0]
			if r.method != http.MethodPost || r.contentType != "application/x-www-form-urlencoded" {
				t.Errorf("revocation request %s %s; want a form POST", r.method, r.contentType)
			}
			wantForm := url.Values{"token": {first.Value()}, "token_type_hint": {"access_token"}}
			for k, v := range tokenAuth.formFields() {
				wantForm[k] = v
			}
			if got := withoutAssertion(r.form); !equalForms(got, wantForm) {
				t.Errorf("revocation form %v; want exactly %v", got, wantForm)
			}
			if r.client != tokenAuth {
				t.Errorf("revocation client auth %+v; want the token endpoint's %+v", r.client, tokenAuth)
			}
			if a.isLive(first.Value()) {
				t.Errorf("the dropped token is still live at the server")
			}

			// A Revocation naming the credential drops it for everyone (Forget), and Close
			// revokes what is left.
			second := get(t, m, Request{Name: "idp", Subject: subjA})
			m.Forget("idp")
			m.waitBackground()
			third := get(t, m, Request{Name: "idp", Subject: subjA})
			if err := m.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			var revoked []string
			for _, r := range a.revocations() {
				revoked = append(revoked, r.form.Get("token"))
			}
			if want := []string{first.Value(), second.Value(), third.Value()}; !slices.Equal(revoked, want) {
				t.Errorf("revoked %q; want %q", revoked, want)
			}
			if a.isLive(second.Value()) || a.isLive(third.Value()) {
				t.Errorf("tokens still live at the server after Forget and Close")
			}
		})
	}
}

// formFields are the client authentication fields of the form (what client_secret_post and an
// assertion put there), without the assertion itself: each request mints its own.
func (c clientSeen) formFields() url.Values {
	v := url.Values{}
	if c.formID != "" {
		v.Set("client_id", c.formID)
	}
	if c.formSecret != "" {
		v.Set("client_secret", c.formSecret)
	}
	if c.assertionType != "" {
		v.Set("client_assertion_type", c.assertionType)
	}
	return v
}

func withoutAssertion(f url.Values) url.Values {
	g := url.Values{}
	for k, v := range f {
		if k != "client_assertion" {
			g[k] = v
		}
	}
	return g
}

func equalForms(a, b url.Values) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			return false
		}
	}
	return true
}

func TestOAuthRevocation_A503IsLoggedWithoutSecretsAndBreaksNothing(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	a := newAuthServer(t, svids)
	a.status, a.echo = http.StatusServiceUnavailable, true
	p, err := NewProvider("idp", revocationCases[0].cred(a, writeSecret(t, clientSecret)), testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	m := NewManager(map[string]Provider{"idp": p}, Options{Logger: zap.New(core)})
	first := get(t, m, Request{Name: "idp", Subject: subjA})
	m.ForgetSubject(subjA)
	m.waitBackground()

	// The token stays servable from the server's side (§2.2.1), escrow no longer serves it, and
	// the next request gets a new one.
	second := get(t, m, Request{Name: "idp", Subject: subjA})
	if second.Value() == first.Value() {
		t.Errorf("the dropped token was served again")
	}
	if err := m.Close(context.Background()); err != nil {
		t.Fatalf("Close after failed revocations: %v", err)
	}
	if n := len(a.revocations()); n != 2 {
		t.Errorf("%d revocation requests; want 2 (the drop and Close)", n)
	}
	failed := logs.FilterMessage("credential revocation failed; it stays valid until it expires").All()
	if len(failed) != 2 {
		t.Fatalf("%d revocation failures logged; want 2", len(failed))
	}
	if e := failed[0].ContextMap()["error"]; !strings.Contains(fmt.Sprint(e), "revocation endpoint answered 503") {
		t.Errorf("logged error %q; want the 503", e)
	}
	for _, e := range logs.All() {
		line := fmt.Sprintf("%s %v", e.Message, e.ContextMap())
		assertNoSecrets(t, "log line", line, first.Value(), second.Value(), clientSecret)
	}
}

func TestOAuthRevocation_ErrorsNameTheAnswerNeverTheTokenOrSecret(t *testing.T) {
	a := newAuthServer(t, nil)
	a.status, a.echo = http.StatusBadRequest, true
	sf := writeSecret(t, clientSecret)
	for _, style := range []string{"basic", "post"} {
		p, err := NewOAuth2(OAuth2Options{TokenURL: a.tokenURL(), RevocationURL: a.revokeURL(),
			ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: sf, AuthStyle: style}, CAFile: a.ca}, testDeps(nil))
		if err != nil {
			t.Fatal(err)
		}
		tok, err := p.Fetch(context.Background(), FetchArgs{Name: "idp"})
		if err != nil {
			t.Fatal(err)
		}
		err = p.(Revoker).Revoke(context.Background(), tok)
		var ee *EndpointError
		if !errors.As(err, &ee) || ee.Status != 400 || ee.Code != "temporarily_unavailable" {
			t.Fatalf("%s: error %v; want an EndpointError with the status and code", style, err)
		}
		assertNoSecrets(t, style+" revocation error", err.Error(), tok.Value(), clientSecret)
	}

	// Without the ca_file the private CA is not trusted: the revocation endpoint is reached
	// through the same client as the token endpoint.
	p, _ := NewOAuth2(OAuth2Options{TokenURL: a.tokenURL(), RevocationURL: a.revokeURL(),
		ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: sf}}, testDeps(nil))
	tok := NewToken("idp", "at-unverified-"+strings.Repeat("y", 20), time.Time{})
	if err := p.(Revoker).Revoke(context.Background(), tok); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("without ca_file: %v; want a TLS verification failure", err)
	} else {
		assertNoSecrets(t, "transport error", err.Error(), tok.Value(), clientSecret)
	}
}

func TestOAuthRevocation_RedirectsAreNotFollowed(t *testing.T) {
	var calls []string
	var mu sync.Mutex
	srv, ca := tlsStandIn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		calls = append(calls, r.URL.Path)
		mu.Unlock()
		http.Redirect(w, r, "/elsewhere", http.StatusTemporaryRedirect) // 307 resends the body
	}))
	p, err := NewOAuth2(OAuth2Options{TokenURL: srv.URL + "/token", RevocationURL: srv.URL + "/revoke",
		ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: writeSecret(t, clientSecret)}, CAFile: ca}, testDeps(nil))
	if err != nil {
		t.Fatal(err)
	}
	err = p.(Revoker).Revoke(context.Background(), NewToken("idp", "at-"+strings.Repeat("z", 24), time.Time{}))
	var ee *EndpointError
	if !errors.As(err, &ee) || ee.Status != http.StatusTemporaryRedirect {
		t.Errorf("error %v; want the 307 as an error", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(calls, []string{"/revoke"}) {
		t.Errorf("requests %q; the redirect must not be followed with the token", calls)
	}
}

func TestOAuthRevocation_WithoutRevocationURLTheProviderIsNoRevoker(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	a := newAuthServer(t, svids)
	sf := writeSecret(t, clientSecret)
	for _, tc := range revocationCases {
		c := tc.cred(a, sf)
		if c.OAuth2 != nil {
			c.OAuth2.RevocationURL = ""
		} else {
			c.TokenExchange.RevocationURL = ""
		}
		p, err := NewProvider("idp", c, testDeps(svids))
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := p.(Revoker); ok {
			t.Errorf("%s: %T is a Revoker without revocation_url", tc.name, p)
		}
		m := NewManager(map[string]Provider{"idp": p}, Options{})
		get(t, m, Request{Name: "idp", Subject: subjA})
		m.ForgetSubject(subjA)
		get(t, m, Request{Name: "idp", Subject: subjA})
		if err := m.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(a.revocations()); n != 0 {
		t.Errorf("%d revocation requests without revocation_url; want none", n)
	}
	if _, err := NewOAuth2(OAuth2Options{TokenURL: a.tokenURL(), RevocationURL: "revoke",
		ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: sf}, CAFile: a.ca}, testDeps(nil)); err == nil ||
		!strings.Contains(err.Error(), "revocation_url") {
		t.Errorf("a relative revocation_url: %v; want a refusal naming it", err)
	}
}
