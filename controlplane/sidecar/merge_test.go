package sidecar

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/policy"
)

func baseConfig(t *testing.T, extra string) *config.Config {
	t.Helper()
	c, err := config.Parse([]byte("identity: {spiffe: {}}\nxds: {address: c:1}\n" + extra))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestMerge_ANameInBothTheFileAndTheBundleIsRefused(t *testing.T) {
	base := baseConfig(t, "credentials: {api: {static: {env: API_KEY}}}\n")
	pol := policy.Source{Policies: map[string][]byte{"base.cedar": []byte(`@id("base") permit (principal, action, resource);`)}}
	_, err := merge(base, pol, bundle.Bundle{
		Credentials: map[string]config.Credential{"api": {Static: &config.Static{Env: "OTHER"}}},
		Policies:    map[string]string{"base.cedar": `@id("x") permit (principal, action, resource);`},
	})
	if err == nil || !strings.Contains(err.Error(), "credentials.api: defined in the sidecar's config file and pushed") || !strings.Contains(err.Error(), `policies["base.cedar"]`) {
		t.Fatalf("merge = %v", err)
	}
}

func TestMerge_ValidatesTheWholeAsAFileWithKeyPaths(t *testing.T) {
	base := baseConfig(t, "upstreams: [{host: api.example.com, tunnel: true}]\n")
	_, err := merge(base, policy.Source{}, bundle.Bundle{
		Upstreams: []config.Upstream{{Host: "api.example.com", Tunnel: true}, {Host: "Bad Host"}},
		Policies:  map[string]string{"a/p.cedar": `@id("p") permit (principal, action, resource);`},
	})
	for _, want := range []string{"upstreams[1].host: duplicates upstreams[0]", "upstreams[2].host: want a host name"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("merge = %v, want %q", err, want)
		}
	}
}

func TestMerge_PoliciesAreOneSetWithTheBasesSchema(t *testing.T) {
	base := baseConfig(t, "")
	// The same @id in the base and the bundle: one set, so a duplicate.
	basePol := policy.Source{Policies: map[string][]byte{"base.cedar": []byte(`@id("p") permit (principal, action, resource);`)}}
	if _, err := merge(base, basePol, bundle.Bundle{Policies: map[string]string{"a/p.cedar": `@id("p") forbid (principal, action, resource);`}}); !errors.Is(err, policy.ErrDuplicateID) {
		t.Fatalf("duplicate id across base and bundle: %v", err)
	}
	// A policy that does not match the schema the sidecar uses (the built-in one: no such
	// attribute in context).
	_, err := merge(base, basePol, bundle.Bundle{Policies: map[string]string{"a/q.cedar": `@id("q") permit (principal, action, resource) when { context.nosuch == 1 };`}})
	if !errors.Is(err, policy.ErrValidation) {
		t.Fatalf("a policy against the schema: %v", err)
	}
	m, err := merge(base, basePol, bundle.Bundle{Policies: map[string]string{"a/q.cedar": `@id("q") forbid (principal, action, resource) when { context.path == "/admin" };`}})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.source.Policies) != 2 || m.source.Origin != "xds" {
		t.Fatalf("source = %+v", m.source)
	}
}

// Every Policy object deleted: the set in force denies everything (it must not keep allowing
// what the last good set allowed).
func TestMerge_NoPoliciesAnywhereDeniesEverything(t *testing.T) {
	m, err := merge(baseConfig(t, ""), policy.Source{}, bundle.Bundle{})
	if err != nil {
		t.Fatal(err)
	}
	e := policy.NewEngine(policy.Options{})
	e.Install(m.policies)
	id, _ := attest.NewStatic("spiffe://example.org/a")
	who, _ := id.Identify(context.Background(), attest.Peer{})
	d := e.Decide(context.Background(), policy.Input{Identity: who, Action: "GET", Scheme: "https", Host: "api.example.com", Port: 443, Path: "/", Time: time.Now()})
	if d.Allow || d.Reason != policy.ReasonDenied || len(d.PolicyIDs) != 1 || d.PolicyIDs[0] != "escrow.xds.no-policies" {
		t.Fatalf("decision = %+v", d)
	}
}

func TestNew_ReadsTheBasePolicyDirOnce(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "base.cedar"), []byte(`@id("base") permit (principal, action, resource);`), 0o644); err != nil {
		t.Fatal(err)
	}
	c := baseConfig(t, "policy: {dir: "+dir+"}\n")
	s, err := New(Options{Base: c, Conn: &grpc.ClientConn{}, Apply: func(context.Context, Update) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	if string(s.basePol.Policies["base.cedar"]) == "" {
		t.Fatalf("base policies = %v", s.basePol.Policies)
	}
	if _, err := New(Options{Base: baseConfig(t, "policy: {dir: "+filepath.Join(dir, "nope")+"}\n"), Conn: &grpc.ClientConn{}, Apply: func(context.Context, Update) error { return nil }}); err == nil {
		t.Fatal("a missing base policy dir was accepted")
	}
}

// refusingADS ends every stream at once, as a controller that is up but failing would.
type refusingADS struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	respond func(discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error
}

func (a refusingADS) StreamAggregatedResources(s discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	return a.respond(s)
}

func TestRun_BacksOffExponentiallyWithJitterCappedAndResetsAfterAResponse(t *testing.T) {
	lis := bufconn.Listen(1 << 16)
	var calls sync.Mutex
	n := 0
	gs := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(gs, refusingADS{respond: func(s discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
		calls.Lock()
		n++
		k := n
		calls.Unlock()
		if k == 6 { // one stream that answers (an empty bundle), then breaks
			if _, err := s.Recv(); err != nil {
				return err
			}
			if err := s.Send(&discovery.DiscoveryResponse{VersionInfo: "e", Nonce: "1", TypeUrl: TypeURL}); err != nil {
				return err
			}
			_, _ = s.Recv() // its ACK
		}
		return grpcstatus.Error(codes.Unavailable, "not now")
	}})
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()
	conn, err := grpc.NewClient("passthrough:///x", grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var sleeps []time.Duration
	s, err := New(Options{
		Base: baseConfig(t, ""), Conn: conn, InitialBackoff: 100 * time.Millisecond, MaxBackoff: 800 * time.Millisecond,
		Rand:  func() float64 { return 0.5 },
		Apply: func(context.Context, Update) error { return nil },
		Sleep: func(ctx context.Context, d time.Duration) error {
			sleeps = append(sleeps, d)
			if len(sleeps) == 9 {
				cancel()
			}
			return ctx.Err()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v", err)
	}
	// Half the backoff plus half of it times Rand: 0.75 of 100, 200, 400, 800, 800 ms; the
	// sixth stream got a response, so the backoff starts over.
	ms := time.Millisecond
	want := []time.Duration{75 * ms, 150 * ms, 300 * ms, 600 * ms, 600 * ms, 75 * ms, 150 * ms, 300 * ms, 600 * ms}
	for i := range want {
		if sleeps[i] != want[i] {
			t.Fatalf("sleeps = %v, want %v", sleeps, want)
		}
	}
	if st := s.Status(); st.Applied != "e" || st.Connected {
		t.Fatalf("status = %+v", st)
	}
}
