package credential

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/config"
)

// The Vault stand-in follows Vault's HTTP API documentation:
//   - JWT auth login, POST /v1/auth/<mount>/login {role, jwt} → {"auth": {"client_token",
//     "lease_duration", ...}} (https://developer.hashicorp.com/vault/api-docs/auth/jwt#jwt-login);
//     Kubernetes auth the same at its mount
//     (https://developer.hashicorp.com/vault/api-docs/auth/kubernetes#login);
//   - KV v2 read, GET /v1/<mount>/data/<path> → {"data": {"data": {...}, "metadata": {...}}}
//     (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2#read-secret-version);
//   - a dynamic secret, GET /v1/database/creds/<role> → {"lease_id", "lease_duration",
//     "data": {"username", "password"}}
//     (https://developer.hashicorp.com/vault/api-docs/secret/databases#generate-credentials);
//   - POST /v1/auth/token/revoke-self → 204, revoking the token and its leases
//     (https://developer.hashicorp.com/vault/api-docs/auth/token#revoke-a-token-self);
//   - errors as {"errors": [...]} with 400/403 (https://developer.hashicorp.com/vault/api-docs#error-response),
//     and every request authenticated by X-Vault-Token.

const vaultKVValue = "sk-from-vault-9f8e7d6c5b4a"

type vaultStandIn struct {
	t     *testing.T
	svids *svidIssuer

	mu      sync.Mutex
	tokens  map[string][]string // live client token → its leases
	leases  map[string]bool     // live leases
	n       int
	logins  int
	revoked []string
}

func vaultErr(w http.ResponseWriter, status int, msgs ...string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"errors": msgs})
}

func (v *vaultStandIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	v.mu.Lock()
	defer v.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	// Vault treats PUT and POST alike (its client writes with PUT).
	if (r.Method == http.MethodPost || r.Method == http.MethodPut) && r.URL.Path == "/v1/auth/jwt/login" {
		var body struct{ Role, JWT string }
		json.NewDecoder(r.Body).Decode(&body)
		if body.Role != "agent" {
			vaultErr(w, 400, fmt.Sprintf("role %q could not be found", body.Role))
			return
		}
		if sub, why := v.svids.verify(body.JWT, "vault"); sub == "" {
			vaultErr(w, 400, "error validating token: "+why)
			return
		}
		v.n++
		v.logins++
		tok := fmt.Sprintf("hvs.CAESI%020d", v.n)
		v.tokens[tok] = nil
		json.NewEncoder(w).Encode(map[string]any{"request_id": "r", "lease_id": "", "renewable": false, "lease_duration": 0, "data": nil,
			"auth": map[string]any{"client_token": tok, "accessor": "acc", "policies": []string{"default", "agent"},
				"metadata": map[string]string{"role": "agent"}, "lease_duration": 3600, "renewable": true, "token_type": "service", "orphan": true}})
		return
	}
	tok := r.Header.Get("X-Vault-Token")
	leases, live := v.tokens[tok]
	if !live {
		vaultErr(w, 403, "permission denied")
		return
	}
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/v1/secret/data/agents/openai":
		json.NewEncoder(w).Encode(map[string]any{"request_id": "r", "lease_id": "", "renewable": false, "lease_duration": 0,
			"data": map[string]any{"data": map[string]any{"api_key": vaultKVValue},
				"metadata": map[string]any{"created_time": "2026-01-01T00:00:00Z", "deletion_time": "", "destroyed": false, "version": 3}}})
	case r.Method == http.MethodGet && r.URL.Path == "/v1/database/creds/ro":
		v.n++
		lease := fmt.Sprintf("database/creds/ro/lease%d", v.n)
		v.tokens[tok] = append(leases, lease)
		v.leases[lease] = true
		json.NewEncoder(w).Encode(map[string]any{"request_id": "r", "lease_id": lease, "renewable": true, "lease_duration": 600,
			"data": map[string]any{"username": fmt.Sprintf("v-jwt-ro-%d", v.n), "password": fmt.Sprintf("A1a-pw%dSECRET", v.n)}})
	case (r.Method == http.MethodPost || r.Method == http.MethodPut) && r.URL.Path == "/v1/auth/token/revoke-self":
		for _, l := range leases {
			delete(v.leases, l)
		}
		delete(v.tokens, tok)
		v.revoked = append(v.revoked, tok)
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodGet:
		vaultErr(w, 404)
	default:
		vaultErr(w, 405, "unsupported operation")
	}
}

func newVault(t *testing.T, secret config.VaultSecret, role string) (*vaultStandIn, *svidIssuer, Provider) {
	svids := newSVIDIssuer(t, subjA)
	v := &vaultStandIn{t: t, svids: svids, tokens: map[string][]string{}, leases: map[string]bool{}}
	srv, ca := tlsStandIn(t, v)
	p, err := NewProvider("vault", config.Credential{Vault: &config.Vault{Address: srv.URL, CAFile: ca,
		Auth:   config.VaultAuth{JWT: &config.VaultJWT{Mount: "jwt", Role: role, JWTSVID: &config.JWTSVID{Audience: "vault"}}},
		Secret: secret}}, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	return v, svids, p
}

func TestVault_JWTLoginThenKV2Field(t *testing.T) {
	t.Setenv("VAULT_TOKEN", "hvs.from-the-environment") // must not be used
	v, _, p := newVault(t, config.VaultSecret{KV2: &config.VaultKV2{Mount: "secret", Path: "agents/openai", Field: "api_key"}}, "agent")
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "vault", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != vaultKVValue || time.Until(tok.ExpiresAt()) > time.Hour || time.Until(tok.ExpiresAt()) < 59*time.Minute {
		t.Errorf("token %v expiring %v; want the field, for the login token's hour", tok, tok.ExpiresAt())
	}
	if err := p.(Revoker).Revoke(context.Background(), tok); err != nil {
		t.Fatal(err)
	}
	if len(v.tokens) != 0 || len(v.revoked) != 1 {
		t.Errorf("login token not revoked: live %v", v.tokens)
	}
}

func TestVault_DynamicSecretAppliesAsBasicAuthFromOneLeaseAndRevokesIt(t *testing.T) {
	v, _, p := newVault(t, config.VaultSecret{Dynamic: &config.VaultDynamic{Path: "database/creds/ro", UsernameField: "username", PasswordField: "password"}}, "agent")
	m := NewManager(map[string]Provider{"db": p}, Options{})
	tok := get(t, m, Request{Name: "db", Subject: subjA})
	if time.Until(tok.ExpiresAt()) > 10*time.Minute {
		t.Errorf("expires %v; want the lease's 10 minutes", tok.ExpiresAt())
	}
	a, _ := NewApplier(config.Injection{Kind: config.InjectBasicPair, Header: "Authorization"})
	r, _ := http.NewRequest(http.MethodGet, "https://db-api.internal/", nil)
	if err := a.Apply(r, tok); err != nil {
		t.Fatal(err)
	}
	user, pass, ok := r.BasicAuth()
	if !ok || !strings.HasPrefix(user, "v-jwt-ro-") || !strings.HasSuffix(pass, "SECRET") ||
		strings.TrimPrefix(user, "v-jwt-ro-") != strings.TrimSuffix(strings.TrimPrefix(pass, "A1a-pw"), "SECRET") {
		t.Errorf("basic auth %q:%q; want the username and password of the same lease", user, pass)
	}
	v.mu.Lock()
	if len(v.leases) != 1 {
		t.Errorf("%d leases; want 1", len(v.leases))
	}
	v.mu.Unlock()
	m.Forget("db")
	m.waitBackground()
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.leases) != 0 || len(v.tokens) != 0 {
		t.Errorf("after Forget: leases %v tokens %v; want both revoked", v.leases, v.tokens)
	}
	// A single-value applier refuses the pair.
	b, _ := NewApplier(config.Injection{Kind: config.InjectHeader, Header: "Authorization", Prefix: "Bearer "})
	if err := b.Apply(r, tok); !errors.Is(err, ErrUnavailable) {
		t.Errorf("pair applied as a header: %v", err)
	}
	if got := r.Header.Get("Authorization"); got != "" {
		t.Errorf("Authorization %q left after a refused Apply", got)
	}
}

func TestVault_ErrorsNameVaultsMessageWithoutTheJWT(t *testing.T) {
	_, svids, p := newVault(t, config.VaultSecret{KV2: &config.VaultKV2{Mount: "secret", Path: "agents/openai", Field: "api_key"}}, "nobody")
	_, err := p.Fetch(context.Background(), FetchArgs{Name: "vault", Subject: subjA})
	var ee *EndpointError
	if !errors.As(err, &ee) || ee.Status != 400 || !strings.Contains(err.Error(), `role "nobody" could not be found`) {
		t.Fatalf("error %v", err)
	}
	assertNoSecrets(t, "vault error", err.Error(), svids.issuedTokens()...)

	_, _, p2 := newVault(t, config.VaultSecret{KV2: &config.VaultKV2{Mount: "secret", Path: "agents/missing", Field: "api_key"}}, "agent")
	if _, err := p2.Fetch(context.Background(), FetchArgs{Name: "vault", Subject: subjA}); err == nil {
		t.Errorf("a missing secret was served")
	}
}
