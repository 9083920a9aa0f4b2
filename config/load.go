package config

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/escrowproxy/escrow/internal/strictyaml"
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
	if string(b) == "null" {
		return nil // as encoding/json does for its own types: null leaves the value alone
	}
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

// Load reads the file at path, parses and validates it (Parse) and runs the checks that need
// this machine (CheckLocal against the real filesystem and environment), and reports the
// problems of both at once, so one run of escrow proxy --check names every mistake. It is what
// the binary uses; config that arrives as bytes from elsewhere goes through Parse alone.
func Load(path string) (*Config, error) {
	return LoadWith(path, OSLocal())
}

// LoadWith is Load on the machine l describes.
func LoadWith(path string, l Local) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, shape, values, err := parse(data)
	if err != nil {
		return nil, err
	}
	// The machine is checked even when the file has mistakes: what was decoded of it names
	// the files and variables the fixed config will need.
	var local Errors
	if err := c.CheckLocal(l); err != nil {
		if !errors.As(err, &local) {
			return nil, err
		}
	}
	if errs := Combine(shape, append(values, local...)); len(errs) > 0 {
		return nil, errs
	}
	c.validated = true
	return c, nil
}

// Parse parses YAML (or JSON), rejects unknown keys, fills defaults and validates (Validate).
// It is pure: it reads no file and no environment variable, so config can be validated from
// bytes that arrive over the network. The error, if any, is an Errors naming every bad key path.
func Parse(data []byte) (*Config, error) {
	c, shape, values, err := parse(data)
	if err != nil {
		return nil, err
	}
	if errs := Combine(shape, values); len(errs) > 0 {
		return nil, errs
	}
	c.validated = true
	return c, nil
}

// parse decodes data best effort, fills defaults and validates: the Config (not marked
// validated), its shape and value errors, and err for input that is not YAML at all.
func parse(data []byte) (c *Config, shape, values Errors, err error) {
	c = new(Config)
	shape, err = Decode(data, c)
	if err != nil {
		return nil, nil, nil, err
	}
	c.applyDefaults()
	return c, shape, c.validate(), nil
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
	// ReadFile reads a file a key names (a secret, a key, a token, a CA file) to prove it is
	// readable and, for a CA file, holds a certificate. Nil: such files are only Stat'ed.
	ReadFile func(name string) ([]byte, error)
	// WritableDir reports why dir could not be created (as MkdirAll would) or written (a new
	// file in it), leaving nothing behind. Nil: not checked.
	WritableDir func(dir string) error
}

// OSLocal is the real filesystem and the process's environment.
func OSLocal() Local {
	return Local{Stat: os.Stat, LookupEnv: os.LookupEnv, ReadFile: readBounded, WritableDir: writableDir}
}

// maxCheckedFile bounds how much of a named file CheckLocal reads: secrets, keys and CA bundles
// are small; a larger file is a mistaken path (and /dev/zero must not hang the check).
const maxCheckedFile = 4 << 20

func readBounded(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCheckedFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxCheckedFile {
		return nil, fmt.Errorf("larger than %d MiB", maxCheckedFile>>20)
	}
	return b, nil
}

// writableDir checks that dir exists and a file can be created in it, or that its nearest
// existing ancestor is a directory that can be written (so MkdirAll would succeed). The probe
// file is removed at once; no directory is created.
func writableDir(dir string) error {
	d := filepath.Clean(dir)
	for {
		fi, err := os.Stat(d)
		if err == nil {
			if !fi.IsDir() {
				return fmt.Errorf("%s is not a directory", d)
			}
			f, err := os.CreateTemp(d, ".escrow-check-*")
			if err != nil {
				if d != filepath.Clean(dir) {
					return fmt.Errorf("cannot be created: %s is not writable: %v", d, unwrapPath(err))
				}
				return fmt.Errorf("not writable: %v", unwrapPath(err))
			}
			name := f.Name()
			f.Close()
			return os.Remove(name)
		}
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
			return unwrapPath(err)
		}
		parent := filepath.Dir(d)
		if parent == d {
			return unwrapPath(err)
		}
		d = parent
	}
}

// CheckLocal runs the checks that need the machine escrow runs on, everything escrow proxy would
// find at start short of binding its ports, all reported at once with their key paths:
//   - policy.dir is a directory; the directory of listen_unix exists;
//   - identity.spiffe has a socket, configured or in SPIFFE_ENDPOINT_SOCKET;
//   - every file a key names is readable (upstreams[].ca_file, the credentials'
//     static.file, client_secret_file, private_key_file, token_file and ca_file, a delegation
//     issuer's jwks_file and ca_file), and every ca_file holds at least one PEM certificate;
//   - every static.env variable is set and not empty;
//   - ca_dir and ca_key_dir can be created or written (probed without leaving a file behind).
//
// Load calls it after Parse; escrow proxy --check calls both.
func (c *Config) CheckLocal(l Local) error {
	var errs Errors
	add := func(path, format string, a ...any) {
		errs = append(errs, FieldError{path, fmt.Sprintf(format, a...)})
	}
	checkFile := func(path, file string, ca bool) {
		if l.ReadFile == nil {
			if _, err := l.Stat(file); err != nil {
				add(path, "cannot read: %v", unwrapPath(err))
			}
			return
		}
		b, err := l.ReadFile(file)
		switch {
		case err != nil:
			add(path, "cannot read %s: %v", file, unwrapPath(err))
		case ca && !hasPEMCertificate(b):
			add(path, "%s holds no PEM certificate (want -----BEGIN CERTIFICATE-----)", file)
		case !ca && len(bytes.TrimSpace(b)) == 0:
			add(path, "%s is empty", file)
		}
	}
	if l.WritableDir != nil {
		for _, d := range []struct{ key, dir string }{{"ca_dir", c.CADir}, {"ca_key_dir", c.CAKeyDir}} {
			if d.dir == "" {
				continue
			}
			if err := l.WritableDir(d.dir); err != nil {
				add(d.key, "%s: %v", d.dir, err)
			}
		}
	}
	for _, n := range sortedKeys(c.Credentials) {
		cr := c.Credentials[n]
		for _, f := range cr.Files("credentials." + n) {
			checkFile(f.Path, f.File, f.CA)
		}
		if cr.Static != nil && cr.Static.Env != "" {
			switch v, ok := l.LookupEnv(cr.Static.Env); {
			case !ok:
				add("credentials."+n+".static.env", "environment variable %s is not set", cr.Static.Env)
			case strings.TrimSpace(v) == "":
				add("credentials."+n+".static.env", "environment variable %s is empty", cr.Static.Env)
			}
		}
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
	if c.ListenUnix != "" {
		dir := filepath.Dir(c.ListenUnix)
		if fi, err := l.Stat(dir); err != nil {
			add("listen_unix", "directory %s: %v", dir, unwrapPath(err))
		} else if !fi.IsDir() {
			add("listen_unix", "%s is not a directory", dir)
		}
	}
	if d := c.Delegation; d != nil {
		for i, is := range d.Issuers {
			if is.OIDC != nil && is.OIDC.JWKSFile != "" {
				checkFile(fmt.Sprintf("delegation.issuers[%d].oidc.jwks_file", i), is.OIDC.JWKSFile, false)
			}
			if is.OIDC != nil && is.OIDC.CAFile != "" {
				checkFile(fmt.Sprintf("delegation.issuers[%d].oidc.ca_file", i), is.OIDC.CAFile, true)
			}
		}
	}
	for i, u := range c.Upstreams {
		if u.CAFile != "" {
			checkFile(fmt.Sprintf("upstreams[%d].ca_file", i), u.CAFile, true)
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
	if c.Egress.ResponseTimeout == 0 {
		c.Egress.ResponseTimeout = Duration(DefaultResponseTimeout)
	}
	if x := c.XDS; x != nil {
		if x.NodeIDFrom == "" {
			x.NodeIDFrom = XDSNodeIDFromSVID
		}
		if x.MaxBackoff == 0 {
			x.MaxBackoff = Duration(DefaultXDSMaxBackoff)
		}
	}
	if d := c.Delegation; d != nil && d.MaxDepth == nil {
		n := DefaultDelegationDepth
		d.MaxDepth = &n
	}
	for n, cr := range c.Credentials {
		cr.applyDefaults()
		c.Credentials[n] = cr
	}
	if c.Audit.FlushInterval == nil {
		d := Duration(DefaultAuditFlush)
		c.Audit.FlushInterval = &d
	}
	for i := range c.Upstreams {
		u := &c.Upstreams[i]
		u.Host = strings.ToLower(strings.TrimSuffix(u.Host, "."))
		if u.MCP != nil {
			if u.MCP.Path == "" {
				u.MCP.Path = DefaultMCPPath
			}
			if u.MCP.MaxMessageBytes == 0 {
				u.MCP.MaxMessageBytes = DefaultMCPMaxMessage
			}
		}
	}
}

// maxUnixPath is the longest path a Unix socket address holds on Linux (sun_path is 108 bytes,
// one of them the terminating NUL).
const maxUnixPath = 107

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
	checkListen := func(key, addr string, loopbackOnly bool, unsafe string) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			add(key, "want host:port, got %q", addr)
			return
		}
		if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			add(key, "invalid port %q: want 1-65535, or 0 for any free port", port)
		}
		if !loopbackOnly {
			return
		}
		ip, err := netip.ParseAddr(host)
		if host == "localhost" || (err == nil && ip.IsLoopback()) {
			return
		}
		if key == "listen" {
			add(key, "%q is not a loopback address; the proxy holds credentials for whoever can reach it (set %s to override)", host, unsafe)
		} else {
			add(key, "%q is not a loopback address; /metrics and /readyz tell whoever reaches them what the agent does (set %s to override, e.g. for a pod's probes and scrape)", host, unsafe)
		}
	}
	checkListen("listen", c.Listen, !c.UnsafeAllowNonLoopbackListen, "unsafe_allow_non_loopback_listen")
	checkListen("admin", c.Admin, !c.UnsafeAllowNonLoopbackAdmin, "unsafe_allow_non_loopback_admin")
	if c.ListenUnix != "" {
		if !filepath.IsAbs(c.ListenUnix) {
			add("listen_unix", "want an absolute path, got %q", c.ListenUnix)
		} else if strings.HasSuffix(c.ListenUnix, "/") {
			add("listen_unix", "want the socket's path, not a directory: %q", c.ListenUnix)
		} else if len(c.ListenUnix) > maxUnixPath {
			add("listen_unix", "%d bytes is too long for a Unix socket path (at most %d)", len(c.ListenUnix), maxUnixPath)
		}
	}
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
	c.validateDelegation(add)
	if c.CAKeyDir != "" {
		key, dir := filepath.Clean(c.CAKeyDir), filepath.Clean(c.CADir)
		if key == dir || strings.HasPrefix(key, dir+string(filepath.Separator)) {
			add("ca_key_dir", "must not be ca_dir or below it: the agent reads ca_dir, and this holds the CA's private key")
		}
	}

	if c.Policy.Dir == "" && c.XDS == nil {
		add("policy.dir", "required: a directory of *.cedar files (or xds, to receive the policies from escrow controller)")
	}
	c.validateXDS(add)
	if !c.Policy.Mode.Valid() {
		add("policy.mode", "want enforce or report, got %q", c.Policy.Mode)
	}
	if c.Policy.ReloadInterval.D() < MinReloadInterval {
		add("policy.reload_interval", "must be at least %v", MinReloadInterval)
	}
	if c.LeafTTL.D() < MinLeafTTL {
		add("leaf_ttl", "must be at least %v", fmtDuration(MinLeafTTL))
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
			add(p+".port", "must be 1-65535, or omit it for the scheme's default (80 for http, 443 for https)")
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
			if cr, ok := c.Credentials[u.Credential]; !ok {
				add(p+".credential", "no credential named %q in credentials%s", u.Credential, suggestName(u.Credential, sortedKeys(c.Credentials)))
			} else if !u.Tunnel {
				c.checkCredentialOnUpstream(p, u, cr, n, add)
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
		if u.Timeout != 0 && u.Timeout.D() < MinResponseTimeout {
			add(p+".response_timeout", "must be at least %v (or omit it for egress.response_timeout)", MinResponseTimeout)
		}
		if u.MCP != nil {
			if u.Tunnel {
				add(p+".mcp", "an MCP server's calls are decided one by one, which needs an intercepted upstream, not a tunnel")
			}
			if !strings.HasPrefix(u.MCP.Path, "/") {
				add(p+".mcp.path", "must start with \"/\", got %q", u.MCP.Path)
			} else if strings.ContainsAny(u.MCP.Path, "?#") || strings.ContainsFunc(u.MCP.Path, isCTL) {
				add(p+".mcp.path", "want a path without query, fragment or control characters, got %q", u.MCP.Path)
			}
			if n := u.MCP.MaxMessageBytes; n < MinMCPMessage || n > MaxMCPMessage {
				add(p+".mcp.max_message_bytes", "must be between %d (1 KiB) and %d (64 MiB)", MinMCPMessage, MaxMCPMessage)
			}
		}
	}

	names := make([]string, 0, len(c.Credentials))
	for n := range c.Credentials {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		c.validateCredential("credentials."+n, c.Credentials[n], add)
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
	if c.Egress.ResponseTimeout.D() < MinResponseTimeout {
		add("egress.response_timeout", "must be at least %v", MinResponseTimeout)
	}
	if len(errs) == 0 {
		// Compiled only from values that passed every check above.
		for i, u := range c.Upstreams {
			if !u.Tunnel && u.Credential != "" {
				c.Upstreams[i].injection = compileInjection(u, c.Credentials[u.Credential])
			}
			c.Upstreams[i].responseTimeout = c.Egress.ResponseTimeout.D()
			if u.Timeout != 0 {
				c.Upstreams[i].responseTimeout = u.Timeout.D()
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
func compileInjection(u Upstream, cr Credential) Injection {
	switch {
	case cr.AWS != nil:
		svc := cr.AWS.Service
		if svc == "" {
			svc = deriveAWSService(u.Host)
		}
		return Injection{Kind: InjectSigV4, Region: cr.AWS.Region, Service: svc}
	case cr.Vault != nil && cr.Vault.Secret.Dynamic != nil && cr.Vault.Secret.Dynamic.UserPass():
		return Injection{Kind: InjectBasicPair, Header: "Authorization"}
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

// validateXDS checks the xds block.
func (c *Config) validateXDS(add func(path, format string, a ...any)) {
	x := c.XDS
	if x == nil {
		return
	}
	if c.Identity.SPIFFE == nil {
		add("xds", "needs identity.spiffe: the sidecar connects to the controller with its X509-SVID, and its node identity is the SVID's")
	}
	if x.Address == "" {
		add("xds.address", "required: the controller's host:port")
	} else if host, port, err := net.SplitHostPort(x.Address); err != nil || host == "" {
		add("xds.address", "want host:port, got %q", x.Address)
	} else if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		add("xds.address", "invalid port %q: want 1-65535", port)
	}
	if x.NodeIDFrom != XDSNodeIDFromSVID {
		add("xds.node_id_from", "want %s (the node identity is the sidecar's SVID), got %q", XDSNodeIDFromSVID, x.NodeIDFrom)
	}
	if x.ServerID != "" {
		if err := checkSPIFFEID(x.ServerID); err != nil {
			add("xds.server_id", "%v", err)
		}
	}
	if b := x.MaxBackoff.D(); b < MinXDSMaxBackoff || b > MaxXDSMaxBackoff {
		add("xds.max_backoff", "must be between %v and %v", fmtDuration(MinXDSMaxBackoff), fmtDuration(MaxXDSMaxBackoff))
	}
}

// validateDelegation checks the delegation block.
func (c *Config) validateDelegation(add func(path, format string, a ...any)) {
	d := c.Delegation
	if d == nil {
		return
	}
	if d.Audience == "" {
		add("delegation.audience", "required: the aud a delegation token must carry (e.g. this proxy's SPIFFE ID)")
	}
	if len(d.Issuers) == 0 {
		add("delegation.issuers", "required: at least one of {spiffe: {}} or {oidc: {issuer: ...}}")
	}
	if n := d.MaxActors(); n < 0 || n > MaxDelegationDepth {
		add("delegation.max_depth", "must be between 0 (the token's subject calls directly) and %d", MaxDelegationDepth)
	}
	for i, is := range d.Issuers {
		p := fmt.Sprintf("delegation.issuers[%d]", i)
		switch {
		case is.SPIFFE != nil && is.OIDC != nil:
			add(p, "set exactly one of spiffe or oidc, not both")
		case is.SPIFFE == nil && is.OIDC == nil:
			add(p, "set one of spiffe: {} or oidc: {issuer: ...}")
		case is.SPIFFE != nil:
			if c.Identity.SPIFFE == nil {
				add(p+".spiffe", "needs identity.spiffe: JWT-SVIDs are verified against the Workload API's bundles")
			}
		case is.OIDC != nil:
			o := is.OIDC
			if o.Issuer == "" {
				add(p+".oidc.issuer", "required")
			} else if msg := checkEndpointURL(o.Issuer); msg != "" {
				add(p+".oidc.issuer", "%s", msg)
			}
			if o.JWKSURL != "" && o.JWKSFile != "" {
				add(p+".oidc", "set at most one of jwks_url or jwks_file")
			}
			if o.JWKSURL != "" {
				if msg := checkEndpointURL(o.JWKSURL); msg != "" {
					add(p+".oidc.jwks_url", "%s", msg)
				}
			}
		}
	}
}

// checkEndpointURL accepts an absolute https URL, or http on a loopback host (a local test
// server): whatever escrow fetches keys or tokens from must not be readable or forgeable on the
// network. No user info (a secret does not belong in a URL) and no fragment.
func checkEndpointURL(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Opaque != "" {
		return fmt.Sprintf("want an https URL, got %q", s)
	}
	if u.User != nil {
		return "must not contain user information (put secrets in files)"
	}
	if u.Fragment != "" || strings.HasSuffix(s, "#") {
		return fmt.Sprintf("must not contain a fragment, got %q", s)
	}
	switch u.Scheme {
	case "https":
		return ""
	case "http":
		if isLoopbackHost(u.Hostname()) {
			return ""
		}
		return fmt.Sprintf("want https (http only on a loopback host), got %q", s)
	}
	return fmt.Sprintf("want an https URL, got %q", s)
}

func isLoopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(h)
	return err == nil && ip.IsLoopback()
}

// fmtDuration prints d without Go's trailing zero units ("1m", not "1m0s").
func fmtDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// checkCredentialOnUpstream checks that the upstream at p can apply credential cr: a credential
// whose form is fixed (an aws SigV4 signature, a username and password pair) takes no
// inject/basic/query.
func (c *Config) checkCredentialOnUpstream(p string, u Upstream, cr Credential, n int, add func(path, format string, a ...any)) {
	if u.Port == 80 && !u.UnsafePlaintextCredential {
		add(p+".port", "port 80 is plain HTTP: the credential would cross the network in clear text, so every request would be refused (plaintext_credential_refused); use the https port, or set unsafe_plaintext_credential: true to send it anyway")
	}
	switch {
	case cr.AWS != nil:
		if n > 0 {
			add(p, "credential %q is aws: it is applied by SigV4 signing only; remove inject/basic/query", u.Credential)
		}
		if cr.AWS.Service == "" && deriveAWSService(u.Host) == "" {
			add(p+".credential", "%q is not an amazonaws.com name, so the SigV4 service cannot be derived from it: set credentials.%s.aws.service (e.g. s3)", u.Host, u.Credential)
		}
	case cr.Vault != nil && cr.Vault.Secret.Dynamic != nil && cr.Vault.Secret.Dynamic.UserPass():
		if n > 0 {
			add(p, "credential %q is a username and password: it is applied as basic auth from one lease; remove inject/basic/query", u.Credential)
		}
	}
}

// suggestName is " (did you mean "x"?)" for the known name one small edit away from k, or "".
func suggestName(k string, known []string) string {
	if best := strictyaml.Nearest(k, known); best != "" {
		return fmt.Sprintf(" (did you mean %q?)", best)
	}
	return ""
}

// hasPEMCertificate reports whether b holds at least one PEM CERTIFICATE block that parses.
func hasPEMCertificate(b []byte) bool {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return false
		}
		if blk.Type == "CERTIFICATE" {
			if _, err := x509.ParseCertificate(blk.Bytes); err == nil {
				return true
			}
		}
	}
}
