package proxy

import (
	"io"
	"net/http"
	"testing"
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
	for b.Loop() {
		get()
	}
}
