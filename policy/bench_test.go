package policy

import (
	"context"
	"fmt"
	"strings"
	"testing"
)

// benchPolicies returns n realistic policies: one global forbid and n-1 policies for distinct
// workloads and hosts, mixing `==`, `in Namespace`, `in ServiceAccount` and `is ... in`
// principal scopes, read/write/connect actions and a condition each.
func benchPolicies(n int) string {
	var b strings.Builder
	b.WriteString(`@id("global-forbid-unattested") forbid (principal, action, resource) when { context.credential != "" && !context.attestation.attested };` + "\n")
	for i := 1; i < n; i++ {
		switch i % 4 {
		case 0:
			fmt.Fprintf(&b, `@id("p%d") permit (principal == Workload::"spiffe://example.org/ns/team%d/sa/agent", action in Action::"read", resource == Host::"api%d.example.com") when { context.path like "/v1/*" };`, i, i, i)
		case 1:
			fmt.Fprintf(&b, `@id("p%d") permit (principal in Namespace::"team%d", action == Action::"POST", resource == Host::"api%d.example.com") when { context.credential == "cred%d" };`, i, i, i, i)
		case 2:
			fmt.Fprintf(&b, `@id("p%d") forbid (principal in ServiceAccount::"team%d/agent", action in Action::"write", resource == Host::"api%d.example.com") when { context.path like "/admin/*" };`, i, i, i)
		case 3:
			fmt.Fprintf(&b, `@id("p%d") permit (principal is Workload in Namespace::"team%d", action == Action::"connect", resource == Host::"mirror%d.example.com") when { context.port == 443 };`, i, i, i)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// benchInput matches the `==` permit in the middle of benchPolicies(n).
func benchInput(n int) Input {
	k := n / 2 / 4 * 4
	if k == 0 {
		k = 4
	}
	in := get(fmt.Sprintf("spiffe://example.org/ns/team%d/sa/agent", k), fmt.Sprintf("api%d.example.com", k), "/v1/repos/x")
	in.Credential = fmt.Sprintf("cred%d", k)
	return in
}

var benchSizes = []int{10, 100, 1000, 10000}

// BenchmarkDecide measures Engine.Decide with the index.
func BenchmarkDecide(b *testing.B) { benchDecide(b, false) }

// BenchmarkDecideUnindexed is the baseline: the same engine path, evaluating the full set.
func BenchmarkDecideUnindexed(b *testing.B) { benchDecide(b, true) }

func benchDecide(b *testing.B, unindexed bool) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			e := engineWith(compileText(b, benchPolicies(n)))
			e.unindexed = unindexed
			in := benchInput(n)
			ctx := context.Background()
			if d := e.Decide(ctx, in); !d.Allow || d.Reason != ReasonAllowed || len(d.PolicyIDs) != 1 {
				b.Fatalf("benchmark request not allowed by exactly one policy: %+v", d)
			}
			b.ReportAllocs()
			for b.Loop() {
				if !e.Decide(ctx, in).Allow {
					b.Fatal("denied")
				}
			}
		})
	}
}

// BenchmarkDecideToolCall measures a decided tools/call with arguments (the second decision
// on an MCP upstream) against the worked MCP policies, beside a plain request on the same
// engine.
func BenchmarkDecideToolCall(b *testing.B) {
	e := mcpEngine(b)
	ctx := context.Background()
	for name, in := range map[string]Input{
		"plain-POST":        with(get(coderID, mcpHost, "/mcp"), func(in *Input) { in.Action = "POST" }),
		"tools-call-1-arg":  toolCall(b, "read_file", `{"path": "/workspace/a"}`),
		"tools-call-20-arg": toolCall(b, "read_file", `{"path": "/workspace/a", "o": {"a": [1, 2, 3], "b": "x", "c": true}, "k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5, "k6": 6, "k7": 7, "k8": 8, "k9": 9, "k10": "ten"}`),
	} {
		b.Run(name, func(b *testing.B) {
			if d := e.Decide(ctx, in); !d.Allow {
				b.Fatalf("benchmark request denied: %+v", d)
			}
			b.ReportAllocs()
			for b.Loop() {
				if !e.Decide(ctx, in).Allow {
					b.Fatal("denied")
				}
			}
		})
	}
}
