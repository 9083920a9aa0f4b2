package proxy

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// BenchmarkProxy_InterceptedKeepAlive measures one intercepted HTTPS request on a kept-alive
// agent connection: identity, policy (allow), credential injection, forward over a pooled TLS
// connection to a loopback upstream. Allocations include the client and the upstream.
func BenchmarkProxy_InterceptedKeepAlive(b *testing.B) {
	up := newTLSUpstream(b, okHandler(nil), false, "api.example.com")
	tp := newTestProxy(b, "upstreams:\n"+up.route("api.example.com", "credential: api"), withoutRecords())
	benchGet(b, tp, "https://api.example.com/v1/models")
}

// BenchmarkProxy_PlainHTTP is the same for an absolute-form http:// request.
func BenchmarkProxy_PlainHTTP(b *testing.B) {
	up := newPlainUpstream(b, okHandler(nil))
	tp := newTestProxy(b, "upstreams:\n"+up.route("api.example.com", "credential: api", "unsafe_plaintext_credential: true"),
		withoutRecords())
	benchGet(b, tp, "http://api.example.com/v1/models")
}

// BenchmarkProxy_PlainHTTPRevocations is BenchmarkProxy_PlainHTTP with 300 revocations in force
// that do not cover the caller (100 exact IDs, 100 prefixes, 100 credentials): what checking
// them costs each request. Compare in one run: go test -run '^$' -bench 'Proxy_PlainHTTP' ./proxy/
func BenchmarkProxy_PlainHTTPRevocations(b *testing.B) {
	up := newPlainUpstream(b, okHandler(nil))
	tp := newTestProxy(b, "upstreams:\n"+up.route("api.example.com", "credential: api", "unsafe_plaintext_credential: true"),
		withoutRecords())
	var rs []Revocation
	for i := range 100 {
		rs = append(rs, Revocation{
			Name:             fmt.Sprintf("ns/r%d", i),
			SPIFFEIDs:        []string{fmt.Sprintf("spiffe://example.org/ns/other/sa/w%d", i)},
			SPIFFEIDPrefixes: []string{fmt.Sprintf("spiffe://example.org/ns/team%d", i)},
			Credentials:      []string{fmt.Sprintf("cred%d", i)},
		})
	}
	must(b, tp.Sidecar.Update(b.Context(), Update{Revocations: &rs}))
	benchGet(b, tp, "http://api.example.com/v1/models")
}

func benchGet(b *testing.B, tp *testProxy, url string) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	must(b, err)
	req.Header.Set("Authorization", "Bearer agent-placeholder")
	get := func() {
		resp, err := tp.Transport.RoundTrip(req)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
	get() // connections, leaf, credential: warm
	b.ReportAllocs()
	b.ResetTimer()
	cpu := cpuNow(b)
	for b.Loop() {
		get()
	}
	reportCPU(b, cpu)
}

// BenchmarkDirect_PlainHTTP is the baseline of BenchmarkProxy_PlainHTTP: the same client and
// upstream with no proxy between them. The difference is what escrow adds; compare the two in
// one run (go test -run '^$' -bench 'PlainHTTP' ./proxy/).
func BenchmarkDirect_PlainHTTP(b *testing.B) {
	up := newPlainUpstream(b, okHandler(nil))
	tr := &http.Transport{MaxIdleConnsPerHost: 16}
	b.Cleanup(tr.CloseIdleConnections)
	benchDirect(b, tr, "http://"+up.Addr+"/v1/models")
}

// BenchmarkDirect_HTTPSKeepAlive is the baseline of BenchmarkProxy_InterceptedKeepAlive: one
// TLS hop instead of two.
func BenchmarkDirect_HTTPSKeepAlive(b *testing.B) {
	up := newTLSUpstream(b, okHandler(nil), false, "api.example.com")
	tr := &http.Transport{MaxIdleConnsPerHost: 16, TLSClientConfig: &tls.Config{RootCAs: upstreamCA(b).Pool(), ServerName: "api.example.com"}}
	b.Cleanup(tr.CloseIdleConnections)
	benchDirect(b, tr, "https://"+up.Addr+"/v1/models")
}

func benchDirect(b *testing.B, tr *http.Transport, url string) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	must(b, err)
	req.Header.Set("Authorization", "Bearer agent-placeholder")
	get := func() {
		resp, err := tr.RoundTrip(req)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	get()
	b.ReportAllocs()
	b.ResetTimer()
	cpu := cpuNow(b)
	for b.Loop() {
		get()
	}
	reportCPU(b, cpu)
}

// reportCPU reports the process CPU time per request since start (client, escrow and upstream
// together): on a shared machine it varies far less than the wall-clock ns/op.
func reportCPU(b *testing.B, start time.Duration) {
	if start < 0 {
		return // not measured on this platform
	}
	b.ReportMetric(float64(cpuNow(b)-start)/float64(b.N), "cpu-ns/op")
}

// BenchmarkProxy_Scrub measures what scrubbing the injected credential from responses costs on
// an intercepted credential route: a 1 KiB JSON answer and a 10-event SSE stream, with
// scrub_responses on (the default) and off, side by side in one run:
//
//	go test -run '^$' -bench 'Proxy_Scrub' -benchmem ./proxy/
func BenchmarkProxy_Scrub(b *testing.B) {
	kib := []byte(`{"data":"` + strings.Repeat("x", 1024-11) + `"}`)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/sse" {
			w.Header().Set("Content-Type", "text/event-stream")
			for i := range 10 {
				fmt.Fprintf(w, "data: {\"delta\":\"token %d of the answer\"}\n\n", i)
				w.(http.Flusher).Flush()
			}
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(kib)
	})
	for _, scrubbed := range []bool{true, false} {
		name := "scrub"
		if !scrubbed {
			name = "noscrub"
		}
		up := newTLSUpstream(b, h, false, "api.example.com")
		tp := newTestProxy(b, "upstreams:\n"+up.route("api.example.com", "credential: api",
			fmt.Sprintf("scrub_responses: %v", scrubbed)), withoutRecords())
		for _, path := range []string{"/1kib", "/sse"} {
			b.Run(name+path, func(b *testing.B) { benchGet(b, tp, "https://api.example.com"+path) })
		}
	}
}

// BenchmarkProxy_MCP is the cost of deciding an MCP tools/call: the same intercepted POST of
// the same JSON-RPC body to the same upstream, once on a plain route and once on an MCP route
// (the body parsed, the call decided by the policy). Compare the two sub-benchmarks' ns/op:
//
//	go test -run '^$' -bench 'Proxy_MCP' -benchmem -count 6 ./proxy/
func BenchmarkProxy_MCP(b *testing.B) {
	const body = `{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/workspace/notes.txt","max_bytes":4096}}}`
	answer := []byte(`{"jsonrpc":"2.0","id":42,"result":{"content":[{"type":"text","text":"ok"}]}}`)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(answer)
	})
	policy := `@id("all-http")
permit (principal, action in [Action::"read", Action::"write"], resource);
@id("read-workspace")
permit (principal, action == Action::"tools/call", resource == Tool::"mcp.example.test/read_file")
when { context has mcp && context.mcp.arguments has path && context.mcp.arguments.path like "/workspace/*" };
`
	for _, c := range []struct{ name, extra string }{{"plain_POST", ""}, {"tools_call_decided", "mcp: {path: /mcp}"}} {
		b.Run(c.name, func(b *testing.B) {
			up := newTLSUpstream(b, h, false, "mcp.example.test")
			extra := []string{"credential: api"}
			if c.extra != "" {
				extra = append(extra, c.extra)
			}
			tp := newTestProxy(b, "upstreams:\n"+up.route("mcp.example.test", extra...), withoutRecords(), withPolicy(policy))
			post := func() {
				req, err := http.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(body))
				must(b, err)
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Accept", "application/json, text/event-stream")
				resp, err := tp.Transport.RoundTrip(req)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
			post()
			b.ReportAllocs()
			b.ResetTimer()
			cpu := cpuNow(b)
			for b.Loop() {
				post()
			}
			reportCPU(b, cpu)
		})
	}
}
