package credential

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/escrowproxy/escrow/config"
)

// The token endpoint stand-in follows RFC 6749: §4.4.2 (client credentials request:
// application/x-www-form-urlencoded POST, grant_type=client_credentials, scope), §2.3.1 (client
// secret in HTTP basic auth, form-encoded id and secret, or in the body), §5.1 (JSON answer
// with access_token, token_type, expires_in) and §5.2 (error answer: 400/401 with error and
// error_description); RFC 7523 §2.2 (client_assertion_type jwt-bearer, client_assertion a JWT
// whose aud is the token endpoint) and RFC 8693 §2.1 and §2.2.1 (token exchange request and
// answer with issued_token_type).

const (
	clientSecret = "cs-0d9e8f7a6b5c4d3e2f1a"
	mintedToken  = "at-4f3e2d1c0b9a8f7e6d5c4b3a"
)

type tokenRequest struct {
	form         url.Values
	basicID      string
	basicSecret  string
	hasBasic     bool
	contentType  string
	method, path string
}

// oauthStandIn is a token endpoint; check returns "" to accept a request, or an error code.
func oauthStandIn(t *testing.T, check func(r tokenRequest) (code, desc string)) (url string, caFile string, calls *atomic.Int32, last *atomic.Pointer[tokenRequest]) {
	calls, last = new(atomic.Int32), new(atomic.Pointer[tokenRequest])
	srv, ca := tlsStandIn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if err := r.ParseForm(); err != nil {
			oauthErrorBody(w, 400, "invalid_request", "bad form")
			return
		}
		tr := tokenRequest{form: r.PostForm, contentType: r.Header.Get("Content-Type"), method: r.Method, path: r.URL.Path}
		tr.basicID, tr.basicSecret, tr.hasBasic = r.BasicAuth()
		last.Store(&tr)
		if r.Method != http.MethodPost || tr.contentType != "application/x-www-form-urlencoded" {
			oauthErrorBody(w, 400, "invalid_request", "POST a form")
			return
		}
		if code, desc := check(tr); code != "" {
			status := 400
			if code == "invalid_client" {
				status = 401
			}
			oauthErrorBody(w, status, code, desc)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		body := map[string]any{"access_token": mintedToken, "token_type": "Bearer", "expires_in": 3600}
		if tr.form.Get("grant_type") == GrantTokenExchange {
			body["issued_token_type"] = TokenTypeAccessToken
		}
		json.NewEncoder(w).Encode(body)
	}))
	return srv.URL + "/oauth2/token", ca, calls, last
}

func TestOAuth2_ClientSecretBasicPerRFC6749(t *testing.T) {
	u, ca, calls, last := oauthStandIn(t, func(r tokenRequest) (string, string) {
		if !r.hasBasic || r.basicID != "agents" || r.basicSecret != clientSecret {
			return "invalid_client", "client authentication failed"
		}
		if r.form.Get("grant_type") != "client_credentials" || r.form.Get("scope") != "read write" {
			return "invalid_request", "grant_type or scope"
		}
		if r.form.Has("client_secret") {
			return "invalid_request", "secret sent twice"
		}
		return "", ""
	})
	p, err := NewOAuth2(OAuth2Options{TokenURL: u, ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: writeSecret(t, clientSecret), AuthStyle: "basic"},
		Scopes: []string{"read", "write"}, Audience: "https://api.example.com", Resource: "https://api.example.com/v1", CAFile: ca}, testDeps(nil))
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "idp", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != mintedToken || tok.ExpiresAt().Before(before.Add(59*time.Minute)) || tok.ExpiresAt().After(time.Now().Add(time.Hour)) {
		t.Errorf("token %v expires %v; want the minted token for expires_in=3600", tok, tok.ExpiresAt())
	}
	if f := last.Load().form; f.Get("audience") != "https://api.example.com" || f.Get("resource") != "https://api.example.com/v1" {
		t.Errorf("audience/resource not sent: %v", f)
	}
	if calls.Load() != 1 || KindOf(p) != "oauth2" {
		t.Errorf("calls %d kind %s", calls.Load(), KindOf(p))
	}
}

func TestOAuth2_ClientSecretPostPerRFC6749(t *testing.T) {
	u, ca, _, _ := oauthStandIn(t, func(r tokenRequest) (string, string) {
		if r.hasBasic || r.form.Get("client_id") != "agents" || r.form.Get("client_secret") != clientSecret {
			return "invalid_client", "want client_secret_post"
		}
		return "", ""
	})
	p, err := NewOAuth2(OAuth2Options{TokenURL: u, ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: writeSecret(t, clientSecret), AuthStyle: "post"}, CAFile: ca}, testDeps(nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Fetch(context.Background(), FetchArgs{Name: "idp"}); err != nil {
		t.Fatal(err)
	}
}

func TestOAuth2_ClientAssertionIsTheCallersJWTSVIDPerRFC7523(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	var u string
	u, ca, _, _ := oauthStandIn(t, func(r tokenRequest) (string, string) {
		if r.hasBasic || r.form.Has("client_secret") {
			return "invalid_request", "no secret expected"
		}
		if r.form.Get("client_assertion_type") != AssertionTypeJWT || r.form.Get("client_id") != "agents" {
			return "invalid_client", "assertion type"
		}
		if sub, why := svids.verify(r.form.Get("client_assertion"), u); sub != subjA {
			return "invalid_client", "assertion: " + why
		}
		return "", ""
	})
	p, err := NewOAuth2(OAuth2Options{TokenURL: u, ClientAuth: ClientAuth{ClientID: "agents", AssertionAudience: u}, CAFile: ca}, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Fetch(context.Background(), FetchArgs{Name: "idp", Subject: subjA}); err != nil {
		t.Fatal(err)
	}
	// The SVID the agent holds is for A; a fetch under B's key must not mint with it.
	_, err = p.Fetch(context.Background(), FetchArgs{Name: "idp", Subject: subjB})
	if err == nil || !strings.Contains(err.Error(), "not the caller") {
		t.Errorf("fetch for another subject: %v; want a refusal", err)
	}
}

func TestOAuth2_ErrorsFollowRFC6749Section5_2WithoutSecrets(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	u, ca, _, _ := oauthStandIn(t, func(r tokenRequest) (string, string) {
		// A careless IdP that echoes what it got.
		return "invalid_client", "unknown secret " + r.basicSecret + " / " + r.form.Get("subject_token")
	})
	p, _ := NewOAuth2(OAuth2Options{TokenURL: u, ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: writeSecret(t, clientSecret)}, CAFile: ca}, testDeps(nil))
	_, err := p.Fetch(context.Background(), FetchArgs{Name: "idp"})
	var ee *EndpointError
	if !errors.As(err, &ee) || ee.Status != 401 || ee.Code != "invalid_client" {
		t.Fatalf("error %v; want an EndpointError 401 invalid_client", err)
	}
	assertNoSecrets(t, "oauth2 error", err.Error(), clientSecret)

	x, _ := NewTokenExchange(TokenExchangeOptions{TokenURL: u, SubjectTokenAudience: "idp", CAFile: ca}, testDeps(svids))
	_, err = x.Fetch(context.Background(), FetchArgs{Name: "x", Subject: subjA})
	if err == nil || !strings.Contains(err.Error(), "invalid_client") {
		t.Fatalf("error %v", err)
	}
	assertNoSecrets(t, "token exchange error", fmt.Sprint(err), svids.issuedTokens()...)
}

func TestOAuth2_CAFileIsRequiredForAPrivateCA(t *testing.T) {
	u, _, _, _ := oauthStandIn(t, func(tokenRequest) (string, string) { return "", "" })
	p, _ := NewOAuth2(OAuth2Options{TokenURL: u, ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: writeSecret(t, clientSecret)}}, testDeps(nil))
	if _, err := p.Fetch(context.Background(), FetchArgs{Name: "idp"}); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("without ca_file: %v; want a TLS verification failure", err)
	}
	if _, err := NewOAuth2(OAuth2Options{TokenURL: u, CAFile: writeSecret(t, "not a pem")}, testDeps(nil)); err == nil {
		t.Errorf("a ca_file without a certificate was accepted")
	}
	if _, err := NewOAuth2(OAuth2Options{TokenURL: u}, Deps{}); err == nil || !strings.Contains(err.Error(), "HTTP client") {
		t.Errorf("no HTTP client: %v; want a refusal (never a default client)", err)
	}
}

func TestTokenExchange_SendsTheJWTSVIDAsSubjectTokenPerRFC8693(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	u, ca, _, last := oauthStandIn(t, func(r tokenRequest) (string, string) {
		f := r.form
		if f.Get("grant_type") != GrantTokenExchange || f.Get("subject_token_type") != TokenTypeJWT ||
			f.Get("requested_token_type") != TokenTypeAccessToken {
			return "invalid_request", "token exchange fields"
		}
		if sub, why := svids.verify(f.Get("subject_token"), "https://idp.example.com"); sub != subjA {
			return "invalid_grant", "subject token: " + why
		}
		if !r.hasBasic || r.basicSecret != clientSecret {
			return "invalid_client", "client auth"
		}
		return "", ""
	})
	p, err := NewTokenExchange(TokenExchangeOptions{TokenURL: u,
		ClientAuth:           ClientAuth{ClientID: "agents", ClientSecretFile: writeSecret(t, clientSecret)},
		SubjectTokenAudience: "https://idp.example.com", Audience: "https://api.example.com", Scopes: []string{"openid"},
		Extra: map[string]string{"connector_id": "spiffe"}, CAFile: ca}, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "exchange", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	f := last.Load().form
	if tok.Value() != mintedToken || f.Get("connector_id") != "spiffe" || f.Get("audience") != "https://api.example.com" || f.Get("scope") != "openid" {
		t.Errorf("token %v, form %v", tok, f)
	}
	if KindOf(p) != "token_exchange" {
		t.Errorf("kind %s", KindOf(p))
	}
}

func TestNewProvider_BuildsEveryKindFromConfig(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	key := writeRSAKey(t)
	d := testDeps(svids)
	jwtSrc := &config.TokenSource{JWTSVID: &config.JWTSVID{Audience: "aud"}}
	for kind, c := range map[string]config.Credential{
		"static":         {Static: &config.Static{Env: "HOME"}},
		"oauth2":         {OAuth2: &config.OAuth2{TokenURL: "https://idp.example.com/token", ClientID: "a", ClientAssertion: jwtSrc}},
		"token_exchange": {TokenExchange: &config.TokenExchange{TokenURL: "https://idp.example.com/token", SubjectToken: jwtSrc}},
		"aws":            {AWS: &config.AWS{RoleARN: "arn:aws:iam::1:role/r", WebIdentity: jwtSrc, Region: "us-east-1", Duration: config.Duration(time.Hour)}},
		"github_app":     {GitHubApp: &config.GitHubApp{AppID: 1, InstallationID: 2, PrivateKeyFile: key, APIURL: "https://api.github.com"}},
		"vault": {Vault: &config.Vault{Address: "https://vault.example.com:8200",
			Auth:   config.VaultAuth{JWT: &config.VaultJWT{Mount: "jwt", Role: "agent", JWTSVID: &config.JWTSVID{Audience: "vault"}}},
			Secret: config.VaultSecret{KV2: &config.VaultKV2{Mount: "secret", Path: "p", Field: "f"}}}},
		"gcp":   {GCP: &config.GCP{Audience: "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x", SubjectToken: jwtSrc}},
		"azure": {Azure: &config.Azure{TenantID: "t", ClientID: "c", Scope: "https://management.azure.com/.default"}},
	} {
		p, err := NewProvider(kind+"-cred", c, d)
		if err != nil {
			t.Errorf("%s: %v", kind, err)
			continue
		}
		if KindOf(p) != kind {
			t.Errorf("%s: KindOf = %s", kind, KindOf(p))
		}
	}
	_, err := NewProvider("x", config.Credential{TokenExchange: &config.TokenExchange{TokenURL: "https://idp.example.com/token", SubjectToken: jwtSrc}}, testDeps(nil))
	if err == nil || !strings.Contains(err.Error(), "credential: x: token_exchange") {
		t.Errorf("token_exchange without a JWT source: %v; want a refusal naming the credential", err)
	}
}

// TestManager_LogsOfFailingAndSucceedingFetchesHoldNoSecret runs the Manager's logging at
// debug level over an IdP that echoes what it receives, and searches every line for the
// client secret, the JWT-SVIDs and the minted token.
func TestManager_LogsOfFailingAndSucceedingFetchesHoldNoSecret(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	var fail atomic.Bool
	fail.Store(true)
	u, ca, _, _ := oauthStandIn(t, func(r tokenRequest) (string, string) {
		if fail.Load() {
			return "invalid_grant", "bad grant " + r.basicSecret + " " + r.form.Get("subject_token")
		}
		return "", ""
	})
	p, _ := NewTokenExchange(TokenExchangeOptions{TokenURL: u, SubjectTokenAudience: "idp",
		ClientAuth: ClientAuth{ClientID: "agents", ClientSecretFile: writeSecret(t, clientSecret)}, CAFile: ca}, testDeps(svids))
	core, logs := observer.New(zapcore.DebugLevel)
	clock := newFakeClock()
	m := NewManager(map[string]Provider{"x": p}, Options{Logger: zap.New(core), Now: clock.Now})
	r := Request{Name: "x", Subject: subjA}
	if _, err := m.Get(context.Background(), r); err == nil {
		t.Fatal("no error from a refusing IdP")
	} else {
		assertNoSecrets(t, "Get's error", err.Error(), append(svids.issuedTokens(), clientSecret)...)
	}
	fail.Store(false)
	clock.Advance(time.Minute)
	tok := get(t, m, r)
	m.ForgetSubject(subjA)
	m.waitBackground()
	if logs.Len() < 2 {
		t.Fatalf("%d log lines; want the failure and the fetch", logs.Len())
	}
	for _, e := range logs.All() {
		line := fmt.Sprintf("%s %v", e.Message, e.ContextMap())
		assertNoSecrets(t, "log line", line, append(svids.issuedTokens(), clientSecret, tok.Value())...)
	}
}
