package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/proxy/egress"
	"github.com/escrowproxy/escrow/proxy/scrub"
)

// fwdKey carries the in-flight forward's state to the ReverseProxy callbacks.
type fwdKey struct{}

// fwdState is one forward's state. The body and response counters live in it so a request
// makes one allocation for all three.
type fwdState struct {
	rec   *audit.Record
	start time.Time
	out   outbound
	// finished: upstreamError already denied and finished the record.
	finished bool
	redacted atomic.Int64 // occurrences of the injected value replaced in the response
	cr       countingReader
	cw       countingWriter
}

// outbound is what handle decided for the upstream request: where it goes and which credential
// it carries. It is applied to ReverseProxy's own copy of the request, so the agent's request is
// cloned once, not twice.
type outbound struct {
	scheme, host string
	port         int
	applier      credential.Applier // nil: no credential bound
	token        credential.Token
	// scrubber replaces the injected value in the response; nil: not scrubbed.
	scrubber *scrub.Scrubber
	// filter rewrites the response (an MCP tools/list answer); an error answers 502 so nothing
	// unfiltered reaches the agent. nil: none.
	filter func(*http.Response) error
}

// fixedLengthFlushInterval is how long bytes of a response with a Content-Length may wait in
// escrow's write buffer before they are flushed to the agent. Streamed responses (SSE, or no
// Content-Length, as chunked LLM output) are flushed after every write whatever this is:
// httputil.ReverseProxy always does that for them. A fixed-length response is written as it is
// copied and flushed at the latest after this interval, or when the handler returns: a small
// response then leaves in one write with its headers. Flushing after every write instead costs
// a timer goroutine and a header-only write (a loopback TCP segment) per request.
const fixedLengthFlushInterval = 5 * time.Millisecond

// newReverseProxy is the forwarder of one route. Streamed responses (SSE, chunked LLM output)
// are flushed after every write so they reach the agent as the upstream sends them, others
// within fixedLengthFlushInterval; it passes WebSocket upgrades, removes hop-by-hop headers, and
// strips X-Escrow-Reason from upstream responses so an upstream cannot forge an escrow denial.
func (p *Proxy) newReverseProxy(tr http.RoundTripper) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		// Rewrite (rather than Director) also keeps ReverseProxy from adding X-Forwarded-*
		// headers that would leak the agent's address upstream.
		Rewrite:       rewrite,
		Transport:     tr,
		FlushInterval: fixedLengthFlushInterval,
		BufferPool:    p.buffers,
		ErrorLog:      zap.NewStdLog(p.log.Named("forward")),
		ModifyResponse: func(resp *http.Response) error {
			resp.Header.Del(ReasonHeader)
			resp.Header.Del(RequestIDHeader)
			st, _ := resp.Request.Context().Value(fwdKey{}).(*fwdState)
			if st != nil && st.out.scrubber != nil {
				if err := st.scrubResponse(resp, p.metrics.Redactions); err != nil {
					return err
				}
			}
			if st != nil && st.out.filter != nil {
				if err := st.out.filter(resp); err != nil {
					// Not delivered unfiltered: recorded as a response escrow could not check.
					return fmt.Errorf("%w: %w", errUnscannable, err)
				}
			}
			if resp.Trailer != nil {
				// Neither as an announced trailer nor as one that arrives after the body.
				delete(resp.Trailer, ReasonHeader)
				resp.Body = &trailerScrub{ReadCloser: resp.Body, resp: resp, st: st}
			}
			if st != nil {
				resp.Header[RequestIDHeader] = []string{st.rec.RequestID}
				st.rec.UpstreamStatus, st.rec.Status = resp.StatusCode, resp.StatusCode
				st.rec.UpstreamDur = p.now().Sub(st.start)
			}
			return nil
		},
		ErrorHandler: p.upstreamError,
	}
}

// forward sends out upstream through the route's transport and finishes the record, also when
// the response body copy aborts midway (ReverseProxy panics with http.ErrAbortHandler then).
func (p *Proxy) forward(w http.ResponseWriter, r *http.Request, rt *route, rec *audit.Record, ob outbound) {
	st := &fwdState{rec: rec, start: p.now(), out: ob}
	out := r.WithContext(context.WithValue(r.Context(), fwdKey{}, st))
	cr := &st.cr
	cr.ReadCloser = out.Body
	if out.Body != nil && out.Body != http.NoBody {
		out.Body = cr
	}
	cw := &st.cw
	cw.ResponseWriter, cw.n, cw.p, cw.st = w, &rec.BytesOut, p, st
	defer func() {
		if v := recover(); v != nil {
			// The transport may still hold the body reader in another goroutine: read atomically.
			// Only here: once finish has handed rec to the sink, rec is no longer ours to write.
			rec.BytesIn = cr.n.Load()
			rec.Redacted = int(st.redacted.Load())
			if rec.Decision != audit.Deny && rec.Outcome == "" {
				// The body copy broke after the upstream answered: either the agent left (its
				// request context is done) or the upstream's stream broke.
				rec.Outcome = audit.OutcomeUpstreamUnavailable
				if out.Context().Err() != nil {
					rec.Outcome = p.goneOutcome()
				}
			}
			p.finish(rec)
			if cw.upgraded != nil {
				p.conns.release()
			}
			panic(v)
		}
	}()
	rt.forward.ServeHTTP(cw, out)
	if st.finished {
		return // denied (and finished) by upstreamError
	}
	if rec.UpstreamDur == 0 {
		rec.UpstreamDur = p.now().Sub(st.start)
	}
	rec.BytesIn = cr.n.Load()
	rec.Redacted = int(st.redacted.Load())
	if u := cw.upgraded; u != nil {
		// An upgraded connection (WebSocket): count what crossed it after the 101.
		rec.BytesIn += u.in.Load()
		rec.BytesOut += u.out.Load()
		// Shutdown waits for this release; the record is written first.
		defer p.conns.release()
	}
	p.finish(rec)
}

// rewrite points ReverseProxy's copy of the request at the upstream. The credential is applied
// later, by applyingTransport, where applying can fail (and sign the final request).
func rewrite(pr *httputil.ProxyRequest) {
	st := pr.Out.Context().Value(fwdKey{}).(*fwdState)
	out := pr.Out
	out.URL.Scheme, out.URL.Host, out.Host = st.out.scheme, hostPort(st.out.host, st.out.port, st.out.scheme), ""
	// Proxy-Authorization is the agent's credential for escrow, never the upstream's
	// (ReverseProxy drops it as hop-by-hop too; this does not rely on that).
	out.Header.Del("Proxy-Authorization")
	if st.out.applier == nil {
		// A route without a credential passes no credential either: the agent's own
		// Authorization stays with the agent (a route with one replaces it when applying).
		out.Header.Del("Authorization")
	}
	if st.out.scrubber != nil {
		// An answer escrow can scan: identity encoding, whole (no ranges to reassemble).
		scrub.PrepareRequest(out.Header)
	}
}

// applyingTransport puts the route's credential on the outbound request right before it is
// sent: the request is ReverseProxy's own copy (cloned URL and headers), final in method, URL,
// headers and body, which is what a signing applier (SigV4) needs. An applier that fails stops
// the request: it is never sent without its credential.
type applyingTransport struct{ base *http.Transport }

// applyError marks a failure to apply the credential, as opposed to an upstream failure.
type applyError struct{ err error }

func (e *applyError) Error() string { return "applying the credential: " + e.err.Error() }
func (e *applyError) Unwrap() error { return e.err }

func (t applyingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if st, ok := r.Context().Value(fwdKey{}).(*fwdState); ok && st.out.applier != nil {
		if err := st.out.applier.Apply(r, st.out.token); err != nil {
			if r.Body != nil {
				_ = r.Body.Close() // RoundTrip owns the body, also on error
			}
			return nil, &applyError{err}
		}
	}
	return t.base.RoundTrip(r)
}

// upstreamError classifies a failed round trip. The agent gets a stable reason, never the error.
// A credential that cannot be applied and a denied address are denials; the rest happened to a
// request that was let through, and are its outcome.
func (p *Proxy) upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	st, _ := r.Context().Value(fwdKey{}).(*fwdState)
	if st == nil {
		writeDenial(w, ReasonUpstreamUnavailable, "", "")
		return
	}
	rec := st.rec
	rec.UpstreamDur = p.now().Sub(st.start)
	var denied *egress.DeniedError
	var ne net.Error
	var ae *applyError
	switch {
	case errors.As(err, &ae):
		p.deny(w, rec, ReasonCredentialUnavailable, withoutURL(err))
		st.finished = true
		return
	case errors.As(err, &denied):
		p.deny(w, rec, ReasonEgressDenied, withoutURL(err))
		st.finished = true
		return
	}
	outcome := ReasonUpstreamUnavailable
	switch {
	case r.Context().Err() != nil:
		// The agent went away (or the drain period ended); there is nobody to answer.
		rec.Outcome = p.goneOutcome()
		p.log.Debug("agent gone", zap.String("request_id", rec.RequestID))
		return
	case st.cr.err() != nil:
		// The agent's body could not be read (a malformed chunk, a short body).
		outcome = ReasonBadRequest
	case errors.Is(err, errUnscannable):
		outcome = ReasonResponseUnscannable
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		outcome = ReasonUpstreamTimeout
	}
	rec.Outcome, rec.Status = string(outcome), outcome.Status()
	p.log.Info("upstream error", zap.String("request_id", rec.RequestID), zap.String("outcome", string(outcome)), zap.Error(withoutURL(err)))
	writeDenial(w, outcome, "", rec.RequestID)
}

type countingReader struct {
	io.ReadCloser
	n    atomic.Int64
	rerr atomic.Pointer[error] // the first read error other than EOF
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.ReadCloser.Read(b)
	c.n.Add(int64(n))
	if err != nil && err != io.EOF {
		c.rerr.CompareAndSwap(nil, &err)
	}
	return n, err
}

// err is the first error reading the agent's body, other than its end.
func (c *countingReader) err() error {
	if e := c.rerr.Load(); e != nil {
		return *e
	}
	return nil
}

// countingWriter counts response bytes; Unwrap lets http.ResponseController reach Flush on the
// real writer. Hijack (a protocol upgrade) hands out a tracked, counting connection, so an
// upgraded connection is drained and closed at shutdown like a tunnel and its bytes are audited.
type countingWriter struct {
	http.ResponseWriter
	n        *int64
	p        *Proxy
	upgraded *upgradedConn
	st       *fwdState
}

func (c *countingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(c.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	u := &upgradedConn{Conn: conn, p: c.p}
	if !c.p.conns.track(c.st.rec.SPIFFEID, conn) {
		return nil, nil, errors.New("proxy: shutting down")
	}
	c.p.metrics.TunnelsActive.Inc()
	c.upgraded = u
	return u, brw, nil
}

// upgradedConn counts the bytes of an upgraded connection and leaves the drain set on Close.
type upgradedConn struct {
	net.Conn
	p       *Proxy
	in, out atomic.Int64
	once    sync.Once
}

func (u *upgradedConn) Read(b []byte) (int, error) {
	n, err := u.Conn.Read(b)
	u.in.Add(int64(n))
	return n, err
}

func (u *upgradedConn) Write(b []byte) (int, error) {
	n, err := u.Conn.Write(b)
	u.out.Add(int64(n))
	return n, err
}

func (u *upgradedConn) Close() error {
	u.once.Do(func() {
		u.p.metrics.TunnelsActive.Dec()
		u.p.conns.untrack(u.Conn)
	})
	return nil
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	*c.n += int64(n)
	return n, err
}

func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// WriteHeader drops a forged X-Escrow-Reason from informational (1xx) responses, which
// ReverseProxy relays as they arrive, before ModifyResponse sees the final one.
func (c *countingWriter) WriteHeader(code int) {
	if code < 200 {
		// And the injected value from them (103 Early Hints carries Link headers).
		c.Header().Del(ReasonHeader)
		if s := c.st.out.scrubber; s != nil {
			if n := s.Header(c.Header()); n > 0 {
				c.st.redacted.Add(int64(n))
				c.p.metrics.Redactions.Add(float64(n))
			}
		}
	}
	c.ResponseWriter.WriteHeader(code)
}

// trailerScrub removes X-Escrow-Reason, and the injected value when the route scrubs, from the
// trailers the transport fills in at the end of the body, before ReverseProxy copies them.
type trailerScrub struct {
	io.ReadCloser
	resp *http.Response
	st   *fwdState // nil: not forwarded by escrow's pipeline
}

func (t *trailerScrub) Read(b []byte) (int, error) {
	n, err := t.ReadCloser.Read(b)
	if err != nil {
		delete(t.resp.Trailer, ReasonHeader)
		if t.st != nil && t.st.out.scrubber != nil {
			t.st.redacted.Add(int64(t.st.out.scrubber.Header(t.resp.Trailer)))
		}
	}
	return n, err
}

// errUnscannable is a scrubbed route's response whose body is compressed although escrow asked
// for identity: it cannot be checked for the credential, so it is not passed on.
var errUnscannable = errors.New("proxy: the upstream answered with a content coding that cannot be scanned")

// scrubResponse replaces the injected value in the response's headers and, for text-like
// bodies, in the body as it streams (bounded: scrub.DefaultLimit bytes).
func (st *fwdState) scrubResponse(resp *http.Response, redactions prometheus.Counter) error {
	s := st.out.scrubber
	if n := s.Header(resp.Header); n > 0 {
		st.redacted.Add(int64(n))
		redactions.Add(float64(n))
	}
	switch plan := scrub.PlanBody(resp.Header); {
	case plan.Reason == scrub.ReasonEncoded:
		return errUnscannable
	case plan.Scan && resp.Body != nil && resp.Body != http.NoBody && resp.StatusCode != http.StatusSwitchingProtocols:
		// (A 101's body is the upgraded connection: a byte stream escrow does not read.)
		resp.Body = s.Body(resp.Body, scrub.BodyOptions{OnDone: func(r scrub.BodyResult) {
			if r.Redacted > 0 {
				st.redacted.Add(int64(r.Redacted))
				redactions.Add(float64(r.Redacted))
			}
		}})
	}
	return nil
}

// withoutURL drops the request URL from a transport error before it is logged: with a query
// credential the URL carries the secret.
func withoutURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s: %w", ue.Op, ue.Err)
	}
	return err
}

// copyBufferSize is the size of ReverseProxy's copy buffers (its own default).
const copyBufferSize = 32 << 10

// bufferPool recycles ReverseProxy's copy buffers: without it every request allocates 32 KiB.
// It pools array pointers, which convert to and from the slices ReverseProxy handles without
// allocating (pooling a *[]byte would allocate a slice header on every Put).
type bufferPool struct{ p sync.Pool }

func newBufferPool() *bufferPool {
	return &bufferPool{p: sync.Pool{New: func() any { return new([copyBufferSize]byte) }}}
}

func (b *bufferPool) Get() []byte { return b.p.Get().(*[copyBufferSize]byte)[:] }

func (b *bufferPool) Put(x []byte) {
	if cap(x) < copyBufferSize {
		return // not one of ours
	}
	b.p.Put((*[copyBufferSize]byte)(x[:copyBufferSize]))
}
