package sidecar_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/controlplane/sidecar"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/proxy"
)

const (
	workload = "spiffe://example.org/ns/agents/sa/coder"
	secret   = "sk-live-xdsTEST-0123456789abcdef"
	allowAll = `@id("allow-all") permit (principal, action, resource);`
)

// controller is an in-process go-control-plane ADS server (snapshot cache, ads mode) on a
// bufconn listener, recording every request it receives.
type controller struct {
	cache    cache.SnapshotCache
	gs       *grpc.Server
	lis      *bufconn.Listener
	requests chan *discovery.DiscoveryRequest
}

func startController(t *testing.T, reqs chan *discovery.DiscoveryRequest) *controller {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := &controller{cache: cache.NewSnapshotCache(true, cache.IDHash{}, nil), lis: bufconn.Listen(1 << 20), requests: reqs}
	srv := server.NewServer(ctx, c.cache, server.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discovery.DiscoveryRequest) error {
			c.requests <- r
			return nil
		},
	})
	c.gs = grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(c.gs, srv)
	go func() { _ = c.gs.Serve(c.lis) }()
	t.Cleanup(func() { c.gs.Stop(); cancel() })
	return c
}

// push serves b as version v to the workload's node.
func (c *controller) push(t *testing.T, v string, b bundle.Bundle) {
	t.Helper()
	b.Version = v
	tec, err := bundle.Encode(b)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := cache.NewSnapshot(v, map[resource.Type][]cachetypes.Resource{resource.ExtensionConfigType: {tec}})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cache.SetSnapshot(context.Background(), workload, snap); err != nil {
		t.Fatal(err)
	}
}

// waitFor returns the next request the controller receives that acknowledges or refuses
// version v: an ACK names v, a NACK carries ErrorDetail (and the last good version).
func waitFor(t *testing.T, reqs chan *discovery.DiscoveryRequest, match func(*discovery.DiscoveryRequest) bool) *discovery.DiscoveryRequest {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case r := <-reqs:
			t.Logf("request: version %q nonce %q error %v", r.GetVersionInfo(), r.GetResponseNonce(), r.GetErrorDetail().GetMessage())
			if match(r) {
				return r
			}
		case <-timeout:
			t.Fatal("the controller did not receive the expected request within 10s")
		}
	}
}

func ack(v string) func(*discovery.DiscoveryRequest) bool {
	return func(r *discovery.DiscoveryRequest) bool {
		return r.GetVersionInfo() == v && r.GetErrorDetail() == nil && r.GetResponseNonce() != ""
	}
}

func nack(r *discovery.DiscoveryRequest) bool { return r.GetErrorDetail() != nil }

// mintingProvider mints one token per subject and records revocations at its "issuer".
type mintingProvider struct {
	mu      sync.Mutex
	fetches int
	revoked chan string
}

func (p *mintingProvider) Fetch(_ context.Context, a credential.FetchArgs) (credential.Token, error) {
	p.mu.Lock()
	p.fetches++
	n := p.fetches
	p.mu.Unlock()
	return credential.NewToken(a.Name, fmt.Sprintf("%s-%d", secret, n), time.Now().Add(time.Hour)), nil
}

func (p *mintingProvider) Revoke(_ context.Context, tok credential.Token) error {
	p.revoked <- tok.ID()
	return nil
}

// TestSubscriber_KeepsARealSidecarOnTheControllersBundle drives a real sidecar (proxy.Build)
// from an in-process go-control-plane server through every case of the protocol.
func TestSubscriber_KeepsARealSidecarOnTheControllersBundle(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()

	// The upstream: it echoes the credential it received (the test reads it back).
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "up "+r.Header.Get("Authorization"))
	}))
	defer up.Close()
	noScrub := false // the upstream echoes the credential for the test to read
	route := config.Upstream{Host: "api.example.test", Port: 8080, Address: up.Listener.Addr().String(), Credential: "api", UnsafePlaintextCredential: true, Scrub: &noScrub}
	good := bundle.Bundle{
		Upstreams:   []config.Upstream{route},
		Credentials: map[string]config.Credential{"api": {Static: &config.Static{File: filepath.Join(dir, "unused")}}},
		Policies:    map[string]string{"agents/allow.cedar": allowAll},
	}

	base, err := config.Parse([]byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {spiffe: {socket: unix:///nonexistent}}
ca_dir: %s
egress: {allow_cidrs: [127.0.0.0/8]}
xds: {address: controller.test:15490}
`, filepath.Join(dir, "ca"))))
	if err != nil {
		t.Fatal(err)
	}

	// The controller, behind a listener the test can swap (stop it, start another).
	reqs := make(chan *discovery.DiscoveryRequest, 64)
	var cur atomic.Pointer[controller]
	cur.Store(startController(t, reqs))
	conn, err := grpc.NewClient("passthrough:///controller",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return cur.Load().lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, MaxDelay: 100 * time.Millisecond}}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// The sidecar and its subscriber: the adapter below is what escrow proxy wires.
	var sc *proxy.Sidecar
	var sleeps []time.Duration
	var sleepMu sync.Mutex
	sub, err := sidecar.New(sidecar.Options{
		Base: base, Conn: conn, NodeID: workload,
		Apply: func(ctx context.Context, u sidecar.Update) error {
			revs := make([]proxy.Revocation, len(u.Revocations))
			for i, r := range u.Revocations {
				revs[i] = proxy.Revocation(r)
			}
			return sc.Update(ctx, proxy.Update{Config: u.Config, PolicySet: u.Policies, Revocations: &revs})
		},
		Sleep: func(ctx context.Context, d time.Duration) error {
			sleepMu.Lock()
			sleeps = append(sleeps, d)
			sleepMu.Unlock()
			return ctx.Err() // the stream waits for the connection itself (WaitForReady)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	id, err := attest.NewStatic(workload)
	if err != nil {
		t.Fatal(err)
	}
	prov := &mintingProvider{revoked: make(chan string, 8)}
	var recMu sync.Mutex
	var recs []*audit.Record
	sc, err = proxy.Build(ctx, base, proxy.Deps{
		Identity: id, Providers: map[string]credential.Provider{"api": prov},
		Audit:       audit.SinkFunc(func(r *audit.Record) { recMu.Lock(); recs = append(recs, r); recMu.Unlock() }),
		SystemRoots: func() ([]byte, error) { return nil, nil },
		ReadyChecks: map[string]proxy.ReadyCheck{"xds": sub.Ready},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.Register(sc.Metrics.Registry); err != nil {
		t.Fatal(err)
	}
	serveDone := make(chan error, 1)
	go func() { serveDone <- sc.Serve(ctx) }()
	subDone := make(chan error, 1)
	go func() { subDone <- sub.Run(ctx) }()
	defer func() { cancel(); <-subDone; <-serveDone }()

	proxyURL := &url.URL{Scheme: "http", Host: sc.ProxyAddr.String()}
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL), DisableKeepAlives: true}, Timeout: 10 * time.Second}
	get := func() (int, string, string) {
		t.Helper()
		resp, err := client.Get("http://api.example.test:8080/v1")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get(proxy.ReasonHeader), string(b)
	}
	ready := func() int {
		resp, err := http.Get("http://" + sc.AdminAddr.String() + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// metric reads one series from the sidecar's /metrics.
	metric := func(series string) string {
		t.Helper()
		resp, err := http.Get("http://" + sc.AdminAddr.String() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, series+" "); ok {
				return v
			}
		}
		return "absent"
	}
	waitStatus := func(ok func(sidecar.Status) bool) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			ch := sub.Changed()
			if ok(sub.Status()) {
				return
			}
			select {
			case <-ch:
			case <-timeout:
				t.Fatalf("status %+v did not change as expected", sub.Status())
			}
		}
	}

	// Nothing received yet: not ready, and every request denied.
	waitFor(t, reqs, func(r *discovery.DiscoveryRequest) bool { return r.GetResponseNonce() == "" }) // subscribed
	if code, reason, _ := get(); code != http.StatusForbidden || reason != "unknown_destination" {
		t.Fatalf("before any config: %d %s", code, reason)
	}
	if code := ready(); code != http.StatusServiceUnavailable {
		t.Fatalf("readyz before any config = %d", code)
	}

	// A pushed upstream and policy: allowed within a second.
	start := time.Now()
	cur.Load().push(t, "v1", good)
	waitFor(t, reqs, ack("v1"))
	if code, _, body := get(); code != 200 || body != "up Bearer "+secret+"-1" {
		t.Fatalf("after v1: %d %q", code, body)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("v1 took %v to be applied, want under a second", d)
	}
	if st := sub.Status(); st.Applied != "v1" || !st.Connected || ready() != 200 {
		t.Fatalf("status after v1 = %+v", st)
	}

	// Invalid Cedar, then an unknown credential: each NACKed with its reason; v1 stays.
	bad := good
	bad.Policies = map[string]string{"agents/allow.cedar": `@id("broken") permit (principal, action resource);`}
	cur.Load().push(t, "v2", bad)
	r := waitFor(t, reqs, nack)
	if r.GetVersionInfo() != "v1" || !strings.Contains(r.GetErrorDetail().GetMessage(), "agents/allow.cedar") || !strings.Contains(r.GetErrorDetail().GetMessage(), "parse error") {
		t.Fatalf("NACK of v2 = version %q, %q", r.GetVersionInfo(), r.GetErrorDetail().GetMessage())
	}
	unknown := good
	unknown.Upstreams = []config.Upstream{route, {Host: "other.example.test", Credential: "nope"}}
	cur.Load().push(t, "v3", unknown)
	r = waitFor(t, reqs, func(r *discovery.DiscoveryRequest) bool {
		return nack(r) && strings.Contains(r.GetErrorDetail().GetMessage(), "nope")
	})
	if msg := r.GetErrorDetail().GetMessage(); r.GetVersionInfo() != "v1" || !strings.Contains(msg, `upstreams[1].credential: no credential named "nope"`) {
		t.Fatalf("NACK of v3 = version %q, %q", r.GetVersionInfo(), msg)
	}
	if code, _, _ := get(); code != 200 {
		t.Fatalf("after the NACKs the last good config is gone: %d", code)
	}
	if st := sub.Status(); st.Applied != "v1" || st.NACKedVersion != "v3" || !strings.Contains(st.LastNACK, "nope") {
		t.Fatalf("status after the NACKs = %+v", st)
	}
	// Two NACKs or more, one ACK: this test's controller is a bare snapshot cache, which sends
	// a refused version again at once (escrow controller does not:
	// TestServer_DoesNotResendARejectedVersion in controlplane/controller).
	if n, a := metric(`escrow_xds_updates_total{result="nack"}`), metric(`escrow_xds_updates_total{result="ack"}`); a != "1" {
		t.Fatalf("updates: ack %s nack %s", a, n)
	} else if nacks, err := strconv.Atoi(n); err != nil || nacks < 2 {
		t.Fatalf("updates: ack %s nack %s", a, n)
	}
	if v := metric(`escrow_xds_applied_info{version="v1"}`); v != "1" {
		t.Fatalf("escrow_xds_applied_info{version=v1} = %s", v)
	}

	// The controller goes away: the sidecar keeps serving v1.
	cur.Load().gs.Stop()
	waitStatus(func(st sidecar.Status) bool { return !st.Connected })
	if v := metric("escrow_xds_connected"); v != "0" {
		t.Fatalf("escrow_xds_connected = %s with the controller gone", v)
	}
	if code, _, _ := get(); code != 200 {
		t.Fatalf("with the controller gone: %d", code)
	}

	// Another controller comes back with a new snapshot, revoking the workload: it converges;
	// the identity is denied and its cached credential dropped (and revoked at the issuer).
	next := startController(t, reqs)
	revoked := good
	revoked.Revocations = []bundle.Revocation{{Name: "agents/stop-coder", SPIFFEIDs: []string{workload}, Reason: "test"}}
	next.push(t, "v4", revoked)
	cur.Store(next)
	waitFor(t, reqs, ack("v4"))
	select {
	case <-prov.revoked:
	case <-time.After(5 * time.Second):
		t.Fatal("the revoked identity's token was not revoked at its issuer")
	}
	if code, reason, _ := get(); code != http.StatusForbidden || reason != "revoked" {
		t.Fatalf("after the revocation: %d %s", code, reason)
	}
	recMu.Lock()
	last := recs[len(recs)-1]
	recMu.Unlock()
	if last.Revocation != "agents/stop-coder" {
		t.Errorf("audit record names revocation %q", last.Revocation)
	}

	// Lifting it restores service with a fresh token.
	next.push(t, "v5", good)
	waitFor(t, reqs, ack("v5"))
	if code, _, body := get(); code != 200 || body != "up Bearer "+secret+"-2" {
		t.Fatalf("after lifting the revocation: %d %q", code, body)
	}

	// A revoked credential: dropped (revoked at the issuer), not minted, denied as revoked.
	credRevoked := good
	credRevoked.Revocations = []bundle.Revocation{{Name: "ops/leaked", Credentials: []string{"api"}}}
	next.push(t, "v6", credRevoked)
	waitFor(t, reqs, ack("v6"))
	select {
	case <-prov.revoked:
	case <-time.After(5 * time.Second):
		t.Fatal("the revoked credential's token was not revoked at its issuer")
	}
	if code, reason, _ := get(); code != http.StatusForbidden || reason != "revoked" {
		t.Fatalf("with the credential revoked: %d %s", code, reason)
	}
	next.push(t, "v7", good)
	waitFor(t, reqs, ack("v7"))
	if code, _, body := get(); code != 200 || body != "up Bearer "+secret+"-3" {
		t.Fatalf("after lifting the credential's revocation: %d %q", code, body)
	}
	if v, old := metric(`escrow_xds_applied_info{version="v7"}`), metric(`escrow_xds_applied_info{version="v1"}`); v != "1" || old != "absent" {
		t.Errorf("escrow_xds_applied_info: v7 %s, v1 %s", v, old)
	}
	sleepMu.Lock()
	if len(sleeps) == 0 {
		t.Error("the subscriber did not back off after the stream broke")
	}
	sleepMu.Unlock()
}
