package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/telemetry"
)

func TestAdmin_ReadyzReportsEachCheck(t *testing.T) {
	var credsReady atomic.Bool
	m := telemetry.New(telemetry.Options{})
	m.Requests.WithLabelValues("allow", "allowed").Inc()
	srv := httptest.NewServer(AdminHandler(m.Handler(), map[string]ReadyCheck{
		"identity": func() error { return nil },
		"credentials": func() error {
			if !credsReady.Load() {
				return errors.New("credentials not warmed up")
			}
			return nil
		},
	}))
	defer srv.Close()

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := direct.Get(srv.URL + path)
		must(t, err)
		defer resp.Body.Close()
		return resp.StatusCode, string(readBody(t, resp))
	}
	if code, body := get("/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz = %d %q", code, body)
	}

	type readyz struct {
		Ready  bool              `json:"ready"`
		Checks map[string]string `json:"checks"`
	}
	code, body := get("/readyz")
	var r readyz
	must(t, json.Unmarshal([]byte(body), &r))
	if code != http.StatusServiceUnavailable || r.Ready || r.Checks["credentials"] != "credentials not warmed up" || r.Checks["identity"] != "ok" {
		t.Errorf("/readyz not ready = %d %s", code, body)
	}
	credsReady.Store(true)
	code, body = get("/readyz")
	r = readyz{}
	must(t, json.Unmarshal([]byte(body), &r))
	if code != 200 || !r.Ready || r.Checks["credentials"] != "ok" {
		t.Errorf("/readyz ready = %d %s", code, body)
	}

	code, body = get("/metrics")
	if code != 200 || !strings.Contains(body, `escrow_requests_total{decision="allow",reason="allowed"} 1`) {
		t.Errorf("/metrics = %d\n%s", code, grepLines(body, "escrow_"))
	}
	if code, _ := get("/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("/debug/pprof/ = %d, want 404", code)
	}

	// The running proxy serves the same on its admin listener.
	tp := newTestProxy(t, "")
	tp.Get(t, "http://unknown.example.net/")
	tp.WaitRecords(t, 1)
	out := scrape(t, tp.AdminURL+"/metrics")
	if !strings.Contains(out, `escrow_requests_total{decision="deny",reason="unknown_destination"} 1`) {
		t.Errorf("admin /metrics:\n%s", grepLines(out, "escrow_requests"))
	}
	// The test config's "broken" credential (its file does not exist) is reported, by name.
	resp, err := direct.Get(tp.AdminURL + "/readyz")
	must(t, err)
	ready := string(readBody(t, resp))
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(ready, `"credentials":"broken: not available`) ||
		!strings.Contains(ready, `"policy":"ok"`) {
		t.Errorf("admin /readyz = %d %s", resp.StatusCode, ready)
	}
}

// blockingUpstream answers once release is closed; started receives each request's path.
func blockingUpstream(started chan<- string, release <-chan struct{}) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		started <- r.URL.Path
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		_, _ = io.WriteString(w, "done")
	}
}

func TestProxy_ShutdownDrainsInFlightRequests(t *testing.T) {
	started := make(chan string, 2)
	release := make(chan struct{})
	up := newTLSUpstream(t, blockingUpstream(started, release), false, "slow.example.com")
	plain := newPlainUpstream(t, blockingUpstream(started, release))
	tp := newTestProxy(t, "upstreams:\n"+up.route("slow.example.com", "credential: api")+plain.route("plain.example.com"),
		withDrain(10*time.Second))

	type result struct {
		code int
		body string
		err  error
	}
	results := make(chan result, 2)
	for _, u := range []string{"https://slow.example.com/intercepted", "http://plain.example.com/plain"} {
		go func() {
			resp, err := tp.Client.Get(u)
			if err != nil {
				results <- result{err: err}
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			results <- result{resp.StatusCode, string(b), err}
		}()
	}
	<-started
	<-started

	stopped := make(chan error, 1)
	go func() { stopped <- tp.Stop() }()

	// New connections are refused as soon as the drain starts.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", tp.Addr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the proxy still accepts connections 5s into the drain")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-stopped:
		t.Fatalf("Serve returned (%v) with requests in flight", err)
	default:
	}

	close(release)
	for range 2 {
		r := <-results
		if r.err != nil || r.code != 200 || r.body != "done" {
			t.Errorf("in-flight request: %d %q %v", r.code, r.body, r.err)
		}
	}
	select {
	case err := <-stopped:
		must(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after the in-flight requests finished")
	}
	for _, rec := range tp.WaitRecords(t, 2) {
		if rec.Decision != audit.Allow || rec.UpstreamStatus != 200 {
			t.Errorf("record = %+v", rec)
		}
	}
	if _, err := net.DialTimeout("tcp", tp.Addr, time.Second); err == nil {
		t.Error("the proxy accepts connections after Serve returned")
	}
}

func TestProxy_ShutdownClosesWhatIsLeftAfterTheDrainTimeout(t *testing.T) {
	// An endless stream (intercepted and plain) and an open tunnel outlive the drain period.
	endless := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		for {
			if _, err := io.WriteString(w, "data: tick\n\n"); err != nil {
				return
			}
			_ = rc.Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	})
	up := newTLSUpstream(t, endless, false, "stream.example.com")
	plain := newPlainUpstream(t, endless)
	echo := newTLSEchoServer(t, "tunnel.example.com")
	const drain = 300 * time.Millisecond
	tp := newTestProxy(t, "upstreams:\n"+up.route("stream.example.com")+plain.route("plain.example.com")+
		"  - host: tunnel.example.com\n    tunnel: true\n    address: "+echo+"\n", withDrain(drain))

	ended := make(chan string, 3)
	for _, u := range []string{"https://stream.example.com/", "http://plain.example.com/"} {
		resp, err := tp.Client.Get(u)
		must(t, err)
		buf := make([]byte, 4)
		_, err = io.ReadFull(resp.Body, buf)
		must(t, err)
		go func() {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			ended <- u
		}()
	}
	conn, br, resp, _ := tp.rawConnect(t, "tunnel.example.com:443", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", resp.StatusCode)
	}
	tc := tlsThroughTunnel(t, conn, br, "tunnel.example.com")
	_, err := tc.Write([]byte("x"))
	must(t, err)
	go func() {
		_, _ = io.Copy(io.Discard, tc)
		ended <- "tunnel"
	}()

	start := time.Now()
	must(t, tp.Stop())
	if d := time.Since(start); d > drain+5*time.Second {
		t.Errorf("Serve took %v to return with a %v drain timeout", d, drain)
	}
	// When Serve returns the process may exit: the tunnel's record must already be written.
	if !slices.ContainsFunc(tp.Records(), func(r *audit.Record) bool { return r.Kind == "tunnel" }) {
		t.Error("Serve returned before the closed tunnel's audit record was written")
	}
	for range 3 {
		select {
		case what := <-ended:
			t.Logf("%s closed %v after shutdown began", what, time.Since(start))
		case <-time.After(5 * time.Second):
			t.Fatal("a connection is still open 5s after Serve returned: the drain timeout did not close it")
		}
	}
	// Every CONNECT connection (tunnelled or intercepted) is accounted closed.
	waitFor(t, "escrow_tunnels_active to return to 0", func() bool { return gaugeValue(t, tp.Metrics.TunnelsActive) == 0 })
	// The tunnel's record is written at close, with the bytes relayed.
	var tunnel *audit.Record
	for _, r := range tp.WaitRecords(t, 3) {
		if r.Kind == "tunnel" {
			tunnel = r
		}
	}
	if tunnel == nil || tunnel.BytesIn <= 1 || tunnel.BytesOut == 0 {
		t.Errorf("tunnel record = %+v", tunnel)
	}
}

func TestProxy_ConnectWhileShuttingDownIs503(t *testing.T) {
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	echo := newEchoServer(t)
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com")+
		"  - host: tunnel.example.com\n    tunnel: true\n    address: "+echo+"\n")
	// The pipeline is shutting down while the listener still hands it a CONNECT (the front
	// server drains first): the agent gets a clear answer and the audit trail a record.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	must(t, tp.Proxy.Shutdown(ctx))
	for i, authority := range []string{"tunnel.example.com:443", "api.example.com:443"} {
		_, _, resp, body := tp.rawConnect(t, authority, nil)
		denialOf(t, resp, body, http.StatusServiceUnavailable, ReasonShuttingDown)
		if rec := tp.Record(t, i+1); rec.Decision != audit.Deny || rec.Reason != string(ReasonShuttingDown) || rec.Scheme != "https" {
			t.Errorf("record = %+v", rec)
		}
	}
}

// waitFor polls cond for up to 5s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5s for %s", what)
		}
	}
}

// gaugeValue reads a gauge. (prometheus/testutil would need a go.mod change: its godebug
// dependency is not in the module graph.)
func gaugeValue(t testing.TB, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	must(t, g.Write(&m))
	return m.GetGauge().GetValue()
}
