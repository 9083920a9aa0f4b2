package proxy

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/escrowproxy/escrow/audit"
)

// rawProxyRequest writes raw (one HTTP/1.1 request, bytes exactly as given) to the proxy
// listener and returns the response, its body, and whether the proxy then closed the connection.
func rawProxyRequest(t testing.TB, tp *testProxy, raw string) (*http.Response, []byte, bool) {
	t.Helper()
	c, err := net.DialTimeout("tcp", tp.Addr, 5*time.Second)
	must(t, err)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = io.WriteString(c, raw)
	must(t, err)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	must(t, err)
	body, err := io.ReadAll(resp.Body)
	must(t, err)
	// A closed connection reads EOF at once; an open one times out.
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = br.ReadByte()
	closed := err == io.EOF
	return resp, body, closed
}

// seenRequests records what an upstream received.
type seenRequests struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func (s *seenRequests) handler(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	s.mu.Lock()
	s.reqs = append(s.reqs, r)
	s.mu.Unlock()
	_, _ = io.WriteString(w, "ok")
}

func (s *seenRequests) all() []*http.Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*http.Request(nil), s.reqs...)
}

func TestProxy_NeverSendsTraceOrTrackWithACredential(t *testing.T) {
	var seen seenRequests
	up := newTLSUpstream(t, http.HandlerFunc(seen.handler), false, "api.example.com")
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api")+
		plain.route("plain.example.com", "credential: api", "unsafe_plaintext_credential: true")+
		plain.route("open.example.com"))

	for _, c := range []struct{ method, url string }{
		{"TRACE", "https://api.example.com/v1/x"},
		{"TRACK", "https://api.example.com/v1/x"},
		{"trace", "https://api.example.com/v1/x"},
		{"TRACE", "http://plain.example.com/v1/x"},
	} {
		req, _ := http.NewRequest(c.method, c.url, nil)
		resp := tp.Do(t, req)
		d := denialOf(t, resp, readBody(t, resp), http.StatusMethodNotAllowed, ReasonMethodNotAllowed)
		if rec := findRecord(t, tp, d.RequestID); rec.Decision != audit.Deny || rec.Credential != "api" {
			t.Errorf("%s %s: record %+v", c.method, c.url, rec)
		}
	}
	if n := len(seen.all()); n != 0 {
		t.Fatalf("upstream received %d TRACE/TRACK request(s) on credential routes", n)
	}
	// Without a credential there is nothing to reflect: TRACE passes to policy and upstream.
	req, _ := http.NewRequest("TRACE", "http://open.example.com/x", nil)
	if resp := tp.Do(t, req); resp.StatusCode != 200 {
		t.Errorf("TRACE without a credential: %d", resp.StatusCode)
	}
}

func TestProxy_RefusesRawFragmentInRequestTarget(t *testing.T) {
	var seen seenRequests
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "upstreams:\n"+plain.route("plain.example.com", "credential: api", "unsafe_plaintext_credential: true", "query: {param: key}"))

	resp, body, _ := rawProxyRequest(t, tp, "GET http://plain.example.com/v1/x#?key=mine HTTP/1.1\r\nHost: plain.example.com\r\n\r\n")
	d := denialOf(t, resp, body, http.StatusBadRequest, ReasonBadRequest)
	if !strings.Contains(d.Message, "'#'") {
		t.Errorf("message = %q, want it to name the '#'", d.Message)
	}
	if n := len(seen.all()); n != 0 {
		t.Fatalf("upstream received %d request(s)", n)
	}
}

func TestProxy_RefusesPathsUpstreamsReadDifferently(t *testing.T) {
	var seen seenRequests
	up := newTLSUpstream(t, http.HandlerFunc(seen.handler), false, "api.example.com")
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api")+plain.route("plain.example.com"),
		withPolicy(`@id("all") permit (principal, action, resource);
@id("no-admin") forbid (principal, action, resource) when { context.path like "/v1/admin*" };`))

	for _, c := range []struct{ path, msg string }{
		{"/v1//admin", "empty segment"},
		{"/v1/%2Fadmin", "empty segment"},
		{"/v1/public/..;/admin", "'..' segment"},
		{"/v1/.;/admin", "'..' segment"},
		{"/v1/public/..%3B/admin", "'..' segment"},
		{"/v1/admin%00.json", "control character"},
		{"/v1/x%0d%0aX-Injected:1", "control character"},
		{"/v1/public/%252e%252e/admin", "double encoding"},
		{"/v1/public%252fadmin", "double encoding"},
		{"/v1/public/%c0%ae%c0%ae/admin", "UTF-8"},
		{"/v1/public/%e0%80%ae/admin", "UTF-8"},
		{"/v1/public/..%5cadmin", "'..' segment"},
	} {
		for _, base := range []string{"https://api.example.com", "http://plain.example.com"} {
			req, err := http.NewRequest("GET", base+"/", nil)
			must(t, err)
			req.URL.Opaque = "//" + req.URL.Host + c.path // sent exactly as written
			resp := tp.Do(t, req)
			d := denialOf(t, resp, readBody(t, resp), http.StatusBadRequest, ReasonBadRequest)
			if !strings.Contains(d.Message, c.msg) {
				t.Errorf("%s%s: message %q, want it to mention %q", base, c.path, d.Message, c.msg)
			}
		}
	}
	if n := len(seen.all()); n != 0 {
		t.Fatalf("upstream received %d request(s) with ambiguous paths", n)
	}
	// Ordinary paths, including an encoded slash inside a segment (GitLab project ids), an
	// encoded percent sign not followed by hex digits, and a trailing slash.
	for _, p := range []string{"/v1/projects/group%2Fproject", "/v1/100%25", "/v1/", "/", "/v1/caf%C3%A9"} {
		req, _ := http.NewRequest("GET", "https://api.example.com/", nil)
		req.URL.Opaque = "//api.example.com" + p
		if resp := tp.Do(t, req); resp.StatusCode != 200 {
			t.Errorf("%s: %d %s", p, resp.StatusCode, readBody(t, resp))
		}
	}
}

func TestProxy_StripsMethodOverridesAndForwardsTheCanonicalMethod(t *testing.T) {
	var seen seenRequests
	up := newTLSUpstream(t, http.HandlerFunc(seen.handler), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"),
		withPolicy(`@id("post-and-get") permit (principal, action, resource) when { context.method == "POST" || context.method == "GET" };`))

	req, _ := http.NewRequest("POST", "https://api.example.com/v1/items/7?_method=DELETE&keep=1&%5Fmethod=PUT", strings.NewReader("x"))
	req.Header.Set("X-HTTP-Method-Override", "DELETE")
	req.Header.Set("X-HTTP-Method", "DELETE")
	req.Header.Set("X-Method-Override", "DELETE")
	if resp := tp.Do(t, req); resp.StatusCode != 200 {
		t.Fatalf("POST: %d", resp.StatusCode)
	}
	req, _ = http.NewRequest("get", "https://api.example.com/v1/lower", nil)
	if resp := tp.Do(t, req); resp.StatusCode != 200 {
		t.Fatalf("get: %d", resp.StatusCode)
	}
	got := seen.all()
	if len(got) != 2 {
		t.Fatalf("upstream saw %d requests", len(got))
	}
	for _, h := range []string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"} {
		if v := got[0].Header.Get(h); v != "" {
			t.Errorf("upstream received %s: %s", h, v)
		}
	}
	if got[0].Method != "POST" || got[0].URL.RawQuery != "keep=1" {
		t.Errorf("upstream received %s ?%s, want POST ?keep=1", got[0].Method, got[0].URL.RawQuery)
	}
	if got[1].Method != "GET" {
		t.Errorf("upstream received method %q, want GET", got[1].Method)
	}
	if rec := tp.Record(t, 2); rec.Method != "GET" {
		t.Errorf("record method = %q, want GET", rec.Method)
	}
}

func TestProxy_RefusesUpgradesOtherThanWebSocket(t *testing.T) {
	var seen seenRequests
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "upstreams:\n"+plain.route("plain.example.com"))

	for _, up := range []string{"h2c", "foo/1", "websocket, h2c"} {
		resp, body, _ := rawProxyRequest(t, tp, "GET http://plain.example.com/x HTTP/1.1\r\nHost: plain.example.com\r\n"+
			"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: "+up+"\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
		d := denialOf(t, resp, body, http.StatusBadRequest, ReasonBadRequest)
		if !strings.Contains(d.Message, "websocket") {
			t.Errorf("Upgrade %s: message %q", up, d.Message)
		}
	}
	if n := len(seen.all()); n != 0 {
		t.Fatalf("upstream received %d upgrade request(s)", n)
	}
}

func TestProxy_WebSocketUpgradeIsVisibleToPolicyAndRecord(t *testing.T) {
	gotAuth := make(chan string, 2)
	up := wsEchoUpstream(t, "ws.example.com", gotAuth)
	tp := newTestProxy(t, "upstreams:\n"+up.route("ws.example.com", "credential: api"),
		withPolicy(`@id("ws-only") permit (principal, action, resource) when { context has upgrade && context.upgrade == "websocket" };`))

	tc, _ := openWebSocket(t, tp, "ws.example.com")
	tc.Close()
	rec := tp.Record(t, 1)
	if rec.Upgrade != "websocket" || rec.Decision != audit.Allow || len(rec.PolicyIDs) != 1 {
		t.Errorf("record = %+v", rec)
	}
	// The same host without an upgrade is not permitted by this policy.
	resp := tp.Get(t, "https://ws.example.com/plain")
	denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonPolicyDenied)
}

func TestProxy_ClosesTheConnectionAfterAChunkedRequest(t *testing.T) {
	var seen seenRequests
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "upstreams:\n"+plain.route("plain.example.com"))

	// Content-Length and Transfer-Encoding together (RFC 9112 §6.3): answered, then closed.
	resp, _, closed := rawProxyRequest(t, tp, "POST http://plain.example.com/x HTTP/1.1\r\nHost: plain.example.com\r\n"+
		"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
	if resp.StatusCode != 200 || !closed {
		t.Fatalf("status %d, connection closed %v; want 200 and closed", resp.StatusCode, closed)
	}
	// An ordinary request keeps the connection.
	resp, _, closed = rawProxyRequest(t, tp, "POST http://plain.example.com/x HTTP/1.1\r\nHost: plain.example.com\r\nContent-Length: 3\r\n\r\nabc")
	if resp.StatusCode != 200 || closed {
		t.Fatalf("status %d, connection closed %v; want 200 and kept", resp.StatusCode, closed)
	}
}

func TestProxy_EveryResponseCarriesTheRecordsRequestID(t *testing.T) {
	plain := newPlainUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(RequestIDHeader, "forged-by-upstream")
		_, _ = io.WriteString(w, "ok")
	}))
	tp := newTestProxy(t, "upstreams:\n"+plain.route("plain.example.com"))

	resp := tp.Get(t, "http://plain.example.com/ok")
	id := resp.Header.Get(RequestIDHeader)
	if resp.StatusCode != 200 || id == "" || id == "forged-by-upstream" {
		t.Fatalf("forwarded response: %d, %s = %q", resp.StatusCode, RequestIDHeader, id)
	}
	if rec := tp.Record(t, 1); rec.RequestID != id {
		t.Errorf("record request_id %q, header %q", rec.RequestID, id)
	}
	resp = tp.Get(t, "http://unknown.example.com/")
	var d denialBody
	must(t, json.Unmarshal(readBody(t, resp), &d))
	if got := resp.Header.Get(RequestIDHeader); got == "" || got != d.RequestID {
		t.Errorf("denial: header %q, body request_id %q", got, d.RequestID)
	}
}

// newTLSEchoServer is a TLS server for host (signed by the test upstream CA) that echoes what it
// decrypts until the peer half-closes, then closes.
func newTLSEchoServer(t testing.TB, host string) string {
	t.Helper()
	leaf, err := upstreamCA(t).Leaf(host)
	must(t, err)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}})
	must(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// tlsThroughTunnel does a TLS handshake for host over an open CONNECT tunnel, trusting the test
// upstream CA (a tunnel keeps end-to-end TLS: escrow's CA plays no part).
func tlsThroughTunnel(t testing.TB, conn net.Conn, br *bufio.Reader, host string) *tls.Conn {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(upstreamCA(t).Certificate())
	tc := tls.Client(&bufferedConn{Conn: conn, r: br}, &tls.Config{ServerName: host, RootCAs: roots})
	must(t, tc.Handshake())
	return tc
}

func TestProxy_TunnelRequiresTLSForTheConnectHost(t *testing.T) {
	echo := newTLSEchoServer(t, "tunnel.example.com")
	tp := newTestProxy(t, fmt.Sprintf("upstreams:\n  - host: tunnel.example.com\n    tunnel: true\n    address: %s\n", echo),
		withPolicy(tunnelPolicy))

	// The server name is the CONNECT host: relayed, and the record names it.
	conn, br, resp, _ := tp.rawConnect(t, "tunnel.example.com:443", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", resp.StatusCode)
	}
	tc := tlsThroughTunnel(t, conn, br, "tunnel.example.com")
	_, err := io.WriteString(tc, "ping")
	must(t, err)
	got := make([]byte, 4)
	_, err = io.ReadFull(tc, got)
	must(t, err)
	tc.Close()
	if rec := tp.Record(t, 1); rec.Decision != audit.Allow || rec.SNI != "tunnel.example.com" || string(got) != "ping" {
		t.Errorf("record %+v, echo %q", rec, got)
	}

	// Domain fronting: a tunnel to the allowed name carrying TLS for another one.
	conn, br, _, _ = tp.rawConnect(t, "tunnel.example.com:443", nil)
	fronted := tls.Client(&bufferedConn{Conn: conn, r: br}, &tls.Config{ServerName: "other.example.net", InsecureSkipVerify: true})
	if err := fronted.Handshake(); err == nil {
		t.Fatal("a TLS handshake for another name completed through the tunnel")
	}
	if rec := tp.Record(t, 2); rec.Decision != audit.Deny || rec.Reason != string(ReasonHostMismatch) || rec.SNI != "other.example.net" {
		t.Errorf("record = %+v", rec)
	}

	// Not TLS at all.
	conn, br, _, _ = tp.rawConnect(t, "tunnel.example.com:443", []byte("GET / HTTP/1.1\r\nHost: tunnel.example.com\r\n\r\n"))
	if b, _ := io.ReadAll(br); len(b) != 0 {
		t.Errorf("plain bytes in a tunnel got an answer: %q", b)
	}
	conn.Close()
	if rec := tp.Record(t, 3); rec.Decision != audit.Deny || rec.Reason != string(ReasonBadRequest) || rec.BytesOut != 0 {
		t.Errorf("record = %+v", rec)
	}
}

func TestProxy_UpstreamThatDoesNotAnswerIs504AfterResponseTimeout(t *testing.T) {
	hang := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	h1 := newTLSUpstream(t, hang, false, "h1.example.com")
	h2 := newTLSUpstream(t, hang, true, "h2.example.com")
	plain := newPlainUpstream(t, hang)
	tp := newTestProxy(t, "upstreams:\n"+h1.route("h1.example.com", "credential: api", "response_timeout: 1s")+
		h2.route("h2.example.com", "response_timeout: 1s")+plain.route("plain.example.com", "response_timeout: 1s"))

	for _, u := range []string{"https://h1.example.com/slow", "https://h2.example.com/slow", "http://plain.example.com/slow"} {
		start := time.Now()
		resp := tp.Get(t, u)
		d := denialOf(t, resp, readBody(t, resp), http.StatusGatewayTimeout, ReasonUpstreamTimeout)
		if el := time.Since(start); el < time.Second || el > 8*time.Second {
			t.Errorf("%s: answered after %v with response_timeout 1s", u, el)
		}
		if rec := findRecord(t, tp, d.RequestID); rec.Decision != audit.Allow || rec.Outcome != audit.OutcomeUpstreamTimeout || rec.Status != 504 {
			t.Errorf("%s: record %+v", u, rec)
		}
	}
}

func TestSidecar_StalledAuditOutputFailsClosedFast(t *testing.T) {
	up := newPlainUpstream(t, okHandler(nil))
	cfg := sidecarConfig(t, "audit: {flush_interval: 0s}\negress: {allow_cidrs: [127.0.0.0/8]}\nupstreams:\n"+up.route("plain.example.com"))
	out, in := io.Pipe() // nobody reads it yet: every write blocks, as on a full stdout pipe
	defer out.Close()
	sc, err := Build(context.Background(), cfg, Deps{Stdout: in, AuditStallAfter: 200 * time.Millisecond,
		SystemRoots: func() ([]byte, error) { return nil, nil }})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- sc.Serve(ctx) }()
	defer func() {
		cancel()
		go func() { _, _ = io.Copy(io.Discard, out) }()
		<-served
	}()
	pu, _ := url.Parse("http://" + sc.ProxyAddr.String())
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu)}, Timeout: 10 * time.Second}
	get := func() (*http.Response, []byte) {
		t.Helper()
		resp, err := client.Get("http://plain.example.com/x")
		must(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, body
	}
	// The first record is taken; its write blocks.
	if resp, _ := get(); resp.StatusCode != 200 {
		t.Fatalf("first request: %d", resp.StatusCode)
	}
	time.Sleep(300 * time.Millisecond) // past AuditStallAfter (a wall-clock bound by design)
	start := time.Now()
	resp, body := get()
	denialOf(t, resp, body, http.StatusServiceUnavailable, ReasonAuditUnavailable)
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("refused after %v; want fast", el)
	}
	code, ready := adminGet(t, sc, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(ready, `"audit"`) {
		t.Errorf("/readyz = %d %s", code, ready)
	}
	if _, metrics := adminGet(t, sc, "/metrics"); !strings.Contains(metrics, "escrow_audit_backlog_records ") ||
		strings.Contains(metrics, "escrow_audit_backlog_records 0\n") {
		t.Errorf("backlog metric missing or zero:\n%s", grepLines(metrics, "escrow_audit"))
	}
	// The output drains: records flow again, and so do requests.
	lines := make(chan string, 16)
	go func() {
		br := bufio.NewReader(out)
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			lines <- l
		}
	}()
	waitFor(t, "readyz back to 200", func() bool { c, _ := adminGet(t, sc, "/readyz"); return c == 200 })
	if resp, _ := get(); resp.StatusCode != 200 {
		t.Fatalf("after the output drained: %d", resp.StatusCode)
	}
	// Every request has its record, the refused one included.
	for i := range 3 {
		select {
		case l := <-lines:
			if !strings.Contains(l, `"msg":"audit"`) {
				t.Errorf("line %d: %s", i, l)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("record %d not written", i+1)
		}
	}
}

func adminGet(t testing.TB, sc *Sidecar, path string) (int, string) {
	t.Helper()
	resp, err := direct.Get("http://" + sc.AdminAddr.String() + path)
	must(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestProxy_EveryAttemptLeavesOneRecordWithItsTrueCause(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	plain := newPlainUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hang" {
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return
		}
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = io.WriteString(w, "ok")
	}))
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+plain.route("plain.example.com")+up.route("api.example.com", "credential: api"))
	next := 0
	record := func(what string) *audit.Record {
		t.Helper()
		next++
		recs := tp.WaitRecords(t, next)
		if len(recs) != next {
			t.Fatalf("%s: %d records, want %d", what, len(recs), next)
		}
		return recs[next-1]
	}

	// The agent gives up while the upstream has not answered: agent_closed, policy's allow kept.
	c, err := net.Dial("tcp", tp.Addr)
	must(t, err)
	_, err = io.WriteString(c, "GET http://plain.example.com/hang HTTP/1.1\r\nHost: plain.example.com\r\n\r\n")
	must(t, err)
	time.Sleep(100 * time.Millisecond)
	c.Close()
	if rec := record("agent left"); rec.Decision != audit.Allow || rec.Outcome != audit.OutcomeAgentClosed {
		t.Errorf("agent left: record %+v", rec)
	}

	// A malformed chunked body: 400, outcome bad_request.
	resp, body, _ := rawProxyRequest(t, tp, "POST http://plain.example.com/upload HTTP/1.1\r\nHost: plain.example.com\r\n"+
		"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
	denialOf(t, resp, body, http.StatusBadRequest, ReasonBadRequest)
	if rec := record("malformed body"); rec.Outcome != audit.OutcomeBadRequest || rec.Status != 400 {
		t.Errorf("malformed body: record %+v", rec)
	}

	// Requests net/http refuses before escrow sees them.
	for _, c := range []struct {
		name, raw string
		status    int
	}{
		{"differing Content-Length", "POST http://plain.example.com/ HTTP/1.1\r\nHost: plain.example.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400},
		{"bad header name", "GET http://plain.example.com/ HTTP/1.1\r\nHost: plain.example.com\r\nBad Header: x\r\n\r\n", 400},
		{"unknown transfer coding", "POST http://plain.example.com/ HTTP/1.1\r\nHost: plain.example.com\r\nTransfer-Encoding: gzip\r\n\r\n", 501},
		// The answer may be lost to a reset (escrow closes with unread bytes); the record is not.
		{"headers too large", "GET http://plain.example.com/ HTTP/1.1\r\nHost: plain.example.com\r\nX-Big: " + strings.Repeat("a", 1<<20+8192) + "\r\n\r\n", 431},
	} {
		if c.status != 431 {
			resp, _, _ := rawProxyRequest(t, tp, c.raw)
			if resp.StatusCode != c.status {
				t.Errorf("%s: status %d, want %d", c.name, resp.StatusCode, c.status)
			}
		} else {
			conn, err := net.Dial("tcp", tp.Addr)
			must(t, err)
			_, _ = io.WriteString(conn, c.raw)
			_, _ = io.Copy(io.Discard, conn)
			conn.Close()
		}
		if rec := record(c.name); rec.Decision != audit.Deny || rec.Reason != string(ReasonBadRequest) || rec.Status != c.status ||
			rec.SPIFFEID != testSPIFFEID {
			t.Errorf("%s: record %+v", c.name, rec)
		}
	}

	// An intercepted CONNECT whose agent does not trust escrow's CA: no request, one record.
	conn, br, cresp, _ := tp.rawConnect(t, "api.example.com:443", nil)
	if cresp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", cresp.StatusCode)
	}
	tc := tls.Client(&bufferedConn{Conn: conn, r: br}, &tls.Config{ServerName: "api.example.com"}) // system roots only
	if err := tc.Handshake(); err == nil {
		t.Fatal("handshake succeeded without trusting the pod CA")
	}
	conn.Close()
	if rec := record("untrusted CA"); rec.Kind != "connect" || rec.Outcome != audit.OutcomeTLSHandshakeFailed ||
		rec.Host != "api.example.com" || rec.Credential != "api" {
		t.Errorf("untrusted CA: record %+v", rec)
	}
	// One that connects and leaves.
	conn, _, _, _ = tp.rawConnect(t, "api.example.com:443", nil)
	conn.Close()
	if rec := record("connect and leave"); rec.Kind != "connect" || rec.Outcome == audit.OutcomeOK {
		t.Errorf("connect and leave: record %+v", rec)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(tp.Records()); n != next {
		t.Errorf("%d records, want exactly %d", n, next)
	}
}

// reflector echoes the request (URL and headers) back in every way an upstream can.
func reflector() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		self := "https://" + r.Host + r.URL.RequestURI()
		switch r.URL.Path {
		case "/redirect":
			w.Header().Set("Location", self+"&next=1")
			w.Header().Set("X-Echo-Auth", r.Header.Get("Authorization"))
			w.WriteHeader(http.StatusFound)
		case "/sse":
			w.Header().Set("Content-Type", "text/event-stream")
			auth := r.Header.Get("Authorization")
			fmt.Fprintf(w, "data: one\n\ndata: %s", auth[:12])
			w.(http.Flusher).Flush()
			fmt.Fprintf(w, "%s\n\n", auth[12:]) // the rest in a later write
		case "/gzip":
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Encoding", "gzip") // although escrow asked for identity
			_, _ = w.Write([]byte{0x1f, 0x8b, 0, 0})
		default:
			body, _ := json.Marshal(map[string]any{"url": self, "headers": r.Header})
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(body)
		}
	}
}

func TestProxy_TheAgentNeverReceivesTheInjectedCredential(t *testing.T) {
	up := func(host string) *upstream { return newTLSUpstream(t, reflector(), false, host) }
	tp := newTestProxy(t, "upstreams:\n"+up("api.example.com").route("api.example.com", "credential: api")+
		up("query.example.com").route("query.example.com", "credential: api", "query: {param: key}")+
		up("basic.example.com").route("basic.example.com", "credential: api", "basic: {username: bot}")+
		up("raw.example.com").route("raw.example.com", "credential: api", "scrub_responses: false"))
	tp.Client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	needles := []string{testSecret, url.QueryEscape(testSecret), base64.StdEncoding.EncodeToString([]byte("bot:" + testSecret)),
		base64.StdEncoding.EncodeToString([]byte(testSecret))}
	n := 0
	for _, u := range []string{
		"https://api.example.com/echo", "https://api.example.com/redirect?x=1", "https://api.example.com/sse",
		"https://query.example.com/echo?x=1", "https://query.example.com/redirect?x=1",
		"https://basic.example.com/echo", "https://basic.example.com/redirect?x=1",
	} {
		resp := tp.Get(t, u, "Accept-Encoding", "gzip")
		var dump strings.Builder
		_ = resp.Header.Write(&dump)
		dump.Write(readBody(t, resp))
		for _, s := range needles {
			if strings.Contains(dump.String(), s) {
				t.Errorf("%s: the agent received the credential (%d bytes form):\n%s", u, len(s), dump.String())
			}
		}
		if !strings.Contains(dump.String(), "[escrow:redacted") {
			t.Errorf("%s: no redaction marker in\n%s", u, dump.String())
		}
		n++
		if rec := tp.Record(t, n); rec.Redacted == 0 || rec.Decision != audit.Allow {
			t.Errorf("%s: record %+v", u, rec)
		}
	}
	if v := counterValue(t, tp.Metrics.Redactions); v < float64(n) {
		t.Errorf("escrow_response_redactions_total = %v, want >= %d", v, n)
	}
	// A body escrow cannot scan is not passed on.
	resp := tp.Get(t, "https://api.example.com/gzip")
	denialOf(t, resp, readBody(t, resp), http.StatusBadGateway, ReasonResponseUnscannable)
	// scrub_responses: false is the documented opt-out: the reflection reaches the agent.
	resp = tp.Get(t, "https://raw.example.com/echo")
	if !strings.Contains(string(readBody(t, resp)), testSecret) {
		t.Error("scrub_responses: false still scrubbed")
	}
}

// counterValue reads a counter.
func counterValue(t testing.TB, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	must(t, c.Write(&m))
	return m.GetCounter().GetValue()
}

func TestProxy_RouteWithoutCredentialDropsTheAgentsAuthorization(t *testing.T) {
	var seen seenRequests
	up := newTLSUpstream(t, http.HandlerFunc(seen.handler), false, "open.example.com")
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "upstreams:\n"+up.route("open.example.com")+plain.route("plain.example.com"))
	for _, u := range []string{"https://open.example.com/x", "http://plain.example.com/x"} {
		if resp := tp.Get(t, u, "Authorization", "Bearer agent-own-token", "X-Other", "kept"); resp.StatusCode != 200 {
			t.Fatalf("%s: %d", u, resp.StatusCode)
		}
	}
	for _, r := range seen.all() {
		if a := r.Header.Get("Authorization"); a != "" || r.Header.Get("X-Other") != "kept" {
			t.Errorf("upstream received Authorization %q, X-Other %q", a, r.Header.Get("X-Other"))
		}
	}
}

// deniedConnect CONNECTs to authority, completes TLS trusting the pod CA, sends one GET and
// returns the answer: how an agent reads a CONNECT escrow denied.
func deniedConnect(t testing.TB, tp *testProxy, authority string) (*http.Response, []byte) {
	t.Helper()
	conn, br, resp, _ := tp.rawConnect(t, authority, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT %s: %d", authority, resp.StatusCode)
	}
	host, _, _ := net.SplitHostPort(authority)
	tc := tls.Client(&bufferedConn{Conn: conn, r: br}, &tls.Config{ServerName: host, RootCAs: tp.Roots, NextProtos: []string{"http/1.1"}})
	must(t, tc.Handshake())
	_, err := io.WriteString(tc, "GET / HTTP/1.1\r\nHost: "+authority+"\r\n\r\n")
	must(t, err)
	r, err := http.ReadResponse(bufio.NewReader(tc), nil)
	must(t, err)
	return r, readBody(t, r)
}

func TestProxy_ConnectToPort80ServesPlainHTTPInside(t *testing.T) {
	var seen seenRequests
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "upstreams:\n"+plain.route("plain.example.com")+plain.route("cred.example.com", "credential: api"))

	// As Node's env proxy support does for http:// URLs.
	for _, c := range []struct {
		host   string
		status int
	}{{"plain.example.com", 200}, {"cred.example.com", http.StatusForbidden}} {
		conn, br, resp, _ := tp.rawConnect(t, c.host+":80", nil)
		if resp.StatusCode != 200 {
			t.Fatalf("CONNECT %s:80: %d", c.host, resp.StatusCode)
		}
		_, err := io.WriteString(conn, "GET /inside HTTP/1.1\r\nHost: "+c.host+"\r\nAuthorization: Bearer agent-own\r\n\r\n")
		must(t, err)
		r, err := http.ReadResponse(br, nil)
		must(t, err)
		body := readBody(t, r)
		if r.StatusCode != c.status {
			t.Errorf("%s: %d %s", c.host, r.StatusCode, body)
		}
		id := r.Header.Get(RequestIDHeader)
		if rec := findRecord(t, tp, id); rec.Scheme != "http" || rec.Port != 80 || rec.Path != "/inside" {
			t.Errorf("%s: record %+v", c.host, rec)
		}
	}
	// The credential was never sent in clear text: the plaintext rule holds inside a tunnel too.
	if got := seen.all(); len(got) != 1 || got[0].Header.Get("Authorization") != "" {
		t.Errorf("upstream saw %d requests", len(got))
	}
}

func TestProxy_DelegationTokenIsVerifiedAndRecorded(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	jwks, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k1", Algorithm: "ES256", Use: "sig"}}})
	must(t, err)
	jwksFile := filepath.Join(t.TempDir(), "jwks.json")
	must(t, os.WriteFile(jwksFile, jwks, 0o644))
	sign := func(claims map[string]any) string {
		sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k1").WithType("JWT"))
		must(t, err)
		tok, err := jwt.Signed(sig).Claims(claims).Serialize()
		must(t, err)
		return tok
	}
	now := time.Now()
	good := sign(map[string]any{"iss": "https://idp.example.com", "sub": "alice@example.com", "aud": "escrow",
		"exp": now.Add(time.Hour).Unix(), "iat": now.Unix(), "jti": "tok-1", "act": map[string]any{"sub": testSPIFFEID}})
	var seen seenRequests
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "delegation:\n  audience: escrow\n  required: true\n  issuers:\n  - oidc: {issuer: https://idp.example.com, jwks_file: "+jwksFile+"}\n"+
		"upstreams:\n"+plain.route("plain.example.com"))

	get := func(auth string) (*http.Response, []byte) {
		h := ""
		if auth != "" {
			h = "Proxy-Authorization: " + auth + "\r\n"
		}
		resp, body, _ := rawProxyRequest(t, tp, "GET http://plain.example.com/x HTTP/1.1\r\nHost: plain.example.com\r\n"+h+"\r\n")
		return resp, body
	}
	for name, auth := range map[string]string{"missing": "", "garbage": "Bearer not-a-token", "wrong key": "Bearer " + good[:len(good)-4] + "AAAA"} {
		resp, body := get(auth)
		d := denialOf(t, resp, body, http.StatusProxyAuthRequired, ReasonDelegationInvalid)
		if resp.Header.Get("Proxy-Authenticate") != "Bearer" {
			t.Errorf("%s: Proxy-Authenticate = %q", name, resp.Header.Get("Proxy-Authenticate"))
		}
		if rec := findRecord(t, tp, d.RequestID); rec.Decision != audit.Deny || rec.SPIFFEID != testSPIFFEID {
			t.Errorf("%s: record %+v", name, rec)
		}
	}
	if n := len(seen.all()); n != 0 {
		t.Fatalf("upstream reached %d times without a valid delegation", n)
	}
	resp, body := get("Bearer " + good)
	if resp.StatusCode != 200 {
		t.Fatalf("valid token: %d %s", resp.StatusCode, body)
	}
	rec := findRecord(t, tp, resp.Header.Get(RequestIDHeader))
	if rec.DelegationSubject != "alice@example.com" || len(rec.DelegationActors) != 1 || rec.DelegationActors[0] != testSPIFFEID || rec.DelegationTokenID != "tok-1" {
		t.Errorf("record %+v", rec)
	}
	if got := seen.all(); len(got) != 1 || got[0].Header.Get("Proxy-Authorization") != "" {
		t.Error("the delegation token reached the upstream")
	}
}

func TestSidecar_CallingProcessReachesPolicyAndRecord(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the calling process is found from /proc")
	}
	plain := newPlainUpstream(t, okHandler(nil))
	cfg := sidecarConfig(t, "upstreams:\n"+plain.route("plain.example.com"))
	cfg.Identity.Process = true
	recs := make(chan *audit.Record, 4)
	sc, err := Build(context.Background(), cfg, Deps{Audit: audit.SinkFunc(func(r *audit.Record) { recs <- r }),
		SystemRoots: func() ([]byte, error) { return nil, nil }})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	pu, _ := url.Parse("http://" + sc.ProxyAddr.String())
	tr := &http.Transport{Proxy: http.ProxyURL(pu)}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://plain.example.com/x")
	must(t, err)
	resp.Body.Close()
	select {
	case rec := <-recs:
		// This test process is the caller: the kernel says so.
		if rec.CallerPID != os.Getpid() || rec.CallerUID != uint32(os.Getuid()) || rec.CallerExe == "" {
			t.Errorf("record caller pid %d uid %d exe %q; want pid %d", rec.CallerPID, rec.CallerUID, rec.CallerExe, os.Getpid())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no record")
	}
}

func TestProxy_TunnelHalfClosesTheAgentWhenTheUpstreamEnds(t *testing.T) {
	// The upstream answers the TLS handshake's first flight and then ends its side only.
	leaf, err := upstreamCA(t).Leaf("tunnel.example.com")
	must(t, err)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}})
	must(t, err)
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		_, _ = io.WriteString(tc, "bye")
		_ = tc.CloseWrite()
		_ = tc.NetConn().(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(tc) // the agent can still send after the upstream's end of stream
		got <- string(b)
	}()
	tp := newTestProxy(t, fmt.Sprintf("upstreams:\n  - host: tunnel.example.com\n    tunnel: true\n    address: %s\n", ln.Addr()),
		withPolicy(tunnelPolicy))
	conn, br, resp, _ := tp.rawConnect(t, "tunnel.example.com:443", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", resp.StatusCode)
	}
	tc := tlsThroughTunnel(t, conn, br, "tunnel.example.com")
	if b, err := io.ReadAll(tc); err != nil || string(b) != "bye" {
		t.Fatalf("read %q, %v", b, err)
	}
	// The TCP end of stream: escrow has acted on the upstream's by now (half-close, not close).
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after close_notify: %v", err)
	}
	_, err = io.WriteString(tc, "late")
	must(t, err)
	must(t, tc.CloseWrite())
	must(t, conn.(*net.TCPConn).CloseWrite())
	select {
	case s := <-got:
		if s != "late" {
			t.Errorf("upstream received %q after its end of stream, want late", s)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("upstream never received the agent's last bytes")
	}
}

// TestProxy_DelegationTokenEscrowCannotCheckIs503NotA407: when the issuer's keys cannot be
// fetched (the issuer is down), a presented token is escrow's outage: 503
// delegation_unavailable with a record, never forwarded, and not 407 (which tells the agent its
// token is bad).
func TestProxy_DelegationTokenEscrowCannotCheckIs503NotA407(t *testing.T) {
	down := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer down.Close()
	caFile := filepath.Join(t.TempDir(), "idp-ca.pem")
	must(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: down.Certificate().Raw}), 0o644))
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k1").WithType("JWT"))
	must(t, err)
	now := time.Now()
	tok, err := jwt.Signed(sig).Claims(map[string]any{"iss": down.URL, "sub": "alice@example.com", "aud": "escrow",
		"exp": now.Add(time.Hour).Unix(), "iat": now.Unix()}).Serialize()
	must(t, err)

	var seen seenRequests
	plain := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	tp := newTestProxy(t, "delegation:\n  audience: escrow\n  issuers:\n  - oidc: {issuer: "+down.URL+", ca_file: "+caFile+"}\n"+
		"upstreams:\n"+plain.route("plain.example.com"))
	resp, body, _ := rawProxyRequest(t, tp, "GET http://plain.example.com/x HTTP/1.1\r\nHost: plain.example.com\r\nProxy-Authorization: Bearer "+tok+"\r\n\r\n")
	d := denialOf(t, resp, body, http.StatusServiceUnavailable, ReasonDelegationUnavailable)
	if resp.Header.Get("Proxy-Authenticate") != "" {
		t.Errorf("Proxy-Authenticate %q on a 503", resp.Header.Get("Proxy-Authenticate"))
	}
	if rec := findRecord(t, tp, d.RequestID); rec.Decision != audit.Deny || rec.Reason != string(ReasonDelegationUnavailable) {
		t.Errorf("record %+v", rec)
	}
	if n := len(seen.all()); n != 0 {
		t.Fatalf("upstream reached %d times with an unchecked delegation token", n)
	}
}
