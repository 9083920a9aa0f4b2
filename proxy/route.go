package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/proxy/mcp"
	"github.com/escrowproxy/escrow/proxy/scrub"
)

// route is one compiled upstream entry. A route is immutable; an update builds new ones (or
// keeps an old one whose entry did not change, with its connection pool).
type route struct {
	spec       config.Upstream // what it was built from
	host       string          // exact name, or the suffix of a wildcard without "*." (wildcard true)
	wildcard   bool
	port       int // 0: the scheme's default port
	tunnel     bool
	credential string
	applier    credential.Applier // nil: no credential
	plaintext  bool               // UnsafePlaintextCredential
	address    string             // dial this host:port instead of resolving the host
	inspector  Inspector          // nil: no inspection
	// scrub keeps the Scrubber of the credential's current value; nil when the route has no
	// credential or scrub_responses is false.
	scrub *scrub.Memo
	// mcp inspects the JSON-RPC calls to an MCP server (upstreams[].mcp); nil otherwise.
	mcp *mcp.Inspector

	transport *http.Transport // nil for tunnels
	forward   *httputil.ReverseProxy
}

// routeTable finds the route for a destination: an exact host first, then the longest wildcard
// suffix; an entry with an explicit port beats one without.
type routeTable struct {
	all      []*route // in config order
	exact    map[string][]*route
	wildcard []*route // longest suffix first
}

func (t *routeTable) match(host string, port int, defaultPort int) *route {
	pick := func(rs []*route) *route {
		var fallback *route
		for _, r := range rs {
			switch {
			case r.port == port:
				return r
			case r.port == 0 && port == defaultPort:
				fallback = r
			}
		}
		return fallback
	}
	if r := pick(t.exact[host]); r != nil {
		return r
	}
	for _, r := range t.wildcard {
		if len(host) > len(r.host)+1 && strings.HasSuffix(host, r.host) && host[len(host)-len(r.host)-1] == '.' {
			if rr := pick([]*route{r}); rr != nil {
				return rr
			}
		}
	}
	return nil
}

// buildRoutes compiles the upstream entries. dial is the egress-checked dialer shared by every
// route's transport. A route of prev whose entry is unchanged is reused (reuse is true only when
// prev dials through the same dialer), so its pooled connections survive an update.
func buildRoutes(cfg *config.Config, dial dialFunc, newProxy func(http.RoundTripper) *httputil.ReverseProxy, inspect func(config.Upstream) Inspector, prev *routeTable) (*routeTable, error) {
	t := &routeTable{exact: map[string][]*route{}}
	for i, u := range cfg.Upstreams {
		r := prev.find(u)
		if r == nil {
			var err error
			if r, err = buildRoute(u, dial, newProxy); err != nil {
				return nil, fmt.Errorf("proxy: upstreams[%d]: %w", i, err)
			}
			if inspect != nil && !r.tunnel {
				r.inspector = inspect(u)
			}
		}
		t.all = append(t.all, r)
		if r.wildcard {
			t.wildcard = append(t.wildcard, r)
		} else {
			t.exact[r.host] = append(t.exact[r.host], r)
		}
	}
	// Longest suffix first, so *.api.example.com wins over *.example.com.
	for i := 1; i < len(t.wildcard); i++ {
		for j := i; j > 0 && len(t.wildcard[j].host) > len(t.wildcard[j-1].host); j-- {
			t.wildcard[j], t.wildcard[j-1] = t.wildcard[j-1], t.wildcard[j]
		}
	}
	return t, nil
}

// find returns the route built from exactly u, or nil. t may be nil.
func (t *routeTable) find(u config.Upstream) *route {
	if t == nil {
		return nil
	}
	for _, r := range t.all {
		if reflect.DeepEqual(r.spec, u) {
			return r
		}
	}
	return nil
}

// closeIdle closes the idle pooled connections of t's routes that next does not keep.
func (t *routeTable) closeIdle(next *routeTable) {
	if t == nil {
		return
	}
	for _, r := range t.all {
		if r.transport != nil && (next == nil || !slices.Contains(next.all, r)) {
			r.transport.CloseIdleConnections()
		}
	}
}

func buildRoute(u config.Upstream, dial dialFunc, newProxy func(http.RoundTripper) *httputil.ReverseProxy) (*route, error) {
	r := &route{spec: u, port: u.Port, tunnel: u.Tunnel, credential: u.Credential, plaintext: u.UnsafePlaintextCredential, address: u.Address}
	r.host = u.Host
	if strings.HasPrefix(u.Host, "*.") {
		r.wildcard, r.host = true, strings.TrimPrefix(u.Host, "*.")
	}
	if u.Credential != "" {
		a, err := credential.NewApplier(u.Injection())
		if err != nil {
			return nil, err
		}
		r.applier = a
		if u.ScrubResponses() {
			r.scrub = new(scrub.Memo)
		}
	}
	if u.Tunnel {
		return r, nil
	}
	if u.MCP != nil {
		insp, err := mcp.New(mcp.OptionsFrom(*u.MCP))
		if err != nil {
			return nil, fmt.Errorf("mcp: %w", err)
		}
		r.mcp = insp
	}
	// nil RootCAs is the system roots, which crypto/tls then loads at the first upstream
	// handshake: parsing the system bundle leaves a few MB of startup garbage that a proxy with
	// no HTTPS upstream in use never needs. Only a ca_file needs them now, to extend a copy
	// (SystemCertPool returns a fresh one each call).
	var roots *x509.CertPool
	if u.CAFile != "" {
		pem, err := os.ReadFile(u.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ca_file: %w", err)
		}
		if roots, err = x509.SystemCertPool(); err != nil {
			roots = x509.NewCertPool()
		}
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file: no PEM certificates in %s", u.CAFile)
		}
	}
	d := dial
	if u.Address != "" {
		// Pinning: dial the configured address (still egress-checked), keep the name for TLS.
		address := u.Address
		d = func(ctx context.Context, network, _ string) (net.Conn, error) { return dial(ctx, network, address) }
	}
	r.transport = newTransport(roots, d, u.ResponseTimeout())
	r.forward = newProxy(applyingTransport{r.transport})
	return r, nil
}

type dialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// newTransport is the pooled upstream transport of one route: TLS always verified (against roots,
// or the system roots when roots is nil), HTTP/2 when the upstream offers it, never the
// environment's proxy settings (Proxy is nil), and at most responseTimeout from the request
// sent to the response headers (504 upstream_timeout after it).
func newTransport(roots *x509.CertPool, dial dialFunc, responseTimeout time.Duration) *http.Transport {
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           dial,
		TLSClientConfig:       &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: 1 * time.Second,
		ResponseHeaderTimeout: responseTimeout,
		// Upstreams compress as they choose; the agent asked for what it asked for.
		DisableCompression: true,
	}
}

// splitHostPort parses an authority, lower-cases the host and strips IPv6 brackets.
func splitHostPort(authority string, defaultPort int) (string, int, error) {
	host, portStr, hasPort, err := splitAuthority(authority)
	if err != nil {
		return "", 0, err
	}
	if !hasPort && strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		// No port: a bracketed IPv6 literal and nothing after it.
		host = host[1 : len(host)-1]
	}
	port := defaultPort
	if portStr != "" {
		p, err := parsePort(portStr)
		if err != nil {
			return "", 0, err
		}
		port = p
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	// No brackets left over from a malformed authority, no IPv6 zone (never a destination).
	if host == "" || strings.ContainsAny(host, "[]%") || !config.ValidHostPattern(host) || strings.HasPrefix(host, "*.") {
		return "", 0, fmt.Errorf("invalid host %q", host)
	}
	return host, port, nil
}

// splitAuthority splits host and port as net.SplitHostPort does, except that an authority
// without a port is a result (hasPort false, host the whole authority), not an error to be told
// apart by its text. It allocates only for a malformed authority.
func splitAuthority(a string) (host, port string, hasPort bool, err error) {
	i := strings.LastIndexByte(a, ':')
	if i < 0 {
		return a, "", false, nil
	}
	j, k := 0, 0
	if a[0] == '[' {
		end := strings.IndexByte(a, ']')
		if end < 0 {
			return "", "", false, fmt.Errorf("invalid authority %q: missing ']'", a)
		}
		switch end + 1 {
		case len(a):
			return a, "", false, nil // "[v6]" without a port
		case i:
		default:
			if a[end+1] == ':' {
				return "", "", false, fmt.Errorf("invalid authority %q: too many colons", a)
			}
			return a, "", false, nil // "[v6]x": no port; the host check refuses it
		}
		host, j, k = a[1:end], 1, end+1
	} else {
		host = a[:i]
		if strings.IndexByte(host, ':') >= 0 {
			return "", "", false, fmt.Errorf("invalid authority %q: too many colons", a)
		}
	}
	if strings.IndexByte(a[j:], '[') >= 0 || strings.IndexByte(a[k:], ']') >= 0 {
		return "", "", false, fmt.Errorf("invalid authority %q: unexpected bracket", a)
	}
	return host, a[i+1:], true, nil
}

func parsePort(s string) (int, error) {
	if s == "" || len(s) > 5 {
		return 0, fmt.Errorf("invalid port %q", s)
	}
	p := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("invalid port %q", s)
		}
		p = p*10 + int(c-'0')
	}
	if p < 1 || p > 65535 {
		return 0, fmt.Errorf("invalid port %q", s)
	}
	return p, nil
}
