package broker

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
	"github.com/escrowproxy/escrow/controlplane/sidecar"
	"github.com/escrowproxy/escrow/credential"
)

const (
	allowed   = "spiffe://example.org/ns/agents/sa/coder"
	other     = "spiffe://example.org/ns/agents/sa/other"
	rootKey   = "-----BEGIN RSA PRIVATE KEY-----MIIEowIBAAKCAQEAroot-secret-never-sent"
	ghToken   = "ghs_brokeredInstallationToken0001"
	ghCred    = "github"
	multiCred = "aws-like"
)

// minter is a controller stand-in: it allows one workload, and answers by name.
type minter struct {
	mu      sync.Mutex
	callers []string
	exp     time.Time
}

func (m *minter) Mint(_ context.Context, r Request) (credential.Token, error) {
	m.mu.Lock()
	m.callers = append(m.callers, r.Caller.String())
	m.mu.Unlock()
	switch {
	case r.Credential == "forever":
		return credential.NewToken(r.Credential, ghToken, time.Time{}), nil
	case r.Credential == "broken":
		// The cause names the root secret (as a careless upstream error might): it must stay
		// in the controller's log.
		return credential.Token{}, errors.New("github answered 401 for key " + rootKey)
	case r.Credential != ghCred && r.Credential != multiCred:
		return credential.Token{}, Refuse(ResultNotFound, nil)
	case r.Caller.String() != allowed:
		return credential.Token{}, Refuse(ResultDenied, errors.New("not in spiffe_ids, key "+rootKey))
	case r.Credential == multiCred:
		return credential.NewTokenParts(r.Credential, map[string]string{"access_key_id": "AKIA1", "secret_access_key": "s3cr3t"}, m.exp), nil
	}
	return credential.NewToken(r.Credential, ghToken, m.exp), nil
}

type observed struct {
	mu  sync.Mutex
	got []string
}

func (o *observed) observe(cred string, r Result) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.got = append(o.got, cred+"="+string(r))
}

func (o *observed) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return strings.Join(o.got, ",")
}

type fixture struct {
	ca   *controllertest.CA
	addr string
	m    *minter
	obs  *observed
	logs *observer.ObservedLogs
}

// start serves Broker over real gRPC with mTLS, as the controller does: its own X509-SVID,
// clients verified against the trust bundle and required to be members of the trust domain.
func start(t *testing.T) *fixture {
	t.Helper()
	ca, err := controllertest.NewCA("example.org")
	if err != nil {
		t.Fatal(err)
	}
	own, err := ca.SVID("spiffe://example.org/ns/escrow/sa/escrow-controller")
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	f := &fixture{ca: ca, m: &minter{exp: time.Now().Add(time.Hour).Truncate(time.Second)}, obs: &observed{}, logs: logs}
	s, err := NewServer(ServerOptions{Minter: f.m, Logger: zap.New(core), Observe: f.obs.observe})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsconfig.MTLSServerConfig(own, ca.Bundle(), tlsconfig.AuthorizeMemberOf(ca.TD)))))
	s.Register(g)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)
	f.addr = l.Addr().String()
	return f
}

// dial connects as the sidecar does (controlplane/sidecar's mTLS credentials) with an SVID for id.
func (f *fixture) dial(t *testing.T, id string) *grpc.ClientConn {
	t.Helper()
	svid, err := f.ca.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	creds, err := sidecar.MTLS(&config.XDS{Address: f.addr}, svid, f.ca.Bundle())
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func (f *fixture) logText() string {
	var b strings.Builder
	for _, e := range f.logs.All() {
		b.WriteString(e.Message)
		for k, v := range e.ContextMap() {
			b.WriteString(" " + k + "=")
			b.WriteString(strings.TrimSpace(strings.ReplaceAll(fmtAny(v), "\n", " ")))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func fmtAny(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	if e, ok := v.(error); ok {
		return e.Error()
	}
	return ""
}

func TestBroker_AnAllowedWorkloadGetsTheTokenWithItsExpiry(t *testing.T) {
	f := start(t)
	c := NewClient(f.dial(t, allowed))
	tok, err := c.Mint(context.Background(), credential.BrokerRequest{Name: ghCred})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != ghToken || tok.Name() != ghCred || !tok.ExpiresAt().Equal(f.m.exp) {
		t.Fatalf("token %v value %q expiring %v; want %v", tok, tok.Value(), tok.ExpiresAt(), f.m.exp)
	}
	// The minter saw the certificate's ID, which is what it authorizes.
	if strings.Join(f.m.callers, ",") != allowed {
		t.Errorf("callers %v", f.m.callers)
	}
	if f.obs.String() != ghCred+"=ok" {
		t.Errorf("observed %s", f.obs)
	}
	if strings.Contains(f.logText(), ghToken) {
		t.Errorf("the log holds the token:\n%s", f.logText())
	}
}

func TestBroker_MultiPartTokensKeepEveryPart(t *testing.T) {
	f := start(t)
	tok, err := NewClient(f.dial(t, allowed)).Mint(context.Background(), credential.BrokerRequest{Name: multiCred})
	if err != nil {
		t.Fatal(err)
	}
	if !tok.MultiPart() || tok.Part("access_key_id") != "AKIA1" || tok.Part("secret_access_key") != "s3cr3t" {
		t.Fatalf("token %v parts %v", tok, tok.PartNames())
	}
}

func TestBroker_AnotherWorkloadIsPermissionDeniedWithoutTheCause(t *testing.T) {
	f := start(t)
	conn := f.dial(t, other)
	_, err := NewClient(conn).Mint(context.Background(), credential.BrokerRequest{Name: ghCred})
	if err == nil || !strings.Contains(err.Error(), "PermissionDenied") || !strings.Contains(err.Error(), `may not use credential "github"`) {
		t.Fatalf("error %v; want PermissionDenied", err)
	}
	if strings.Contains(err.Error(), rootKey) || strings.Contains(err.Error(), "spiffe_ids") {
		t.Errorf("the refusal carries the internal cause: %v", err)
	}
	if f.obs.String() != ghCred+"=denied" {
		t.Errorf("observed %s", f.obs)
	}
	// The controller's log says why.
	if !strings.Contains(f.logText(), "not in spiffe_ids") || !strings.Contains(f.logText(), "caller="+other) {
		t.Errorf("log:\n%s", f.logText())
	}
}

func TestBroker_RefusalsMapToCodesAndBoundTheirLabels(t *testing.T) {
	f := start(t)
	conn := f.dial(t, allowed)
	for name, want := range map[string]codes.Code{"missing": codes.NotFound, "broken": codes.Unavailable, "forever": codes.Unavailable} {
		in, _ := EncodeRequest(MintRequest{Credential: name})
		err := conn.Invoke(context.Background(), MintMethod, in, new(structpb.Struct))
		if status.Code(err) != want {
			t.Errorf("%s: %v; want %s", name, err, want)
		}
		if strings.Contains(status.Convert(err).Message(), rootKey) {
			t.Errorf("%s: the status carries the cause: %v", name, err)
		}
	}
	// An unknown name is not a label value: callers choose it.
	if got := f.obs.String(); !strings.Contains(got, "=not_found") || strings.Contains(got, "missing") || !strings.Contains(got, "broken=unavailable") {
		t.Errorf("observed %s", got)
	}
}

func TestBroker_ARequestWithAnUnknownFieldIsInvalidArgument(t *testing.T) {
	f := start(t)
	conn := f.dial(t, allowed)
	for _, in := range []map[string]any{
		{"credential": ghCred, "spiffe_id": allowed}, // a claimed identity is not a field
		{"credential": ""},
		{"credential": 7.0},
	} {
		st, err := structpb.NewStruct(in)
		if err != nil {
			t.Fatal(err)
		}
		err = conn.Invoke(context.Background(), MintMethod, st, new(structpb.Struct))
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%v: %v; want InvalidArgument", in, err)
		}
	}
	if len(f.m.callers) != 0 {
		t.Errorf("the minter was asked: %v", f.m.callers)
	}
}

func TestBroker_ANonMemberOfTheTrustDomainCannotConnect(t *testing.T) {
	f := start(t)
	foreign, err := controllertest.NewCA("evil.example")
	if err != nil {
		t.Fatal(err)
	}
	svid, _ := foreign.SVID("spiffe://evil.example/ns/agents/sa/coder")
	creds, _ := sidecar.MTLS(&config.XDS{Address: f.addr, ServerID: "spiffe://example.org/ns/escrow/sa/escrow-controller"}, svid, f.ca.Bundle())
	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := NewClient(conn).Mint(ctx, credential.BrokerRequest{Name: ghCred}); err == nil {
		t.Fatal("a foreign SVID minted a token")
	}
	if len(f.m.callers) != 0 {
		t.Errorf("the minter was asked: %v", f.m.callers)
	}
}

func TestDecode_IsStrictAndNeverQuotesTheToken(t *testing.T) {
	exp := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for name, c := range map[string]struct {
		in   map[string]any
		want string
	}{
		"unknown field":   {map[string]any{"value": ghToken, "expires_at": exp.Format(time.RFC3339), "token": ghToken}, `unknown field "token"`},
		"no expiry":       {map[string]any{"value": ghToken}, "expires_at: required"},
		"value and parts": {map[string]any{"value": ghToken, "parts": map[string]any{"a": ghToken}, "expires_at": exp.Format(time.RFC3339)}, "exactly one of value or parts"},
		"neither":         {map[string]any{"expires_at": exp.Format(time.RFC3339)}, "exactly one of value or parts"},
		"bad time":        {map[string]any{"value": "x", "expires_at": ghToken}, "expires_at: want an RFC 3339 time"},
		"wrong type":      {map[string]any{"value": 1.0, "expires_at": exp.Format(time.RFC3339)}, "value: want a string"},
	} {
		st, err := structpb.NewStruct(c.in)
		if err != nil {
			t.Fatal(err)
		}
		_, err = DecodeResponse(st)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v; want %q", name, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), ghToken) {
			t.Errorf("%s: the error quotes the token: %v", name, err)
		}
	}
	if _, err := DecodeResponse(nil); err == nil {
		t.Error("a nil message decoded")
	}
}

func TestNewServer_NeedsAMinter(t *testing.T) {
	if _, err := NewServer(ServerOptions{}); err == nil {
		t.Fatal("no error")
	}
}
