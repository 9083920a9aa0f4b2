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
	"strings"
	"time"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
)

// route is one compiled upstream entry. Routes are built once from the config and never change.
type route struct {
	host       string // exact name, or the suffix of a wildcard without "*." (wildcard true)
	wildcard   bool
	port       int // 0: the scheme's default port
	tunnel     bool
	credential string
	applier    *credential.Applier
	plaintext  bool   // UnsafePlaintextCredential
	address    string // dial this host:port instead of resolving the host

	forward *httputil.ReverseProxy
}

// routeTable finds the route for a destination: an exact host first, then the longest wildcard
// suffix; an entry with an explicit port beats one without.
type routeTable struct {
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
// route's transport.
func buildRoutes(cfg *config.Config, dial dialFunc, newProxy func(*http.Transport) *httputil.ReverseProxy) (*routeTable, error) {
	t := &routeTable{exact: map[string][]*route{}}
	for i, u := range cfg.Upstreams {
		r := &route{port: u.Port, tunnel: u.Tunnel, credential: u.Credential, plaintext: u.UnsafePlaintextCredential, address: u.Address}
		r.host = u.Host
		if strings.HasPrefix(u.Host, "*.") {
			r.wildcard, r.host = true, strings.TrimPrefix(u.Host, "*.")
		}
		if u.Credential != "" {
			spec := credential.ApplySpec{Method: credential.MethodHeader, Header: "Authorization", Template: "Bearer {{.Token}}"}
			switch {
			case u.Inject != nil:
				spec.Header = u.Inject.Header
				if u.Inject.Value != "" {
					spec.Template = u.Inject.Value
				}
			case u.Basic != nil:
				spec = credential.ApplySpec{Method: credential.MethodBasic, Username: u.Basic.Username}
			case u.Query != nil:
				spec = credential.ApplySpec{Method: credential.MethodQuery, Param: u.Query.Param}
			}
			a, err := credential.NewApplier(spec)
			if err != nil {
				return nil, fmt.Errorf("proxy: upstreams[%d]: %w", i, err)
			}
			r.applier = a
		}
		if !u.Tunnel {
			// nil RootCAs is the system roots, which crypto/tls then loads at the first upstream
			// handshake: parsing the system bundle leaves a few MB of startup garbage that a
			// proxy with no HTTPS upstream in use never needs. Only a ca_file needs them now, to
			// extend a copy (SystemCertPool returns a fresh one each call).
			var roots *x509.CertPool
			if u.CAFile != "" {
				pem, err := os.ReadFile(u.CAFile)
				if err != nil {
					return nil, fmt.Errorf("proxy: upstreams[%d].ca_file: %w", i, err)
				}
				if roots, err = x509.SystemCertPool(); err != nil {
					roots = x509.NewCertPool()
				}
				if !roots.AppendCertsFromPEM(pem) {
					return nil, fmt.Errorf("proxy: upstreams[%d].ca_file: no PEM certificates in %s", i, u.CAFile)
				}
			}
			d := dial
			if u.Address != "" {
				// Pinning: dial the configured address (still egress-checked), keep the name for TLS.
				address := u.Address
				d = func(ctx context.Context, network, _ string) (net.Conn, error) { return dial(ctx, network, address) }
			}
			r.forward = newProxy(newTransport(roots, d))
		}
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

type dialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// newTransport is the pooled upstream transport of one route: TLS always verified (against roots,
// or the system roots when roots is nil), HTTP/2 when the upstream offers it, and never the
// environment's proxy settings (Proxy is nil).
func newTransport(roots *x509.CertPool, dial dialFunc) *http.Transport {
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
		// Upstreams compress as they choose; the agent asked for what it asked for.
		DisableCompression: true,
	}
}

// splitHostPort parses an authority, lower-cases the host and strips IPv6 brackets.
func splitHostPort(authority string, defaultPort int) (string, int, error) {
	// Without a colon there is no port (net.SplitHostPort would build a "missing port" error
	// for it, on every plain request to a default port).
	host, portStr := authority, ""
	if strings.IndexByte(authority, ':') >= 0 {
		var err error
		host, portStr, err = net.SplitHostPort(authority)
		if err != nil {
			if !strings.Contains(err.Error(), "missing port") {
				return "", 0, err
			}
			host, portStr = authority, ""
		}
	}
	if portStr == "" && strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
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
