package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

const reloadBasePolicy = `@id("agents-read-api")
permit (principal in Namespace::"agents", action in Action::"read", resource == Host::"api.example.test");
`

// TestPolicyHotReload changes the policy directory under a running escrow
// (policy.reload_interval: 200ms): a broken file is rejected whole and the last good set keeps
// deciding; a valid change takes effect without a restart.
func TestPolicyHotReload(t *testing.T) {
	requireClient(t, "curl")
	api := newUpstream(t, true, map[string]expectation{"api.example.test": bearer(fileSecret)})
	dir := t.TempDir()
	writeAtomic(t, filepath.Join(dir, "base.cedar"), reloadBasePolicy)
	e := startEscrow(t, fmt.Sprintf(`
identity:
  static: %[1]s
policy:
  dir: %[2]s
  reload_interval: 200ms
upstreams:
  - host: api.example.test
    credential: api-key
    address: %[3]s
    ca_file: %[4]s
credentials:
  api-key: {static: {file: %[5]s}}
egress:
  allow_cidrs: [127.0.0.0/8]
`, staticID, dir, api.Addr, upstreamCA.certFile, fileSecretPath), escrowOptions{})

	get := func(t *testing.T, path string) (response, auditRecord) {
		t.Helper()
		r := doCurl(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders}, false)
		return r, e.auditFor(t, path)
	}
	reloads := func(t *testing.T, result string) float64 {
		return e.metrics(t).get("escrow_policy_reloads_total", "result", result)
	}

	if r, rec := get(t, uniquePath("/v1/models", "before")); r.Status != http.StatusOK || !slices.Equal(rec.PolicyIDs, []string{"agents-read-api"}) {
		t.Fatalf("before any change: status %d, policy_ids %v; want 200 by agents-read-api", r.Status, rec.PolicyIDs)
	}
	failures0, successes0 := reloads(t, "failure"), reloads(t, "success")

	t.Run("broken_policy_file_is_rejected_and_the_last_good_set_keeps_deciding", func(t *testing.T) {
		writeAtomic(t, filepath.Join(dir, "broken.cedar"), `@id("broken") permit (principal, action, resource) when { context.path like };`)
		waitFor(t, 10*time.Second, "escrow_policy_reloads_total{result=\"failure\"} to increase", func() bool {
			return reloads(t, "failure") > failures0
		})
		r, rec := get(t, uniquePath("/v1/models", "after-broken"))
		if r.Status != http.StatusOK || rec.Decision != "allow" || !slices.Equal(rec.PolicyIDs, []string{"agents-read-api"}) {
			t.Errorf("status %d, record %s; want the old decision (200 by agents-read-api)", r.Status, rec.Raw)
		}
		if got := reloads(t, "success"); got != successes0 {
			t.Errorf("escrow_policy_reloads_total{result=\"success\"} went from %v to %v for a broken set", successes0, got)
		}
		if code, body := e.adminGet(t, "/readyz"); code != http.StatusOK {
			t.Errorf("/readyz %d %s: a rejected reload must not make escrow unready", code, body)
		}
	})

	t.Run("fixed_policy_change_takes_effect_without_restart", func(t *testing.T) {
		if err := os.Remove(filepath.Join(dir, "broken.cedar")); err != nil {
			t.Fatal(err)
		}
		writeAtomic(t, filepath.Join(dir, "freeze.cedar"), `@id("freeze-models")
forbid (principal, action, resource == Host::"api.example.test") when { context.path like "/v1/models/*" };
`)
		var last auditRecord
		waitFor(t, 10*time.Second, "the new policy to deny /v1/models/*", func() bool {
			r, rec := get(t, uniquePath("/v1/models", "after-fix"))
			last = rec
			return r.Status == http.StatusForbidden && r.Header.Get("X-Escrow-Reason") == "policy_denied"
		})
		if !slices.Equal(last.PolicyIDs, []string{"freeze-models"}) {
			t.Errorf("policy_ids %v, want [freeze-models]", last.PolicyIDs)
		}
		// The rest of the old set still applies.
		if r, _ := get(t, uniquePath("/v1/other", "after-fix")); r.Status != http.StatusOK {
			t.Errorf("GET /v1/other: status %d, want 200 (agents-read-api)", r.Status)
		}
		if got := reloads(t, "success"); got <= successes0 {
			t.Errorf("escrow_policy_reloads_total{result=\"success\"} = %v, want > %v", got, successes0)
		}
	})

	e.finish(t)
}

// writeAtomic writes a file so a poller never sees it half-written (a dot-file, then rename).
func writeAtomic(t testing.TB, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond every 50ms until it holds or the deadline passes.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
