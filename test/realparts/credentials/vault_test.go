package credentials_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/escrowproxy/escrow/test/realparts/harness"
)

const (
	vaultHost       = "vault-api.example.test"
	vaultDeniedHost = "vault-denied.example.test"
	vaultOtherHost  = "vault-other.example.test"
)

// bearerAPI answers 200 only to "Authorization: Bearer <want>" and counts what it saw.
type bearerAPI struct {
	want       string
	ok, denied atomic.Int32
}

func (a *bearerAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+a.want {
		a.denied.Add(1)
		http.Error(w, "bad credential", http.StatusUnauthorized)
		return
	}
	a.ok.Add(1)
	fmt.Fprint(w, "hello, workload")
}

// vaultJWTTokens returns the accessors of the live tokens Vault issued through the JWT auth
// method (as root: auth/token/accessors, then a lookup of each).
func vaultJWTTokens(t *testing.T, c *vaultapi.Client) []string {
	t.Helper()
	s, err := c.Logical().List("auth/token/accessors")
	if err != nil {
		t.Fatalf("vault: list accessors: %v", err)
	}
	var out []string
	keys, _ := s.Data["keys"].([]any)
	for _, k := range keys {
		acc, _ := k.(string)
		l, err := c.Auth().Token().LookupAccessor(acc)
		if err != nil {
			continue // revoked meanwhile
		}
		if p, _ := l.Data["path"].(string); strings.HasPrefix(p, "auth/jwt/login") {
			out = append(out, acc)
		}
	}
	return out
}

// TestVault_JWTSVIDLoginAndKV2SecretThroughEscrow: a real Vault (dev mode, HTTPS with its own CA)
// trusts SPIRE's JWKS for its JWT auth method; its role "agent" is bound to the workload's
// SPIFFE ID and the "vault" audience and may read one KV v2 secret. escrow logs in with the
// workload's real JWT-SVID, reads the secret and puts it on the agent's request (curl, no
// credential) to an HTTPS API that accepts only that secret. The login is cached (one Vault token
// for three requests) and revoked when escrow stops. A secret the role may not read, and a role
// bound to another SPIFFE ID, fail closed (503 credential_unavailable) and never reach the API.
// The secret, the JWT-SVID and the Vault token never appear in escrow's output or the agent's
// responses.
func TestVault_JWTSVIDLoginAndKV2SecretThroughEscrow(t *testing.T) {
	needCurl(t)
	sp := startSPIRE(t)
	v := harness.StartVault(t, harness.VaultOptions{})
	root := v.Client(t)
	ctx := context.Background()

	apiKey := "sk-vault-" + fmt.Sprint(time.Now().UnixNano())
	adminKey := "sk-admin-" + fmt.Sprint(time.Now().UnixNano())
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("vault setup: %s: %v", what, err)
		}
	}
	must("enable jwt auth", root.Sys().EnableAuthWithOptionsWithContext(ctx, "jwt", &vaultapi.EnableAuthOptions{Type: "jwt"}))
	_, err := root.Logical().WriteWithContext(ctx, "auth/jwt/config", map[string]any{
		"jwks_url":           sp.JWKSURL,
		"bound_issuer":       sp.IssuerURL,
		"jwt_supported_algs": []string{"RS256", "ES256", "ES384"},
	})
	must("jwt config", err)
	must("policy", root.Sys().PutPolicyWithContext(ctx, "agent-openai", `path "secret/data/agents/openai" { capabilities = ["read"] }`))
	role := func(name, subject string) {
		_, err := root.Logical().WriteWithContext(ctx, "auth/jwt/role/"+name, map[string]any{
			"role_type":       "jwt",
			"user_claim":      "sub",
			"bound_audiences": []string{"vault"},
			"bound_subject":   subject,
			"token_policies":  []string{"agent-openai"},
			"token_ttl":       "10m",
		})
		must("role "+name, err)
	}
	role("agent", workloadID)
	role("other", "spiffe://example.org/ns/agents/sa/other")
	_, err = root.KVv2("secret").Put(ctx, "agents/openai", map[string]any{"api_key": apiKey})
	must("kv put", err)
	_, err = root.KVv2("secret").Put(ctx, "agents/admin", map[string]any{"api_key": adminKey})
	must("kv put admin", err)

	api := &bearerAPI{want: apiKey}
	denied := &bearerAPI{want: adminKey}
	other := &bearerAPI{want: apiKey}
	up := harness.StartUpstream(t, vaultHost, api)
	upDenied := harness.StartUpstream(t, vaultDeniedHost, denied)
	upOther := harness.StartUpstream(t, vaultOtherHost, other)
	policies := harness.PolicyDir(t, map[string]string{"p.cedar": fmt.Sprintf(`@id("coder-vault")
permit (principal == Workload::%q, action, resource) when { principal.attested };
`, workloadID)})
	e := harness.StartEscrow(t, harness.EscrowOptions{Config: fmt.Sprintf(`
identity:
  spiffe: {socket: %q}
policy:
  dir: %s
upstreams:
  - {host: %s, credential: openai, address: %s, ca_file: %s}
  - {host: %s, credential: admin, address: %s, ca_file: %s}
  - {host: %s, credential: other-role, address: %s, ca_file: %s}
credentials:
  openai:
    vault:
      address: %s
      auth: {jwt: {mount: jwt, role: agent, jwt_svid: {audience: vault}}}
      secret: {kv2: {mount: secret, path: agents/openai, field: api_key}}
      ca_file: %s
  admin:
    vault:
      address: %s
      auth: {jwt: {mount: jwt, role: agent, jwt_svid: {audience: vault}}}
      secret: {kv2: {mount: secret, path: agents/admin, field: api_key}}
      ca_file: %s
  other-role:
    vault:
      address: %s
      auth: {jwt: {mount: jwt, role: other, jwt_svid: {audience: vault}}}
      secret: {kv2: {mount: secret, path: agents/openai, field: api_key}}
      ca_file: %s
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, sp.WorkloadAPI, policies,
		vaultHost, up.Addr, up.CAFile, vaultDeniedHost, upDenied.Addr, upDenied.CAFile, vaultOtherHost, upOther.Addr, upOther.CAFile,
		v.URL, v.CAFile, v.URL, v.CAFile, v.URL, v.CAFile)})

	var bodies []string
	for i := range 3 {
		code, body := curl(t, e, "https://"+vaultHost+"/v1/chat")
		if code != http.StatusOK || body != "hello, workload" {
			t.Fatalf("request %d: %d %s", i, code, body)
		}
		bodies = append(bodies, body)
	}
	if got := api.ok.Load(); got != 3 || api.denied.Load() != 0 {
		t.Errorf("the API accepted %d and refused %d requests; want 3 and 0", got, api.denied.Load())
	}
	// One login for three requests: the cache holds the secret and its Vault token.
	toks := vaultJWTTokens(t, root)
	if len(toks) != 1 {
		t.Errorf("%d live Vault tokens from JWT logins after three requests; want 1 (cached)", len(toks))
	}

	// The role may not read agents/admin (Vault answers 403): escrow fails closed, the API never
	// sees a request, and the token of the failed read is revoked.
	for host, a := range map[string]*bearerAPI{vaultDeniedHost: denied, vaultOtherHost: other} {
		code, body := curl(t, e, "https://"+host+"/v1/chat")
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "credential_unavailable") {
			t.Errorf("%s: %d %s; want 503 credential_unavailable", host, code, body)
		}
		if n := a.ok.Load() + a.denied.Load(); n != 0 {
			t.Errorf("%s: the API saw %d requests; want none", host, n)
		}
		bodies = append(bodies, body)
		rec := e.WaitAudit(t, "the denial for "+host, func(r harness.AuditRecord) bool {
			return r.Host == host && r.Decision == "deny"
		})
		if rec.Reason != "credential_unavailable" {
			t.Errorf("%s: audit reason %q", host, rec.Reason)
		}
	}
	if got := vaultJWTTokens(t, root); len(got) != 1 || got[0] != toks[0] {
		t.Errorf("live JWT-login tokens after the failures: %v; want only %v", got, toks)
	}

	rec := e.WaitAudit(t, "an allowed request", func(r harness.AuditRecord) bool {
		return r.Host == vaultHost && r.Decision == "allow" && r.UpstreamStatus == 200
	})
	if rec.Credential != "openai" || rec.Fields["credential_provider"] != "vault" {
		t.Errorf("audit credential %q provider %v; want openai, vault", rec.Credential, rec.Fields["credential_provider"])
	}
	if id, _ := rec.Fields["credential_id"].(string); id == "" || strings.Contains(apiKey, id) {
		t.Errorf("audit credential_id %q", id)
	}

	secrets := []string{apiKey, adminKey, v.RootToken, sp.FetchJWTSVID(t, "vault", workloadID)}
	for _, b := range bodies {
		for _, s := range secrets {
			if strings.Contains(b, s) {
				t.Errorf("the agent's response contains a secret (%.10s...)", s)
			}
		}
	}
	assertNotIn(t, e, "a secret", secrets...)

	// Stopping escrow revokes its Vault token at Vault.
	e.Stop(t)
	if got := vaultJWTTokens(t, root); len(got) != 0 {
		t.Errorf("%d JWT-login tokens still live after escrow stopped; want 0 (revoked)", len(got))
	}
}

// vaultJWTAuth enables Vault's JWT auth method trusting SPIRE's JWKS, with a role "agent" bound
// to the workload's SPIFFE ID and the "vault" audience, granted policy.
func vaultJWTAuth(t *testing.T, root *vaultapi.Client, sp *harness.SPIRE, policy string) {
	t.Helper()
	ctx := context.Background()
	if err := root.Sys().EnableAuthWithOptionsWithContext(ctx, "jwt", &vaultapi.EnableAuthOptions{Type: "jwt"}); err != nil {
		t.Fatalf("vault: enable jwt auth: %v", err)
	}
	if _, err := root.Logical().WriteWithContext(ctx, "auth/jwt/config", map[string]any{
		"jwks_url":           sp.JWKSURL,
		"bound_issuer":       sp.IssuerURL,
		"jwt_supported_algs": []string{"RS256", "ES256", "ES384"},
	}); err != nil {
		t.Fatalf("vault: jwt config: %v", err)
	}
	if _, err := root.Logical().WriteWithContext(ctx, "auth/jwt/role/agent", map[string]any{
		"role_type":       "jwt",
		"user_claim":      "sub",
		"bound_audiences": []string{"vault"},
		"bound_subject":   workloadID,
		"token_policies":  []string{policy},
		"token_ttl":       "10m",
	}); err != nil {
		t.Fatalf("vault: jwt role: %v", err)
	}
}

// basicAuthDB is an API that accepts HTTP basic auth only if it is a live PostgreSQL login:
// each request's username and password are tried against the real database.
type basicAuthDB struct {
	pg         *harness.Postgres
	ok, denied atomic.Int32
	mu         sync.Mutex
	users      map[string]bool
	passwords  []string
}

func (a *basicAuthDB) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	u, p, ok := r.BasicAuth()
	if ok {
		if who, err := a.pg.Query(u, p, "select current_user"); err == nil && who == u {
			a.ok.Add(1)
			a.mu.Lock()
			a.users[u] = true
			a.passwords = append(a.passwords, p)
			a.mu.Unlock()
			fmt.Fprint(w, "rows for "+u)
			return
		}
	}
	a.denied.Add(1)
	http.Error(w, "bad credential", http.StatusUnauthorized)
}

// seen returns the database users and passwords the API accepted.
func (a *basicAuthDB) seen() (map[string]bool, []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	users := map[string]bool{}
	for u := range a.users {
		users[u] = true
	}
	return users, append([]string(nil), a.passwords...)
}

// TestVault_DynamicDatabaseCredentialFromOneLeaseThroughEscrow: Vault's database secrets engine
// mints PostgreSQL logins (a real PostgreSQL on loopback) for the role "ro". escrow logs in to
// Vault with the workload's JWT-SVID, reads database/creds/ro once, and applies the lease's
// username and password as basic auth to the agent's requests (curl, no credential); the API
// accepts them only if they log in to the database. Three requests use one lease (one database
// user); stopping escrow revokes its Vault token and with it the lease, and Vault drops the
// database user. The password never appears in escrow's output or the agent's responses.
func TestVault_DynamicDatabaseCredentialFromOneLeaseThroughEscrow(t *testing.T) {
	needCurl(t)
	pg := harness.StartPostgres(t)
	sp := startSPIRE(t)
	v := harness.StartVault(t, harness.VaultOptions{})
	root := v.Client(t)
	ctx := context.Background()

	if err := root.Sys().MountWithContext(ctx, "database", &vaultapi.MountInput{Type: "database"}); err != nil {
		t.Fatalf("vault: mount database: %v", err)
	}
	if _, err := root.Logical().WriteWithContext(ctx, "database/config/pg", map[string]any{
		"plugin_name":       "postgresql-database-plugin",
		"connection_url":    fmt.Sprintf("postgresql://{{username}}:{{password}}@%s:%d/postgres?sslmode=disable", pg.Host, pg.Port),
		"username":          pg.Superuser,
		"password":          pg.SuperPassword,
		"allowed_roles":     []string{"ro"},
		"verify_connection": true,
	}); err != nil {
		t.Fatalf("vault: database config: %v", err)
	}
	if _, err := root.Logical().WriteWithContext(ctx, "database/roles/ro", map[string]any{
		"db_name":             "pg",
		"creation_statements": []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`},
		"default_ttl":         "10m",
		"max_ttl":             "1h",
	}); err != nil {
		t.Fatalf("vault: database role: %v", err)
	}
	if err := root.Sys().PutPolicyWithContext(ctx, "agent-db", `path "database/creds/ro" { capabilities = ["read"] }`); err != nil {
		t.Fatalf("vault: policy: %v", err)
	}
	vaultJWTAuth(t, root, sp, "agent-db")

	api := &basicAuthDB{pg: pg, users: map[string]bool{}}
	up := harness.StartUpstream(t, vaultHost, api)
	policies := harness.PolicyDir(t, map[string]string{"p.cedar": fmt.Sprintf(`@id("coder-db")
permit (principal == Workload::%q, action, resource) when { principal.attested };
`, workloadID)})
	e := harness.StartEscrow(t, harness.EscrowOptions{Config: fmt.Sprintf(`
identity:
  spiffe: {socket: %q}
policy:
  dir: %s
upstreams:
  - {host: %s, credential: db, address: %s, ca_file: %s}
credentials:
  db:
    vault:
      address: %s
      auth: {jwt: {mount: jwt, role: agent, jwt_svid: {audience: vault}}}
      secret: {dynamic: {path: database/creds/ro, username_field: username, password_field: password}}
      ca_file: %s
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, sp.WorkloadAPI, policies, vaultHost, up.Addr, up.CAFile, v.URL, v.CAFile)})

	var bodies []string
	for i := range 3 {
		code, body := curl(t, e, "https://"+vaultHost+"/v1/rows")
		if code != http.StatusOK || !strings.HasPrefix(body, "rows for ") {
			t.Fatalf("request %d: %d %s", i, code, body)
		}
		bodies = append(bodies, body)
	}
	if api.ok.Load() != 3 || api.denied.Load() != 0 {
		t.Errorf("the API accepted %d and refused %d requests; want 3 and 0", api.ok.Load(), api.denied.Load())
	}
	roles := pg.Roles(t)
	users, passwords := api.seen()
	if len(users) != 1 || len(roles) != 1 || !users[roles[0]] {
		t.Fatalf("database users seen by the API %v, in the database %v; want the same one (one lease for three requests)", users, roles)
	}
	leases, err := root.Logical().ListWithContext(ctx, "sys/leases/lookup/database/creds/ro")
	if err != nil || leases == nil {
		t.Fatalf("vault: list leases: %v", err)
	}
	if keys, _ := leases.Data["keys"].([]any); len(keys) != 1 {
		t.Errorf("Vault holds %d leases for database/creds/ro; want 1", len(keys))
	}

	rec := e.WaitAudit(t, "an allowed request", func(r harness.AuditRecord) bool {
		return r.Host == vaultHost && r.Decision == "allow" && r.UpstreamStatus == 200
	})
	if rec.Credential != "db" || rec.Fields["credential_provider"] != "vault" {
		t.Errorf("audit credential %q provider %v; want db, vault", rec.Credential, rec.Fields["credential_provider"])
	}
	// The lease's password (as the API received it) and every other secret stay out of what
	// escrow wrote and what the agent got; the user name is not a secret.
	secrets := append([]string{pg.SuperPassword, v.RootToken, sp.FetchJWTSVID(t, "vault", workloadID)}, passwords...)
	for _, b := range bodies {
		for _, s := range secrets {
			if strings.Contains(b, s) {
				t.Errorf("the agent's response contains a secret (%.10s...)", s)
			}
		}
	}
	assertNotIn(t, e, "a secret", secrets...)

	// Stopping escrow revokes its Vault token, its lease with it, and Vault drops the user.
	e.Stop(t)
	harness.Eventually(t, 30*time.Second, "the lease's database user dropped after escrow stopped", func() error {
		if got := pg.Roles(t); len(got) != 0 {
			return fmt.Errorf("database users %v", got)
		}
		return nil
	})
}
