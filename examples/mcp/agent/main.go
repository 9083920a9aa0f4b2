// Command agent is the example's agent: the official Go SDK's MCP client, sent through escrow
// by HTTPS_PROXY and trusting escrow's CA (SSL_CERT_FILE=<ca_dir>/trust-bundle.pem). It holds
// no token for the MCP server. It lists the tools and makes allowed and refused calls; with
// -check it exits non-zero unless escrow decided each one as policies/mcp.cedar says.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// codeDenied is the JSON-RPC error code of a call escrow refused.
const codeDenied = -32050

func main() {
	endpoint := flag.String("endpoint", "https://mcp.github.example/mcp", "the MCP server's endpoint")
	version := flag.String("protocol", "", "the protocol version to ask for (default: the SDK's latest)")
	check := flag.Bool("check", false, "exit 1 unless every outcome is the expected one")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	client := mcp.NewClient(&mcp.Implementation{Name: "example-agent", Version: "1.0.0"}, nil)
	cs, err := client.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: *endpoint, MaxRetries: -1},
		&mcp.ClientSessionOptions{ProtocolVersion: *version})
	if err != nil {
		log.Fatalf("agent: connecting: %v", err)
	}
	defer cs.Close()
	fmt.Printf("agent: connected, protocol %s, session %q\n", cs.InitializeResult().ProtocolVersion, cs.ID())

	failed := false
	expect := func(what string, ok bool) {
		if !ok {
			failed = true
			fmt.Printf("agent: UNEXPECTED: %s\n", what)
		}
	}

	var tools []string
	for t, err := range cs.Tools(ctx, nil) {
		if err != nil {
			log.Fatalf("agent: tools/list: %v", err)
		}
		tools = append(tools, t.Name)
	}
	slices.Sort(tools)
	fmt.Printf("agent: tools/list -> %s\n", strings.Join(tools, ", "))
	// transfer_repo: no policy could permit it, so escrow removes it from the list.
	expect("transfer_repo is listed", !slices.Contains(tools, "transfer_repo"))
	expect("read_file and search are listed", slices.Contains(tools, "read_file") && slices.Contains(tools, "search"))

	for _, c := range []struct {
		name    string
		args    map[string]any
		allowed bool
	}{
		{"search", map[string]any{"query": "flaky test", "per_page": 50}, true},
		{"search", map[string]any{"query": "flaky test", "per_page": 5000}, false},
		{"read_file", map[string]any{"path": "/workspace/notes.txt"}, true},
		{"read_file", map[string]any{"path": "/etc/passwd"}, false},
		{"delete_repo", map[string]any{"name": "acme/app"}, false}, // not acting for a human
		{"transfer_repo", map[string]any{"name": "acme/app"}, false},
		{"admin_reset", map[string]any{"name": "acme/app"}, false}, // forbidden on the whole server
	} {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: c.name, Arguments: c.args})
		report("tools/call "+c.name+" "+fmt.Sprint(c.args), res, err, c.allowed, expect)
	}
	rr, err := cs.ReadResource(ctx, &mcp.ReadResourceParams{URI: "file:///docs/readme.md"})
	report("resources/read file:///docs/readme.md", rr, err, true, expect)
	rr, err = cs.ReadResource(ctx, &mcp.ReadResourceParams{URI: "file:///etc/shadow"})
	report("resources/read file:///etc/shadow", rr, err, false, expect)
	pr, err := cs.GetPrompt(ctx, &mcp.GetPromptParams{Name: "review", Arguments: map[string]string{"pr": "42"}})
	report("prompts/get review", pr, err, true, expect)

	if *check && failed {
		os.Exit(1)
	}
}

// report prints the outcome of one call and checks it against allowed.
func report(what string, res any, err error, allowed bool, expect func(string, bool)) {
	var je *jsonrpc.Error
	switch {
	case err == nil:
		fmt.Printf("agent: %s -> %s\n", what, summary(res))
		expect(what+" was allowed", allowed)
	case errors.As(err, &je) && je.Code == codeDenied:
		fmt.Printf("agent: %s -> refused by escrow: %s\n", what, je.Message)
		expect(what+" was refused", !allowed)
	default:
		fmt.Printf("agent: %s -> error: %v\n", what, err)
		expect(what+" failed", false)
	}
}

func summary(res any) string {
	switch r := res.(type) {
	case *mcp.CallToolResult:
		if len(r.Content) > 0 {
			if t, ok := r.Content[0].(*mcp.TextContent); ok {
				return t.Text
			}
		}
	case *mcp.ReadResourceResult:
		if len(r.Contents) > 0 {
			return r.Contents[0].Text
		}
	case *mcp.GetPromptResult:
		if len(r.Messages) > 0 {
			if t, ok := r.Messages[0].Content.(*mcp.TextContent); ok {
				return t.Text
			}
		}
	}
	return fmt.Sprintf("%v", res)
}
