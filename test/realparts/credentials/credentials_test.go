// Package credentials_test runs the real `escrow proxy` with ephemeral credentials minted from a
// real SPIRE JWT-SVID by real issuers: dex (RFC 8693 token exchange, and OAuth2 client
// credentials), MinIO (STS AssumeRoleWithWebIdentity, then SigV4 on every request) and Vault (JWT
// auth login, then a KV v2 secret). The agent is curl (and the AWS CLI when installed) holding no
// credential at all.
//
// The binaries come from ESCROW_REALPARTS_BIN (test/tools/realparts.sh builds them); without it
// every test here skips, unless ESCROW_REALPARTS_REQUIRE=1. `make test-realparts` runs them.
package credentials_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/escrowproxy/escrow/test/realparts/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

const (
	workloadID = "spiffe://example.org/ns/agents/sa/coder"
	apiHost    = "api.example.test"
	ccHost     = "cc.example.test"
	// s3Host is the name MinIO's certificate (from the harness) holds besides 127.0.0.1.
	s3Host = "localhost"
)

// startSPIRE runs SPIRE with its OIDC discovery provider and registers this process's uid (escrow
// runs as it) as the workload.
func startSPIRE(t *testing.T) *harness.SPIRE {
	sp := harness.StartSPIRE(t, harness.SPIREOptions{OIDCDiscovery: true})
	sp.CreateEntry(t, harness.Entry{SPIFFEID: workloadID, Selectors: []string{harness.UIDSelector(os.Getuid())}})
	sp.WaitX509SVID(t, workloadID, time.Minute)
	return sp
}

// dexVerifier is what a resource server does with a dex access token: check its RS256
// signature against dex's JWKS, its issuer and its expiry. It records the tokens it accepted.
type dexVerifier struct {
	t      *testing.T
	dex    *harness.Dex
	mu     sync.Mutex
	jwks   *jose.JSONWebKeySet
	tokens []string
	ok     atomic.Int32
	denied atomic.Int32
}

func (v *dexVerifier) keys() *jose.JSONWebKeySet {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.jwks == nil {
		res, err := v.dex.HTTPClient(v.t).Get(v.dex.JWKSURL)
		if err != nil {
			v.t.Errorf("dex JWKS: %v", err)
			return &jose.JSONWebKeySet{}
		}
		defer res.Body.Close()
		var set jose.JSONWebKeySet
		json.NewDecoder(res.Body).Decode(&set)
		v.jwks = &set
	}
	return v.jwks
}

// verify returns the token's claims, or an error saying why it is refused.
func (v *dexVerifier) verify(raw string) (map[string]any, error) {
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.RS256, jose.ES256})
	if err != nil {
		return nil, err
	}
	if len(tok.Headers) == 0 {
		return nil, fmt.Errorf("no header")
	}
	ks := v.keys().Key(tok.Headers[0].KeyID)
	if len(ks) == 0 {
		return nil, fmt.Errorf("unknown key %q", tok.Headers[0].KeyID)
	}
	var std jwt.Claims
	all := map[string]any{}
	if err := tok.Claims(ks[0].Key, &std, &all); err != nil {
		return nil, err
	}
	if err := std.ValidateWithLeeway(jwt.Expected{Issuer: v.dex.Issuer, Time: time.Now()}, 0); err != nil {
		return nil, err
	}
	return all, nil
}

func (v *dexVerifier) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	raw, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	claims, err := v.verify(raw)
	if !ok || err != nil {
		v.denied.Add(1)
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		http.Error(w, "invalid token", http.StatusUnauthorized)
		return
	}
	v.ok.Add(1)
	v.mu.Lock()
	v.tokens = append(v.tokens, raw)
	v.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"sub": claims["sub"], "aud": claims["aud"]})
}

func (v *dexVerifier) seen() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]string(nil), v.tokens...)
}

// curl runs curl as the agent: through escrow, trusting escrow's CA, with no credential and an
// environment without any.
func curl(t *testing.T, e *harness.Escrow, args ...string) (int, string) {
	t.Helper()
	full := append([]string{"-sS", "--max-time", "30", "--proxy", e.ProxyURL, "--cacert", e.CACert,
		"-o", "-", "-w", "\n%{http_code}"}, args...)
	cmd := exec.Command("curl", full...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("curl %v: %v\n%s", args, err, out)
	}
	s := strings.TrimRight(string(out), "\n")
	i := strings.LastIndexByte(s, '\n')
	code := 0
	fmt.Sscan(s[i+1:], &code)
	return code, s[:max(i, 0)]
}

func needCurl(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed")
	}
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// assertNotIn fails when any secret appears in escrow's output (ops log and audit records).
func assertNotIn(t *testing.T, e *harness.Escrow, what string, secrets ...string) {
	t.Helper()
	out := e.Process().Output()
	for _, s := range secrets {
		if s != "" && strings.Contains(out, s) {
			t.Errorf("%s (%.10s...) appears in escrow's output", what, s)
		}
	}
}

// TestDex_TokenExchangeAndClientCredentialsThroughEscrow: escrow trades the workload's real
// JWT-SVID at dex (RFC 8693, over TLS with dex's private CA) for an access token, and gets another
// with client credentials; the agent (curl, no credential) reaches two HTTPS APIs that verify
// the tokens against dex's JWKS, issuer and expiry, and answer 401 otherwise.
func TestDex_TokenExchangeAndClientCredentialsThroughEscrow(t *testing.T) {
	needCurl(t)
	sp := startSPIRE(t)
	dex := harness.StartDex(t, harness.DexOptions{SPIFFEIssuer: sp.IssuerURL, TLS: true})
	client := dex.Clients[0]
	exchangeAPI := &dexVerifier{t: t, dex: dex}
	ccAPI := &dexVerifier{t: t, dex: dex}
	up1 := harness.StartUpstream(t, apiHost, exchangeAPI)
	up2 := harness.StartUpstream(t, ccHost, ccAPI)
	secretFile := writeFile(t, "dex-secret", client.Secret)
	policies := harness.PolicyDir(t, map[string]string{"p.cedar": fmt.Sprintf(`@id("coder-apis")
permit (principal == Workload::%q, action, resource) when { principal.attested };
`, workloadID)})
	e := harness.StartEscrow(t, harness.EscrowOptions{Config: fmt.Sprintf(`
identity:
  spiffe: {socket: %q}
policy:
  dir: %s
upstreams:
  - {host: %s, credential: exchange, address: %s, ca_file: %s}
  - {host: %s, credential: cc, address: %s, ca_file: %s}
credentials:
  exchange:
    token_exchange:
      token_url: %s
      client_id: %s
      client_secret_file: %s
      subject_token: {jwt_svid: {audience: dex}}
      subject_token_type: urn:ietf:params:oauth:token-type:id_token
      scopes: [openid]
      extra: {connector_id: %s}
      ca_file: %s
  cc:
    oauth2:
      token_url: %s
      client_id: %s
      client_secret_file: %s
      auth_style: post
      scopes: [openid]
      ca_file: %s
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, sp.WorkloadAPI, policies, apiHost, up1.Addr, up1.CAFile, ccHost, up2.Addr, up2.CAFile,
		dex.TokenURL, client.ID, secretFile, dex.ConnectorID, dex.CAFile,
		dex.TokenURL, client.ID, secretFile, dex.CAFile)})

	// The APIs really check: a forged token and no token are refused.
	forged := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"RS256","kid":"x"}`)) + ".e30.c2ln"
	for _, h := range []string{"", "Bearer " + forged} {
		req, _ := http.NewRequest(http.MethodGet, "https://"+up1.Addr+"/v1/me", nil)
		if h != "" {
			req.Header.Set("Authorization", h)
		}
		res, err := tlsClient(t, up1.CAFile).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusUnauthorized {
			t.Fatalf("the API accepted %q: %d", h, res.StatusCode)
		}
	}

	for i := range 3 {
		code, body := curl(t, e, "https://"+apiHost+"/v1/me")
		if code != http.StatusOK {
			t.Fatalf("token exchange route, request %d: %d %s", i, code, body)
		}
		// dex's sub encodes the connector's user ID: the workload's SPIFFE ID.
		var got struct{ Sub string }
		json.Unmarshal([]byte(body), &got)
		if raw, err := base64.RawURLEncoding.DecodeString(got.Sub); err != nil || !strings.Contains(string(raw), workloadID) {
			t.Errorf("the exchanged token's sub %q does not name %s", got.Sub, workloadID)
		}
		if code, body := curl(t, e, "https://"+ccHost+"/v1/me"); code != http.StatusOK {
			t.Fatalf("client credentials route, request %d: %d %s", i, code, body)
		}
	}
	// One token per route, served from the cache for the later requests.
	for name, v := range map[string]*dexVerifier{"exchange": exchangeAPI, "cc": ccAPI} {
		toks := v.seen()
		if len(toks) != 3 || toks[0] != toks[1] || toks[1] != toks[2] {
			t.Errorf("%s: %d tokens seen, not one token reused (cache)", name, len(toks))
		}
		assertNotIn(t, e, name+" access token", toks...)
	}
	if exchangeAPI.seen()[0] == ccAPI.seen()[0] {
		t.Errorf("both routes got the same token")
	}
	assertNotIn(t, e, "dex client secret", client.Secret)
	assertNotIn(t, e, "the JWT-SVID", sp.FetchJWTSVID(t, "dex", workloadID))
	rec := e.WaitAudit(t, "an allowed exchange request", func(r harness.AuditRecord) bool {
		return r.Host == apiHost && r.Decision == "allow" && r.UpstreamStatus == 200
	})
	if rec.Credential != "exchange" {
		t.Errorf("audit credential %q", rec.Credential)
	}
	e.Stop(t)
}

// TestDex_ClientCredentialsThroughEscrow: escrow gets an access token from dex with client
// credentials (client_secret_post, over TLS with dex's private CA) and the agent (curl, no
// credential) reaches an HTTPS API that verifies it against dex's JWKS, issuer and expiry. The
// identity is static here: client credentials do not use the JWT-SVID, and this runs without
// SPIRE.
//
// No revocation_url: dex has no RFC 7009 revocation endpoint (its access tokens are
// self-contained JWTs; it serves /token, /keys, /userinfo and /token/introspect, and its
// discovery document names no revocation_endpoint), so escrow's revocation of oauth2 tokens is
// tested against an RFC 7009 stand-in in package credential. The discovery check below fails
// when dex gains one; then add revocation_url here and assert the revocation.
func TestDex_ClientCredentialsThroughEscrow(t *testing.T) {
	needCurl(t)
	dex := harness.StartDex(t, harness.DexOptions{TLS: true})
	client := dex.Clients[0]
	api := &dexVerifier{t: t, dex: dex}
	up := harness.StartUpstream(t, ccHost, api)
	secretFile := writeFile(t, "dex-secret", client.Secret)
	policies := harness.PolicyDir(t, map[string]string{"p.cedar": fmt.Sprintf(`@id("coder-cc")
permit (principal == Workload::%q, action, resource == Host::%q);
`, workloadID, ccHost)})
	e := harness.StartEscrow(t, harness.EscrowOptions{Config: fmt.Sprintf(`
identity: {static: %q}
policy:
  dir: %s
upstreams:
  - {host: %s, credential: cc, address: %s, ca_file: %s}
credentials:
  cc:
    oauth2:
      token_url: %s
      client_id: %s
      client_secret_file: %s
      auth_style: post
      scopes: [openid]
      ca_file: %s
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, workloadID, policies, ccHost, up.Addr, up.CAFile, dex.TokenURL, client.ID, secretFile, dex.CAFile)})
	for i := range 3 {
		if code, body := curl(t, e, "https://"+ccHost+"/v1/me"); code != http.StatusOK {
			t.Fatalf("request %d: %d %s", i, code, body)
		}
	}
	toks := api.seen()
	if len(toks) != 3 || toks[0] != toks[1] || toks[1] != toks[2] {
		t.Errorf("%d tokens seen, not one token reused from the cache", len(toks))
	}
	assertNotIn(t, e, "access token", toks...)
	assertNotIn(t, e, "dex client secret", client.Secret)
	e.Stop(t)

	res, err := dex.HTTPClient(t).Get(dex.Issuer + "/.well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var disco map[string]any
	if err := json.NewDecoder(res.Body).Decode(&disco); err != nil || disco["token_endpoint"] != dex.TokenURL {
		t.Fatalf("dex discovery: %v %v", err, disco)
	}
	if rev, ok := disco["revocation_endpoint"]; ok {
		t.Errorf("dex now has a revocation endpoint (%v): configure revocation_url and assert the revocation", rev)
	}
}

func tlsClient(t *testing.T, caFile string) *http.Client {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
}

// rootS3 sends a request to MinIO signed with its root credentials (test setup and inspection
// only; the agent never has them).
func rootS3(t *testing.T, m *harness.MinIO, method, path string) int {
	t.Helper()
	req, _ := http.NewRequest(method, m.URL+path, nil)
	req.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
	err := v4.NewSigner(func(o *v4.SignerOptions) { o.DisableURIPathEscaping = true }).SignHTTP(context.Background(),
		aws.Credentials{AccessKeyID: m.RootUser, SecretAccessKey: m.RootPassword}, req, "UNSIGNED-PAYLOAD", "s3", "us-east-1", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	res, err := tlsClient(t, m.CAFile).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	return res.StatusCode
}

// TestMinIO_AssumeRoleWithWebIdentityAndSigV4ThroughEscrow: escrow obtains temporary keys from
// MinIO's STS with the workload's real JWT-SVID and signs every request with SigV4; curl (no
// keys) and, when installed, the AWS CLI (dummy keys, whose signature escrow replaces) create a
// bucket, PUT, GET and list objects. A request the policy denies never reaches MinIO.
func TestMinIO_AssumeRoleWithWebIdentityAndSigV4ThroughEscrow(t *testing.T) {
	needCurl(t)
	sp := startSPIRE(t)
	m := harness.StartMinIO(t, harness.MinIOOptions{OpenIDConfigURL: sp.DiscoveryURL, TLS: true})
	policies := harness.PolicyDir(t, map[string]string{"s3.cedar": fmt.Sprintf(`@id("coder-s3")
permit (principal == Workload::%q, action, resource == Host::%q) when { principal.attested };
@id("no-forbidden-bucket")
forbid (principal, action, resource) when { context.path like "/forbidden-bucket*" };
`, workloadID, s3Host)})
	e := harness.StartEscrow(t, harness.EscrowOptions{Config: fmt.Sprintf(`
identity:
  spiffe: {socket: %q}
policy:
  dir: %s
upstreams:
  - {host: %s, credential: s3, address: %s, ca_file: %s}
credentials:
  s3:
    aws:
      role_arn: %s
      web_identity: {jwt_svid: {audience: minio}}
      region: us-east-1
      service: s3
      sts_endpoint: %s
      duration: 15m
      ca_file: %s
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, sp.WorkloadAPI, policies, s3Host, m.Addr, m.CAFile, m.RoleARN, m.URL, m.CAFile)})

	base := "https://" + s3Host
	if code, body := curl(t, e, "-X", "PUT", base+"/agent-bucket"); code != http.StatusOK {
		t.Fatalf("create bucket: %d %s", code, body)
	}
	payload := strings.Repeat("escrow signs, the agent holds no key. ", 2000) // ~76 KB, streamed
	file := writeFile(t, "hello.txt", payload)
	if code, body := curl(t, e, "-T", file, base+"/agent-bucket/hello.txt"); code != http.StatusOK {
		t.Fatalf("PUT object: %d %s", code, body)
	}
	if code, body := curl(t, e, base+"/agent-bucket/hello.txt"); code != http.StatusOK || body != payload {
		t.Fatalf("GET object: %d (%d bytes; want %d)", code, len(body), len(payload))
	}
	code, body := curl(t, e, base+"/agent-bucket?list-type=2")
	if code != http.StatusOK || !strings.Contains(body, "<Key>hello.txt</Key>") {
		t.Fatalf("list: %d %s", code, body)
	}
	// The agent's own (fake) signature is removed and replaced.
	if code, body := curl(t, e, "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "AKIAAGENTFAKE:agent-fake-secret",
		base+"/agent-bucket/hello.txt"); code != http.StatusOK {
		t.Fatalf("GET with the agent's dummy signature: %d %s", code, body)
	}

	// Denied by policy: 403 from escrow, and MinIO never created the bucket.
	if code, body := curl(t, e, "-X", "PUT", base+"/forbidden-bucket"); code != http.StatusForbidden {
		t.Fatalf("forbidden bucket: %d %s; want 403", code, body)
	}
	if got := rootS3(t, m, http.MethodHead, "/forbidden-bucket"); got != http.StatusNotFound {
		t.Errorf("HEAD /forbidden-bucket as root: %d; want 404 (the denied PUT must not reach MinIO)", got)
	}
	if got := rootS3(t, m, http.MethodHead, "/agent-bucket/hello.txt"); got != http.StatusOK {
		t.Errorf("HEAD the object as root: %d", got)
	}

	if _, err := exec.LookPath("aws"); err == nil {
		awsCLI(t, e, base)
	} else {
		t.Log("the AWS CLI is not installed; curl alone played the agent")
	}

	// The audit record names the temporary access key (what MinIO logs), never its secret.
	rec := e.WaitAudit(t, "an allowed S3 request", func(r harness.AuditRecord) bool {
		return r.Host == s3Host && r.Decision == "allow" && r.UpstreamStatus == 200
	})
	id, _ := rec.Fields["credential_id"].(string)
	if id == "" || strings.HasPrefix(id, "AKIAAGENT") {
		t.Errorf("audit credential_id %q; want the temporary access key ID", id)
	}
	assertNotIn(t, e, "root password", m.RootPassword)
	assertNotIn(t, e, "the JWT-SVID", sp.FetchJWTSVID(t, "minio", workloadID))
	e.Stop(t)
}

// awsCLI plays the agent with the AWS CLI: dummy keys, escrow as its HTTPS proxy and CA.
func awsCLI(t *testing.T, e *harness.Escrow, base string) {
	t.Helper()
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(),
		"HTTPS_PROXY=" + e.ProxyURL, "https_proxy=" + e.ProxyURL, "AWS_CA_BUNDLE=" + e.CACert,
		"AWS_ACCESS_KEY_ID=AKIAAGENTDUMMY", "AWS_SECRET_ACCESS_KEY=agent-dummy-secret", "AWS_DEFAULT_REGION=us-east-1"}
	run := func(args ...string) string {
		cmd := exec.Command("aws", append([]string{"--endpoint-url", base}, args...)...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("aws %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	src := writeFile(t, "cli.txt", "from the AWS CLI")
	run("s3", "cp", src, "s3://agent-bucket/cli.txt")
	if out := run("s3", "ls", "s3://agent-bucket/"); !strings.Contains(out, "cli.txt") || !strings.Contains(out, "hello.txt") {
		t.Errorf("aws s3 ls: %s", out)
	}
	dst := filepath.Join(t.TempDir(), "back.txt")
	run("s3", "cp", "s3://agent-bucket/cli.txt", dst)
	if b, _ := os.ReadFile(dst); string(b) != "from the AWS CLI" {
		t.Errorf("aws s3 cp back: %q", b)
	}
}
