package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"
)

// helloTimeout bounds how long a tunnel waits for the agent's TLS ClientHello.
const helloTimeout = 10 * time.Second

// maxHelloBytes bounds what is read to find the ClientHello (a few KiB in practice, more with
// post-quantum key shares; a handshake message may span several 16 KiB records).
const maxHelloBytes = 64 << 10

// errHelloRead stops the handshake once the ClientHello is parsed.
var errHelloRead = errors.New("proxy: client hello read")

// errNotTLS is returned by readClientHello for bytes that are not a TLS ClientHello.
var errNotTLS = errors.New("proxy: the tunnel's first bytes are not a TLS ClientHello")

// readClientHello reads the agent's TLS ClientHello from r with crypto/tls's own parser and
// returns its server name and every byte read, which the caller relays before the rest of r.
// It returns errNotTLS for anything else and io.EOF when the agent sent nothing.
func readClientHello(r io.Reader) (sni string, read []byte, err error) {
	hc := &helloConn{r: io.LimitReader(r, maxHelloBytes)}
	seen := false
	srv := tls.Server(hc, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			sni, seen = h.ServerName, true
			return nil, errHelloRead
		},
	})
	herr := srv.Handshake()
	if seen {
		return sni, hc.buf.Bytes(), nil
	}
	if hc.buf.Len() == 0 && hc.err != nil {
		return "", nil, io.EOF
	}
	if hc.err != nil && !errors.Is(hc.err, io.EOF) {
		return "", hc.buf.Bytes(), hc.err // a read error or timeout
	}
	_ = herr
	return "", hc.buf.Bytes(), errNotTLS
}

// sniMatches reports whether a ClientHello's server name is the CONNECT host. A CONNECT to an
// IP address carries no server name (clients send none for addresses).
func sniMatches(sni, host string) bool {
	if _, err := netip.ParseAddr(host); err == nil {
		return sni == "" || sni == host
	}
	return strings.EqualFold(strings.TrimSuffix(sni, "."), host)
}

// helloConn is the read side of the agent's connection as the TLS parser sees it: every byte
// read is kept; writes (the alert after the aborted handshake) go nowhere.
type helloConn struct {
	r   io.Reader
	buf bytes.Buffer
	err error
}

func (c *helloConn) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.buf.Write(b[:n])
	if err != nil && c.err == nil {
		c.err = err
	}
	return n, err
}

func (c *helloConn) Write(b []byte) (int, error)        { return len(b), nil }
func (c *helloConn) Close() error                       { return nil }
func (c *helloConn) LocalAddr() net.Addr                { return &net.TCPAddr{} }
func (c *helloConn) RemoteAddr() net.Addr               { return &net.TCPAddr{} }
func (c *helloConn) SetDeadline(time.Time) error        { return nil }
func (c *helloConn) SetReadDeadline(time.Time) error    { return nil }
func (c *helloConn) SetWriteDeadline(t time.Time) error { return nil }
