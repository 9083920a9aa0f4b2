package spire_test

import (
	"fmt"
	"io"
	"net/http"
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
