package mcp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/escrowproxy/escrow/policy"
)

// The tests in this file run the official Go SDK's server and client (protocol versions up to
// 2026-07-28) through the harness gate: real Streamable HTTP, real sessions, both response
// modes.

const sdkHost = "mcp.github.example"

const sdkPolicies = `
@id("mcp-transport")
permit (principal, action in [Action::"read", Action::"write"], resource == Host::"mcp.github.example");

@id("search")
permit (principal, action == Action::"tools/call", resource == Tool::"mcp.github.example/search");

@id("read-workspace")
permit (principal, action == Action::"tools/call", resource == Tool::"mcp.github.example/read_file")
when { context.mcp.arguments has path && context.mcp.arguments.path like "/workspace/*" };

@id("readme")
permit (principal, action == Action::"resources/read", resource == Resource::"mcp.github.example/file:///workspace/README.md");

@id("prompts")
permit (principal, action == Action::"prompts/get", resource in Host::"mcp.github.example");
`

// serverLog is what the MCP server executed.
type serverLog struct {
	mu    sync.Mutex
	calls []string
}

func (l *serverLog) add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls = append(l.calls, s)
}

func (l *serverLog) all() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.calls, "\n")
}

type pathArgs struct {
	Path string `json:"path"`
}
type queryArgs struct {
	Query string `json:"query"`
}
type nameArgs struct {
	Name string `json:"name"`
}

func text(s string) *sdk.CallToolResult {
	return &sdk.CallToolResult{Content: []sdk.Content{&sdk.TextContent{Text: s}}}
}

// newSDKServer starts an MCP server with three tools, two resources and a prompt; tools/list
// answers two tools a page, so listing takes a cursor.
func newSDKServer(t *testing.T, jsonResponse, stateless bool) (*httptest.Server, *serverLog) {
	ts, log, _ := newSDKServerWith(t, jsonResponse, stateless)
	return ts, log
}

func newSDKServerWith(t *testing.T, jsonResponse, stateless bool) (*httptest.Server, *serverLog, *sdk.Server) {
	log := &serverLog{}
	srv := sdk.NewServer(&sdk.Implementation{Name: "escrow-test-server", Version: "1.0.0"}, &sdk.ServerOptions{PageSize: 2})
	sdk.AddTool(srv, &sdk.Tool{Name: "read_file", Description: "read a file"}, func(_ context.Context, _ *sdk.CallToolRequest, a pathArgs) (*sdk.CallToolResult, any, error) {
		log.add("read_file " + a.Path)
		return text("contents of " + a.Path), nil, nil
	})
	sdk.AddTool(srv, &sdk.Tool{Name: "search", Description: "search issues"}, func(_ context.Context, _ *sdk.CallToolRequest, a queryArgs) (*sdk.CallToolResult, any, error) {
		log.add("search " + a.Query)
		return text("3 results for " + a.Query), nil, nil
	})
	sdk.AddTool(srv, &sdk.Tool{Name: "delete_repo", Description: "delete a repository"}, func(_ context.Context, _ *sdk.CallToolRequest, a nameArgs) (*sdk.CallToolResult, any, error) {
		log.add("delete_repo " + a.Name)
		return text("deleted " + a.Name), nil, nil
	})
	for _, uri := range []string{"file:///workspace/README.md", "file:///etc/shadow"} {
		srv.AddResource(&sdk.Resource{URI: uri, Name: uri, MIMEType: "text/plain"}, func(_ context.Context, r *sdk.ReadResourceRequest) (*sdk.ReadResourceResult, error) {
			log.add("read " + r.Params.URI)
			return &sdk.ReadResourceResult{Contents: []*sdk.ResourceContents{{URI: r.Params.URI, MIMEType: "text/plain", Text: "text of " + r.Params.URI}}}, nil
		})
	}
	srv.AddPrompt(&sdk.Prompt{Name: "review", Arguments: []*sdk.PromptArgument{{Name: "lang"}}}, func(_ context.Context, r *sdk.GetPromptRequest) (*sdk.GetPromptResult, error) {
		log.add("prompt review " + r.Params.Arguments["lang"])
		return &sdk.GetPromptResult{Messages: []*sdk.PromptMessage{{Role: "user", Content: &sdk.TextContent{Text: "review this " + r.Params.Arguments["lang"]}}}}, nil
	})
	h := sdk.NewStreamableHTTPHandler(func(*http.Request) *sdk.Server { return srv }, &sdk.StreamableHTTPOptions{JSONResponse: jsonResponse, Stateless: stateless})
	ts := httptest.NewServer(h)
	t.Cleanup(ts.Close)
	return ts, log, srv
}

func compiledEngine(t testing.TB, text string) *policy.Engine {
	eng := policy.NewEngine(policy.Options{})
	if err := eng.Load(policy.Source{Origin: "test", Policies: map[string][]byte{"mcp.cedar": []byte(text)}}); err != nil {
		t.Fatal(err)
	}
	return eng
}

func TestSDK_ToolCallsAreDecidedOneByOneThroughTheGate(t *testing.T) {
	for _, tc := range []struct {
		version   string // asked for by the client; "" is the SDK's latest
		json      bool
		stateless bool
		want      string // negotiated
	}{
		// A stateful server cannot serve the sessionless 2026-07-28: the client falls back.
		{"", false, false, "2025-11-25"}, {"", true, false, "2025-11-25"},
		// A stateless one does: no session, and Mcp-Method / Mcp-Name headers on every call.
		{"", false, true, "2026-07-28"}, {"", true, true, "2026-07-28"},
		{"2025-06-18", false, false, "2025-06-18"}, {"2025-06-18", true, false, "2025-06-18"},
	} {
		name := fmt.Sprintf("version=%s/json=%v/stateless=%v", cmp(tc.version, "latest"), tc.json, tc.stateless)
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			upstream, log := newSDKServer(t, tc.json, tc.stateless)
			g := newGate(t, sdkPolicies, upstream.URL, sdkHost)
			front := httptest.NewServer(g)
			defer front.Close()

			client := sdk.NewClient(&sdk.Implementation{Name: "escrow-test-agent", Version: "1.0.0"}, nil)
			cs, err := client.Connect(ctx, &sdk.StreamableClientTransport{Endpoint: front.URL + "/mcp", MaxRetries: -1},
				&sdk.ClientSessionOptions{ProtocolVersion: tc.version})
			if err != nil {
				t.Fatal(err)
			}
			defer cs.Close()
			if got := cs.InitializeResult().ProtocolVersion; got != tc.want {
				t.Fatalf("negotiated %q, want %q", got, tc.want)
			}

			// tools/list, over pages: only what the workload may call (read_file stays: its
			// permit depends on the arguments).
			var listed []string
			for tool, err := range cs.Tools(ctx, nil) {
				if err != nil {
					t.Fatal(err)
				}
				listed = append(listed, tool.Name)
			}
			slices.Sort(listed)
			if strings.Join(listed, ",") != "read_file,search" {
				t.Errorf("listed tools = %v, want read_file,search", listed)
			}

			// Allowed calls return the server's result.
			res, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: "search", Arguments: map[string]any{"query": "flaky test"}})
			if err != nil || res.IsError || res.Content[0].(*sdk.TextContent).Text != "3 results for flaky test" {
				t.Fatalf("search: %v %+v", err, res)
			}
			res, err = cs.CallTool(ctx, &sdk.CallToolParams{Name: "read_file", Arguments: map[string]any{"path": "/workspace/a"}})
			if err != nil || res.Content[0].(*sdk.TextContent).Text != "contents of /workspace/a" {
				t.Fatalf("read_file /workspace/a: %v %+v", err, res)
			}

			// Denied calls come back as the JSON-RPC error, and the server never sees them.
			for _, p := range []*sdk.CallToolParams{
				{Name: "read_file", Arguments: map[string]any{"path": "/etc/passwd"}},
				{Name: "delete_repo", Arguments: map[string]any{"name": "prod"}},
			} {
				_, err := cs.CallTool(ctx, p)
				assertDenied(t, err, p.Name)
			}
			rr, err := cs.ReadResource(ctx, &sdk.ReadResourceParams{URI: "file:///workspace/README.md"})
			if err != nil || rr.Contents[0].Text != "text of file:///workspace/README.md" {
				t.Fatalf("README: %v %+v", err, rr)
			}
			_, err = cs.ReadResource(ctx, &sdk.ReadResourceParams{URI: "file:///etc/shadow"})
			assertDenied(t, err, "resources/read file:///etc/shadow")
			pr, err := cs.GetPrompt(ctx, &sdk.GetPromptParams{Name: "review", Arguments: map[string]string{"lang": "go"}})
			if err != nil || pr.Messages[0].Content.(*sdk.TextContent).Text != "review this go" {
				t.Fatalf("prompt: %v %+v", err, pr)
			}

			// The session still works after denials.
			if _, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: "search", Arguments: map[string]any{"query": "again"}}); err != nil {
				t.Fatalf("search after denials: %v", err)
			}

			seen := log.all()
			for _, never := range []string{"/etc/passwd", "delete_repo", "shadow"} {
				if strings.Contains(seen, never) {
					t.Errorf("the server executed a denied call (%s):\n%s", never, seen)
				}
			}
			for _, want := range []string{"search flaky test", "read_file /workspace/a", "read file:///workspace/README.md", "prompt review go", "search again"} {
				if !strings.Contains(seen, want) {
					t.Errorf("the server did not execute %q:\n%s", want, seen)
				}
			}

			g.mu.Lock()
			sessions, named := slices.Clone(g.sessions), g.named
			g.mu.Unlock()
			if tc.stateless {
				// Every decided call came with its Mcp-Name header, checked against the body.
				if cs.ID() != "" || named < 8 {
					t.Errorf("stateless: session %q, %d calls with Mcp-Name", cs.ID(), named)
				}
			} else {
				// One session across the calls: once the server has handed one out (in answer
				// to initialize; the latest protocol's client first tries the sessionless
				// server/discover), every POST carries it.
				first := slices.IndexFunc(sessions, func(s string) bool { return s != "" })
				if cs.ID() == "" || first < 0 || first > 2 {
					t.Fatalf("session %q; sessions sent: %q", cs.ID(), sessions)
				}
				for i, s := range sessions[first:] {
					if s != cs.ID() {
						t.Errorf("POST %d carried session %q, want %q", first+i, s, cs.ID())
					}
				}
				if n := len(sessions) - first; n < 10 {
					t.Errorf("only %d POSTs in the session", n)
				}
			}

			// The audit of the refused delete_repo: method, tool, id, session, hash only.
			var found bool
			for _, r := range g.snapshot() {
				for _, a := range r.mcp {
					if a.Tool != "delete_repo" {
						continue
					}
					found = true
					if r.reason != string(policy.ReasonDenied) || a.Method != "tools/call" || a.JSONRPCID == "" ||
						a.Session != cs.ID() || len(a.ArgumentsSHA256) != 64 || a.Arguments != nil {
						t.Errorf("delete_repo record = %+v %+v", r, a)
					}
				}
			}
			if !found {
				t.Error("no record of the refused delete_repo")
			}
		})
	}
}

func cmp(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func assertDenied(t *testing.T, err error, what string) {
	t.Helper()
	var je *jsonrpc.Error
	if !errors.As(err, &je) {
		t.Fatalf("%s: err = %v, want a JSON-RPC error", what, err)
	}
	if je.Code != CodeDenied || je.Message != "escrow denied this call: policy_denied" {
		t.Errorf("%s: error %d %q", what, je.Code, je.Message)
	}
}

func TestSDK_BadInputIsRefusedAndNeverReachesTheServer(t *testing.T) {
	upstream, log := newSDKServer(t, true, true)
	g := newGate(t, sdkPolicies, upstream.URL, sdkHost)
	front := httptest.NewServer(g)
	defer front.Close()
	for name, tc := range map[string]struct {
		body   string
		status int
	}{
		"malformed JSON":          {`{"jsonrpc":"2.0","id":1,"method":"tools/call",`, http.StatusBadRequest},
		"no method":               {`{"jsonrpc":"2.0","id":1,"params":{"name":"delete_repo"}}`, http.StatusBadRequest},
		"tools/call without name": {`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"name":"prod"}}}`, http.StatusBadRequest},
		"duplicate name":          {`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete_repo","arguments":{"name":"prod"}}}`, http.StatusBadRequest},
		"argument in two cases":   {`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/workspace/a","Path":"/etc/passwd"}}}`, http.StatusBadRequest},
		"deep nesting":            {`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"query":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}}}`, http.StatusBadRequest},
		"huge message":            {`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"query":"` + strings.Repeat("q", DefaultMaxMessageBytes) + `"}}}`, http.StatusRequestEntityTooLarge},
	} {
		t.Run(name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodPost, front.URL+"/mcp", strings.NewReader(tc.body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Accept", "application/json, text/event-stream")
			req.Header.Set("Mcp-Protocol-Version", "2026-07-28")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var got struct {
				Error struct {
					Code int       `json:"code"`
					Data ErrorData `json:"data"`
				} `json:"error"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.status || got.Error.Data.Reason != "bad_request" || got.Error.Code == 0 {
				t.Errorf("status %d, error %+v", resp.StatusCode, got.Error)
			}
		})
	}
	if seen := log.all(); seen != "" {
		t.Errorf("the server executed bad input:\n%s", seen)
	}
}

func TestSDK_ListChangedPassesAndTheNewListIsFiltered(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	upstream, _, srv := newSDKServerWith(t, false, false)
	g := newGate(t, sdkPolicies, upstream.URL, sdkHost)
	front := httptest.NewServer(g)
	defer front.Close()

	changed := make(chan struct{}, 1)
	client := sdk.NewClient(&sdk.Implementation{Name: "escrow-test-agent", Version: "1.0.0"}, &sdk.ClientOptions{
		ToolListChangedHandler: func(context.Context, *sdk.ToolListChangedRequest) {
			select {
			case changed <- struct{}{}:
			default:
			}
		},
	})
	cs, err := client.Connect(ctx, &sdk.StreamableClientTransport{Endpoint: front.URL + "/mcp", MaxRetries: -1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	if _, err := cs.ListTools(ctx, nil); err != nil { // the server notifies sessions that listed
		t.Fatal(err)
	}

	// The server gains a tool no policy permits; the notification reaches the client through the gate (on
	// the GET stream, filtered by StreamFilter), and its new list is filtered.
	sdk.AddTool(srv, &sdk.Tool{Name: "transfer_repo"}, func(context.Context, *sdk.CallToolRequest, nameArgs) (*sdk.CallToolResult, any, error) {
		return text("moved"), nil, nil
	})
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("notifications/tools/list_changed did not reach the client")
	}
	var listed []string
	for tool, err := range cs.Tools(ctx, nil) {
		if err != nil {
			t.Fatal(err)
		}
		listed = append(listed, tool.Name)
	}
	slices.Sort(listed)
	if strings.Join(listed, ",") != "read_file,search" {
		t.Errorf("tools after the change = %v, want read_file,search", listed)
	}
}
