package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"
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

// FieldError is one problem at one key path.
type FieldError struct {
	Path string // e.g. upstreams[1].inject.header
	Msg  string
}

func (e FieldError) Error() string { return e.Path + ": " + e.Msg }

// Errors is every problem found in one file, reported at once.
type Errors []FieldError

func (es Errors) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "config: %d error(s):", len(es))
	for _, e := range es {
		b.WriteString("\n  ")
		b.WriteString(e.Error())
	}
	return b.String()
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

// Shaper is implemented (on its pointer) by a field type whose YAML form is not what its Go
// kind suggests, e.g. a Duration written as "2s". CheckShape gets the decoded YAML value
// (string, float64, bool, map[string]any or []any) and returns what is wrong with it, or "".
type Shaper interface {
	CheckShape(v any) string
}

// Decode decodes YAML (or JSON) into out, a pointer to a struct with json tags. It reports
// every unknown key (with a "did you mean" for a near miss) and every value of the wrong kind,
// each with its key path, all at once, as shape errors; out is then filled best effort, so that
// the caller's value checks can still run and one run names every mistake (see Combine). err
// is for input that is not YAML at all. Every escrow config file (the proxy's, the injector's)
// is read through it.
func Decode(data []byte, out any) (shape Errors, err error) {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("config: not valid YAML: %w", err)
	}
	var raw any
	if err := json.Unmarshal(js, &raw); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if raw == nil {
		return nil, nil // an empty document: every key at its default
	}
	checkShape(&shape, "", raw, reflect.TypeOf(out).Elem())
	dec := json.NewDecoder(bytes.NewReader(js))
	if len(shape) == 0 {
		dec.DisallowUnknownFields()
	}
	if err := dec.Decode(out); err != nil && len(shape) == 0 {
		// checkShape catches nearly everything with a path; this is the backstop.
		return Errors{{Path: "(root)", Msg: err.Error()}}, nil
	}
	return shape, nil
}

// Combine is every problem of one document, sorted by key path: the shape errors Decode
// reported and the value errors of the caller's checks, less the value errors at or below a
// path that already has a shape error (they would only repeat it). Nil when there are none.
func Combine(shape, values Errors) Errors {
	errs := append(Errors(nil), shape...)
	for _, e := range values {
		if !coveredBy(e.Path, shape) {
			errs = append(errs, e)
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return sortErrs(errs)
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

func coveredBy(path string, shape Errors) bool {
	for _, s := range shape {
		if s.Path == "(root)" || path == s.Path || strings.HasPrefix(path, s.Path+".") || strings.HasPrefix(path, s.Path+"[") {
			return true
		}
	}
	return false
}

func sortErrs(es Errors) Errors {
	sort.SliceStable(es, func(i, j int) bool { return es[i].Path < es[j].Path })
	return es
}

var shaperType = reflect.TypeOf((*Shaper)(nil)).Elem()

// checkShape walks the decoded document against the Go type, reporting unknown keys and wrong
// kinds with their paths, so that one run names every mistake.
func checkShape(errs *Errors, path string, v any, t reflect.Type) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	at := path
	if at == "" {
		at = "(root)"
	}
	if v == nil {
		return // null: leave the zero value
	}
	if reflect.PointerTo(t).Implements(shaperType) {
		if msg := reflect.New(t).Interface().(Shaper).CheckShape(v); msg != "" {
			*errs = append(*errs, FieldError{at, msg})
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			*errs = append(*errs, FieldError{at, "want a mapping, got " + kindOf(v)})
			return
		}
		fields := map[string]reflect.Type{}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name != "" && name != "-" {
				fields[name] = f.Type
			}
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			ft, ok := fields[k]
			if !ok {
				*errs = append(*errs, FieldError{join(path, k), "unknown key" + suggest(k, fields)})
				continue
			}
			checkShape(errs, join(path, k), m[k], ft)
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			*errs = append(*errs, FieldError{at, "want a mapping, got " + kindOf(v)})
			return
		}
		for k, e := range m {
			checkShape(errs, join(path, k), e, t.Elem())
		}
	case reflect.Slice:
		l, ok := v.([]any)
		if !ok {
			*errs = append(*errs, FieldError{at, "want a list, got " + kindOf(v)})
			return
		}
		for i, e := range l {
			checkShape(errs, fmt.Sprintf("%s[%d]", path, i), e, t.Elem())
		}
	case reflect.String:
		if _, ok := v.(string); !ok {
			*errs = append(*errs, FieldError{at, "want a string, got " + kindOf(v)})
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			*errs = append(*errs, FieldError{at, "want true or false, got " + kindOf(v)})
		}
	case reflect.Int, reflect.Int64, reflect.Int32:
		f, ok := v.(float64)
		if !ok || f != float64(int64(f)) {
			*errs = append(*errs, FieldError{at, "want an integer, got " + kindOf(v)})
		}
	}
}

func join(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

// KindOf names the kind of a decoded YAML value for messages ("a mapping", "the number 5").
func KindOf(v any) string { return kindOf(v) }

func kindOf(v any) string {
	switch x := v.(type) {
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case float64:
		return "the number " + strconv.FormatFloat(x, 'g', -1, 64)
	default:
		return fmt.Sprintf("%T", v)
	}
}

// suggest names a known key that is one small edit away, the common typo case.
func suggest(k string, known map[string]reflect.Type) string {
	best, bestD := "", 3
	for name := range known {
		if d := editDistance(k, name); d < bestD || (d == bestD && name < best) {
			best, bestD = name, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
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
