package proxy

import (
	"bytes"
	"context"
	"net"
	"strconv"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/audit"
)

// parserErrorHeaders is what net/http's server writes, and only it, when it refuses a request
// it could not parse (400, 431, 501) without calling a handler: Content-Type before Connection,
// which a handler's response never has (its headers are written sorted).
var parserErrorHeaders = []byte("\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n")

// recordingListener wraps the proxy listener so that requests net/http refuses before any
// handler runs (a duplicate Content-Length, a bad header name, headers too large, an unknown
// transfer coding) leave an audit record like every other refusal.
type recordingListener struct {
	net.Listener
	p *Proxy
}

func (l recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &recordingConn{Conn: c, p: l.p}, nil
}

// recordingConn spots net/http's own refusals on the connection's writes. A connection that
// carries other bytes than HTTP responses (a tunnel, an upgrade) stops being watched.
type recordingConn struct {
	net.Conn
	p   *Proxy
	raw atomic.Bool // CONNECT or upgrade: what follows is not escrow's to read
}

func (c *recordingConn) Write(b []byte) (int, error) {
	if !c.raw.Load() && bytes.HasPrefix(b, []byte("HTTP/1.1 ")) && bytes.Contains(b, parserErrorHeaders) {
		c.p.recordParserRefusal(c, b)
	}
	return c.Conn.Write(b)
}

// CloseWrite half-closes the connection when the underlying one can (a tunnel passes the
// upstream's end of stream on to the agent this way).
func (c *recordingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

type recordingConnKey struct{}

// markRaw stops watching the request's connection: its next bytes are a tunnel's or an
// upgraded protocol's.
func markRaw(ctx context.Context) {
	if c, ok := ctx.Value(recordingConnKey{}).(*recordingConn); ok {
		c.raw.Store(true)
	}
}

// recordParserRefusal writes the record of a request net/http refused: status from the response
// line, reason bad_request, the agent's identity when it can be established.
func (p *Proxy) recordParserRefusal(c net.Conn, resp []byte) {
	rec := &audit.Record{Time: p.now(), RequestID: p.nextRequestID(), Kind: kindRequest, Mode: string(p.state.Load().mode)}
	status := 400
	if len(resp) >= 12 {
		if n, err := strconv.Atoi(string(resp[9:12])); err == nil {
			status = n
		}
	}
	p.log.Info("request refused by the HTTP parser", zap.String("request_id", rec.RequestID), zap.Int("status", status))
	p.bestEffortIdentity(context.Background(), peerOf(c), rec)
	markDenied(rec, ReasonBadRequest)
	rec.Status = status
	p.finish(rec)
}
