package credential

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// GitHubAppOptions configures the GitHub App installation token provider.
type GitHubAppOptions struct {
	AppID          int64
	InstallationID int64
	PrivateKeyFile string            // the App's PEM private key (PKCS#1 as GitHub issues it, or PKCS#8)
	APIURL         string            // default https://api.github.com; GHES: https://HOST/api/v3
	Repositories   []string          // optional down-scope: "repo" or "owner/repo"
	Permissions    map[string]string // optional down-scope: {"contents": "read"}
	CAFile         string
}

// NewGitHubApp returns the GitHub App provider: it signs an App JWT (RS256, go-jose) and
// creates an installation access token, down-scoped to Repositories and Permissions when set
// (POST /app/installations/{installation_id}/access_tokens). Tokens are revoked on drop
// (DELETE /installation/token). Documented at
// https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app
// and https://docs.github.com/en/rest/apps/apps#create-an-installation-access-token-for-an-app.
func NewGitHubApp(o GitHubAppOptions, d Deps) (Provider, error) {
	c, err := endpointClient(d, o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("credential: github_app: %w", err)
	}
	if o.AppID <= 0 || o.InstallationID <= 0 || o.PrivateKeyFile == "" {
		return nil, errors.New("credential: github_app: app_id, installation_id and private_key_file are required")
	}
	if _, err := loadRSAKey(d, o.PrivateKeyFile); err != nil {
		return nil, fmt.Errorf("credential: github_app: %w", err)
	}
	api := strings.TrimSuffix(o.APIURL, "/")
	if api == "" {
		api = "https://api.github.com"
	}
	if u, err := url.Parse(api); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("credential: github_app: api_url %q is not an http(s) URL", o.APIURL)
	}
	body := map[string]any{}
	if len(o.Repositories) > 0 {
		names := make([]string, 0, len(o.Repositories))
		for _, r := range o.Repositories {
			// The API takes names within the installation's account: "owner/repo" → "repo".
			names = append(names, r[strings.LastIndexByte(r, '/')+1:])
		}
		slices.Sort(names)
		body["repositories"] = slices.Compact(names)
	}
	if len(o.Permissions) > 0 {
		body["permissions"] = o.Permissions
	}
	b, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("credential: github_app: %w", err)
	}
	return &githubProvider{o: o, api: api, body: b, client: c, now: nowFunc(d), d: d}, nil
}

type githubProvider struct {
	o      GitHubAppOptions
	api    string
	body   []byte // the down-scope, JSON
	client *http.Client
	now    func() time.Time
	d      Deps // ReadFile reads the private key
}

func (p *githubProvider) Kind() string { return "github_app" }

// appJWT returns the App's JWT: iss = the App ID, iat 60 s in the past against clock drift (as
// GitHub recommends), exp 9 minutes ahead (GitHub refuses more than 10 minutes).
func (p *githubProvider) appJWT() (string, error) {
	key, err := loadRSAKey(p.d, p.o.PrivateKeyFile)
	if err != nil {
		return "", err
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", fmt.Errorf("app JWT: %w", err)
	}
	now := p.now()
	return jwt.Signed(sig).Claims(jwt.Claims{
		Issuer:   strconv.FormatInt(p.o.AppID, 10),
		IssuedAt: jwt.NewNumericDate(now.Add(-60 * time.Second)),
		Expiry:   jwt.NewNumericDate(now.Add(9 * time.Minute)),
	}).Serialize()
}

func (p *githubProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	appJWT, err := p.appJWT()
	if err != nil {
		return Token{}, err
	}
	u := fmt.Sprintf("%s/app/installations/%d/access_tokens", p.api, p.o.InstallationID)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(p.body))
	if err != nil {
		return Token{}, err
	}
	githubHeaders(req, appJWT)
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		return Token{}, fmt.Errorf("github: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return Token{}, fmt.Errorf("github: %w", err)
	}
	if resp.StatusCode != http.StatusCreated {
		return Token{}, githubError(resp.StatusCode, b, appJWT)
	}
	var out struct {
		Token     string    `json:"token"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	if err := json.Unmarshal(b, &out); err != nil || out.Token == "" || out.ExpiresAt.IsZero() {
		return Token{}, errors.New("github: the access token response has no token or expires_at")
	}
	return NewToken(args.Name, out.Token, out.ExpiresAt), nil
}

// Revoke revokes an installation token (DELETE /installation/token, authenticated by the token
// itself): https://docs.github.com/en/rest/apps/installations#revoke-an-installation-access-token
func (p *githubProvider) Revoke(ctx context.Context, tok Token) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, p.api+"/installation/token", nil)
	if err != nil {
		return err
	}
	githubHeaders(req, tok.Value())
	resp, err := p.client.Do(req)
	if err != nil {
		return fmt.Errorf("github: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if resp.StatusCode != http.StatusNoContent {
		return githubError(resp.StatusCode, b, tok.Value())
	}
	return nil
}

func githubHeaders(req *http.Request, bearer string) {
	req.Header.Set("Accept", "application/vnd.github+json")
	req.Header.Set("X-GitHub-Api-Version", "2022-11-28")
	req.Header.Set("Authorization", "Bearer "+bearer)
}

// githubError names the status and GitHub's message ({"message": ..., "documentation_url": ...}).
func githubError(status int, body []byte, secrets ...string) error {
	var e struct {
		Message string `json:"message"`
	}
	_ = json.Unmarshal(body, &e)
	msg := fmt.Sprintf("github answered %d", status)
	if e.Message != "" {
		msg += ": " + scrub(e.Message, secrets...)
	}
	return &EndpointError{Status: status, msg: msg}
}

// loadRSAKey reads an RSA private key in PEM, PKCS#1 or PKCS#8.
func loadRSAKey(d Deps, path string) (*rsa.PrivateKey, error) {
	s, err := readSecretFile(d, path)
	if err != nil {
		return nil, fmt.Errorf("private_key_file: %w", err)
	}
	blk, _ := pem.Decode([]byte(s))
	if blk == nil {
		return nil, fmt.Errorf("private_key_file %s: no PEM block", path)
	}
	if k, err := x509.ParsePKCS1PrivateKey(blk.Bytes); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("private_key_file %s: not an RSA private key", path)
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("private_key_file %s: a %T, not an RSA key (GitHub Apps sign with RS256)", path, k)
	}
	return rk, nil
}
