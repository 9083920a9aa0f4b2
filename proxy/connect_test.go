package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/audit"
)

func TestProxy_StreamsSSEWithoutBuffering(t *testing.T) {
	const events = 3
	var (
		sentAt     [events]time.Time
		gotFirst   = make(chan struct{})
		sentMu     sync.Mutex
		handlerEnd = make(chan struct{})
	)
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(handlerEnd)
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := range events {
			if i > 0 {
				time.Sleep(150 * time.Millisecond)
			}
			if i == events-1 {
				// Before the last event, give the agent time to have seen the first one. If escrow
				// buffered the stream, it never does, and the assertion below fails.
				select {
				case <-gotFirst:
				case <-time.After(5 * time.Second):
				}
			}
			sentMu.Lock()
			sentAt[i] = time.Now()
			sentMu.Unlock()
			fmt.Fprintf(w, "data: event %d\n\n", i)
			_ = rc.Flush()
		}
	}), false, "llm.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("llm.example.com", "credential: api"))

	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			gotFirst = make(chan struct{})
			handlerEnd = make(chan struct{})
			tr := tp.Transport.Clone()
			tr.ForceAttemptHTTP2 = h2
			defer tr.CloseIdleConnections()
			resp, err := (&http.Client{Transport: tr}).Get("https://llm.example.com/v1/stream")
			must(t, err)
			defer resp.Body.Close()
			if resp.ProtoMajor != map[bool]int{false: 1, true: 2}[h2] {
				t.Fatalf("agent protocol %s", resp.Proto)
			}
			br := bufio.NewReader(resp.Body)
			var gotAt [events]time.Time
			for i := range events {
				line, err := br.ReadString('\n')
				if err != nil {
					t.Fatalf("event %d: %v", i, err)
				}
				gotAt[i] = time.Now()
				if want := fmt.Sprintf("data: event %d\n", i); line != want {
					t.Fatalf("event %d = %q, want %q", i, line, want)
				}
				if i == 0 {
					close(gotFirst)
				}
				_, _ = br.ReadString('\n') // blank line
			}
			<-handlerEnd
			sentMu.Lock()
			defer sentMu.Unlock()
			if !gotAt[0].Before(sentAt[events-1]) {
				t.Errorf("the first event arrived %v after the last was sent: escrow buffers the stream",
					gotAt[0].Sub(sentAt[events-1]))
			}
			for i := 1; i < events; i++ {
				if gotAt[i].Before(sentAt[i]) {
					t.Errorf("event %d arrived before it was sent", i)
				}
			}
		})
	}
}

// TestProxy_FixedLengthResponseIsNotHeldUntilComplete: a response with a Content-Length is
// not streamed flush by flush like SSE (a small one leaves in one write with its headers), but
// what arrived is still passed on within fixedLengthFlushInterval, not held until the body is
// complete.
func TestProxy_FixedLengthResponseIsNotHeldUntilComplete(t *testing.T) {
	gotFirst := make(chan struct{})
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		_, _ = io.WriteString(w, "first")
		_ = http.NewResponseController(w).Flush()
		// If escrow held the body until it is complete, the agent never sees "first" before
		// this gives up.
		select {
		case <-gotFirst:
		case <-time.After(5 * time.Second):
		}
		_, _ = io.WriteString(w, "-last")
	}), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"))

	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			gotFirst = make(chan struct{})
			tr := tp.Transport.Clone()
			tr.ForceAttemptHTTP2 = h2
			defer tr.CloseIdleConnections()
			start := time.Now()
			resp, err := (&http.Client{Transport: tr}).Get("https://api.example.com/v1/slow")
			must(t, err)
			defer resp.Body.Close()
			first := make([]byte, 5)
			if _, err := io.ReadFull(resp.Body, first); err != nil || string(first) != "first" {
				t.Fatalf("first part %q, %v", first, err)
			}
			took := time.Since(start)
			close(gotFirst)
			if took > 3*time.Second {
				t.Errorf("the first part of the body took %v to arrive: escrow held it until the body was complete", took)
			}
			rest, err := io.ReadAll(resp.Body)
			if err != nil || string(rest) != "-last" {
				t.Errorf("rest %q, %v", rest, err)
			}
		})
	}
}

func TestProxy_StreamsRequestBody(t *testing.T) {
	firstChunk := make(chan string, 1)
	total := make(chan int, 1)
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			t.Errorf("upstream read: %v", err)
			return
		}
		firstChunk <- string(buf)
		rest, _ := io.ReadAll(r.Body)
		total <- len(buf) + len(rest)
		_, _ = io.WriteString(w, "stored")
	}), true, "upload.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("upload.example.com", "credential: api"))

	for i, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			tr := tp.Transport.Clone()
			tr.ForceAttemptHTTP2 = h2
			defer tr.CloseIdleConnections()
			pr, pw := io.Pipe()
			req, _ := http.NewRequest(http.MethodPost, "https://upload.example.com/files", pr)
			type result struct {
				resp *http.Response
				err  error
			}
			done := make(chan result, 1)
			go func() {
				resp, err := (&http.Client{Transport: tr}).Do(req)
				done <- result{resp, err}
			}()
			if _, err := pw.Write([]byte("chunk")); err != nil {
				t.Fatal(err)
			}
			select {
			case c := <-firstChunk:
				if c != "chunk" {
					t.Fatalf("first chunk = %q", c)
				}
			case <-time.After(10 * time.Second):
				pw.CloseWithError(errors.New("test gave up"))
				t.Fatal("the upstream did not receive the first chunk while the agent was still writing: escrow buffers request bodies")
			}
			if _, err := pw.Write(bytes.Repeat([]byte("x"), 100_000)); err != nil {
				t.Fatal(err)
			}
			pw.Close()
			r := <-done
			must(t, r.err)
			// Read the answer before closing: closing first makes the agent leave mid-response.
			if body := readBody(t, r.resp); string(body) != "stored" {
				t.Fatalf("body = %q", body)
			}
			if r.resp.StatusCode != 200 || r.resp.ProtoMajor != map[bool]int{false: 1, true: 2}[h2] {
				t.Fatalf("status %d, %s", r.resp.StatusCode, r.resp.Proto)
			}
			if n := <-total; n != 100_005 {
				t.Errorf("upstream received %d bytes", n)
			}
			rec := tp.Record(t, i+1)
			if rec.BytesIn != 100_005 || rec.BytesOut != int64(len("stored")) || rec.Method != "POST" {
				t.Errorf("record bytes in/out = %d/%d, method %s, record %+v", rec.BytesIn, rec.BytesOut, rec.Method, *rec)
			}
		})
	}
}

// wsEchoUpstream answers a WebSocket handshake with 101 and then echoes raw bytes; it sends the
// Authorization it saw on gotAuth.
func wsEchoUpstream(t *testing.T, host string, gotAuth chan<- string) *upstream {
	return newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth <- r.Header.Get("Authorization")
		if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") || !strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade") {
			http.Error(w, "not a websocket handshake", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("hijack: %v", err)
			return
		}
		defer conn.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
			wsAccept(r.Header.Get("Sec-WebSocket-Key")))
		_ = brw.Flush()
		_, _ = io.Copy(conn, brw) // echo raw bytes (frames are opaque here)
	}), false, host)
}

// openWebSocket CONNECTs to host through the proxy, does the TLS and WebSocket handshakes by
// hand (RFC 6455, no library) with the agent's own Authorization, and returns the connection.
func openWebSocket(t *testing.T, tp *testProxy, host string) (*tls.Conn, *bufio.Reader) {
	t.Helper()
	conn, br, resp, _ := tp.rawConnect(t, host+":443", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", resp.StatusCode)
	}
	tc := tls.Client(&bufferedConn{Conn: conn, r: br}, &tls.Config{ServerName: host, RootCAs: tp.Roots, NextProtos: []string{"http/1.1"}})
	must(t, tc.Handshake())
	key := base64.StdEncoding.EncodeToString([]byte("escrow-ws-key-16"))
	fmt.Fprintf(tc, "GET /socket HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer agent-placeholder\r\n\r\n", host, key)
	tbr := bufio.NewReader(tc)
	wsResp, err := http.ReadResponse(tbr, &http.Request{Method: http.MethodGet})
	must(t, err)
	if wsResp.StatusCode != http.StatusSwitchingProtocols || wsResp.Header.Get("Sec-WebSocket-Accept") != wsAccept(key) {
		t.Fatalf("handshake response %d %v", wsResp.StatusCode, wsResp.Header)
	}
	return tc, tbr
}

// wsFrame is a masked text frame "hi" (FIN, opcode 1); the echo upstream returns it as is.
var wsFrame = []byte{0x81, 0x82, 1, 2, 3, 4, 'h' ^ 1, 'i' ^ 2}

func TestProxy_WebSocketUpgradePasses(t *testing.T) {
	gotAuth := make(chan string, 1)
	up := wsEchoUpstream(t, "ws.example.com", gotAuth)
	tp := newTestProxy(t, "upstreams:\n"+up.route("ws.example.com", "credential: api"))

	tc, tbr := openWebSocket(t, tp, "ws.example.com")
	if a := <-gotAuth; a != "Bearer "+testSecret {
		t.Errorf("upstream handshake Authorization = %q", a)
	}
	_, err := tc.Write(wsFrame)
	must(t, err)
	echo := make([]byte, len(wsFrame))
	_, err = io.ReadFull(tbr, echo)
	must(t, err)
	if !bytes.Equal(echo, wsFrame) {
		t.Errorf("echo = %x, want %x", echo, wsFrame)
	}
	if n := gaugeValue(t, tp.Metrics.TunnelsActive); n != 1 {
		t.Errorf("escrow_tunnels_active = %v with an upgraded connection open, want 1", n)
	}
	tc.Close()
	rec := tp.Record(t, 1)
	if rec.UpstreamStatus != http.StatusSwitchingProtocols || rec.Decision != audit.Allow {
		t.Errorf("record = %+v", rec)
	}
	// The frame crossed the upgraded connection both ways, and the record says so.
	if rec.BytesIn < int64(len(wsFrame)) || rec.BytesOut < int64(len(wsFrame)) {
		t.Errorf("record bytes in/out = %d/%d, want at least %d each way", rec.BytesIn, rec.BytesOut, len(wsFrame))
	}
	waitFor(t, "escrow_tunnels_active back to 0", func() bool { return gaugeValue(t, tp.Metrics.TunnelsActive) == 0 })
}

func TestProxy_ShutdownClosesUpgradedConnectionsAfterTheDrainTimeout(t *testing.T) {
	gotAuth := make(chan string, 1)
	up := wsEchoUpstream(t, "ws.example.com", gotAuth)
	const drain = 300 * time.Millisecond
	tp := newTestProxy(t, "upstreams:\n"+up.route("ws.example.com", "credential: api"), withDrain(drain))
	tc, tbr := openWebSocket(t, tp, "ws.example.com")
	<-gotAuth
	closed := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, tbr); close(closed) }()

	start := time.Now()
	must(t, tp.Stop())
	select {
	case <-closed:
		t.Logf("upgraded connection closed %v after shutdown began", time.Since(start))
	case <-time.After(5 * time.Second):
		tc.Close()
		t.Fatal("an upgraded (WebSocket) connection is still open 5s after shutdown: the drain did not close it")
	}
	// When Serve returns the process may exit: the upgraded connection's record must be written.
	if recs := tp.Records(); len(recs) != 1 || recs[0].UpstreamStatus != http.StatusSwitchingProtocols {
		t.Errorf("records when Serve returned = %+v, want the upgraded request's", recs)
	}
}

func wsAccept(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

// bufferedConn reads through a bufio.Reader that may hold bytes already read from Conn.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func TestProxy_HTTP2ToAgentOverALPN(t *testing.T) {
	upProto := make(chan int, 4)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		upProto <- r.ProtoMajor
		_, _ = io.WriteString(w, "ok")
	})
	up2 := newTLSUpstream(t, h, true, "h2.example.com")
	up1 := newTLSUpstream(t, h, false, "h1.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up2.route("h2.example.com", "credential: api")+up1.route("h1.example.com", "credential: api"))
	tp.Transport.ForceAttemptHTTP2 = true

	for host, want := range map[string]int{"h2.example.com": 2, "h1.example.com": 1} {
		resp := tp.Get(t, "https://"+host+"/")
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Fatalf("%s: status %d, agent protocol %s, want HTTP/2", host, resp.StatusCode, resp.Proto)
		}
		if got := <-upProto; got != want {
			t.Errorf("%s: upstream protocol HTTP/%d, want HTTP/%d", host, got, want)
		}
	}
	// Two requests on one agent connection both go through the pipeline.
	resp := tp.Get(t, "https://h2.example.com/again")
	if resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	<-upProto
	if recs := tp.WaitRecords(t, 3); recs[2].Path != "/again" || recs[2].Decision != audit.Allow {
		t.Errorf("record = %+v", recs[2])
	}
}

func TestProxy_HostHeaderMismatchIs421(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	other := newTLSUpstream(t, okHandler(&calls), false, "other.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api")+other.route("other.example.com"))

	for _, h2 := range []bool{false, true} {
		tr := tp.Transport.Clone()
		tr.ForceAttemptHTTP2 = h2
		req, _ := http.NewRequest(http.MethodGet, "https://api.example.com/", nil)
		req.Host = "other.example.com"
		resp, err := (&http.Client{Transport: tr}).Do(req)
		must(t, err)
		body := readBody(t, resp)
		resp.Body.Close()
		tr.CloseIdleConnections()
		d := denialOf(t, resp, body, http.StatusMisdirectedRequest, ReasonHostMismatch)
		rec := findRecord(t, tp, d.RequestID)
		if rec.Host != "api.example.com" || rec.Reason != string(ReasonHostMismatch) || rec.Decision != audit.Deny {
			t.Errorf("record = %+v", rec)
		}
	}
	// The same host with its explicit port is fine.
	req, _ := http.NewRequest(http.MethodGet, "https://api.example.com/", nil)
	req.Host = "API.example.com:443"
	if resp := tp.Do(t, req); resp.StatusCode != 200 {
		t.Errorf("explicit default port: status %d", resp.StatusCode)
	}
	if calls.get() != 1 {
		t.Errorf("upstream calls = %d, want 1", calls.get())
	}
}

// newEchoServer is a raw TCP echo server; it echoes until the peer half-closes, then closes.
func newEchoServer(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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

const tunnelPolicy = `
@id("allow-tunnel")
permit (principal, action == Action::"connect", resource == Host::"tunnel.example.com")
when { context.port == 443 };
`

func TestProxy_TunnelRelaysBytesAndAuditsAtClose(t *testing.T) {
	echo := newTLSEchoServer(t, "tunnel.example.com")
	tp := newTestProxy(t, fmt.Sprintf(`upstreams:
  - host: tunnel.example.com
    tunnel: true
    address: %s
  - host: closed.example.com
    tunnel: true
    address: %s
`, echo, echo), withPolicy(tunnelPolicy))

	conn, br, resp, _ := tp.rawConnect(t, "tunnel.example.com:443", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", resp.StatusCode)
	}
	tc := tlsThroughTunnel(t, conn, br, "tunnel.example.com")
	if n := len(tp.Records()); n != 0 {
		t.Fatalf("%d record(s) written while the tunnel is open; want one at close", n)
	}
	_, err := tc.Write([]byte("hello"))
	must(t, err)
	got := make([]byte, len("hello"))
	_, err = io.ReadFull(tc, got)
	must(t, err)
	if string(got) != "hello" {
		t.Fatalf("echo = %q", got)
	}
	must(t, tc.CloseWrite())
	must(t, conn.(*net.TCPConn).CloseWrite())
	if rest, err := io.ReadAll(tc); err != nil || len(rest) != 0 {
		t.Fatalf("after close: %q, %v", rest, err)
	}
	rec := tp.Record(t, 1)
	// TLS records: more bytes crossed than the plaintext, both ways.
	if rec.Kind != "tunnel" || rec.Decision != audit.Allow || rec.Host != "tunnel.example.com" || rec.Port != 443 ||
		rec.BytesIn <= 5 || rec.BytesOut <= 5 || rec.PolicyIDs[0] != "allow-tunnel" {
		t.Errorf("record = %+v", rec)
	}

	// Denied by policy: refused at the CONNECT, nothing relayed.
	_, _, resp, body := tp.rawConnect(t, "closed.example.com:443", nil)
	denialOf(t, resp, body, http.StatusForbidden, ReasonPolicyDenied)
	rec = tp.Record(t, 2)
	if rec.Kind != "tunnel" || rec.Decision != audit.Deny || rec.Reason != string(ReasonPolicyDenied) {
		t.Errorf("record = %+v", rec)
	}
}

func TestProxy_TunnelDialsResolvedHostOnDefaultPort(t *testing.T) {
	// No address: the tunnel resolves its host (through the egress rules) and dials port 443.
	echo := newTLSEchoServer(t, "tunnel.example.com")
	var dialed []string
	var mu sync.Mutex
	tp := newTestProxy(t, "upstreams:\n  - host: tunnel.example.com\n    tunnel: true\n",
		withPolicy(tunnelPolicy),
		withResolver(&fakeResolver{answers: map[string][]netip.Addr{"tunnel.example.com": {netip.MustParseAddr("127.0.0.1")}}}),
		withDial(func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			dialed = append(dialed, addr)
			mu.Unlock()
			if addr != "127.0.0.1:443" {
				return nil, fmt.Errorf("unexpected dial %s", addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, echo)
		}))
	conn, br, resp, body := tp.rawConnect(t, "tunnel.example.com:443", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d %s", resp.StatusCode, body)
	}
	tc := tlsThroughTunnel(t, conn, br, "tunnel.example.com")
	_, err := tc.Write([]byte("ping"))
	must(t, err)
	got := make([]byte, 4)
	_, err = io.ReadFull(tc, got)
	must(t, err)
	tc.Close()
	if rec := tp.Record(t, 1); rec.Decision != audit.Allow || rec.BytesIn <= 4 {
		t.Errorf("record = %+v", rec)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(dialed) != 1 || dialed[0] != "127.0.0.1:443" {
		t.Errorf("dialed %q", dialed)
	}
}

func TestProxy_TunnelEgressDenied(t *testing.T) {
	echo := newEchoServer(t)
	tp := newTestProxy(t, "upstreams:\n  - host: tunnel.example.com\n    tunnel: true\n    address: "+echo+"\n",
		withPolicy(tunnelPolicy), withoutLoopbackEgress())
	_, _, resp, body := tp.rawConnect(t, "tunnel.example.com:443", nil)
	denialOf(t, resp, body, http.StatusForbidden, ReasonEgressDenied)
	if rec := tp.Record(t, 1); rec.Kind != "tunnel" || rec.Reason != string(ReasonEgressDenied) {
		t.Errorf("record = %+v", rec)
	}
}

// leafRecorder remembers every distinct leaf certificate handed out.
type leafRecorder struct {
	LeafSource
	mu    sync.Mutex
	seen  map[*tls.Certificate]bool
	calls int
}

func (l *leafRecorder) Leaf(host string) (*tls.Certificate, error) {
	c, err := l.LeafSource.Leaf(host)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls++
	if c != nil {
		l.seen[c] = true
	}
	return c, err
}

func TestProxy_ConcurrentConnectsMintOneLeaf(t *testing.T) {
	up := newTLSUpstream(t, okHandler(nil), true, "api.example.com")
	rec := &leafRecorder{seen: map[*tls.Certificate]bool{}}
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"),
		withLeafSource(func(l LeafSource) LeafSource { rec.LeafSource = l; return rec }))

	const n = 12
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			tr := tp.Transport.Clone() // its own agent connection, so its own CONNECT and handshake
			tr.ForceAttemptHTTP2 = i%2 == 0
			defer tr.CloseIdleConnections()
			resp, err := (&http.Client{Transport: tr}).Get(fmt.Sprintf("https://api.example.com/%d", i))
			if err != nil {
				errs <- err
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				errs <- fmt.Errorf("status %d", resp.StatusCode)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	tp.WaitRecords(t, n)
	// The agents closed their connections (HTTP/1.1 and HTTP/2 alike): none is counted open.
	waitFor(t, "escrow_tunnels_active to return to 0", func() bool { return gaugeValue(t, tp.Metrics.TunnelsActive) == 0 })
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.calls != n || len(rec.seen) != 1 {
		t.Errorf("%d handshakes got %d distinct leaves, want 1", rec.calls, len(rec.seen))
	}
}

// eagerConn sends the CONNECT request together with the first bytes the TLS client writes (its
// ClientHello), as clients that do not wait for the proxy's answer do, and skips the proxy's
// answer before the first read.
type eagerConn struct {
	net.Conn
	connect  []byte
	br       *bufio.Reader
	status   int
	answered bool
}

func (c *eagerConn) Write(b []byte) (int, error) {
	if c.connect != nil {
		msg := append(c.connect, b...)
		c.connect = nil
		if _, err := c.Conn.Write(msg); err != nil {
			return 0, err
		}
		return len(b), nil
	}
	return c.Conn.Write(b)
}

func (c *eagerConn) Read(b []byte) (int, error) {
	if !c.answered {
		c.answered = true
		resp, err := http.ReadResponse(c.br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			return 0, err
		}
		c.status = resp.StatusCode
	}
	return c.br.Read(b)
}

func TestProxy_InterceptsClientHelloSentWithTheConnect(t *testing.T) {
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"))
	raw, err := net.DialTimeout("tcp", tp.Addr, 5*time.Second)
	must(t, err)
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(20 * time.Second))
	ec := &eagerConn{Conn: raw, br: bufio.NewReader(raw),
		connect: []byte("CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")}
	tc := tls.Client(ec, &tls.Config{ServerName: "api.example.com", RootCAs: tp.Roots, NextProtos: []string{"http/1.1"}})
	must(t, tc.Handshake())
	if ec.status != 200 {
		t.Fatalf("CONNECT answered %d", ec.status)
	}
	_, err = io.WriteString(tc, "GET /early HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
	must(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	must(t, err)
	if body := readBody(t, resp); resp.StatusCode != 200 || string(body) != "ok" {
		t.Errorf("response %d %q", resp.StatusCode, body)
	}
	if rec := tp.Record(t, 1); rec.Path != "/early" || rec.Decision != audit.Allow {
		t.Errorf("record = %+v", rec)
	}
}
