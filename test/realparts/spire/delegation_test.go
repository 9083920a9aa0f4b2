package spire_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/escrowproxy/escrow/test/realparts/harness"
)

// TestSPIRE_DelegationByAnotherWorkloadsJWTSVID: an orchestrator workload (this test process,
// registered by its executable's path) hands escrow's workload (the escrow binary, registered
// by its path) a JWT-SVID minted by the real SPIRE for escrow's delegation audience. escrow
// verifies it against the Workload API's JWT bundles (issuers: [{spiffe: {}}]) and the policy
// lets the call out only on the orchestrator's behalf; a JWT-SVID for another audience is 407.
func TestSPIRE_DelegationByAnotherWorkloadsJWTSVID(t *testing.T) {
	t.Parallel()
	const audience, orchestrator = "spiffe://example.org/escrow", "spiffe://example.org/orchestrator"
	sp := harness.StartSPIRE(t, harness.SPIREOptions{})
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sp.CreateEntry(t, harness.Entry{SPIFFEID: workloadID, Selectors: []string{harness.PathSelector(harness.EscrowBin(t))}})
	sp.CreateEntry(t, harness.Entry{SPIFFEID: orchestrator, Selectors: []string{harness.PathSelector(self)}})

	secret := fmt.Sprintf("sk-realparts-delegation-%d", os.Getpid())
	api := harness.StartUpstream(t, apiHost, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+secret || r.Header.Get("Proxy-Authorization") != "" {
			http.Error(w, "wrong credential, or the delegation token leaked", http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, "ok "+r.URL.Path)
	}))
	secretFile := filepath.Join(t.TempDir(), "api-key")
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	policies := harness.PolicyDir(t, map[string]string{"delegation.cedar": fmt.Sprintf(`@id("on-behalf-of-the-orchestrator")
permit (principal == Workload::%q, action, resource == Host::%q)
when { principal.attested && context has delegation && context.delegation.subject == %q };
`, workloadID, apiHost, orchestrator)})
	e := harness.StartEscrow(t, harness.EscrowOptions{Config: fmt.Sprintf(`
identity:
  spiffe: {socket: %q}
policy:
  dir: %s
delegation:
  audience: %s
  issuers:
    - spiffe: {}
upstreams:
  - host: %s
    credential: api-key
    address: %s
    ca_file: %s
credentials:
  api-key: {static: {file: %s}}
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, sp.WorkloadAPI, policies, audience, apiHost, api.Addr, api.CAFile, secretFile)})

	get := func(t *testing.T, path, token string) (int, string) {
		t.Helper()
		tr := e.Transport(t)
		defer tr.CloseIdleConnections()
		if token != "" {
			tr.ProxyConnectHeader = http.Header{"Proxy-Authorization": {"Bearer " + token}}
		}
		res, err := (&http.Client{Transport: tr}).Get("https://" + apiHost + path)
		if err != nil {
			return 0, err.Error()
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}

	token := sp.FetchJWTSVID(t, audience, orchestrator)
	if code, body := get(t, "/on-behalf", token); code != http.StatusOK {
		t.Fatalf("with the orchestrator's JWT-SVID: %d %s, want 200", code, body)
	}
	rec := e.WaitAudit(t, "/on-behalf", func(a harness.AuditRecord) bool { return a.Path == "/on-behalf" })
	if d, _ := rec.Fields["delegation"].(map[string]any); d == nil || d["subject"] != orchestrator {
		t.Errorf("record %s, want delegation.subject %s", rec.Raw, orchestrator)
	}
	if code, body := get(t, "/no-token", ""); code != http.StatusForbidden {
		t.Errorf("without a token: %d %s, want 403 policy_denied", code, body)
	}
	other := sp.FetchJWTSVID(t, "spiffe://example.org/someone-else", orchestrator)
	if code, body := get(t, "/wrong-audience", other); code != http.StatusProxyAuthRequired || !strings.Contains(body, "delegation_invalid") {
		t.Errorf("a JWT-SVID for another audience: %d %s, want 407 delegation_invalid", code, body)
	}
	if out := e.Process().Output(); strings.Contains(out, token[strings.LastIndexByte(token, '.')+1:]) {
		t.Error("the delegation token appears in escrow's output")
	}
}

// TestDex_DelegationByAnOIDCToken: a token dex issued (client credentials) is verified through
// OIDC discovery of dex's issuer (issuers: [{oidc: {issuer}}]) and policy sees its issuer and
// subject; a token whose signature was altered is 407.
func TestDex_DelegationByAnOIDCToken(t *testing.T) {
	t.Parallel()
	dex := harness.StartDex(t, harness.DexOptions{})
	client := dex.Clients[0]
	form := url.Values{"grant_type": {"client_credentials"}, "scope": {"openid"}}
	req, _ := http.NewRequest(http.MethodPost, dex.TokenURL, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(client.ID, client.Secret)
	res, err := dex.HTTPClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var tok struct {
		AccessToken string `json:"access_token"`
		IDToken     string `json:"id_token"`
	}
	err = json.NewDecoder(res.Body).Decode(&tok)
	res.Body.Close()
	if err != nil || tok.IDToken == "" {
		t.Fatalf("dex token response: %d %v", res.StatusCode, err)
	}

	api := harness.StartUpstream(t, apiHost, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok "+r.URL.Path)
	}))
	policies := harness.PolicyDir(t, map[string]string{"dex.cedar": fmt.Sprintf(`@id("issued-by-dex")
permit (principal, action, resource == Host::%q)
when { context has delegation && context.delegation.issuer == %q && context.delegation.depth == 0 };
`, apiHost, dex.Issuer)})
	e := harness.StartEscrow(t, harness.EscrowOptions{Config: fmt.Sprintf(`
identity:
  static: %s
policy:
  dir: %s
delegation:
  audience: %s
  issuers:
    - oidc: {issuer: %s}
upstreams:
  - host: %s
    address: %s
    ca_file: %s
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, workloadID, policies, client.ID, dex.Issuer, apiHost, api.Addr, api.CAFile)})

	get := func(path, token string) (int, string) {
		tr := e.Transport(t)
		defer tr.CloseIdleConnections()
		tr.ProxyConnectHeader = http.Header{"Proxy-Authorization": {"Bearer " + token}}
		res, err := (&http.Client{Transport: tr}).Get("https://" + apiHost + path)
		if err != nil {
			return 0, err.Error()
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	if code, body := get("/dex", tok.IDToken); code != http.StatusOK {
		t.Fatalf("with dex's token: %d %s, want 200", code, body)
	}
	rec := e.WaitAudit(t, "/dex", func(a harness.AuditRecord) bool { return a.Path == "/dex" })
	if d, _ := rec.Fields["delegation"].(map[string]any); d == nil || d["subject"] == "" {
		t.Errorf("record %s, want the delegation chain", rec.Raw)
	}
	// The last signature character changed: the signature no longer verifies.
	bad := []byte(tok.IDToken)
	if bad[len(bad)-2] == 'A' {
		bad[len(bad)-2] = 'B'
	} else {
		bad[len(bad)-2] = 'A'
	}
	if code, body := get("/tampered", string(bad)); code != http.StatusProxyAuthRequired || !strings.Contains(body, "delegation_invalid") {
		t.Errorf("a tampered dex token: %d %s, want 407 delegation_invalid", code, body)
	}
}
