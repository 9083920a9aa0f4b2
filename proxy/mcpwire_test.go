package proxy

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/escrowproxy/escrow/internal/nodetest"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// mcpPolicy lets every HTTP request through (the transport) and decides the tool calls: search
// always, read_file only under /workspace, nothing else (delete_repo is never permitted).
const mcpPolicy = `
@id("transport")
permit (principal, action in [Action::"read", Action::"write"], resource);
@id("search")
permit (principal, action == Action::"tools/call", resource == Tool::"mcp.example.test/search");
@id("read-workspace")
permit (principal, action == Action::"tools/call", resource == Tool::"mcp.example.test/read_file")
when { context has mcp && context.mcp.arguments has path && context.mcp.arguments.path like "/workspace/*" };
`

type mcpArgs struct {
	Path  string `json:"path,omitempty"`
	Query string `json:"query,omitempty"`
	Name  string `json:"name,omitempty"`
}

// newMCPUpstream is a real MCP server (the official Go SDK, Streamable HTTP) behind TLS that
// logs every tool call it executes and the Authorization it was sent.
func newMCPUpstream(t *testing.T, jsonResponse bool) (*upstream, func() []string) {
	var mu sync.Mutex
	var calls []string
	srv := sdk.NewServer(&sdk.Implementation{Name: "test-server", Version: "1.0.0"}, nil)
	for _, name := range []string{"read_file", "search", "delete_repo"} {
		sdk.AddTool(srv, &sdk.Tool{Name: name}, func(_ context.Context, req *sdk.CallToolRequest, a mcpArgs) (*sdk.CallToolResult, any, error) {
			mu.Lock()
			calls = append(calls, name+" "+a.Path+a.Query+a.Name)
			mu.Unlock()
			return &sdk.CallToolResult{Content: []sdk.Content{&sdk.TextContent{Text: "ok " + name}}}, nil, nil
		})
	}
	h := sdk.NewStreamableHTTPHandler(func(*http.Request) *sdk.Server { return srv },
		&sdk.StreamableHTTPOptions{JSONResponse: jsonResponse, DisableLocalhostProtection: true})
	auth := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+testSecret {
			http.Error(w, "no credential", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
	up := newTLSUpstream(t, auth, false, "mcp.example.test")
	return up, func() []string { mu.Lock(); defer mu.Unlock(); return slices.Clone(calls) }
}

func TestProxy_MCPDecidesEachToolCallAndFiltersTheToolList(t *testing.T) {
	for _, mode := range []struct {
		name string
		json bool
	}{{"sse", false}, {"json", true}} {
		t.Run(mode.name, func(t *testing.T) {
			up, calls := newMCPUpstream(t, mode.json)
			tp := newTestProxy(t, "upstreams:\n"+up.route("mcp.example.test",
				"credential: api", "inject: {header: Authorization, value: \"Bearer {{.Token}}\"}", "mcp: {path: /mcp}"),
				withPolicy(mcpPolicy))
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			client := sdk.NewClient(&sdk.Implementation{Name: "agent", Version: "1.0.0"}, nil)
			cs, err := client.Connect(ctx, &sdk.StreamableClientTransport{
				Endpoint: "https://mcp.example.test/mcp", HTTPClient: tp.Client, MaxRetries: -1}, nil)
			must(t, err)
			defer cs.Close()

			// The model is shown only what it may call: delete_repo is never permitted.
			list, err := cs.ListTools(ctx, nil)
			must(t, err)
			var names []string
			for _, tool := range list.Tools {
				names = append(names, tool.Name)
			}
			slices.Sort(names)
			if !slices.Equal(names, []string{"read_file", "search"}) {
				t.Errorf("tools/list = %v, want [read_file search] (delete_repo filtered out)", names)
			}

			if res, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: "search", Arguments: map[string]any{"query": "q"}}); err != nil || res.IsError {
				t.Fatalf("search: %v %+v", err, res)
			}
			if res, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: "read_file", Arguments: map[string]any{"path": "/workspace/a"}}); err != nil || res.IsError {
				t.Fatalf("read_file /workspace/a: %v %+v", err, res)
			}
			for _, c := range []*sdk.CallToolParams{
				{Name: "read_file", Arguments: map[string]any{"path": "/etc/passwd"}},
				{Name: "delete_repo", Arguments: map[string]any{"name": "org/repo"}},
			} {
				_, err := cs.CallTool(ctx, c)
				if err == nil || !strings.Contains(err.Error(), "policy_denied") {
					t.Errorf("%s %v: err = %v, want the JSON-RPC denial naming policy_denied", c.Name, c.Arguments, err)
				}
			}
			// The session survives a denial.
			if _, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: "search", Arguments: map[string]any{"query": "again"}}); err != nil {
				t.Fatalf("search after a denial: %v", err)
			}

			if got, want := calls(), []string{"search q", "read_file /workspace/a", "search again"}; !slices.Equal(got, want) {
				t.Errorf("the server executed %q, want %q (never a denied call)", got, want)
			}
			var denied *struct{ tool, reason, sha string }
			for _, r := range tp.Records() {
				for _, m := range r.MCP {
					if m.Tool == "delete_repo" {
						denied = &struct{ tool, reason, sha string }{m.Tool, r.Reason, m.ArgumentsSHA256}
						if m.Arguments != "" {
							t.Errorf("the record kept the arguments without audit.mcp_arguments: %q", m.Arguments)
						}
					}
				}
			}
			if denied == nil || denied.reason != "policy_denied" || len(denied.sha) != 64 {
				t.Errorf("record of the denied delete_repo = %+v, want reason policy_denied and the arguments' sha256", denied)
			}
			if n := testutil.ToFloat64(tp.Metrics.MCPCalls.WithLabelValues("deny", "tools/call")); n != 2 {
				t.Errorf("escrow_mcp_calls_total{decision=deny,method=tools/call} = %v, want 2", n)
			}
			if n := testutil.ToFloat64(tp.Metrics.MCPCalls.WithLabelValues("allow", "tools/call")); n != 3 {
				t.Errorf("escrow_mcp_calls_total{decision=allow,method=tools/call} = %v, want 3", n)
			}
		})
	}
}

func TestProxy_MCPRefusesAMalformedBodyWithoutForwardingIt(t *testing.T) {
	up, calls := newMCPUpstream(t, true)
	tp := newTestProxy(t, "upstreams:\n"+up.route("mcp.example.test",
		"credential: api", "inject: {header: Authorization, value: \"Bearer {{.Token}}\"}", "mcp: {path: /mcp}"),
		withPolicy(mcpPolicy))
	body := `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"delete_repo","name":"search","arguments":{}}}`
	req, _ := http.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp := tp.Do(t, req)
	out := string(readBody(t, resp))
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(out, `"id":7`) && !strings.Contains(out, "mcp_duplicate_key") {
		t.Errorf("duplicate key: %d %s, want 400 with a JSON-RPC error", resp.StatusCode, out)
	}
	if resp.Header.Get(RequestIDHeader) == "" {
		t.Error("the denial has no X-Escrow-Request-Id")
	}
	if got := calls(); len(got) != 0 {
		t.Errorf("the server executed %q", got)
	}
	rec := tp.Record(t, 1)
	if rec.Reason != string(ReasonBadRequest) {
		t.Errorf("record reason = %q, want bad_request", rec.Reason)
	}
}

// The TypeScript MCP SDK's client (npm, run by node through undici's ProxyAgent, trusting
// escrow's bundle) sees the same decisions as the Go SDK's: the list filtered, allowed calls
// answered by the server, denied calls refused with escrow's JSON-RPC error.
func TestProxy_MCPTypeScriptSDKClientThroughEscrow(t *testing.T) {
	if testing.Short() {
		t.Skip("the TypeScript SDK client needs npm packages")
	}
	script := nodetest.Script(t, filepath.Join("mcp", "testdata", "ts-client"))
	up, calls := newMCPUpstream(t, false)
	tp := newTestProxy(t, "upstreams:\n"+up.route("mcp.example.test",
		"credential: api", "inject: {header: Authorization, value: \"Bearer {{.Token}}\"}", "mcp: {path: /mcp}"),
		withPolicy(mcpPolicy))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", script)
	cmd.Env = append(os.Environ(), "MCP_ENDPOINT=https://mcp.example.test/mcp", "HTTPS_PROXY="+tp.URL.String(),
		"ESCROW_CA_FILE="+tp.BundleFile, "MCP_HIDDEN_TOOL=delete_repo")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("TypeScript client: %v\n%s", err, out)
	}
	for _, want := range []string{`"step":"tools/list"`, `"code":-32050`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("client output lacks %s:\n%s", want, out)
		}
	}
	for _, c := range calls() {
		if strings.Contains(c, "/etc/passwd") || strings.HasPrefix(c, "delete_repo") {
			t.Errorf("the server executed a denied call: %q", c)
		}
	}
}

// A tools/list answer escrow cannot filter (here compressed, which it did not ask for) is never
// delivered: 502 response_unscannable, recorded as such, not as an unavailable upstream.
func TestProxy_MCPRefusesAToolListItCannotFilter(t *testing.T) {
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Encoding", "gzip")
		_, _ = w.Write([]byte("\x1f\x8b not really gzip, and not filterable"))
	}), false, "mcp.example.test")
	tp := newTestProxy(t, "upstreams:\n"+up.route("mcp.example.test", "mcp: {path: /mcp}"), withPolicy(mcpPolicy))
	req, _ := http.NewRequest(http.MethodPost, "https://mcp.example.test/mcp",
		strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp := tp.Do(t, req)
	body := string(readBody(t, resp))
	if resp.StatusCode != http.StatusBadGateway || strings.Contains(body, "not filterable") {
		t.Errorf("unfilterable tools/list: %d %q, want 502 and nothing of the upstream's body", resp.StatusCode, body)
	}
	if rec := tp.Record(t, 1); rec.Outcome != string(ReasonResponseUnscannable) {
		t.Errorf("record outcome %q, want %s", rec.Outcome, ReasonResponseUnscannable)
	}
}
