package e2e

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
)

// TestReportMode runs escrow with policy.mode: report: what the policy would deny is let through
// (with the real credential) and recorded as would_deny, so a policy can be rolled out safely.
// Report mode is about policy only: an unknown destination is still refused.
func TestReportMode(t *testing.T) {
	api := newUpstream(t, true, map[string]expectation{"api.example.test": bearer(fileSecret)})
	e := startEscrow(t, fmt.Sprintf(`
identity:
  static: %[1]s
policy:
  dir: %[2]s
  mode: report
upstreams:
  - host: api.example.test
    credential: api-key
    address: %[3]s
    ca_file: %[4]s
credentials:
  api-key: {static: {file: %[5]s}}
egress:
  allow_cidrs: [127.0.0.0/8]
`, staticID, testdata("policies", "report"), api.Addr, upstreamCA.certFile, fileSecretPath), escrowOptions{})

	t.Run("would_be_denied_request_is_allowed_and_recorded_as_would_deny", func(t *testing.T) {
		eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{Method: http.MethodDelete, URL: "https://api.example.test" + path, Headers: agentHeaders})
			if r.Status != http.StatusOK || r.Header.Get("X-Escrow-Reason") != "" {
				t.Fatalf("status %d reason %q err %q, want 200 from the upstream in report mode", r.Status, r.Header.Get("X-Escrow-Reason"), r.Err)
			}
			checkUpstreamSawOnlyTheRealKey(t, api, path)
			rec := e.auditFor(t, path)
			if rec.Decision != "would_deny" || !rec.WouldDeny || rec.Mode != "report" || rec.UpstreamStatus != 200 {
				t.Errorf("record %s, want decision would_deny, would_deny true, mode report, upstream_status 200", rec.Raw)
			}
			if !slices.Equal(rec.PolicyIDs, []string{"forbid-deletes"}) {
				t.Errorf("policy_ids %v, want [forbid-deletes] (the policy that would deny)", rec.PolicyIDs)
			}
		})
	})

	t.Run("allowed_request_is_not_marked_would_deny", func(t *testing.T) {
		requireClient(t, "curl")
		path := uniquePath("/v1/models", "curl")
		r := doCurl(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders}, false)
		if r.Status != http.StatusOK {
			t.Fatalf("status %d err %q", r.Status, r.Err)
		}
		rec := e.auditFor(t, path)
		if rec.Decision != "allow" || rec.Reason != "allowed" || rec.WouldDeny || rec.Mode != "report" {
			t.Errorf("record %s, want allow/allowed, mode report, no would_deny", rec.Raw)
		}
	})

	t.Run("unknown_destination_is_still_denied_in_report_mode", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			r := cl.do(t, e, call{URL: "https://unknown.example.test/", Headers: agentHeaders})
			if r.Status != http.StatusForbidden || r.Header.Get("X-Escrow-Reason") != "unknown_destination" {
				t.Errorf("%d %q err %q, want 403 unknown_destination", r.Status, r.Header.Get("X-Escrow-Reason"), r.Err)
			}
		})
	})

	t.Run("would_deny_decisions_are_counted", func(t *testing.T) {
		m := e.metrics(t)
		if v := m.get("escrow_requests_total", "decision", "would_deny", "reason", "policy_denied"); v < 1 {
			t.Errorf(`escrow_requests_total{decision="would_deny",reason="policy_denied"} = %v, want >= 1`, v)
		}
	})

	e.finish(t)
}
