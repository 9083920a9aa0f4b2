package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/escrowproxy/escrow/attest/attesttest"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/broker"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/credential"
)

type staticSVID struct{ s *x509svid.SVID }

func (s staticSVID) GetX509SVID() (*x509svid.SVID, error) { return s.s, nil }

// brokerMinter is the controller's broker in TestCmdProxy_FollowsTheControllerOverMTLSWithItsSVID:
// it mints for the one workload it knows, and records who asked.
type brokerMinter struct {
	mu      sync.Mutex
	callers []string
	allowed string
}

func (m *brokerMinter) Mint(_ context.Context, r broker.Request) (credential.Token, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.callers = append(m.callers, r.Caller.String()+" "+r.Credential)
	if r.Caller.String() != m.allowed || r.Credential != "gh" {
		return credential.Token{}, broker.Refuse(broker.ResultDenied, nil)
	}
	return credential.NewToken(r.Credential, "ghs_brokered", time.Now().Add(time.Hour)), nil
}

func (m *brokerMinter) asked() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return strings.Join(m.callers, ",")
}

// TestCmdProxy_FollowsTheControllerOverMTLSWithItsSVID: `escrow proxy` with xds subscribes to a
// controller (an ADS server with go-control-plane's snapshot cache) over mTLS with the X509-SVID
// from its Workload API, as node id its SPIFFE ID. It denies until the first bundle, serves the
// pushed upstream under the pushed policy, mints a brokered credential over the same connection
// (once for several requests), then denies the revoked identity with 403 revoked, with no
// restart.
func TestCmdProxy_FollowsTheControllerOverMTLSWithItsSVID(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the proxy")
	}
	const (
		td           = "example.org"
		workload     = "spiffe://example.org/ns/agents/sa/coder"
		controllerID = "spiffe://example.org/ns/escrow-system/sa/escrow-controller"
	)
	w := attesttest.NewWorkloadAPI(t, td)
	w.SetSVID(workload, time.Now().Add(time.Hour))

	// The controller: mTLS with its own SVID from the same trust domain; it records who called.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	snapshots := cache.NewSnapshotCache(true, cache.IDHash{}, nil)
	var (
		mu    sync.Mutex
		peers = map[string]string{} // node id -> the SPIFFE ID of the client certificate
		acks  []string
	)
	srv := server.NewServer(ctx, snapshots, server.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discovery.DiscoveryRequest) error {
			mu.Lock()
			defer mu.Unlock()
			if r.GetErrorDetail() == nil && r.GetVersionInfo() != "" {
				acks = append(acks, r.GetVersionInfo())
			}
			return nil
		},
	})
	bundles := x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(td), w.X509Authorities())
	tlsConf := tlsconfig.MTLSServerConfig(staticSVID{w.MintX509SVID(controllerID, time.Now().Add(time.Hour))}, bundles, tlsconfig.AuthorizeMemberOf(spiffeid.RequireTrustDomainFromString(td)))
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsConf)), grpc.StreamInterceptor(func(s any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if p, ok := peer.FromContext(ss.Context()); ok {
			if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
				if id, err := x509svid.IDFromCert(ti.State.PeerCertificates[0]); err == nil {
					mu.Lock()
					peers["stream"] = id.String()
					mu.Unlock()
				}
			}
		}
		return h(s, ss)
	}))
	discovery.RegisterAggregatedDiscoveryServiceServer(gs, srv)
	minter := &brokerMinter{allowed: workload}
	bs, err := broker.NewServer(broker.ServerOptions{Minter: minter})
	if err != nil {
		t.Fatal(err)
	}
	bs.Register(gs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()
	push := func(v string, b bundle.Bundle) {
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
		if err := snapshots.SetSnapshot(ctx, workload, snap); err != nil {
			t.Fatal(err)
		}
	}

	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "hello from the api") }))
	defer api.Close()
	brokered := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer ghs_brokered" {
			http.Error(w, "bad credentials", http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, "hello with the brokered token")
	}))
	defer brokered.Close()

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "escrow.yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(`listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {spiffe: {socket: %q}}
ca_dir: %s
egress: {allow_cidrs: [127.0.0.0/8]}
xds: {address: %s, server_id: %s}
audit: {flush_interval: 0s}
`, w.Addr(), filepath.Join(dir, "ca"), lis.Addr(), controllerID)), 0o644); err != nil {
		t.Fatal(err)
	}
	pctx, stop := context.WithCancel(context.Background())
	defer stop()
	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- cmdProxy(pctx, []string{"--config", cfgPath, "--drain-timeout", "2s"}, &stdout, &stderr)
	}()
	var proxyAddr, adminAddr string
	deadline := time.Now().Add(20 * time.Second)
	for proxyAddr == "" {
		for _, l := range strings.Split(stderr.String(), "\n") {
			var m struct{ Msg, Proxy, Admin string }
			if json.Unmarshal([]byte(l), &m) == nil && m.Msg == "escrow proxy listening" {
				proxyAddr, adminAddr = m.Proxy, m.Admin
			}
		}
		select {
		case err := <-done:
			t.Fatalf("escrow proxy returned: %v\n%s", err, stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("escrow proxy did not listen within 20s:\n%s", stderr.String())
		}
	}
	var getURL func(string) (int, string)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: proxyAddr})}}
	get := func() (int, string) { return getURL("http://api.example.test/v1") }
	getURL = func(u string) (int, string) {
		resp, err := client.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.Header.Get("X-Escrow-Reason")
	}
	ready := func() int {
		resp, err := http.Get("http://" + adminAddr + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	eventually := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 15s\n%s", what, stderr.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	// Nothing pushed yet: not ready, and the unknown destination is denied.
	if code, _ := get(); code == http.StatusOK {
		t.Fatal("a request was allowed before any config arrived")
	}
	if ready() == http.StatusOK {
		t.Fatal("/readyz ready before any config arrived")
	}

	base := bundle.Bundle{
		Upstreams: []config.Upstream{{Host: "api.example.test", Address: strings.TrimPrefix(api.URL, "http://")},
			{Host: "brokered.example.test", Address: strings.TrimPrefix(brokered.URL, "http://"), Credential: "gh", UnsafePlaintextCredential: true}},
		Credentials: map[string]config.Credential{"gh": {Broker: &config.Broker{}}},
		Policies: map[string]string{"agents/allow.cedar": `@id("allow-api") permit (principal, action, resource == Host::"api.example.test");
@id("allow-brokered") permit (principal, action, resource == Host::"brokered.example.test");`},
	}
	push("v1", base)
	eventually("the pushed upstream and policy serve", func() bool { code, _ := get(); return code == http.StatusOK })
	for i := 0; i < 3; i++ {
		if code, reason := getURL("http://brokered.example.test/"); code != http.StatusOK {
			t.Fatalf("brokered upstream: %d %s\n%s", code, reason, stderr.String())
		}
	}
	if got := minter.asked(); got != workload+" gh" {
		t.Errorf("the broker was asked %q; want one mint for the sidecar's SVID %s", got, workload)
	}
	// A new revision (the controller changed the Credential and revoked its tokens): the
	// sidecar drops its token and asks again.
	rotated := base
	rotated.Credentials = map[string]config.Credential{"gh": {Broker: &config.Broker{Revision: "r2"}}}
	push("v1b", rotated)
	eventually("a new revision makes the sidecar mint again", func() bool {
		code, _ := getURL("http://brokered.example.test/")
		return code == http.StatusOK && minter.asked() == workload+" gh,"+workload+" gh"
	})
	base = rotated
	eventually("/readyz ready after the first bundle", func() bool { return ready() == http.StatusOK })
	mu.Lock()
	if peers["stream"] != workload {
		t.Errorf("the controller saw client certificate %q, want the sidecar's SVID %s", peers["stream"], workload)
	}
	mu.Unlock()
	if keys := snapshots.GetStatusKeys(); len(keys) != 1 || keys[0] != workload {
		t.Errorf("node ids seen by the controller: %v, want [%s]", keys, workload)
	}

	revoked := base
	revoked.Revocations = []bundle.Revocation{{Name: "escrow-system/incident", SPIFFEIDs: []string{workload}, Reason: "test"}}
	push("v2", revoked)
	eventually("the revocation denies the workload", func() bool {
		code, reason := get()
		return code == http.StatusForbidden && reason == "revoked"
	})
	mu.Lock()
	got := strings.Join(acks, ",")
	mu.Unlock()
	if !strings.Contains(got, "v1") || !strings.Contains(got, "v2") {
		t.Errorf("ACKed versions %q, want v1 and v2", got)
	}

	stop()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("escrow proxy: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("escrow proxy did not stop within 20s")
	}
}
