package credential

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
)

// Method says how a credential is put on a request.
type Method int

const (
	// MethodHeader sets a header from a template (default "Authorization: Bearer {{.Token}}").
	MethodHeader Method = iota
	// MethodBasic sets "Authorization: Basic base64(username:token)".
	MethodBasic
	// MethodQuery sets a query parameter to the token.
	MethodQuery
)

func (m Method) String() string {
	switch m {
	case MethodHeader:
		return "header"
	case MethodBasic:
		return "basic"
	case MethodQuery:
		return "query"
	}
	return fmt.Sprintf("Method(%d)", int(m))
}

// Defaults for ApplySpec fields left empty with MethodHeader.
const (
	DefaultHeader   = "Authorization"
	DefaultTemplate = "Bearer {{.Token}}"
)

// ApplySpec says how one route applies its credential.
type ApplySpec struct {
	// Header is, for MethodHeader, the header to set (default DefaultHeader).
	Header string
	// Template is, for MethodHeader, the header's value with the token's place marked by
	// {{.Token}} (default DefaultTemplate). The only action allowed is {{.Token}} (spaces inside
	// the braces allowed: {{ .Token }}), exactly once; the text around it may not contain
	// control characters, "{{" or "}}". Examples: "Bearer {{.Token}}", "token {{.Token}}",
	// "{{.Token}}".
	Template string
	// Username is, for MethodBasic, the user name (required, no ':'); the token is the password.
	Username string
	// Param is, for MethodQuery, the query parameter's name (required).
	Param string
	// Method is how the credential is applied; the zero value is MethodHeader.
	Method Method
}

// Applier puts a credential on requests as its ApplySpec says. It is safe for concurrent use.
type Applier struct {
	method Method
	header string // canonical name of the header set (MethodHeader, MethodBasic)
	prefix string // value = prefix + token + suffix (MethodHeader) or prefix + base64(...) (MethodBasic)
	suffix string
	user   string // MethodBasic
	param  string // MethodQuery

	// last caches the rendered value for the most recent token, keyed by its value's box, so
	// the hot path for an unchanged credential does no concatenation or encoding.
	last atomic.Pointer[rendered]
}

type rendered struct {
	sec   *secret
	value string // header value or escaped query value
	ok    bool   // false: the token cannot be applied (control characters in a header value)
}

// headers never set by an Applier: they frame the message, route it or are hop-by-hop.
var forbiddenHeaders = map[string]bool{
	"Host": true, "Content-Length": true, "Transfer-Encoding": true, "Connection": true,
	"Keep-Alive": true, "Te": true, "Trailer": true, "Upgrade": true,
	"Proxy-Connection": true, "Proxy-Authorization": true, "Proxy-Authenticate": true,
}

// NewApplier validates spec and precompiles it.
func NewApplier(spec ApplySpec) (*Applier, error) {
	a := &Applier{method: spec.Method}
	switch spec.Method {
	case MethodHeader:
		h := spec.Header
		if h == "" {
			h = DefaultHeader
		}
		if !validHeaderName(h) {
			return nil, fmt.Errorf("credential: header %q is not a valid HTTP header name", h)
		}
		a.header = http.CanonicalHeaderKey(h)
		if forbiddenHeaders[a.header] {
			return nil, fmt.Errorf("credential: header %s cannot carry a credential", a.header)
		}
		t := spec.Template
		if t == "" {
			t = DefaultTemplate
		}
		var err error
		if a.prefix, a.suffix, err = compileTemplate(t); err != nil {
			return nil, fmt.Errorf("credential: template %q: %w", t, err)
		}
	case MethodBasic:
		switch {
		case spec.Username == "":
			return nil, errors.New("credential: basic auth needs a username")
		case strings.Contains(spec.Username, ":"):
			return nil, errors.New("credential: basic auth username may not contain ':'")
		case hasCTL(spec.Username):
			return nil, errors.New("credential: basic auth username contains a control character")
		}
		a.header = "Authorization"
		a.prefix = "Basic "
		a.user = spec.Username
	case MethodQuery:
		if spec.Param == "" {
			return nil, errors.New("credential: query method needs a parameter name")
		}
		a.param = spec.Param
	default:
		return nil, fmt.Errorf("credential: unknown apply method %v", spec.Method)
	}
	return a, nil
}

// compileTemplate splits t around its single {{.Token}} action.
func compileTemplate(t string) (prefix, suffix string, err error) {
	i := strings.Index(t, "{{")
	if i < 0 {
		return "", "", errors.New("must contain {{.Token}}")
	}
	j := strings.Index(t[i:], "}}")
	if j < 0 {
		return "", "", errors.New("unclosed action")
	}
	if strings.TrimSpace(t[i+2:i+j]) != ".Token" {
		return "", "", errors.New("the only action allowed is {{.Token}}")
	}
	prefix, suffix = t[:i], t[i+j+2:]
	for _, s := range []string{prefix, suffix} {
		if strings.Contains(s, "{{") || strings.Contains(s, "}}") {
			return "", "", errors.New("must contain {{.Token}} exactly once and no other action")
		}
		if hasCTL(s) {
			return "", "", errors.New("contains a control character")
		}
	}
	return prefix, suffix, nil
}

// Apply removes every credential the agent sent (Authorization, Proxy-Authorization, the
// configured header in any letter case and, for MethodQuery, every occurrence of the configured
// parameter) and then sets the real one: exactly one value, never appended.
//
// For MethodHeader, a token whose value contains control characters (CR, LF, NUL, ...) is not
// applied: the agent's credentials are still removed and nothing is set, so the request fails
// upstream rather than carrying a split header. (Basic and query encode the value, so they are
// safe regardless.) Manager never returns such a token.
//
// For MethodQuery the secret ends up in r.URL.RawQuery: log or audit r.URL before Apply, not
// after.
func (a *Applier) Apply(r *http.Request, tok Token) {
	stripHeader(r.Header, "Authorization")
	stripHeader(r.Header, "Proxy-Authorization")
	if a.method == MethodHeader && a.header != "Authorization" {
		stripHeader(r.Header, a.header)
	}
	rd := a.render(tok)
	if a.method == MethodQuery {
		if r.URL == nil {
			return
		}
		r.URL.RawQuery = replaceQueryParam(r.URL.RawQuery, a.param, rd.value)
		return
	}
	if !rd.ok {
		return
	}
	if r.Header == nil {
		r.Header = make(http.Header, 1)
	}
	r.Header[a.header] = []string{rd.value}
}

// render returns what Apply writes for tok, cached for the last token seen.
func (a *Applier) render(tok Token) *rendered {
	if rd := a.last.Load(); rd != nil && rd.sec == tok.sec && tok.sec != nil {
		return rd
	}
	v := tok.Value()
	rd := &rendered{sec: tok.sec}
	switch a.method {
	case MethodHeader:
		rd.value = a.prefix + v + a.suffix
		rd.ok = !hasCTL(rd.value)
	case MethodBasic:
		rd.value = a.prefix + base64.StdEncoding.EncodeToString([]byte(a.user+":"+v))
		rd.ok = true
	case MethodQuery:
		rd.value = url.QueryEscape(v)
		rd.ok = true
	}
	if tok.sec != nil {
		a.last.Store(rd)
	}
	return rd
}

// stripHeader deletes name and every key equal to it in another letter case (a Header filled
// directly, not through Set/Add, may hold non-canonical keys).
func stripHeader(h http.Header, name string) {
	if h == nil {
		return
	}
	delete(h, name) // name is canonical
	for k := range h {
		if len(k) == len(name) && strings.EqualFold(k, name) {
			delete(h, k)
		}
	}
}

// replaceQueryParam removes every pair of rawQuery whose key means param and appends
// param=escapedValue. Pairs are split at '&' and also at ';' (some servers still split there,
// so "a=1;key=x" must not smuggle a second key past us). Keys are compared after
// percent-decoding (lenient: an invalid escape stays literal, '+' is a space) and without
// regard to case, so "KEY" or "k%65y" cannot survive. The remaining pairs keep their bytes,
// order and separators; empty pairs ("a=1&&b=2") are dropped.
func replaceQueryParam(rawQuery, param, escapedValue string) string {
	var b strings.Builder
	b.Grow(len(rawQuery) + len(param) + len(escapedValue) + 2)
	sep := "" // the separator that preceded seg in rawQuery
	for rest := rawQuery; rest != ""; {
		seg, next := rest, ""
		if i := strings.IndexAny(rest, "&;"); i >= 0 {
			seg, next, rest = rest[:i], rest[i:i+1], rest[i+1:]
		} else {
			rest = ""
		}
		if seg != "" && !isParam(seg, param) {
			if b.Len() > 0 {
				b.WriteString(sep)
			}
			b.WriteString(seg)
		}
		sep = next
	}
	if b.Len() > 0 {
		b.WriteByte('&')
	}
	b.WriteString(url.QueryEscape(param))
	b.WriteByte('=')
	b.WriteString(escapedValue)
	return b.String()
}

// isParam reports whether the query pair seg ("k=v" or "k") has the key param.
func isParam(seg, param string) bool {
	key := seg
	if i := strings.IndexByte(seg, '='); i >= 0 {
		key = seg[:i]
	}
	return strings.EqualFold(lenientUnescape(key), param)
}

// lenientUnescape decodes %XX escapes and '+' as a server might; invalid escapes stay literal.
func lenientUnescape(s string) string {
	if !strings.ContainsAny(s, "%+") {
		return s
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '+':
			b = append(b, ' ')
		case c == '%' && i+2 < len(s) && ishex(s[i+1]) && ishex(s[i+2]):
			b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

func ishex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

// hasCTL reports whether s contains an ASCII control character (including TAB) or DEL.
func hasCTL(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			return true
		}
	}
	return false
}

// validHeaderName reports whether s is an RFC 9110 token.
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}
