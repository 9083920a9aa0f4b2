package telemetry

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestMetrics_ExposesEscrowSeriesWithBoundedLabels(t *testing.T) {
	exp := time.Unix(1900000000, 0)
	m := New(Options{SVIDExpiry: func() time.Time { return exp }, Version: "v1.2.3"})
	m.Requests.WithLabelValues("allow", "allowed").Inc()
	m.RequestDuration.WithLabelValues("allow").Observe(0.001)
	m.PolicyEval.Observe(2e-6)
	m.TunnelsActive.Inc()

	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	text := string(body)
	for _, want := range []string{
		`escrow_requests_total{decision="allow",reason="allowed"} 1`,
		`escrow_request_duration_seconds_bucket{decision="allow"`,
		`escrow_policy_eval_duration_seconds_count 1`,
		`escrow_policy_reloads_total{result="failure"} 0`,
		`escrow_policy_reloads_total{result="success"} 0`,
		`escrow_svid_expiry_timestamp_seconds 1.9e+09`,
		`escrow_tunnels_active 1`,
		`escrow_build_info{version="v1.2.3"} 1`,
		`go_goroutines`, `process_`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// Labels come from closed sets: nothing per host, path or identity.
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "escrow_") && (strings.Contains(line, "host=") || strings.Contains(line, "path=") || strings.Contains(line, "spiffe")) {
			t.Errorf("unbounded label: %s", line)
		}
	}
}

func TestMetrics_SVIDExpiryIsZeroWithoutSVID(t *testing.T) {
	m := New(Options{SVIDExpiry: func() time.Time { return time.Time{} }})
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "escrow_svid_expiry_timestamp_seconds 0") {
		t.Error("expiry gauge should read 0 with no SVID")
	}
}
