package proxy

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"testing"

	"github.com/escrowproxy/escrow/config"
)

func TestSplitHostPort(t *testing.T) {
	for _, c := range []struct {
		in       string
		def      int
		host     string
		port     int
		wantFail bool
	}{
		{in: "api.example.com:443", def: 0, host: "api.example.com", port: 443},
		{in: "API.Example.COM.:8443", def: 0, host: "api.example.com", port: 8443},
		{in: "api.example.com", def: 80, host: "api.example.com", port: 80},
		{in: "api.example.com", def: 0, host: "api.example.com", port: 0},
		{in: "[2001:db8::1]:443", def: 0, host: "2001:db8::1", port: 443},
		{in: "[2001:DB8::1]", def: 443, host: "2001:db8::1", port: 443},
		{in: "10.0.0.1:80", def: 0, host: "10.0.0.1", port: 80},
		{in: "*.example.com:443", wantFail: true},
		{in: "api.example.com:0", wantFail: true},
		{in: "api.example.com:65536", wantFail: true},
		{in: "api.example.com:+443", wantFail: true},
		{in: "api.example.com:http", wantFail: true},
		{in: ":443", wantFail: true},
		{in: "", wantFail: true},
		{in: "a b.example.com:443", wantFail: true},
		{in: "api..example.com:443", wantFail: true},
		{in: "user@api.example.com:443", wantFail: true},
		{in: "2001:db8::1", wantFail: true},
		{in: "[::%]0", def: 443, wantFail: true},
		{in: "[fe80::1%25eth0]:443", wantFail: true},
		{in: "[[api.example.com]]", def: 443, wantFail: true},
	} {
		h, p, err := splitHostPort(c.in, c.def)
		if c.wantFail {
			if err == nil {
				t.Errorf("splitHostPort(%q) = %q, %d; want an error", c.in, h, p)
			}
			continue
		}
		if err != nil || h != c.host || p != c.port {
			t.Errorf("splitHostPort(%q, %d) = %q, %d, %v; want %q, %d", c.in, c.def, h, p, err, c.host, c.port)
		}
	}
}

// referenceSplitHostPort is splitHostPort as first written, always through net.SplitHostPort:
// the shortcut for authorities without a colon must not change any answer.
func referenceSplitHostPort(authority string, defaultPort int) (string, int, error) {
	host, portStr, err := net.SplitHostPort(authority)
	if err != nil {
		if !strings.Contains(err.Error(), "missing port") {
			return "", 0, err
		}
		host, portStr = authority, ""
		if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
			host = host[1 : len(host)-1]
		}
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
	if host == "" || strings.ContainsAny(host, "[]%") || !config.ValidHostPattern(host) || strings.HasPrefix(host, "*.") {
		return "", 0, fmt.Errorf("invalid host %q", host)
	}
	return host, port, nil
}

func TestSplitHostPort_SameAnswersAsTheReference(t *testing.T) {
	const alphabet = "aZ0.:[]%*-@ "
	r := rand.New(rand.NewPCG(3, 4))
	for range 50000 {
		b := make([]byte, r.IntN(10))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		in := string(b)
		h, p, err := splitHostPort(in, 443)
		rh, rp, rerr := referenceSplitHostPort(in, 443)
		if h != rh || p != rp || (err == nil) != (rerr == nil) {
			t.Fatalf("splitHostPort(%q) = %q, %d, %v; the reference says %q, %d, %v", in, h, p, err, rh, rp, rerr)
		}
	}
}

func TestSplitHostPort_DoesNotAllocateWithoutAPort(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { _, _, _ = splitHostPort("api.example.com", 80) }); n != 0 {
		t.Errorf("%v allocations per call, want 0", n)
	}
}

func FuzzSplitHostPort(f *testing.F) {
	for _, s := range []string{
		"api.example.com:443", "API.EXAMPLE.COM.", "[::1]:8080", "[fe80::1%25eth0]:443", "*.example.com:443",
		"example.com:", "example.com:00443", "[[a]]", "[::%]0", "1.2.3.4:65535", "x:65536", "\u212a.example.com:443",
	} {
		f.Add(s, 443)
		f.Add(s, 0)
	}
	f.Fuzz(func(t *testing.T, authority string, def int) {
		if def < 0 || def > 65535 {
			def = 443
		}
		host, port, err := splitHostPort(authority, def)
		if err != nil {
			return
		}
		if host != strings.ToLower(host) {
			t.Errorf("%q: host %q is not lower case", authority, host)
		}
		if !config.ValidHostPattern(host) || strings.Contains(host, "*") {
			t.Errorf("%q: host %q is not a valid concrete host", authority, host)
		}
		if strings.HasSuffix(host, ".") || strings.ContainsAny(host, "[]/@ %") {
			t.Errorf("%q: host %q", authority, host)
		}
		if port == def && def == 0 {
			return // no port given, and none by default
		}
		if port < 1 || port > 65535 {
			t.Errorf("%q: port %d", authority, port)
		}
	})
}

func TestRouteTable_Match(t *testing.T) {
	cfg, err := config.Parse([]byte(`
identity: {static: "spiffe://example.org/ns/a/sa/b"}
policy: {dir: ` + t.TempDir() + `}
upstreams:
  - host: api.example.com
  - host: api.example.com
    port: 8443
  - host: "*.example.com"
  - host: "*.eu.example.com"
    tunnel: true
  - host: plain.example.org
    port: 8080
`))
	must(t, err)
	rt, err := buildRoutes(cfg, nil, func(http.RoundTripper) *httputil.ReverseProxy { return nil }, nil, nil)
	must(t, err)
	for _, c := range []struct {
		host     string
		port     int
		def      int
		want     string // "" no route
		wantPort int
		tunnel   bool
	}{
		{"api.example.com", 443, 443, "api.example.com", 0, false},
		{"api.example.com", 8443, 443, "api.example.com", 8443, false},
		{"api.example.com", 80, 80, "api.example.com", 0, false},
		{"api.example.com", 9000, 443, "", 0, false},
		{"x.example.com", 443, 443, "example.com", 0, false},
		{"a.b.example.com", 443, 443, "example.com", 0, false},
		{"x.eu.example.com", 443, 443, "eu.example.com", 0, true},
		{"example.com", 443, 443, "", 0, false}, // *.example.com does not match example.com
		{"badexample.com", 443, 443, "", 0, false},
		{"plain.example.org", 8080, 80, "plain.example.org", 8080, false},
		{"plain.example.org", 80, 80, "", 0, false},
	} {
		r := rt.match(c.host, c.port, c.def)
		switch {
		case c.want == "" && r != nil:
			t.Errorf("match(%s:%d) = %+v, want none", c.host, c.port, r)
		case c.want != "" && r == nil:
			t.Errorf("match(%s:%d) = none, want %s", c.host, c.port, c.want)
		case r != nil && (r.host != c.want || r.port != c.wantPort || r.tunnel != c.tunnel):
			t.Errorf("match(%s:%d) = %s port %d tunnel %v, want %s port %d tunnel %v", c.host, c.port, r.host, r.port, r.tunnel, c.want, c.wantPort, c.tunnel)
		}
	}
}
