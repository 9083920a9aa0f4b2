package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Duration is a time.Duration written as a Go duration string ("2s", "1h30m").
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// CheckShape accepts a non-negative Go duration string.
func (d *Duration) CheckShape(v any) string {
	s, ok := v.(string)
	if !ok {
		return "want a duration string such as \"2s\""
	}
	if d, err := time.ParseDuration(s); err != nil || d < 0 {
		return fmt.Sprintf("invalid duration %q", s)
	}
	return ""
}

// UnmarshalJSON reads a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration string such as \"2s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("invalid duration %q", s)
	}
	if v < 0 {
		return fmt.Errorf("duration %q is negative", s)
	}
	*d = Duration(v)
	return nil
}

// Load reads the file at path, parses and validates it (Parse), then runs the checks that need
// this machine (CheckLocal against the real filesystem and environment). It is what the binary
// uses; config that arrives as bytes from elsewhere goes through Parse alone.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := Parse(data)
	if err != nil {
		return nil, err
	}
	if err := c.CheckLocal(OSLocal()); err != nil {
		return nil, err
	}
	return c, nil
}

// Parse parses YAML (or JSON), rejects unknown keys, fills defaults and validates (Validate).
// It is pure: it reads no file and no environment variable, so config can be validated from
// bytes that arrive over the network. The error, if any, is an Errors naming every bad key path.
func Parse(data []byte) (*Config, error) {
	var c Config
	shape, err := Decode(data, &c)
	if err != nil {
		return nil, err
	}
	c.applyDefaults()
	if errs := Combine(shape, c.validate()); len(errs) > 0 {
		return nil, errs
	}
	c.validated = true
	return &c, nil
}

// Validate fills defaults, checks every value and compiles what the rest of the program uses
// (Egress.Allow, Upstream.Injection). It is pure (no filesystem, no environment) and
// idempotent. Parse calls it; call it yourself only on a Config built in code.
func (c *Config) Validate() error {
	c.applyDefaults()
	if errs := c.validate(); len(errs) > 0 {
		return sortErrs(errs)
	}
	c.validated = true
	return nil
}

// Local is what CheckLocal may consult of the machine escrow runs on.
type Local struct {
	Stat      func(name string) (fs.FileInfo, error)
	LookupEnv func(key string) (string, bool)
}

// OSLocal is the real filesystem and the process's environment.
func OSLocal() Local { return Local{Stat: os.Stat, LookupEnv: os.LookupEnv} }

// CheckLocal runs the checks that need the machine escrow runs on: the policy directory exists,
// upstream CA files are there, a Workload API socket is configured or in the environment. Every
// problem is reported at once, with its key path. Load calls it after Parse.
func (c *Config) CheckLocal(l Local) error {
	var errs Errors
	add := func(path, format string, a ...any) {
		errs = append(errs, FieldError{path, fmt.Sprintf(format, a...)})
	}
	if c.Identity.SPIFFE != nil && c.Identity.SPIFFE.Socket == "" {
		s, _ := l.LookupEnv("SPIFFE_ENDPOINT_SOCKET")
		if s == "" {
			add("identity.spiffe.socket", "required (or set SPIFFE_ENDPOINT_SOCKET)")
		} else if msg := checkSocket(s); msg != "" {
			add("identity.spiffe.socket", "SPIFFE_ENDPOINT_SOCKET: %s", msg)
		}
	}
	if c.Policy.Dir != "" {
		if fi, err := l.Stat(c.Policy.Dir); err != nil {
			add("policy.dir", "cannot read %s: %v", c.Policy.Dir, unwrapPath(err))
		} else if !fi.IsDir() {
			add("policy.dir", "%s is not a directory", c.Policy.Dir)
		}
	}
	for i, u := range c.Upstreams {
		if u.CAFile != "" {
			if _, err := l.Stat(u.CAFile); err != nil {
				add(fmt.Sprintf("upstreams[%d].ca_file", i), "cannot read: %v", unwrapPath(err))
			}
		}
	}
	if len(errs) > 0 {
		return sortErrs(errs)
	}
	return nil
}

// unwrapPath drops the *PathError's repetition of the path the message already names.
func unwrapPath(err error) error {
	if u := errors.Unwrap(err); u != nil {
		return u
	}
	return err
}

func (c *Config) applyDefaults() {
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.Admin == "" {
		c.Admin = DefaultAdmin
	}
	if c.CADir == "" {
		c.CADir = DefaultCADir
	}
	if c.LeafTTL == 0 {
		c.LeafTTL = Duration(DefaultLeafTTL)
	}
	if c.Policy.Mode == "" {
		c.Policy.Mode = DefaultPolicyMode
	}
	if c.Policy.ReloadInterval == 0 {
		c.Policy.ReloadInterval = Duration(DefaultReloadEvery)
	}
	if c.Egress.DialTimeout == 0 {
		c.Egress.DialTimeout = Duration(DefaultDialTimeout)
	}
	if c.Audit.FlushInterval == nil {
		d := Duration(DefaultAuditFlush)
		c.Audit.FlushInterval = &d
	}
	for i := range c.Upstreams {
		c.Upstreams[i].Host = strings.ToLower(strings.TrimSuffix(c.Upstreams[i].Host, "."))
	}
}

var headerName = regexp.MustCompile("^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

// forbiddenHeaders never carry a credential: they frame the message, route it, are hop-by-hop,
// or authenticate the agent to escrow.
var forbiddenHeaders = map[string]bool{
	"Host": true, "Content-Length": true, "Transfer-Encoding": true, "Connection": true,
	"Keep-Alive": true, "Te": true, "Trailer": true, "Upgrade": true,
	"Proxy-Connection": true, "Proxy-Authorization": true, "Proxy-Authenticate": true,
}

func isCTL(r rune) bool { return r < 0x20 || r == 0x7f }

// ValidHostPattern reports whether h is an exact DNS name (lower-case labels of 1 to 63 letters,
// digits and inner hyphens), an IP literal, or "*.suffix". The proxy calls it on every request's
// host, so it neither allocates nor runs a regular expression.
func ValidHostPattern(h string) bool {
	h = strings.TrimPrefix(h, "*.")
	if h == "" || len(h) > 253 {
		return false
	}
	if validDNSName(h) {
		return true
	}
	// Names are the common case and are checked first: a failed ParseAddr allocates its error.
	_, err := netip.ParseAddr(h)
	return err == nil
}

// validDNSName reports whether every dot-separated label of h matches
// ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$.
func validDNSName(h string) bool {
	for len(h) > 0 {
		label := h
		if i := strings.IndexByte(h, '.'); i >= 0 {
			label, h = h[:i], h[i+1:]
			if h == "" {
				return false // a trailing dot leaves an empty last label
			}
		} else {
			h = ""
		}
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return false
			}
		}
	}
	return true
}

func (c *Config) validate() Errors {
	var errs Errors
	add := func(path, format string, a ...any) {
		errs = append(errs, FieldError{path, fmt.Sprintf(format, a...)})
	}
	checkListen := func(key, addr string, loopbackOnly bool) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			add(key, "want host:port, got %q", addr)
			return
		}
		if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			add(key, "invalid port %q", port)
		}
		if !loopbackOnly {
			return
		}
		ip, err := netip.ParseAddr(host)
		if host == "localhost" || (err == nil && ip.IsLoopback()) {
			return
		}
		add(key, "%q is not a loopback address; the proxy holds credentials for whoever can reach it (set unsafe_allow_non_loopback_listen to override)", host)
	}
	checkListen("listen", c.Listen, !c.UnsafeAllowNonLoopbackListen)
	checkListen("admin", c.Admin, false)
	if c.Listen == c.Admin && !strings.HasSuffix(c.Listen, ":0") {
		add("admin", "must differ from listen (%s)", c.Listen)
	}

	switch {
	case c.Identity.SPIFFE != nil && c.Identity.Static != "":
		add("identity", "set exactly one of spiffe or static, not both")
	case c.Identity.SPIFFE == nil && c.Identity.Static == "":
		add("identity", "set one of spiffe (a Workload API socket) or static (a SPIFFE ID for local use)")
	case c.Identity.Static != "":
		if err := checkSPIFFEID(c.Identity.Static); err != nil {
			add("identity.static", "%v", err)
		}
	case c.Identity.SPIFFE != nil:
		// Empty means SPIFFE_ENDPOINT_SOCKET, which CheckLocal looks at.
		if s := c.Identity.SPIFFE.Socket; s != "" {
			if msg := checkSocket(s); msg != "" {
				add("identity.spiffe.socket", "%s", msg)
			}
		}
	}
	if c.CAKeyDir != "" {
		key, dir := filepath.Clean(c.CAKeyDir), filepath.Clean(c.CADir)
		if key == dir || strings.HasPrefix(key, dir+string(filepath.Separator)) {
			add("ca_key_dir", "must not be ca_dir or below it: the agent reads ca_dir, and this holds the CA's private key")
		}
	}

	if c.Policy.Dir == "" {
		add("policy.dir", "required: a directory of *.cedar files")
	}
	if !c.Policy.Mode.Valid() {
		add("policy.mode", "want enforce or report, got %q", c.Policy.Mode)
	}
	if c.Policy.ReloadInterval.D() < 100*time.Millisecond {
		add("policy.reload_interval", "must be at least 100ms")
	}
	if c.LeafTTL.D() < time.Minute {
		add("leaf_ttl", "must be at least 1m")
	}
	if d := c.Audit.FlushEvery(); d < 0 || d > MaxAuditFlush {
		add("audit.flush_interval", "must be between 0s (write every record at once) and %v", MaxAuditFlush)
	}

	type key struct {
		host string
		port int
	}
	seen := map[key]int{}
	for i, u := range c.Upstreams {
		p := fmt.Sprintf("upstreams[%d]", i)
		if u.Host == "" {
			add(p+".host", "required")
		} else if !ValidHostPattern(u.Host) {
			add(p+".host", "want a host name, an IP address or *.suffix, got %q", u.Host)
		}
		if j, dup := seen[key{u.Host, u.Port}]; dup {
			add(p+".host", "duplicates upstreams[%d] (%s)", j, u.Host)
		} else {
			seen[key{u.Host, u.Port}] = i
		}
		if u.Port < 0 || u.Port > 65535 {
			add(p+".port", "must be 1-65535")
		}
		n := 0
		for _, set := range []bool{u.Inject != nil, u.Basic != nil, u.Query != nil} {
			if set {
				n++
			}
		}
		if n > 1 {
			add(p, "set at most one of inject, basic, query")
		}
		if u.Tunnel {
			if u.Credential != "" {
				add(p+".credential", "a tunnel is not intercepted, so no credential can be applied; remove credential or tunnel")
			}
			if n > 0 {
				add(p, "inject/basic/query need an intercepted upstream, not a tunnel")
			}
		} else if n > 0 && u.Credential == "" {
			add(p+".credential", "required when inject, basic or query is set")
		}
		if u.Credential != "" {
			if _, ok := c.Credentials[u.Credential]; !ok {
				add(p+".credential", "no credential named %q in credentials", u.Credential)
			}
		}
		if u.Inject != nil {
			if !headerName.MatchString(u.Inject.Header) {
				add(p+".inject.header", "want an HTTP header name, got %q", u.Inject.Header)
			} else if h := http.CanonicalHeaderKey(u.Inject.Header); forbiddenHeaders[h] {
				add(p+".inject.header", "%s frames, routes or authenticates the message to escrow itself; it cannot carry a credential", h)
			}
			if u.Inject.Value != "" {
				if msg := checkTemplate(u.Inject.Value); msg != "" {
					add(p+".inject.value", "%s", msg)
				}
			}
		}
		if u.Basic != nil && (u.Basic.Username == "" || strings.Contains(u.Basic.Username, ":") || strings.ContainsFunc(u.Basic.Username, isCTL)) {
			add(p+".basic.username", "required, and may not contain ':' or control characters")
		}
		if u.Query != nil && u.Query.Param == "" {
			add(p+".query.param", "required")
		}
		if u.Address != "" {
			if _, port, err := net.SplitHostPort(u.Address); err != nil || port == "" {
				add(p+".address", "want host:port, got %q", u.Address)
			}
		}
	}

	names := make([]string, 0, len(c.Credentials))
	for n := range c.Credentials {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		cr := c.Credentials[n]
		p := "credentials." + n
		if cr.Static == nil {
			add(p, "set a provider (static)")
			continue
		}
		s := cr.Static
		switch {
		case s.File != "" && s.Env != "":
			add(p+".static", "set exactly one of file or env")
		case s.File == "" && s.Env == "":
			add(p+".static", "set one of file or env (inline secrets are not accepted)")
		}
	}

	c.Egress.allow = c.Egress.allow[:0]
	for i, cidr := range c.Egress.AllowCIDRs {
		pfx, err := netip.ParsePrefix(cidr)
		if err != nil {
			add(fmt.Sprintf("egress.allow_cidrs[%d]", i), "want a CIDR such as 10.0.0.0/8, got %q", cidr)
			continue
		}
		c.Egress.allow = append(c.Egress.allow, pfx)
	}
	if c.Egress.DialTimeout.D() <= 0 {
		add("egress.dial_timeout", "must be positive")
	}
	if len(errs) == 0 {
		// Compiled only from values that passed every check above.
		for i, u := range c.Upstreams {
			if !u.Tunnel && u.Credential != "" {
				c.Upstreams[i].injection = compileInjection(u)
			}
		}
	}
	return errs
}

// checkTemplate accepts exactly one {{.Token}} (spaces allowed inside the braces) and no other
// template action: the value is split around it once, not executed per request.
func checkTemplate(v string) string {
	norm := strings.ReplaceAll(v, "{{ .Token }}", "{{.Token}}")
	if n := strings.Count(norm, "{{.Token}}"); n != 1 {
		return fmt.Sprintf("must contain {{.Token}} exactly once, got %q", v)
	}
	if rest := strings.Replace(norm, "{{.Token}}", "", 1); strings.Contains(rest, "{{") || strings.Contains(rest, "}}") {
		return fmt.Sprintf("only {{.Token}} is supported, got %q", v)
	}
	if strings.ContainsAny(v, "\r\n\x00") {
		return "may not contain CR, LF or NUL"
	}
	return ""
}

// compileInjection turns an upstream's validated inject/basic/query into an Injection; the
// default is "Authorization: Bearer <token>".
func compileInjection(u Upstream) Injection {
	switch {
	case u.Basic != nil:
		return Injection{Kind: InjectBasic, Header: "Authorization", Username: u.Basic.Username}
	case u.Query != nil:
		return Injection{Kind: InjectQuery, Param: u.Query.Param}
	}
	in := Injection{Kind: InjectHeader, Header: "Authorization", Prefix: "Bearer "}
	if u.Inject != nil {
		in.Header = http.CanonicalHeaderKey(u.Inject.Header)
		if u.Inject.Value != "" {
			in.Prefix, in.Suffix = splitTemplate(u.Inject.Value)
		}
	}
	return in
}

// splitTemplate splits a template that checkTemplate accepted around its {{.Token}}.
func splitTemplate(v string) (prefix, suffix string) {
	i := strings.Index(v, "{{")
	j := strings.Index(v[i:], "}}")
	return v[:i], v[i+j+2:]
}

func checkSocket(s string) string {
	if !strings.HasPrefix(s, "unix://") && !strings.HasPrefix(s, "tcp://") {
		return fmt.Sprintf("want unix:///path or tcp://ip:port, got %q", s)
	}
	return ""
}

func checkSPIFFEID(s string) error {
	if _, err := spiffeid.FromString(s); err != nil {
		return fmt.Errorf("want a SPIFFE ID (spiffe://trust-domain/path), got %q: %v", s, err)
	}
	return nil
}
