// Package proxy is escrow's data path: the loopback HTTP_PROXY/HTTPS_PROXY listener, CONNECT
// handling (tunnel or TLS interception with the per-pod CA), and the pipeline every request goes
// through:
//
//	proxy (route) → attest (who?) → policy (may it?) → credential (which secret?) → upstream
//
// The pipeline is one function, Proxy.handle. The core packages know nothing of HTTP servers;
// this package composes them through the small interfaces below.
package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/proxy/egress"
	"github.com/escrowproxy/escrow/proxy/scrub"
	"github.com/escrowproxy/escrow/telemetry"
)

// Identifier establishes who is calling.
type Identifier interface {
	Identify(ctx context.Context, p attest.Peer) (attest.Identity, error)
}

// Authorizer decides whether a call is allowed.
type Authorizer interface {
	Decide(ctx context.Context, in policy.Input) policy.Decision
}

// Credentials returns the current credential for a request (a name, the caller, a scope).
type Credentials interface {
	Get(ctx context.Context, r credential.Request) (credential.Token, error)
}

// DelegationVerifier verifies the delegation token an agent presents in Proxy-Authorization
// (attest.DelegationVerifier): nil and no error when it presents none and none is required.
type DelegationVerifier interface {
	VerifyHeader(ctx context.Context, proxyAuthorization, workload string) (*attest.Delegation, error)
}

// CallerFinder finds the process at the other end of an accepted connection
// (attest.ProcessFinder).
type CallerFinder interface {
	FromConn(ctx context.Context, c net.Conn) (*attest.Process, error)
}

// LeafSource mints (or returns cached) TLS leaf certificates for intercepted hosts.
type LeafSource interface {
	Leaf(host string) (*tls.Certificate, error)
}

// Options are everything New needs. Most callers use Build, which makes them from the config.
type Options struct {
	// Config must be validated (config.Parse or Config.Validate): routes, egress rules and the
	// policy mode are built from its compiled values.
	Config      *config.Config
	Identity    Identifier
	Policy      Authorizer
	Credentials Credentials
	CA          LeafSource
	Audit       audit.Sink
	Metrics     *telemetry.Metrics
	Logger      *zap.Logger

	// Resolver and Dial are the egress dialer's; nil means the system resolver and net.Dialer.
	Resolver egress.Resolver
	Dial     func(ctx context.Context, network, addr string) (net.Conn, error)
	// Self are escrow's own listener addresses; the egress rules never let a request dial them.
	Self []netip.AddrPort
	Now  func() time.Time
	// Inspectors returns the inspector of an upstream entry, or nil for none (the default).
	Inspectors func(config.Upstream) Inspector
	// Delegation verifies delegation tokens (config delegation); nil: none are read.
	Delegation DelegationVerifier
	// Callers finds each connection's calling process (identity.process); nil: not looked up.
	Callers CallerFinder
}

// Proxy is the request pipeline and the CONNECT handler. It is an http.Handler for the proxy
// listener; Serve runs it.
type Proxy struct {
	id      Identifier
	deleg   DelegationVerifier // nil: no delegation
	callers CallerFinder       // nil: no process lookup
	pol     Authorizer
	creds   Credentials
	ca      LeafSource
	sink    audit.Sink
	metrics *telemetry.Metrics
	log     *zap.Logger
	now     func() time.Time

	// state is what an update replaces whole: routes, egress dialer, policy mode.
	state    atomic.Pointer[state]
	updateMu sync.Mutex // serialises updates (each builds on the previous state)
	build    stateDeps  // what every state is built with

	reqIDPfx string
	reqSeq   atomic.Uint64

	// subjects are the identities credentials were requested for (revocations by prefix).
	subjects subjects

	icpt    interception // the inner server of intercepted TLS connections
	conns   *conns       // tunnels and upgraded connections
	buffers *bufferPool
	// reserver is the audit sink's Reserve when it has one (audit.Queue): a request is served
	// only once its record is sure to be written.
	reserver interface{ Reserve(*audit.Record) bool }
}

// stateDeps are the fixed inputs of every state the proxy builds.
type stateDeps struct {
	resolver egress.Resolver
	dial     dialFunc
	self     []netip.AddrPort
	inspect  func(config.Upstream) Inspector
}

// interception serves the requests of intercepted TLS connections: CONNECT hands each
// connection over through ln, with its CONNECT target kept in info until the server picks it up.
type interception struct {
	srv  *http.Server // started by Serve
	ln   *chanListener
	info sync.Map // *tls.Conn → *connMeta, consumed by srv.ConnContext
	live sync.Map // *tls.Conn → *connMeta, until the connection closes
}

// New checks the wiring and compiles the routes. It starts no goroutine: Serve does.
func New(o Options) (*Proxy, error) {
	var missing []string
	for _, m := range []struct {
		name string
		nil  bool
	}{
		{"Config", o.Config == nil}, {"Identity", o.Identity == nil}, {"Policy", o.Policy == nil},
		{"Credentials", o.Credentials == nil}, {"CA", o.CA == nil}, {"Audit", o.Audit == nil},
		{"Metrics", o.Metrics == nil},
	} {
		if m.nil {
			missing = append(missing, m.name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("proxy: missing options: %s", strings.Join(missing, ", "))
	}
	if !o.Config.Validated() {
		return nil, errors.New("proxy: the config was not validated (use config.Parse, config.Load or Config.Validate)")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	var pfx [4]byte
	_, _ = rand.Read(pfx[:])
	p := &Proxy{
		id: o.Identity, deleg: o.Delegation, callers: o.Callers, pol: o.Policy, creds: o.Credentials, ca: o.CA, sink: o.Audit,
		metrics: o.Metrics, log: o.Logger, now: o.Now,
		build:    stateDeps{resolver: o.Resolver, dial: o.Dial, self: slices.Clone(o.Self), inspect: o.Inspectors},
		reqIDPfx: hex.EncodeToString(pfx[:]), conns: newConns(), buffers: newBufferPool(),
	}
	p.reserver, _ = o.Audit.(interface{ Reserve(*audit.Record) bool })
	st, err := p.buildState(o.Config, nil)
	if err != nil {
		return nil, err
	}
	p.state.Store(st)
	p.icpt.ln = newChanListener()
	p.icpt.srv = &http.Server{
		Handler:           http.HandlerFunc(p.serveIntercepted),
		ConnContext:       p.innerConnContext,
		ConnState:         p.innerConnState,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          zap.NewStdLog(o.Logger.Named("intercept")),
	}
	p.icpt.srv.SetKeepAlivesEnabled(true)
	p.icpt.srv.Protocols = new(http.Protocols)
	p.icpt.srv.Protocols.SetHTTP1(true)
	p.icpt.srv.Protocols.SetHTTP2(true)
	return p, nil
}

// peerKey carries the agent's connection details through a request context.
type peerKey struct{}

// ConnContext records the agent's connection on the outer server; wire it into http.Server.
func (p *Proxy) ConnContext(ctx context.Context, c net.Conn) context.Context {
	if rc, ok := c.(*recordingConn); ok {
		ctx = context.WithValue(ctx, recordingConnKey{}, rc)
		c = rc.Conn
	}
	if p.callers != nil {
		ctx = context.WithValue(ctx, callerKey{}, p.lookupCaller(c))
	}
	return context.WithValue(ctx, peerKey{}, peerOf(c))
}

// callerKey carries a connection's *callerLookup through request contexts.
type callerKey struct{}

// callerLookup is the calling process of one connection, looked up once, right after Accept
// (while the client still holds its socket), in the background so that accepting goes on.
type callerLookup struct {
	done chan struct{}
	proc *attest.Process // nil: not found
}

func (p *Proxy) lookupCaller(c net.Conn) *callerLookup {
	cl := &callerLookup{done: make(chan struct{})}
	go func() {
		defer close(cl.done)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		proc, err := p.callers.FromConn(ctx, c)
		if err != nil {
			p.log.Debug("calling process not found", zap.Error(err))
			return
		}
		cl.proc = proc
	}()
	return cl
}

// callerOf waits for the request's connection's caller lookup; nil when none was made or found.
func callerOf(ctx context.Context) *attest.Process {
	cl, _ := ctx.Value(callerKey{}).(*callerLookup)
	if cl == nil {
		return nil
	}
	select {
	case <-cl.done:
		return cl.proc
	case <-ctx.Done():
		return nil
	}
}

func peerOf(c net.Conn) attest.Peer {
	var pr attest.Peer
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		pr.RemoteAddr = a.AddrPort()
	}
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		pr.LocalAddr = a.AddrPort()
	}
	return pr
}

func (p *Proxy) nextRequestID() string {
	// Built in a stack buffer: one allocation (the string) per request instead of two or three.
	var b [32]byte
	id := append(append(b[:0], p.reqIDPfx...), '-')
	return string(strconv.AppendUint(id, p.reqSeq.Add(1), 36))
}

// ServeHTTP handles the proxy listener: CONNECT, or an absolute-form http:// request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect {
		markRaw(r.Context())
		p.serveConnect(w, r)
		return
	}
	t := target{scheme: "http"}
	var err error
	if !r.URL.IsAbs() || r.URL.Scheme != "http" || r.URL.Host == "" {
		err = errors.New("not an absolute-form http:// request")
	} else {
		t.host, t.port, err = splitHostPort(r.URL.Host, 80)
	}
	if err != nil {
		rec := p.newRecord(r, kindRequest, p.state.Load().mode)
		rec.Scheme, rec.Host = r.URL.Scheme, r.URL.Host
		p.deny(w, rec, ReasonBadRequest, err)
		return
	}
	p.handle(w, r, t, peerOfRequest(r))
}

// peerOfRequest is the agent's connection plus what it presented to the proxy itself (the
// Proxy-Authorization of a plain request or of the CONNECT), for identity sources that verify
// delegation tokens.
func peerOfRequest(r *http.Request) attest.Peer {
	pr := peerFrom(r.Context())
	pr.ProxyAuthorization = r.Header.Get("Proxy-Authorization")
	return pr
}

func peerFrom(ctx context.Context) attest.Peer {
	pr, _ := ctx.Value(peerKey{}).(attest.Peer)
	return pr
}

// target is where a request goes: from the absolute URL of a plain request, or from the CONNECT
// authority of an intercepted connection (never from the inner Host header).
type target struct {
	scheme string
	host   string
	port   int
	route  *route // known for intercepted connections
}

// handle is the spine: route → identity → policy → credential → upstream, with one audit record
// and metrics for every outcome. Each step fails closed.
func (p *Proxy) handle(w http.ResponseWriter, r *http.Request, t target, peer attest.Peer) {
	ctx := r.Context()
	st := p.state.Load()
	rec := p.newRecord(r, kindRequest, st.mode)
	rec.Scheme, rec.Host, rec.Port, rec.Path = t.scheme, t.host, t.port, r.URL.Path
	if p.conns.shuttingDown() || r.ProtoMajor == 1 && len(r.TransferEncoding) > 0 {
		// net/http drops a Content-Length sent with Transfer-Encoding before escrow sees the
		// request, so escrow cannot tell that RFC 9112 §6.3 case from a plain chunked body:
		// the connection is closed after any chunked request, as §6.3 requires for it.
		w.Header().Set("Connection", "close")
	}

	// proxy: which upstream entry, if any.
	rt := t.route
	if rt == nil {
		rt = st.routes.match(t.host, t.port, defaultPort(t.scheme))
	}
	if rt == nil || rt.tunnel {
		// A tunnel-only entry is for CONNECT; a plain request to it has no route either.
		p.bestEffortIdentity(ctx, peer, rec)
		p.deny(w, rec, ReasonUnknownDestination, nil)
		return
	}
	rec.Credential = rt.credential
	// request: nothing that could mean something else upstream than to the policy.
	upgrade, ref := checkRequest(r, rt)
	rec.Method, rec.Upgrade = r.Method, upgrade
	if upgrade != "" {
		markRaw(ctx)
	}
	if ref != nil {
		p.bestEffortIdentity(ctx, peer, rec)
		p.refuse(w, rec, ref)
		return
	}

	// attest + policy: who is calling, and may it, now.
	in := policy.Input{
		Action: r.Method, Scheme: t.scheme, Host: t.host, Port: t.port,
		Path: r.URL.Path, Credential: rt.credential, Upgrade: upgrade, Caller: callerOf(ctx),
	}
	v := p.authorize(ctx, rec, peer, in, st)
	if v.Reason != ReasonAllowed {
		p.deny(w, rec, v.Reason, v.Cause)
		return
	}
	// inspect: a route's inspector may read the request (bounded, and put it back) and ask for
	// more decisions, e.g. one per MCP tool call in the body. Every one of them must allow.
	if rt.inspector != nil {
		more, err := rt.inspector.Inspect(ctx, r, Inspection{Input: in})
		if err != nil {
			p.deny(w, rec, ReasonBadRequest, err)
			return
		}
		for _, extra := range more {
			extra.Identity, extra.Time = v.Identity, p.now()
			extra.Caller, extra.Delegation, extra.Upgrade = v.Input.Caller, v.Input.Delegation, v.Input.Upgrade
			if reason := p.decide(ctx, rec, extra, st.mode); reason != ReasonAllowed {
				p.deny(w, rec, reason, nil)
				return
			}
		}
	}

	// mcp: on an MCP server, each JSON-RPC call in the body is decided on its own, and a
	// tools/list answer is filtered to what this workload may call.
	var filter func(*http.Response) error
	if rt.mcp != nil {
		var ok bool
		if filter, ok = p.inspectMCP(w, r, rt, rec, v.Input, st); !ok {
			return
		}
	}

	// credential: the real one, applied to the outbound copy (which strips what the agent sent).
	ob := outbound{scheme: t.scheme, host: t.host, port: t.port, applier: rt.applier, filter: filter}
	if rt.applier != nil {
		if t.scheme == "http" && !rt.plaintext {
			p.deny(w, rec, ReasonPlaintextCredential, nil)
			return
		}
		start := p.now()
		if k, ok := p.creds.(interface{ Kind(name string) string }); ok {
			rec.CredentialProvider = k.Kind(rt.credential)
		}
		// A verified delegation token goes along: a provider that exchanges it keys by it.
		p.subjects.add(v.Identity.SPIFFEID)
		tok, err := p.creds.Get(ctx, credential.Request{Name: rt.credential, Subject: v.Identity.SPIFFEID, Delegation: v.Presented})
		rec.CredentialDur = p.now().Sub(start)
		if name, ok := p.revokedSince(st, v.Identity.SPIFFEID, rt.credential); ok {
			// A revocation arrived while the credential was fetched: the token is not used,
			// and one minted for the revoked identity is not kept.
			rec.Revocation = name
			p.deny(w, rec, ReasonRevoked, nil)
			return
		}
		if err != nil {
			p.metrics.CredentialLookups.WithLabelValues("error").Inc()
			p.deny(w, rec, ReasonCredentialUnavailable, err)
			return
		}
		p.metrics.CredentialLookups.WithLabelValues("ok").Inc()
		rec.CredentialID, ob.token = tok.ID(), tok
		if rt.scrub != nil {
			ob.scrubber = scrubberFor(rt, tok)
		}
	}

	// audit: nothing is served whose record could not be written.
	if !p.reserveRecord(rec) {
		p.deny(w, rec, ReasonAuditUnavailable, nil)
		return
	}

	// upstream: egress-checked dial, verified TLS, streamed both ways.
	p.forward(w, r, rt, rec, ob)
}

// revokedSince reports a revocation of id or cred that came into force after the request loaded
// st. When it covers id, the tokens cached for id (one may just have been minted) are dropped.
func (p *Proxy) revokedSince(st *state, id, cred string) (string, bool) {
	cur := p.state.Load()
	if cur == st {
		return "", false
	}
	if name, ok := cur.revoked.identity(id); ok {
		if f, ok := p.creds.(interface{ ForgetSubject(string) int }); ok {
			f.ForgetSubject(id)
		}
		return name, true
	}
	return cur.revoked.credential(cred)
}

// scrubberFor is the route's Scrubber of what its applier puts on a request: the token's value,
// and for Basic authentication the user:password pair too (its base64 form is the header's).
// A multi-part credential (SigV4) sends no secret, only a signature made with it.
func scrubberFor(rt *route, tok credential.Token) *scrub.Scrubber {
	v := tok.Value()
	if v == "" {
		return nil
	}
	if inj := rt.spec.Injection(); inj.Kind == config.InjectBasic {
		return rt.scrub.For(v, scrub.BasicPair(inj.Username, v))
	}
	return rt.scrub.For(v)
}

func defaultPort(scheme string) int {
	if scheme == "http" {
		return 80
	}
	return 443
}

func hostPort(host string, port int, scheme string) string {
	h := host
	if strings.Contains(host, ":") {
		h = "[" + host + "]"
	}
	if port == defaultPort(scheme) {
		return h
	}
	return h + ":" + strconv.Itoa(port)
}

func (p *Proxy) newRecord(r *http.Request, kind string, mode config.PolicyMode) *audit.Record {
	return &audit.Record{
		Time: p.now(), RequestID: p.nextRequestID(), Kind: kind, Method: r.Method, Mode: string(mode),
	}
}

// reserveRecord makes sure rec will be written before what it records happens: false while the
// audit output is stalled.
func (p *Proxy) reserveRecord(rec *audit.Record) bool {
	return p.reserver == nil || p.reserver.Reserve(rec)
}

// deny answers the agent, logs the internal cause (never sent to the agent) and finishes the
// record.
func (p *Proxy) deny(w http.ResponseWriter, rec *audit.Record, reason Reason, cause error) {
	markDenied(rec, reason)
	rec.Status = reason.Status()
	if cause != nil {
		p.log.Info("denied", zap.String("request_id", rec.RequestID), zap.String("reason", string(reason)), zap.Error(cause))
	}
	rec.BytesOut = writeDenial(w, reason, "", rec.RequestID)
	p.finish(rec)
}

// refuse answers a request refused before the policy was asked, with its fixed message.
func (p *Proxy) refuse(w http.ResponseWriter, rec *audit.Record, ref *refusal) {
	markDenied(rec, ref.reason)
	rec.Status = ref.reason.Status()
	rec.BytesOut = writeDenial(w, ref.reason, ref.message, rec.RequestID)
	p.finish(rec)
}

// markDenied sets the record's outcome to a denial for reason; finish writes it.
func markDenied(rec *audit.Record, reason Reason) {
	rec.Decision, rec.Reason = audit.Deny, string(reason)
}

// finish is the one place an audit record is completed and written, with the request metrics:
// every request, tunnel and refused CONNECT ends here exactly once. The metric's reason label is
// the denial's reason, or for a request let through that did not complete, its outcome.
func (p *Proxy) finish(rec *audit.Record) {
	rec.TotalDur = p.now().Sub(rec.Time)
	if rec.Decision == "" {
		rec.Decision = audit.Allow
	}
	if rec.Reason == "" {
		rec.Reason = string(ReasonAllowed)
	}
	label := rec.Reason
	if rec.Decision != audit.Deny {
		if rec.WouldDeny {
			rec.Decision = audit.WouldDeny
		}
		if rec.Outcome == "" {
			rec.Outcome = audit.OutcomeOK
		} else if rec.Outcome != audit.OutcomeOK {
			label = rec.Outcome
		}
	}
	p.metrics.Requests.WithLabelValues(rec.Decision, label).Inc()
	p.metrics.RequestDuration.WithLabelValues(rec.Decision).Observe(rec.TotalDur.Seconds())
	p.sink.Write(rec)
}

// fail answers a request that was let through but could not be completed (the upstream did not
// answer, the agent's body was malformed) with outcome's status and reason, and finishes it.
func (p *Proxy) fail(w http.ResponseWriter, rec *audit.Record, outcome Reason, cause error) {
	rec.Outcome = string(outcome)
	rec.Status = outcome.Status()
	if cause != nil {
		p.log.Info("request failed", zap.String("request_id", rec.RequestID), zap.String("outcome", string(outcome)), zap.Error(cause))
	}
	rec.BytesOut = writeDenial(w, outcome, "", rec.RequestID)
	p.finish(rec)
}

// goneOutcome is the outcome of a request whose agent connection ended under it: the end of the
// drain period at stop, or the agent leaving.
func (p *Proxy) goneOutcome() string {
	if p.conns.forced.Load() {
		return audit.OutcomeShuttingDown
	}
	return audit.OutcomeAgentClosed
}
