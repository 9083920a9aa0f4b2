package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/proxy/egress"
)

// serveConnect decides a CONNECT: unknown destinations are denied before any byte is relayed;
// tunnel routes are checked (identity, policy action "connect", egress) and relayed blind;
// every other route is intercepted, and each inner request goes through handle.
func (p *Proxy) serveConnect(w http.ResponseWriter, r *http.Request) {
	peer := peerOfRequest(r)
	st := p.state.Load()
	host, port, err := splitHostPort(r.Host, 0)
	if err != nil || port == 0 {
		rec := p.newRecord(r, kindConnect, st.mode)
		rec.Host = r.Host
		p.deny(w, rec, ReasonBadRequest, errors.New("CONNECT needs host:port"))
		return
	}
	if p.conns.shuttingDown() {
		// Nothing new is relayed or intercepted once Shutdown began.
		rec := p.newRecord(r, kindConnect, st.mode)
		rec.Scheme, rec.Host, rec.Port = connectScheme(port), host, port
		p.deny(w, rec, ReasonShuttingDown, nil)
		return
	}
	rt := st.routes.match(host, port, 443)
	if rt == nil && port == 80 {
		// Node's (and undici's) proxy support sends CONNECT host:80 for http:// URLs: a plain
		// HTTP upstream is reached through the tunnel, and its requests read inside it.
		rt = st.routes.match(host, port, 80)
	}
	if rt == nil {
		rec := p.newRecord(r, kindConnect, st.mode)
		rec.Scheme, rec.Host, rec.Port = connectScheme(port), host, port
		p.bestEffortIdentity(r.Context(), peer, rec)
		p.denyConnect(w, r, st, rec, ReasonUnknownDestination, nil, peer)
		return
	}
	if rt.tunnel {
		p.serveTunnel(w, r, st, host, port, rt, peer)
		return
	}
	// The route is fixed for the connection's life: its inner requests go where the CONNECT
	// was decided to go, even if an update changes the routes meanwhile.
	p.intercept(w, r, st, target{scheme: "https", host: host, port: port, route: rt}, peer, nil)
}

// connectScheme is what a CONNECT to port is taken to carry until its first byte says.
func connectScheme(port int) string {
	if port == 80 {
		return "http"
	}
	return "https"
}

// deniedConn is the denial an intercepted connection answers every request with: the CONNECT
// was denied, and its record written with requestID.
type deniedConn struct {
	reason    Reason
	requestID string
}

// denyConnect denies a CONNECT to an unknown destination so that the agent's HTTP client can
// read why: the CONNECT is answered 200, the connection intercepted (TLS with a leaf from the
// pod CA, or plain HTTP), and every request inside answered with the JSON denial. A client that
// does not trust the pod CA fails its TLS handshake instead (the record and the ops log say
// why). Denials on tunnel routes stay plain 403s: their clients keep end-to-end TLS and are not
// expected to trust the pod CA. The record is written here, once.
func (p *Proxy) denyConnect(w http.ResponseWriter, r *http.Request, st *state, rec *audit.Record, reason Reason, cause error, peer attest.Peer) {
	markDenied(rec, reason)
	rec.Status = reason.Status()
	if cause != nil {
		p.log.Info("denied", zap.String("request_id", rec.RequestID), zap.String("reason", string(reason)), zap.Error(cause))
	}
	p.finish(rec)
	p.intercept(w, r, st, target{scheme: "https", host: rec.Host, port: rec.Port}, peer, &deniedConn{reason: reason, requestID: rec.RequestID})
}

// serveTunnel relays bytes to a tunnel-only upstream after identity, policy and egress checks.
// Its audit record is written when the tunnel closes.
func (p *Proxy) serveTunnel(w http.ResponseWriter, r *http.Request, st *state, host string, port int, rt *route, peer attest.Peer) {
	ctx := r.Context()
	rec := p.newRecord(r, kindTunnel, st.mode)
	rec.Scheme, rec.Host, rec.Port = "https", host, port

	v := p.authorize(ctx, rec, peer, policy.Input{Action: actionConnect, Scheme: "https", Host: host, Port: port, Caller: callerOf(ctx)}, st)
	if v.Reason != ReasonAllowed {
		// A plain 403 (not an intercepted denial): a tunnel route's clients keep end-to-end TLS
		// and are not expected to trust the pod CA.
		p.deny(w, rec, v.Reason, v.Cause)
		return
	}

	if !p.reserveRecord(rec) {
		p.deny(w, rec, ReasonAuditUnavailable, nil)
		return
	}
	start := p.now()
	addr := rt.address
	if addr == "" {
		addr = net.JoinHostPort(host, strconv.Itoa(port)) // always with the port: the dialer needs it
	}
	up, err := st.dialer.DialContext(ctx, "tcp", addr)
	rec.UpstreamDur = p.now().Sub(start)
	if err != nil {
		var denied *egress.DeniedError
		if errors.As(err, &denied) {
			p.deny(w, rec, ReasonEgressDenied, err)
		} else {
			p.fail(w, rec, ReasonUpstreamUnavailable, err)
		}
		return
	}
	agent, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = up.Close()
		p.deny(w, rec, ReasonBadRequest, err)
		return
	}
	if _, err := agent.Write([]byte("HTTP/1.1 200 Connection Established\r\n\r\n")); err != nil {
		_ = up.Close()
		_ = agent.Close()
		rec.Outcome = audit.OutcomeAgentClosed
		p.finish(rec)
		return
	}
	rec.UpstreamStatus, rec.Status = http.StatusOK, http.StatusOK
	if !p.conns.track(rec.SPIFFEID, agent, up) {
		rec.Outcome = audit.OutcomeShuttingDown
		p.finish(rec)
		return
	}
	p.metrics.TunnelsActive.Inc()
	defer func() {
		p.metrics.TunnelsActive.Dec()
		p.conns.untrack(agent, up)
		// The record before the release: Shutdown waits for the release, and the process may
		// exit right after it.
		p.finish(rec)
		p.conns.release()
	}()

	var reader io.Reader = agent
	if n := brw.Reader.Buffered(); n > 0 {
		// Bytes the agent sent right behind the CONNECT (e.g. a TLS ClientHello) are in the buffer.
		reader = io.MultiReader(io.LimitReader(brw.Reader, int64(n)), agent)
	}
	// The tunnel carries TLS to the CONNECT host and nothing else: the ClientHello must name it
	// (no domain fronting through an address shared by many names).
	_ = agent.SetReadDeadline(p.now().Add(helloTimeout))
	sni, hello, err := readClientHello(reader)
	_ = agent.SetReadDeadline(time.Time{})
	rec.SNI = sni
	switch {
	case errors.Is(err, io.EOF):
		rec.Outcome = p.goneOutcome()
		return
	case err != nil:
		p.log.Info("tunnel refused", zap.String("request_id", rec.RequestID), zap.Error(err))
		markDenied(rec, ReasonBadRequest)
		return
	case !sniMatches(sni, host):
		p.log.Info("tunnel refused: the TLS server name is not the CONNECT host", zap.String("request_id", rec.RequestID))
		markDenied(rec, ReasonHostMismatch)
		return
	}
	rec.BytesIn = int64(len(hello))
	if _, err := up.Write(hello); err != nil {
		rec.Outcome = audit.OutcomeUpstreamUnavailable
		return
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rec.BytesIn += relay(up, reader)
	}()
	rec.BytesOut = relay(agent, up)
	wg.Wait()
}

// relay copies src to dst until EOF, then half-closes dst's write side so the peer sees EOF.
func relay(dst net.Conn, src io.Reader) int64 {
	n, _ := io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	} else {
		_ = dst.Close()
	}
	return n
}

// connMeta is what an intercepted connection knows about itself: its CONNECT target and agent,
// and how many requests it carried (a connection that carried none gets its own record).
type connMeta struct {
	target   target
	peer     attest.Peer
	start    time.Time
	mode     string
	requests atomic.Int64
	denied   *deniedConn   // the CONNECT was denied: every request is answered with it
	caller   *callerLookup // the CONNECT's connection's calling process; nil: not looked up
}

type connMetaKey struct{}

// intercept answers the CONNECT and hands the connection to the inner server, whose requests
// come to serveIntercepted: TLS terminated with a leaf for the destination when the agent's
// first byte starts a TLS handshake, plain HTTP otherwise (a CONNECT for an http:// URL).
// denied, when set, is the CONNECT's denial, which every request inside is answered with.
func (p *Proxy) intercept(w http.ResponseWriter, r *http.Request, st *state, t target, peer attest.Peer, denied *deniedConn) {
	agent, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		if denied == nil {
			rec := p.newRecord(r, kindConnect, st.mode)
			rec.Scheme, rec.Host, rec.Port = t.scheme, t.host, t.port
			p.deny(w, rec, ReasonBadRequest, err)
		}
		return
	}
	if _, err := agent.Write([]byte("HTTP/1.1 200 Connection Established\r\n\r\n")); err != nil {
		_ = agent.Close()
		return
	}
	// The first byte says what the agent speaks: 0x16 opens a TLS handshake record.
	_ = agent.SetReadDeadline(p.now().Add(helloTimeout))
	first, perr := brw.Reader.Peek(1)
	_ = agent.SetReadDeadline(time.Time{})
	var conn net.Conn = agent
	if n := brw.Reader.Buffered(); n > 0 {
		buf, _ := brw.Reader.Peek(n)
		conn = &prefixConn{Conn: agent, r: io.MultiReader(strings.NewReader(string(buf)), agent)}
	}
	if perr == nil && first[0] != 0x16 {
		t.scheme = "http"
	} else if perr == nil || denied == nil {
		host := t.host
		conn = tls.Server(conn, &tls.Config{
			MinVersion: tls.VersionTLS12,
			NextProtos: []string{"h2", "http/1.1"},
			GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
				// The leaf is always for the CONNECT destination, whatever SNI says: the inner
				// requests go there, so that is the name the agent must verify.
				return p.ca.Leaf(host)
			},
		})
	}
	if perr != nil && denied != nil {
		_ = agent.Close() // denied and gone: the CONNECT's record is written
		return
	}
	meta := &connMeta{target: t, peer: peer, start: p.now(), mode: string(st.mode), denied: denied}
	meta.caller, _ = r.Context().Value(callerKey{}).(*callerLookup)
	p.icpt.info.Store(conn, meta)
	p.icpt.live.Store(conn, meta)
	p.metrics.TunnelsActive.Inc()
	if !p.icpt.ln.push(conn) {
		p.icpt.info.Delete(conn)
		p.icpt.live.Delete(conn)
		p.metrics.TunnelsActive.Dec()
		_ = conn.Close()
	}
}

func (p *Proxy) innerConnContext(ctx context.Context, c net.Conn) context.Context {
	v, ok := p.icpt.info.LoadAndDelete(c)
	if !ok {
		return ctx
	}
	m := v.(*connMeta)
	if m.caller != nil {
		ctx = context.WithValue(ctx, callerKey{}, m.caller)
	}
	return context.WithValue(ctx, connMetaKey{}, m)
}

// serveIntercepted handles one request on an intercepted connection: the destination is the
// CONNECT target; a Host header naming another host is refused rather than followed.
func (p *Proxy) serveIntercepted(w http.ResponseWriter, r *http.Request) {
	m, ok := r.Context().Value(connMetaKey{}).(*connMeta)
	if !ok {
		writeDenial(w, ReasonBadRequest, "", "")
		return
	}
	m.requests.Add(1)
	if m.denied != nil {
		// The denial was decided, and recorded, at the CONNECT: this is how the agent reads it.
		w.Header().Set("Connection", "close")
		writeDenial(w, m.denied.reason, "", m.denied.requestID)
		return
	}
	if r.Host != "" {
		h, port, err := splitHostPort(r.Host, m.target.port)
		if err != nil || h != m.target.host || port != m.target.port {
			rec := p.newRecord(r, kindRequest, p.state.Load().mode)
			rec.Scheme, rec.Host, rec.Port, rec.Path = m.target.scheme, m.target.host, m.target.port, r.URL.Path
			p.bestEffortIdentity(r.Context(), m.peer, rec)
			p.deny(w, rec, ReasonHostMismatch, nil)
			return
		}
	}
	p.handle(w, r, m.target, m.peer)
}

// innerConnState keeps the active-connection gauge true for intercepted connections, and
// records a connection that closed without carrying a request: an agent that did not complete
// TLS with escrow's leaf (it does not trust the pod CA), or that connected and left.
func (p *Proxy) innerConnState(c net.Conn, s http.ConnState) {
	if s != http.StateClosed && s != http.StateHijacked {
		return
	}
	p.metrics.TunnelsActive.Dec()
	v, ok := p.icpt.live.LoadAndDelete(c)
	if !ok || s != http.StateClosed {
		return
	}
	m := v.(*connMeta)
	if m.requests.Load() > 0 || m.denied != nil {
		return
	}
	rec := &audit.Record{Time: m.start, RequestID: p.nextRequestID(), Kind: kindConnect, Method: http.MethodConnect,
		Mode: m.mode, Scheme: m.target.scheme, Host: m.target.host, Port: m.target.port}
	if m.target.route != nil {
		rec.Credential = m.target.route.credential
	}
	p.bestEffortIdentity(context.Background(), m.peer, rec)
	rec.Outcome = audit.OutcomeAgentClosed
	if tc, ok := c.(*tls.Conn); ok && !tc.ConnectionState().HandshakeComplete {
		rec.Outcome = audit.OutcomeTLSHandshakeFailed
	}
	p.finish(rec)
}

// prefixConn replays bytes read past the CONNECT request before reading the connection.
type prefixConn struct {
	net.Conn
	r io.Reader
}

func (c *prefixConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// chanListener is the inner server's listener: intercepted connections are pushed into it.
type chanListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newChanListener() *chanListener {
	return &chanListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// Shutdown stops intercepting new connections, lets in-flight intercepted requests and tunnels
// finish until ctx ends, then closes what is left.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.conns.beginShutdown()
	err := p.icpt.srv.Shutdown(ctx)
	if err != nil {
		// The drain period is over (http.Server.Shutdown leaves active connections open).
		p.conns.forced.Store(true)
		_ = p.icpt.srv.Close()
	}
	_ = p.icpt.ln.Close()
	if p.conns.drain(ctx) {
		p.log.Warn("drain period over: closed open tunnels")
	}
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}
