package mcp

import (
	"context"
	"net/http"
	"net/http/httputil"
	"net/url"
	"regexp"
	"sync"
	"testing"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/policy"
)

// gate is the test harness: a reverse proxy that applies this package in front of an MCP
// server the way escrow's pipeline does (the request's own decision, then Inspect, one decision
// per call, Deny or forward, and the tools/list filter on the way back), with a real policy
// engine. It is what the proxy's wiring must do; the proxy's own tests cover the rest of the
// pipeline.
type gate struct {
	t        testing.TB
	insp     *Inspector
	eng      *policy.Engine
	scope    *policy.Engine // the same permits without their conditions, for listable
	id       attest.Identity
	host     string // the upstream's name in the policy
	upstream *url.URL

	mu       sync.Mutex
	records  []gateRecord
	sessions []string // Mcp-Session-Id of every POST
	named    int      // POSTs with an Mcp-Name header
}

// gateRecord is what the harness's audit record keeps of one request.
type gateRecord struct {
	method  string // HTTP method
	reason  string // "allowed" or the denial's reason
	policy  []string
	mcp     []Audit
	errKind error
}

// newGate puts a gate deciding with the Cedar policies text in front of upstream.
func newGate(t testing.TB, text, upstream, host string) *gate {
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	return &gate{
		t: t, insp: newTestInspector(t, Options{Path: "/mcp"}), host: host, upstream: u,
		eng: compiledEngine(t, text), scope: compiledEngine(t, whenClause.ReplaceAllString(text, "")),
		id: attest.Identity{SPIFFEID: "spiffe://example.org/ns/agents/sa/coder", TrustDomain: "example.org", Attested: true, Source: attest.SourceStatic},
	}
}

func (g *gate) record(r gateRecord) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.records = append(g.records, r)
}

func (g *gate) snapshot() []gateRecord {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]gateRecord(nil), g.records...)
}

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	in := policy.Input{
		Identity: g.id, Action: r.Method, Scheme: "https", Host: g.host, Port: 443, Path: r.URL.Path,
	}
	rec := gateRecord{method: r.Method}
	// The transport: the HTTP request itself, decided as any other.
	if d := g.eng.Decide(ctx, in); !d.Allow {
		rec.reason = string(d.Reason)
		g.record(rec)
		http.Error(w, "denied", http.StatusForbidden)
		return
	}
	var filter func(*http.Response) error
	if g.insp.Applies(r) {
		g.mu.Lock()
		g.sessions = append(g.sessions, r.Header.Get("Mcp-Session-Id"))
		if r.Header.Get("Mcp-Name") != "" {
			g.named++
		}
		g.mu.Unlock()
		call, err := g.insp.Inspect(r, in)
		if err != nil {
			rec.reason, rec.errKind = "bad_request", err
			g.record(rec)
			WriteError(w, err, "bad_request", "req-test")
			return
		}
		rec.mcp = call.Audit(false)
		for k, extra := range call.Inputs() {
			d := g.eng.Decide(ctx, extra)
			rec.policy = append(rec.policy, d.PolicyIDs...)
			if !d.Allow {
				rec.reason = string(d.Reason)
				g.record(rec)
				call.Deny(w, Denial{Input: k, Reason: string(d.Reason), RequestID: "req-test"})
				return
			}
		}
		filter = call.ResponseFilter(func(tool string) bool { return g.listable(ctx, tool) })
	} else {
		filter = g.insp.StreamFilter(r, func(tool string) bool { return g.listable(ctx, tool) })
	}
	rec.reason = "allowed"
	g.record(rec)
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(g.upstream)
			pr.Out.Host = ""
		},
		FlushInterval:  -1,
		ModifyResponse: filter,
	}
	rp.ServeHTTP(w, r)
}

// whenClause matches the one-line conditions of the tests' policies.
var whenClause = regexp.MustCompile(`(?m)^\s*when \{.*\}`)

// listable is the harness's answer to "could a permit match a call of this tool by this
// workload, whatever its arguments": a call is allowed by the policies with their conditions
// removed (the tests' policies have no forbid). The proxy's answer is the policy engine's.
func (g *gate) listable(ctx context.Context, tool string) bool {
	d := g.scope.Decide(ctx, policy.Input{
		Identity: g.id, Action: policy.ActionToolsCall, Scheme: "https", Host: g.host, Port: 443, Path: "/mcp",
		Resource: policy.Resource{Type: policy.TypeTool, ID: g.host + "/" + tool},
		MCP:      &policy.MCPCall{Method: policy.ActionToolsCall, Name: tool, Arguments: map[string]any{}},
	})
	return d.Allow
}
