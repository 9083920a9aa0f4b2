// Command agent is the example's agent: the official Go SDK's MCP client, sent through escrow
// by HTTPS_PROXY and trusting escrow's CA (SSL_CERT_FILE=<ca_dir>/trust-bundle.pem). It holds
// no token for the MCP server. It lists the tools and makes allowed and refused calls; with
// -check it exits non-zero unless escrow decided each one as the example's policy says.
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
	endpoint := flag.String("endpoint", "https://mcp.example.test/mcp", "the MCP server's endpoint")
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
	expect("delete_repo is listed", !slices.Contains(tools, "delete_repo"))
	expect("read_file and search are listed", slices.Contains(tools, "read_file") && slices.Contains(tools, "search"))

	for _, c := range []struct {
		name    string
		args    map[string]any
		allowed bool
	}{
		{"search", map[string]any{"query": "flaky test"}, true},
		{"read_file", map[string]any{"path": "/workspace/notes.txt"}, true},
		{"read_file", map[string]any{"path": "/etc/passwd"}, false},
		{"delete_repo", map[string]any{"name": "prod"}, false},
	} {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: c.name, Arguments: c.args})
		var je *jsonrpc.Error
		switch {
		case err == nil:
			fmt.Printf("agent: %s %v -> %s\n", c.name, c.args, res.Content[0].(*mcp.TextContent).Text)
			expect(c.name+" was allowed", c.allowed)
		case errors.As(err, &je) && je.Code == codeDenied:
			fmt.Printf("agent: %s %v -> refused by escrow: %s\n", c.name, c.args, je.Message)
			expect(c.name+" was refused", !c.allowed)
		default:
			fmt.Printf("agent: %s %v -> error: %v\n", c.name, c.args, err)
			expect(c.name+" failed", false)
		}
	}
	if *check && failed {
		os.Exit(1)
	}
}
