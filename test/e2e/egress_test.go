package e2e

import (
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestEgressDefaultsDenyLoopbackAndMetadata runs escrow WITHOUT egress.allow_cidrs and a policy
// that permits everything, so every denial here is the egress rules': loopback and cloud
// metadata addresses are refused before any connection is made, whether the entry names the
// address as its host or pins a name to it with `address`.
func TestEgressDefaultsDenyLoopbackAndMetadata(t *testing.T) {
	// Nothing may connect to this: escrow's egress check must refuse before dialling.
	target := newCountingListener(t)
	e := startEscrow(t, fmt.Sprintf(`
identity:
  static: %[1]s
policy:
  dir: %[2]s
upstreams:
  - host: loopback.example.test      # an intercepted API pinned to a loopback address
    credential: api-key
    address: %[3]s
    ca_file: %[4]s
  - host: loopback-plain.example.test
    address: %[3]s
  - host: loopback-tunnel.example.test
    tunnel: true
    address: %[3]s
  - host: 169.254.169.254            # the metadata address itself as a host
  - host: metadata.example.test      # a name pinned to the metadata address
    address: 169.254.169.254:80
  - host: metadata-tls.example.test
    credential: api-key
    address: 169.254.169.254:443
credentials:
  api-key: {static: {file: %[5]s}}
egress:
  dial_timeout: 20s
`, staticID, testdata("policies", "permit-all"), target.Addr, upstreamCA.certFile, fileSecretPath), escrowOptions{})

	// A dial that was attempted would fail differently (502 upstream_unavailable, or 504 after
	// the 20s dial timeout); egress_denied comes from the check before any dial.
	t.Run("address_pinned_to_loopback_is_egress_denied_without_allow_cidrs", func(t *testing.T) {
		eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
			for _, url := range []string{"https://loopback.example.test/v1/models", "http://loopback-plain.example.test/status"} {
				r := cl.do(t, e, call{URL: url, Headers: agentHeaders})
				d := checkDenial(t, r, http.StatusForbidden, "egress_denied")
				rec := e.auditByID(t, d.RequestID)
				if rec.Decision != "deny" || rec.Reason != "egress_denied" || rec.UpstreamStatus != 0 {
					t.Errorf("%s: record %s, want deny egress_denied", url, rec.Raw)
				}
			}
			if n := target.count.Load(); n != 0 {
				t.Errorf("escrow connected %d time(s) to the loopback address", n)
			}
		})
	})

	t.Run("tunnel_to_a_loopback_address_is_refused_at_CONNECT", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			r := cl.do(t, e, call{URL: "https://loopback-tunnel.example.test/", CAFile: upstreamCA.certFile})
			if r.ConnectStatus != http.StatusForbidden || r.ConnectReason != "egress_denied" {
				t.Fatalf("CONNECT status %d reason %q err %q, want 403 egress_denied", r.ConnectStatus, r.ConnectReason, r.Err)
			}
			if n := target.count.Load(); n != 0 {
				t.Errorf("escrow connected %d time(s) to the loopback address", n)
			}
		})
	})

	t.Run("metadata_address_is_egress_denied_without_a_dial", func(t *testing.T) {
		eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
			for _, url := range []string{
				"http://169.254.169.254/latest/meta-data/iam/security-credentials/",
				"http://metadata.example.test/computeMetadata/v1/",
				"https://metadata-tls.example.test/v1/models",
			} {
				start := time.Now()
				r := cl.do(t, e, call{URL: url, Headers: [][2]string{{"Metadata-Flavor", "Google"}}})
				d := checkDenial(t, r, http.StatusForbidden, "egress_denied")
				if took := time.Since(start); took > 10*time.Second {
					t.Errorf("%s: took %v: escrow seems to have tried a connection", url, took)
				}
				rec := e.auditByID(t, d.RequestID)
				if rec.Reason != "egress_denied" || rec.UpstreamStatus != 0 {
					t.Errorf("%s: record %s, want egress_denied", url, rec.Raw)
				}
			}
		})
	})

	t.Run("egress_denials_are_counted", func(t *testing.T) {
		if v := e.metrics(t).get("escrow_requests_total", "decision", "deny", "reason", "egress_denied"); v < 1 {
			t.Errorf(`escrow_requests_total{decision="deny",reason="egress_denied"} = %v, want >= 1`, v)
		}
	})

	e.finish(t)
}
