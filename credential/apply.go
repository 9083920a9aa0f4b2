package credential

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"

	"github.com/escrowproxy/escrow/config"
)

// Applier puts a credential on an outbound request. Implementations are safe for concurrent
// use.
type Applier interface {
	// Apply strips every credential the agent sent and puts tok on r (r is the outbound copy:
	// method, URL, headers and body are final). It may sign (SigV4 needs the method, URL,
	// headers and a payload hash, and can fail). On error the agent's credentials are still
	// stripped and r must not be sent; the error never contains a secret and wraps
	// ErrUnavailable, so the proxy denies with credential_unavailable rather than forwarding
	// an unauthenticated request.
	Apply(r *http.Request, tok Token) error
}

// NewApplier returns the Applier for a validated injection. config has checked the header name
// and template once; NewApplier does not check them again. It refuses an unknown kind and one
// missing the field its kind needs (a zero Injection from a caller bug must not become a request
// that silently carries no credential).
func NewApplier(in config.Injection) (Applier, error) {
	a := &valueApplier{kind: in.Kind}
	switch in.Kind {
	case config.InjectHeader:
		if in.Header == "" {
			return nil, errors.New("credential: header injection without a header name")
		}
		a.header, a.prefix, a.suffix = in.Header, in.Prefix, in.Suffix
	case config.InjectBasic:
		a.header, a.prefix, a.user = "Authorization", "Basic ", in.Username
	case config.InjectBasicPair:
		a.header, a.prefix = "Authorization", "Basic "
	case config.InjectSigV4:
		return NewSigV4Applier(SigV4Options{Region: in.Region, Service: in.Service})
	case config.InjectQuery:
		if in.Param == "" {
			return nil, errors.New("credential: query injection without a parameter name")
		}
		a.param = in.Param
	default:
		return nil, fmt.Errorf("credential: unknown injection kind %v", in.Kind)
	}
	return a, nil
}

// valueApplier applies a single-value token as a header (template), basic auth or a query
// parameter.
type valueApplier struct {
	kind   config.InjectKind
	header string // canonical name of the header set (InjectHeader, InjectBasic)
	prefix string // value = prefix + token + suffix (InjectHeader) or prefix + base64(...) (InjectBasic)
	suffix string
	user   string // InjectBasic
	param  string // InjectQuery

	// last caches the rendered value for the most recent token, keyed by its secret's box, so
	// the hot path for an unchanged credential does no concatenation or encoding.
	last atomic.Pointer[rendered]
}

type rendered struct {
	sec   *secret
	value string // header value or escaped query value
	err   error  // the token cannot be applied (control characters in a header value)
}

// Apply removes every credential the agent sent (Authorization, Proxy-Authorization, the
// configured header in any letter case and, for InjectQuery, every occurrence of the configured
// parameter) and then sets the real one: exactly one value, never appended.
//
// It fails, having stripped the agent's credentials and set nothing, when tok has no single
// value (a zero or multi-part token) or, for InjectHeader, when the rendered value contains a
// control character (CR, LF, NUL, ...), which would split or truncate the header. Basic and
// query encode the value, so they are safe regardless. Manager never returns such a token.
//
// For InjectQuery the secret ends up in r.URL.RawQuery: log or audit r.URL before Apply, not
// after.
func (a *valueApplier) Apply(r *http.Request, tok Token) error {
	stripHeader(r.Header, "Authorization")
	stripHeader(r.Header, "Proxy-Authorization")
	if a.kind == config.InjectHeader && a.header != "Authorization" {
		stripHeader(r.Header, a.header)
	}
	var (
		rd  *rendered
		err error
	)
	if a.kind == config.InjectBasicPair {
		if tok.sec == nil || !tok.multi || tok.Part(PartUsername) == "" || tok.Part(PartPassword) == "" {
			err = unavailable(tok.name, fmt.Errorf("cannot apply %s as %v: it is not a username and password", tok, a.kind))
		} else {
			rd = a.render(tok)
		}
	} else if tok.sec == nil || tok.multi {
		err = unavailable(tok.name, fmt.Errorf("cannot apply %s as %v: it has no single value", tok, a.kind))
	} else if rd = a.render(tok); rd.err != nil {
		err = rd.err
	}
	if a.kind == config.InjectQuery {
		if r.URL == nil {
			return unavailable(tok.name, errors.New("cannot apply to a request without a URL"))
		}
		if err != nil {
			r.URL.RawQuery = stripQueryParam(r.URL.RawQuery, a.param)
			return err
		}
		r.URL.RawQuery = replaceQueryParam(r.URL.RawQuery, a.param, rd.value)
		return nil
	}
	if err != nil {
		return err
	}
	if r.Header == nil {
		r.Header = make(http.Header, 1)
	}
	r.Header[a.header] = []string{rd.value}
	return nil
}

// render returns what Apply writes for a single-value tok, cached for the last token seen.
func (a *valueApplier) render(tok Token) *rendered {
	if rd := a.last.Load(); rd != nil && rd.sec == tok.sec {
		return rd
	}
	v := tok.Value()
	rd := &rendered{sec: tok.sec}
	switch a.kind {
	case config.InjectHeader:
		rd.value = a.prefix + v + a.suffix
		if i := ctlIndex(rd.value); i >= 0 {
			rd.err = unavailable(tok.name, fmt.Errorf("cannot apply %s to header %s: the value contains a control character (%s)",
				tok, a.header, ctlName(rd.value[i])))
			rd.value = ""
		}
	case config.InjectBasic:
		rd.value = a.prefix + base64.StdEncoding.EncodeToString([]byte(a.user+":"+v))
	case config.InjectBasicPair: // a username and password from one lease (Vault dynamic secret)
		rd.value = a.prefix + base64.StdEncoding.EncodeToString([]byte(tok.Part(PartUsername)+":"+tok.Part(PartPassword)))
	case config.InjectQuery:
		rd.value = url.QueryEscape(v)
	}
	a.last.Store(rd)
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

// replaceQueryParam removes every pair of rawQuery whose key means param (see
// writeQueryWithout) and appends param=escapedValue.
func replaceQueryParam(rawQuery, param, escapedValue string) string {
	var b strings.Builder
	b.Grow(len(rawQuery) + len(param) + len(escapedValue) + 2)
	writeQueryWithout(&b, rawQuery, param)
	if b.Len() > 0 {
		b.WriteByte('&')
	}
	b.WriteString(url.QueryEscape(param))
	b.WriteByte('=')
	b.WriteString(escapedValue)
	return b.String()
}

// stripQueryParam removes every pair of rawQuery whose key means param.
func stripQueryParam(rawQuery, param string) string {
	var b strings.Builder
	b.Grow(len(rawQuery))
	writeQueryWithout(&b, rawQuery, param)
	return b.String()
}

// writeQueryWithout writes the pairs of rawQuery whose key does not mean param. Pairs are split
// at '&' and also at ';' (some servers still split there, so "a=1;key=x" must not smuggle a
// second key past us). Keys are compared after percent-decoding (lenient: an invalid escape
// stays literal, '+' is a space) and without regard to case, so "KEY" or "k%65y" cannot
// survive. The remaining pairs keep their bytes, order and separators; empty pairs
// ("a=1&&b=2") are dropped.
func writeQueryWithout(b *strings.Builder, rawQuery, param string) {
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

// ctlIndex returns the index of the first ASCII control character (including TAB) or DEL in
// s, or -1.
func ctlIndex(s string) int {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			return i
		}
	}
	return -1
}
