package e2e

import (
	"fmt"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest/attesttest"
)

const svidID = "spiffe://e2e.test/ns/agents/sa/coder"

// TestSPIFFEIdentity runs escrow with identity.spiffe.socket pointing at a test Workload API
// server that speaks the real protocol (attesttest): no SVID means not ready and no traffic;
// a served SVID makes requests attested with its SPIFFE ID; an expired SVID denies again.
func TestSPIFFEIdentity(t *testing.T) {
	wl := attesttest.NewWorkloadAPI(t, "e2e.test")
	api := newUpstream(t, true, map[string]expectation{"api.example.test": bearer(fileSecret)})
	e := startEscrow(t, fmt.Sprintf(`
identity:
  spiffe: {socket: %[1]q}
policy:
  dir: %[2]s
upstreams:
  - host: api.example.test
    credential: api-key
    address: %[3]s
    ca_file: %[4]s
credentials:
  api-key: {static: {file: %[5]s}}
egress:
  allow_cidrs: [127.0.0.0/8]
`, wl.Addr(), testdata("policies", "static"), api.Addr, upstreamCA.certFile, fileSecretPath), escrowOptions{NotReady: true})

	t.Run("not_ready_and_no_traffic_until_an_SVID_is_served", func(t *testing.T) {
		waitFor(t, 10*time.Second, "escrow to watch the Workload API", func() bool { return wl.X509Streams() > 0 })
		code, body := e.adminGet(t, "/readyz")
		if code != http.StatusServiceUnavailable || !strings.Contains(body, `"ready":false`) || strings.Contains(body, `"identity":"ok"`) {
			t.Errorf("/readyz %d %s, want 503 with the identity check failing", code, body)
		}
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders})
			d := checkDenial(t, r, http.StatusServiceUnavailable, "identity_unavailable")
			if rec := e.auditByID(t, d.RequestID); rec.Decision != "deny" || rec.Reason != "identity_unavailable" || rec.Identity.SPIFFEID != "" {
				t.Errorf("record %s, want deny identity_unavailable with no identity", rec.Raw)
			}
			if n := len(api.requests(path)); n != 0 {
				t.Errorf("upstream called %d time(s) without an identity", n)
			}
		})
	})

	notAfter := time.Now().Add(time.Hour).Truncate(time.Second)
	wl.SetSVID(svidID, notAfter)
	e.waitReady(t, 10*time.Second)

	t.Run("requests_are_attested_with_the_served_SPIFFE_ID", func(t *testing.T) {
		eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders})
			if r.Status != http.StatusOK {
				t.Fatalf("status %d err %q body %q, want 200", r.Status, r.Err, r.Body)
			}
			checkUpstreamSawOnlyTheRealKey(t, api, path)
			rec := e.auditFor(t, path)
			checkAllowedRecord(t, rec, "GET", "api.example.test", path, "api-key", []string{"agents-read-apis"})
			if rec.Identity.SPIFFEID != svidID || !rec.Identity.Attested || rec.Identity.Source != "spiffe" {
				t.Errorf("identity %+v, want %s attested by spiffe", rec.Identity, svidID)
			}
		})
	})

	t.Run("SVID_expiry_is_exported_as_a_metric", func(t *testing.T) {
		got := e.metrics(t).get("escrow_svid_expiry_timestamp_seconds")
		if math.Abs(got-float64(notAfter.Unix())) > 1 {
			t.Errorf("escrow_svid_expiry_timestamp_seconds = %v, want %d", got, notAfter.Unix())
		}
	})

	t.Run("revoked_identity_denies_with_503_before_the_SVID_expires", func(t *testing.T) {
		requireClient(t, "curl")
		// The registration entry is removed: the agent answers "no identity issued".
		wl.Revoke()
		var last response
		waitFor(t, 10*time.Second, "requests to be denied after the identity was revoked", func() bool {
			last = doCurl(t, e, call{URL: "https://api.example.test" + uniquePath("/v1/models", "revoked"), Headers: agentHeaders}, false)
			return last.Status == http.StatusServiceUnavailable
		})
		checkDenial(t, last, http.StatusServiceUnavailable, "identity_unavailable")
		if got := e.metrics(t).get("escrow_svid_expiry_timestamp_seconds"); got != 0 {
			t.Errorf("escrow_svid_expiry_timestamp_seconds = %v after revocation, want 0", got)
		}
		m := e.metrics(t)
		if m.get("escrow_identity_updates_total", "result", "ok") < 1 || m.get("escrow_identity_updates_total", "result", "revoked") < 1 {
			t.Errorf("escrow_identity_updates_total: ok=%v revoked=%v, want both counted",
				m.get("escrow_identity_updates_total", "result", "ok"), m.get("escrow_identity_updates_total", "result", "revoked"))
		}
		// The entry comes back: so does the traffic.
		wl.SetSVID(svidID, notAfter)
		e.waitReady(t, 10*time.Second)
	})

	t.Run("expired_SVID_denies_with_503_identity_unavailable", func(t *testing.T) {
		requireClient(t, "curl")
		wl.SetSVID(svidID, time.Now().Add(-time.Minute))
		var last response
		waitFor(t, 10*time.Second, "requests to be denied after the SVID expired", func() bool {
			last = doCurl(t, e, call{URL: "https://api.example.test" + uniquePath("/v1/models", "expired"), Headers: agentHeaders}, false)
			return last.Status == http.StatusServiceUnavailable
		})
		d := checkDenial(t, last, http.StatusServiceUnavailable, "identity_unavailable")
		if rec := e.auditByID(t, d.RequestID); rec.Reason != "identity_unavailable" || rec.Identity.Attested {
			t.Errorf("record %s, want identity_unavailable and not attested", rec.Raw)
		}
		if code, body := e.adminGet(t, "/readyz"); code != http.StatusServiceUnavailable {
			t.Errorf("/readyz %d %s with an expired SVID, want 503", code, body)
		}
	})

	e.finish(t)
}
