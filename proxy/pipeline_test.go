package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/internal/fakeclock"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/telemetry"
)

// The pipeline with small fakes for identity, policy and credentials: each step's failure must
// end in its own denial, before any later step runs, and only a request that passes every step
// reaches the upstream with the credential on it.

type fakeIdentity struct {
	id  attest.Identity
	err error
}

func (f fakeIdentity) Identify(context.Context, attest.Peer) (attest.Identity, error) {
	return f.id, f.err
}

type fakeAuthorizer struct {
	mu     sync.Mutex
	decide func(policy.Input) policy.Decision
	inputs []policy.Input
}

func (f *fakeAuthorizer) Decide(_ context.Context, in policy.Input) policy.Decision {
	f.mu.Lock()
	f.inputs = append(f.inputs, in)
	f.mu.Unlock()
	return f.decide(in)
}

type fakeCredentials struct {
	mu   sync.Mutex
	tok  credential.Token
	err  error
	reqs []credential.Request
}

func (f *fakeCredentials) Get(_ context.Context, r credential.Request) (credential.Token, error) {
	f.mu.Lock()
	f.reqs = append(f.reqs, r)
	f.mu.Unlock()
	return f.tok, f.err
}

type fakeLeaves struct{}

func (fakeLeaves) Leaf(string) (*tls.Certificate, error) {
	return nil, errors.New("no leaves in this test")
}

type recorderSink struct {
	mu   sync.Mutex
	recs []*audit.Record
}

func (s *recorderSink) Write(r *audit.Record) {
	s.mu.Lock()
	s.recs = append(s.recs, r)
	s.mu.Unlock()
}

func allow(policy.Input) policy.Decision {
	return policy.Decision{Allow: true, Reason: policy.ReasonAllowed, PolicyIDs: []string{"p1"}}
}

func deny(policy.Input) policy.Decision {
	return policy.Decision{Reason: policy.ReasonDenied, PolicyIDs: []string{"no"}}
}

// newPipeline builds a Proxy (no listeners, no goroutines) on the fakes, routing
// api.example.com to a plain HTTP upstream that echoes the Authorization it received.
func newPipeline(t *testing.T, mode string, id Identifier, pol Authorizer, creds Credentials, inspect func(config.Upstream) Inspector) (*Proxy, *recorderSink, *int) {
	t.Helper()
	hits := new(int)
	var mu sync.Mutex
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		*hits++
		mu.Unlock()
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "auth=%s body=%s", r.Header.Get("Authorization"), body)
	}))
	t.Cleanup(up.Close)
	cfg, err := config.Parse([]byte(`
identity: {static: spiffe://example.org/ns/agents/sa/coder}
policy: {dir: policies, mode: ` + mode + `}
upstreams:
  - host: api.example.com
    address: ` + up.Listener.Addr().String() + `
    credential: api
    unsafe_plaintext_credential: true
    scrub_responses: false # the upstream echoes the credential for the test to check
credentials:
  api: {static: {env: UNUSED}}
egress: {allow_cidrs: [127.0.0.0/8]}
`))
	if err != nil {
		t.Fatal(err)
	}
	sink := &recorderSink{}
	clock := fakeclock.New(time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC))
	p, err := New(Options{Config: cfg, Identity: id, Policy: pol, Credentials: creds, CA: fakeLeaves{},
		Audit: sink, Metrics: telemetry.New(telemetry.Options{}), Now: clock.Now, Inspectors: inspect})
	if err != nil {
		t.Fatal(err)
	}
	return p, sink, hits
}

func TestPipeline_EachStepFailsClosedWithItsOwnReason(t *testing.T) {
	coder := attest.Identity{SPIFFEID: "spiffe://example.org/ns/agents/sa/coder", Source: "static"}
	tok := credential.NewToken("api", "sk-pipeline-secret", time.Time{})
	for _, tc := range []struct {
		name       string
		mode       string
		id         fakeIdentity
		decide     func(policy.Input) policy.Decision
		creds      *fakeCredentials
		wantStatus int
		wantReason Reason
		wantUp     bool // the upstream was reached
		wantPolicy bool // the policy was asked
		wantCred   bool // a credential was fetched
		wouldDeny  bool
	}{
		{name: "allowed", mode: "enforce", id: fakeIdentity{id: coder}, decide: allow, creds: &fakeCredentials{tok: tok},
			wantStatus: 200, wantReason: ReasonAllowed, wantUp: true, wantPolicy: true, wantCred: true},
		{name: "no identity", mode: "enforce", id: fakeIdentity{err: attest.ErrUnavailable}, decide: allow, creds: &fakeCredentials{tok: tok},
			wantStatus: 503, wantReason: ReasonIdentityUnavailable},
		{name: "policy denies", mode: "enforce", id: fakeIdentity{id: coder}, decide: deny, creds: &fakeCredentials{tok: tok},
			wantStatus: 403, wantReason: ReasonPolicyDenied, wantPolicy: true},
		{name: "policy error", mode: "enforce", id: fakeIdentity{id: coder},
			decide: func(policy.Input) policy.Decision { return policy.Decision{Reason: policy.ReasonError} },
			creds:  &fakeCredentials{tok: tok}, wantStatus: 403, wantReason: ReasonPolicyError, wantPolicy: true},
		{name: "no policy loaded, even in report mode", mode: "report", id: fakeIdentity{id: coder},
			decide: func(policy.Input) policy.Decision { return policy.Decision{Reason: policy.ReasonUnavailable} },
			creds:  &fakeCredentials{tok: tok}, wantStatus: 503, wantReason: ReasonPolicyUnavailable, wantPolicy: true},
		{name: "report mode lets a policy denial through", mode: "report", id: fakeIdentity{id: coder}, decide: deny,
			creds: &fakeCredentials{tok: tok}, wantStatus: 200, wantReason: ReasonPolicyDenied, wantUp: true, wantPolicy: true,
			wantCred: true, wouldDeny: true},
		{name: "credential unavailable", mode: "enforce", id: fakeIdentity{id: coder}, decide: allow,
			creds:      &fakeCredentials{err: errors.New("credential: api: unavailable")},
			wantStatus: 503, wantReason: ReasonCredentialUnavailable, wantPolicy: true, wantCred: true},
		{name: "a credential that cannot be applied is never sent without it", mode: "enforce", id: fakeIdentity{id: coder}, decide: allow,
			creds:      &fakeCredentials{tok: credential.NewToken("api", "bad\nvalue", time.Time{})},
			wantStatus: 503, wantReason: ReasonCredentialUnavailable, wantPolicy: true, wantCred: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pol := &fakeAuthorizer{decide: tc.decide}
			p, sink, hits := newPipeline(t, tc.mode, tc.id, pol, tc.creds, nil)
			w := httptest.NewRecorder()
			r := httptest.NewRequest(http.MethodGet, "http://api.example.com/v1/models", nil)
			r.Header.Set("Authorization", "Bearer agent-own-token")
			p.ServeHTTP(w, r)

			if w.Code != tc.wantStatus {
				t.Fatalf("status %d, want %d (body %q)", w.Code, tc.wantStatus, w.Body)
			}
			if (*hits > 0) != tc.wantUp {
				t.Errorf("upstream reached %d times, want reached=%v", *hits, tc.wantUp)
			}
			if (len(pol.inputs) > 0) != tc.wantPolicy {
				t.Errorf("policy asked %d times, want asked=%v", len(pol.inputs), tc.wantPolicy)
			}
			if (len(tc.creds.reqs) > 0) != tc.wantCred {
				t.Errorf("credential fetched %d times, want fetched=%v", len(tc.creds.reqs), tc.wantCred)
			}
			if tc.wantUp {
				if want := "auth=Bearer sk-pipeline-secret body="; w.Body.String() != want {
					t.Errorf("upstream saw %q, want %q", w.Body, want)
				}
			} else {
				if got := w.Header().Get(ReasonHeader); got != string(tc.wantReason) {
					t.Errorf("%s = %q, want %q", ReasonHeader, got, tc.wantReason)
				}
				if strings.Contains(w.Body.String(), "sk-pipeline-secret") || strings.Contains(w.Body.String(), "credential: api") {
					t.Errorf("denial body leaks internals: %q", w.Body)
				}
			}
			if len(sink.recs) != 1 {
				t.Fatalf("%d audit records, want exactly 1", len(sink.recs))
			}
			rec := sink.recs[0]
			if rec.Reason != string(tc.wantReason) || rec.WouldDeny != tc.wouldDeny || rec.Mode != tc.mode {
				t.Errorf("record reason=%q would_deny=%v mode=%q, want %q %v %q", rec.Reason, rec.WouldDeny, rec.Mode, tc.wantReason, tc.wouldDeny, tc.mode)
			}
			if len(pol.inputs) > 0 {
				in := pol.inputs[0]
				if in.Identity.SPIFFEID != coder.SPIFFEID || in.Action != "GET" || in.Host != "api.example.com" ||
					in.Path != "/v1/models" || in.Credential != "api" || in.Time.IsZero() {
					t.Errorf("policy input %+v", in)
				}
			}
			if len(tc.creds.reqs) > 0 {
				if got := tc.creds.reqs[0]; got != (credential.Request{Name: "api", Subject: coder.SPIFFEID}) {
					t.Errorf("credential request %+v: want the route's name and the caller as subject", got)
				}
			}
		})
	}
}

// bodyInspector reads the body (bounded), puts it back, and asks for one more decision per
// line naming a tool: the shape the MCP inspector will have.
type bodyInspector struct{ err error }

func (b bodyInspector) Inspect(_ context.Context, r *http.Request, in Inspection) ([]policy.Input, error) {
	if b.err != nil {
		return nil, b.err
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<10))
	if err != nil {
		return nil, err
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	var out []policy.Input
	for _, tool := range strings.Fields(string(body)) {
		x := in.Input
		x.Action, x.Host = "tools/call", in.Input.Host+"/"+tool
		out = append(out, x)
	}
	return out, nil
}

func TestPipeline_InspectorAddsDecisionsBetweenRoutingAndCredential(t *testing.T) {
	coder := attest.Identity{SPIFFEID: "spiffe://example.org/ns/agents/sa/coder"}
	tok := credential.NewToken("api", "sk-pipeline-secret", time.Time{})
	denyDelete := func(in policy.Input) policy.Decision {
		if in.Host == "api.example.com/delete_repo" {
			return deny(in)
		}
		return allow(in)
	}
	for _, tc := range []struct {
		name       string
		body       string
		inspector  bodyInspector
		wantStatus int
		wantInputs int
	}{
		{"every extra decision allows: forwarded with the body intact", "search read", bodyInspector{}, 200, 3},
		{"one extra decision denies: refused", "search delete_repo", bodyInspector{}, 403, 3},
		{"the inspector fails: bad request", "x", bodyInspector{err: errors.New("not JSON-RPC")}, 400, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pol := &fakeAuthorizer{decide: denyDelete}
			creds := &fakeCredentials{tok: tok}
			p, sink, hits := newPipeline(t, "enforce", fakeIdentity{id: coder}, pol, creds,
				func(config.Upstream) Inspector { return tc.inspector })
			w := httptest.NewRecorder()
			p.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "http://api.example.com/mcp", strings.NewReader(tc.body)))
			if w.Code != tc.wantStatus {
				t.Fatalf("status %d, want %d (%s)", w.Code, tc.wantStatus, w.Body)
			}
			if len(pol.inputs) != tc.wantInputs {
				t.Errorf("%d decisions, want %d", len(pol.inputs), tc.wantInputs)
			}
			if tc.wantStatus == 200 {
				if want := "auth=Bearer sk-pipeline-secret body=" + tc.body; w.Body.String() != want {
					t.Errorf("upstream saw %q, want %q", w.Body, want)
				}
				for _, in := range pol.inputs[1:] {
					if in.Identity.SPIFFEID != coder.SPIFFEID || in.Time.IsZero() {
						t.Errorf("extra decision without identity or time: %+v", in)
					}
				}
			} else if *hits != 0 || len(creds.reqs) != 0 {
				t.Errorf("refused request reached the upstream (%d) or fetched a credential (%d)", *hits, len(creds.reqs))
			}
			if len(sink.recs) != 1 {
				t.Errorf("%d records, want 1", len(sink.recs))
			}
		})
	}
}
