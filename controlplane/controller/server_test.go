package controller

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
)

type testServer struct {
	*Server
	addr    string
	ca      *controllertest.CA
	metrics *Metrics
}

func startServer(t testing.TB) *testServer {
	t.Helper()
	ca, err := controllertest.NewCA("example.org")
	if err != nil {
		t.Fatal(err)
	}
	own, err := ca.SVID("spiffe://example.org/ns/" + sys + "/sa/escrow-controller")
	if err != nil {
		t.Fatal(err)
	}
	m := NewMetrics(prometheus.NewRegistry())
	s, err := NewServer(ServerOptions{SVIDs: own, Bundles: ca.Bundle(), Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return &testServer{Server: s, addr: l.Addr().String(), ca: ca, metrics: m}
}

func (ts *testServer) dial(t *testing.T, svidID, nodeID string) *controllertest.Client {
	t.Helper()
	svid, err := ts.ca.SVID(svidID)
	if err != nil {
		t.Fatal(err)
	}
	return ts.dialTLS(t, controllertest.ClientTLS(svid, ts.ca.Bundle()), nodeID)
}

func (ts *testServer) dialTLS(t *testing.T, conf *tls.Config, nodeID string) *controllertest.Client {
	t.Helper()
	c, err := controllertest.Dial(context.Background(), ts.addr, conf, nodeID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// dialErr is the error of dialling and receiving the first response, nil if one arrives.
func (ts *testServer) dialErr(conf *tls.Config, nodeID string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := controllertest.Dial(ctx, ts.addr, conf, nodeID)
	if err != nil {
		return err
	}
	defer c.Close()
	_, _, err = c.Recv()
	return err
}

// recv waits for one response, failing the test after a while.
func recv(t *testing.T, c *controllertest.Client) (*discovery.DiscoveryResponse, bundle.Bundle) {
	t.Helper()
	type res struct {
		r   *discovery.DiscoveryResponse
		b   bundle.Bundle
		err error
	}
	ch := make(chan res, 1)
	go func() { r, b, err := c.Recv(); ch <- res{r, b, err} }()
	select {
	case x := <-ch:
		if x.err != nil {
			t.Fatal(x.err)
		}
		return x.r, x.b
	case <-time.After(10 * time.Second):
		t.Fatal("no response within 10s")
	}
	return nil, bundle.Bundle{}
}

// noRecv checks that nothing arrives within d.
func noRecv(t *testing.T, c *controllertest.Client, d time.Duration) {
	t.Helper()
	ch := make(chan *discovery.DiscoveryResponse, 1)
	go func() { r, _, _ := c.Recv(); ch <- r }()
	select {
	case r := <-ch:
		if r != nil {
			t.Fatalf("unexpected push of version %s", r.GetVersionInfo())
		}
	case <-time.After(d):
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestServer_SidecarReceivesItsBundleAndEachChange(t *testing.T) {
	ts := startServer(t)
	objs := Objects{
		Policies:  []v1alpha1.Policy{pol(sys, "base", allowGitHub), pol("agents", "read", allowAgentsRead)},
		Upstreams: []v1alpha1.Upstream{up("agents", "openai", "api.openai.com", 0), up("other", "x", "x.example", 0)},
	}
	ts.Update(Compute(objs, sys))
	c := ts.dial(t, agentsID, agentsID)

	r1, b1 := recv(t, c)
	if got := hosts(b1); len(got) != 1 || got[0] != "api.openai.com" {
		t.Fatalf("upstreams = %v", got)
	}
	if want := Compute(objs, sys).BundleFor(agentsID).Version; r1.GetVersionInfo() != want {
		t.Fatalf("version %s, want %s", r1.GetVersionInfo(), want)
	}
	if err := c.ACK(r1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the ACK observed", func() bool { return histCount(t, ts.metrics) == 1 })

	// A revocation for the namespace: pushed.
	objs.Revocations = []v1alpha1.Revocation{revoke("agents", "stop", agentsID)}
	ts.Update(Compute(objs, sys))
	r2, b2 := recv(t, c)
	if len(b2.Revocations) != 1 || b2.Revocations[0].Name != "agents/stop" || r2.GetVersionInfo() == r1.GetVersionInfo() {
		t.Fatalf("second push: version %s, revocations %+v", r2.GetVersionInfo(), b2.Revocations)
	}
	if err := c.ACK(r2); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two ACKs observed", func() bool { return histCount(t, ts.metrics) == 2 })

	// A change in another namespace, and the same content again: nothing is pushed.
	objs.Upstreams = append(objs.Upstreams, up("other", "y", "y.example", 0))
	ts.Update(Compute(objs, sys))
	ts.Update(Compute(objs, sys))
	noRecv(t, c, 300*time.Millisecond)
	if got := testutil.ToFloat64(ts.metrics.Pushes); got != 2 {
		t.Errorf("pushes = %v, want 2", got)
	}
	if got := testutil.ToFloat64(ts.metrics.Connected); got != 1 {
		t.Errorf("connected = %v", got)
	}
	if got := testutil.ToFloat64(ts.metrics.BundleVersion.WithLabelValues("agents", r2.GetVersionInfo())); got != 1 {
		t.Errorf("bundle_version_info{agents,%s} = %v", r2.GetVersionInfo(), got)
	}
}

func histCount(t *testing.T, m *Metrics) uint64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 1)
	m.PushLatency.Collect(ch)
	var pb = new(dtoMetric)
	if err := (<-ch).Write(&pb.Metric); err != nil {
		t.Fatal(err)
	}
	return pb.GetHistogram().GetSampleCount()
}

func TestServer_SidecarConnectedBeforeTheFirstStateWaitsForIt(t *testing.T) {
	ts := startServer(t)
	c := ts.dial(t, agentsID, agentsID)
	waitFor(t, "stream registered", func() bool { return testutil.ToFloat64(ts.metrics.Connected) == 1 })
	if ts.Ready() {
		t.Fatal("ready before any state")
	}
	ts.Update(Compute(Objects{Policies: []v1alpha1.Policy{pol("agents", "read", allowAgentsRead)}}, sys))
	_, b := recv(t, c)
	if _, ok := b.Policies["agents/read.cedar"]; !ok {
		t.Fatalf("policies = %v", keys(b.Policies))
	}
}

func TestServer_RefusesANodeIDThatIsNotTheCertificatesSPIFFEID(t *testing.T) {
	ts := startServer(t)
	objs := Objects{Upstreams: []v1alpha1.Upstream{up("other", "secret-host", "other.internal", 0)}}
	ts.Update(Compute(objs, sys))
	// An agents workload claims to be the other namespace's sidecar.
	c := ts.dial(t, agentsID, otherID)
	_, _, err := c.Recv()
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), otherID) {
		t.Fatalf("err = %v, want PermissionDenied", err)
	}
	if got := testutil.ToFloat64(ts.metrics.Refused.WithLabelValues("node_id_mismatch")); got != 1 {
		t.Errorf("refused{node_id_mismatch} = %v", got)
	}
	if got := testutil.ToFloat64(ts.metrics.Pushes); got != 0 {
		t.Errorf("pushes = %v", got)
	}
	waitFor(t, "stream closed", func() bool { return testutil.ToFloat64(ts.metrics.Connected) == 0 })
}

func TestServer_RefusesClientsWithoutAnSVIDOfItsTrustDomain(t *testing.T) {
	ts := startServer(t)
	ts.Update(Compute(Objects{}, sys))

	foreign, err := controllertest.NewCA("evil.example")
	if err != nil {
		t.Fatal(err)
	}
	fsvid, err := foreign.SVID("spiffe://evil.example/ns/agents/sa/coder")
	if err != nil {
		t.Fatal(err)
	}
	// The foreign client trusts our controller (so only the server's check can refuse it).
	conf := controllertest.ClientTLS(fsvid, ts.ca.Bundle())
	if err := ts.dialErr(conf, "spiffe://evil.example/ns/agents/sa/coder"); err == nil {
		t.Fatal("a foreign trust domain's SVID was served")
	}

	// No client certificate at all.
	noCert := controllertest.ClientTLS(fsvid, ts.ca.Bundle())
	noCert.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	if err := ts.dialErr(noCert, agentsID); err == nil {
		t.Fatal("a client without a certificate was served")
	}
	if got := testutil.ToFloat64(ts.metrics.Pushes); got != 0 {
		t.Errorf("pushes = %v", got)
	}
}

func TestServer_CountsNACKsByReasonClass(t *testing.T) {
	ts := startServer(t)
	ts.Update(Compute(Objects{}, sys))
	c := ts.dial(t, agentsID, agentsID)
	r, _ := recv(t, c)
	if err := c.NACK(r, "", `policy: load xds: agents/x.cedar:3:8: policy "x": parse error`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "NACK counted", func() bool { return testutil.ToFloat64(ts.metrics.NACKs.WithLabelValues(NACKPolicy)) == 1 })
	if n := testutil.CollectAndCount(ts.metrics.NACKs); n != 1 {
		t.Errorf("%d NACK series", n)
	}
}

// A rejected version is not sent again on the stream that rejected it (the snapshot cache
// answers any request for another version at once: a sidecar that cannot apply a bundle would
// receive and refuse it hundreds of times a second); the next version is.
func TestServer_DoesNotResendARejectedVersion(t *testing.T) {
	ts := startServer(t)
	ts.Update(Compute(Objects{}, sys))
	c := ts.dial(t, agentsID, agentsID)
	r, _ := recv(t, c)
	got := make(chan *discovery.DiscoveryResponse, 16)
	go func() {
		for {
			r, _, err := c.Recv()
			if err != nil {
				return
			}
			got <- r
		}
	}()
	if err := c.NACK(r, "", "policy: parse error"); err != nil {
		t.Fatal(err)
	}
	select {
	case again := <-got:
		t.Fatalf("the rejected version %s was sent again (as %s)", r.GetVersionInfo(), again.GetVersionInfo())
	case <-time.After(300 * time.Millisecond):
	}
	if n := testutil.ToFloat64(ts.metrics.NACKs.WithLabelValues(NACKPolicy)); n != 1 {
		t.Errorf("%v NACKs counted, want 1", n)
	}

	ts.Update(Compute(Objects{Policies: []v1alpha1.Policy{pol("agents", "p", allowGitHub)}}, sys))
	select {
	case next := <-got:
		if next.GetVersionInfo() == r.GetVersionInfo() {
			t.Fatalf("after a change: the rejected version %s again", r.GetVersionInfo())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the next version was not sent after a rejection")
	}
}

func TestServer_ClosedStreamForgetsTheSidecar(t *testing.T) {
	ts := startServer(t)
	ts.Update(Compute(Objects{}, sys))
	c1 := ts.dial(t, agentsID, agentsID)
	c2 := ts.dial(t, agentsID, agentsID) // a second pod of the same service account
	r1, _ := recv(t, c1)
	r2, _ := recv(t, c2)
	if err := c2.ACK(r2); err != nil { // a sidecar asks for the next version by ACKing this one
		t.Fatal(err)
	}
	_ = r1
	waitFor(t, "two streams", func() bool { return testutil.ToFloat64(ts.metrics.Connected) == 2 })
	c1.Close()
	waitFor(t, "one stream", func() bool { return testutil.ToFloat64(ts.metrics.Connected) == 1 })
	if _, err := ts.cache.GetSnapshot(agentsID); err != nil {
		t.Fatal("the remaining pod's snapshot was cleared")
	}
	// The remaining stream still gets changes.
	ts.Update(Compute(Objects{Revocations: []v1alpha1.Revocation{revoke("agents", "r", agentsID)}}, sys))
	if _, b := recv(t, c2); len(b.Revocations) != 1 {
		t.Fatalf("revocations = %+v", b.Revocations)
	}
	c2.Close()
	waitFor(t, "no stream", func() bool { return testutil.ToFloat64(ts.metrics.Connected) == 0 })
	if _, err := ts.cache.GetSnapshot(agentsID); err == nil {
		t.Error("snapshot kept after the last stream closed")
	}
}

func TestNACKClass(t *testing.T) {
	for msg, want := range map[string]string{
		"bundle: 2 resources":     NACKDecode,
		"controlplane: bundle: x": NACKDecode,
		"controlplane: config: 1 error(s):\n  upstreams[1].credential: no credential":   NACKConfig,
		`controlplane: credentials.gh: defined in the sidecar's config file and pushed`: NACKConflict,
		`controlplane: policies["a/b.cedar"]: in the sidecar's policy.dir`:              NACKConflict,
		"config: 1 error(s):\n  x":       NACKConfig,
		"policy: load xds: parse error":  NACKPolicy,
		"something else with secret xyz": NACKOther,
		"":                               NACKOther,
	} {
		if got := NACKClass(msg); got != want {
			t.Errorf("NACKClass(%q) = %s, want %s", msg, got, want)
		}
	}
}

type dtoMetric struct{ dto.Metric }
