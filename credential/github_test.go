package credential

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// The GitHub stand-in follows GitHub's REST API documentation:
//   - "Generating a JSON Web Token (JWT) for a GitHub App": RS256, iss = the App's ID (or client
//     ID), iat, exp no more than 10 minutes after iat
//     (https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app);
//   - "Create an installation access token for an app": POST
//     /app/installations/{installation_id}/access_tokens, body {repositories, permissions}, 201
//     with {token, expires_at, permissions, repository_selection}; 401 {"message": "A JSON web
//     token could not be decoded", "documentation_url"} for a bad JWT; 404 for an unknown
//     installation; 422 for a down-scope beyond the installation's
//     (https://docs.github.com/en/rest/apps/apps#create-an-installation-access-token-for-an-app);
//   - "Revoke an installation access token": DELETE /installation/token, 204
//     (https://docs.github.com/en/rest/apps/installations#revoke-an-installation-access-token).

const ghAppID, ghInstallation = 123456, 7890

func writeRSAKey(t testing.TB) string {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "app.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func readRSAPublic(t testing.TB, path string) *rsa.PublicKey {
	k, err := loadRSAKey(Deps{}, path)
	if err != nil {
		t.Fatal(err)
	}
	return &k.PublicKey
}

type githubStandIn struct {
	t       *testing.T
	pub     *rsa.PublicKey
	mu      sync.Mutex
	tokens  map[string]bool // live installation tokens
	bodies  []map[string]any
	revoked []string
	n       int
}

func ghError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"message":%q,"documentation_url":"https://docs.github.com/rest","status":"%d"}`, msg, status)
}

func (g *githubStandIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Accept") != "application/vnd.github+json" {
		ghError(w, 415, "Unsupported 'Accept' header")
		return
	}
	bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	switch {
	case r.Method == http.MethodPost && r.URL.Path == fmt.Sprintf("/api/v3/app/installations/%d/access_tokens", ghInstallation):
		if !ok || !g.validAppJWT(bearer) {
			ghError(w, 401, "A JSON web token could not be decoded")
			return
		}
		var body map[string]any
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			ghError(w, 400, "Problems parsing JSON")
			return
		}
		if perms, _ := body["permissions"].(map[string]any); perms["administration"] != nil {
			ghError(w, 422, "The permissions requested are not granted to this installation.")
			return
		}
		g.mu.Lock()
		g.n++
		tok := fmt.Sprintf("ghs_%030d", g.n)
		g.tokens[tok] = true
		g.bodies = append(g.bodies, body)
		g.mu.Unlock()
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(map[string]any{
			"token": tok, "expires_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
			"permissions": body["permissions"], "repository_selection": "selected",
		})
	case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/api/v3/app/installations/"):
		ghError(w, 404, "Not Found")
	case r.Method == http.MethodDelete && r.URL.Path == "/api/v3/installation/token":
		g.mu.Lock()
		defer g.mu.Unlock()
		if !ok || !g.tokens[bearer] {
			ghError(w, 401, "Bad credentials")
			return
		}
		delete(g.tokens, bearer)
		g.revoked = append(g.revoked, bearer)
		w.WriteHeader(http.StatusNoContent)
	default:
		ghError(w, 404, "Not Found")
	}
}

// validAppJWT checks what GitHub checks: the RS256 signature with the App's public key, iss =
// the App ID, and an iat..exp window of at most 10 minutes that includes now (iat may be up to
// 60 s in the past for clock drift).
func (g *githubStandIn) validAppJWT(s string) bool {
	p, err := jwt.ParseSigned(s, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		g.t.Logf("app JWT: %v", err)
		return false
	}
	var c jwt.Claims
	if err := p.Claims(g.pub, &c); err != nil {
		g.t.Logf("app JWT signature: %v", err)
		return false
	}
	now := time.Now()
	if c.Issuer != fmt.Sprint(ghAppID) || c.IssuedAt == nil || c.Expiry == nil {
		g.t.Logf("app JWT claims: %+v", c)
		return false
	}
	iat, exp := c.IssuedAt.Time(), c.Expiry.Time()
	if exp.Sub(iat) > 10*time.Minute || iat.After(now) || !exp.After(now) || now.Sub(iat) > 2*time.Minute {
		g.t.Logf("app JWT window iat=%v exp=%v", iat, exp)
		return false
	}
	return true
}

func newGitHub(t *testing.T, perms map[string]string) (*githubStandIn, Provider) {
	key := writeRSAKey(t)
	g := &githubStandIn{t: t, pub: readRSAPublic(t, key), tokens: map[string]bool{}}
	srv, ca := tlsStandIn(t, g)
	p, err := NewGitHubApp(GitHubAppOptions{AppID: ghAppID, InstallationID: ghInstallation, PrivateKeyFile: key,
		APIURL: srv.URL + "/api/v3", Repositories: []string{"acme/widgets", "gadgets"}, Permissions: perms, CAFile: ca}, testDeps(nil))
	if err != nil {
		t.Fatal(err)
	}
	return g, p
}

func TestGitHubApp_MintsADownScopedInstallationToken(t *testing.T) {
	g, p := newGitHub(t, map[string]string{"contents": "read"})
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "github", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok.Value(), "ghs_") || time.Until(tok.ExpiresAt()) < 59*time.Minute {
		t.Errorf("token %v expiring %v", tok, tok.ExpiresAt())
	}
	g.mu.Lock()
	body := g.bodies[0]
	g.mu.Unlock()
	if fmt.Sprint(body["repositories"]) != "[gadgets widgets]" || fmt.Sprint(body["permissions"]) != "map[contents:read]" {
		t.Errorf("down-scope sent: %v", body)
	}
	if tok.ID() == "" || strings.Contains(tok.ID(), tok.Value()) {
		t.Errorf("credential_id %q must be a hash, not the token", tok.ID())
	}
}

func TestGitHubApp_RevokesOnDropAndOnClose(t *testing.T) {
	g, p := newGitHub(t, nil)
	m := NewManager(map[string]Provider{"github": p}, Options{})
	a := get(t, m, Request{Name: "github", Subject: subjA})
	b := get(t, m, Request{Name: "github", Subject: subjB})
	m.ForgetSubject(subjA)
	m.waitBackground()
	g.mu.Lock()
	revoked := strings.Join(g.revoked, ",")
	g.mu.Unlock()
	if revoked != a.Value() {
		t.Errorf("revoked %q after dropping A; want only A's token", revoked)
	}
	if err := m.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.revoked) != 2 || g.revoked[1] != b.Value() || len(g.tokens) != 0 {
		t.Errorf("after Close: revoked %q, live %v", g.revoked, g.tokens)
	}
}

func TestGitHubApp_ErrorsNameGitHubsMessage(t *testing.T) {
	_, p := newGitHub(t, map[string]string{"administration": "write"})
	_, err := p.Fetch(context.Background(), FetchArgs{Name: "github"})
	var ee *EndpointError
	if !errors.As(err, &ee) || ee.Status != 422 || !strings.Contains(err.Error(), "not granted") {
		t.Errorf("error %v; want 422 with GitHub's message", err)
	}

	// A key the App does not have: GitHub answers 401.
	g, _ := newGitHub(t, nil)
	srv, ca := tlsStandIn(t, g)
	other, _ := NewGitHubApp(GitHubAppOptions{AppID: ghAppID, InstallationID: ghInstallation, PrivateKeyFile: writeRSAKey(t),
		APIURL: srv.URL + "/api/v3", CAFile: ca}, testDeps(nil))
	_, err = other.Fetch(context.Background(), FetchArgs{Name: "github"})
	if !errors.As(err, &ee) || ee.Status != 401 || !strings.Contains(err.Error(), "could not be decoded") {
		t.Errorf("wrong key: %v; want 401", err)
	}
	if _, err := NewGitHubApp(GitHubAppOptions{AppID: 1, InstallationID: 1, PrivateKeyFile: writeSecret(t, "junk")}, testDeps(nil)); err == nil {
		t.Errorf("a key file without PEM was accepted")
	}
}
