package proxy

import (
	"net/http"
	"net/url"
	"strings"
	"unicode/utf8"
)

// refusal is why escrow refuses a request before asking the policy: the stable reason and a
// fixed message (never built from the request) that tells the agent what to change.
type refusal struct {
	reason  Reason
	message string
}

// The refusals of requests that could mean something else upstream than what the policy saw.
var (
	refuseFragment      = &refusal{ReasonBadRequest, "the request target contains a raw '#'"}
	refuseDotSegment    = &refusal{ReasonBadRequest, "the request path contains a '.' or '..' segment"}
	refuseEmptySegment  = &refusal{ReasonBadRequest, "the request path contains an empty segment ('//')"}
	refuseControlChar   = &refusal{ReasonBadRequest, "the request path contains a control character (e.g. an encoded NUL)"}
	refuseDoubleEncoded = &refusal{ReasonBadRequest, "the request path contains a percent-encoded '%' followed by hex digits (double encoding)"}
	refuseInvalidUTF8   = &refusal{ReasonBadRequest, "the request path is not valid UTF-8 once percent-decoded (e.g. an overlong encoding)"}
	refuseTrace         = &refusal{ReasonMethodNotAllowed, "TRACE and TRACK are never sent with a credential"}
	refuseUpgrade       = &refusal{ReasonBadRequest, "only the websocket protocol upgrade is supported"}
)

// methodOverrideHeaders make frameworks act on another method than the request line's; escrow
// strips them (and the _method query parameter) so the method the policy judged is the one the
// upstream acts on.
var methodOverrideHeaders = []string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"}

// checkRequest refuses what would let a request mean something else to the upstream than to the
// policy, and normalises what may be normalised without changing meaning: the method is
// upper-cased, method overrides are removed. It returns the Upgrade protocol the request asks
// for ("websocket" or ""). It runs once per request, before the policy.
func checkRequest(r *http.Request, rt *route) (upgrade string, ref *refusal) {
	if m := r.Method; !isUpper(m) {
		r.Method = strings.ToUpper(m)
	}
	if rt.applier != nil && (r.Method == "TRACE" || r.Method == "TRACK") {
		// TRACE echoes the request, credential included, back to the agent.
		return "", refuseTrace
	}
	if strings.IndexByte(r.RequestURI, '#') >= 0 {
		// A client never sends a fragment; a raw '#' can hide what follows it (e.g. the query
		// the credential is appended to) from one parser and not from another.
		return "", refuseFragment
	}
	if ref := checkPath(r.URL.Path); ref != nil {
		return "", ref
	}
	for _, h := range methodOverrideHeaders {
		if _, ok := r.Header[h]; ok {
			r.Header.Del(h)
		}
	}
	if strings.Contains(r.URL.RawQuery, "_method") {
		r.URL.RawQuery = stripQueryParam(r.URL.RawQuery, "_method")
	}
	if up, ok := r.Header["Upgrade"]; ok {
		if len(up) != 1 || !strings.EqualFold(strings.TrimSpace(up[0]), "websocket") {
			// h2c or anything else: after a 101 the bytes are no longer requests the policy sees.
			return "", refuseUpgrade
		}
		upgrade = "websocket"
	}
	return upgrade, nil
}

// checkPath refuses decoded paths that upstreams resolve differently: dot segments (also with
// ";" parameters, as servlet containers read "..;"), empty segments (merged by many servers),
// control characters (an encoded NUL truncates paths in C), a percent sign followed by two hex
// digits (double encoding: "%252e" decodes once to "%2e" here and again upstream) and invalid
// UTF-8 (overlong encodings of '.' and '/'). "\" counts as a separator: some servers treat it so.
func checkPath(path string) *refusal {
	if !utf8.ValidString(path) {
		return refuseInvalidUTF8
	}
	for i := 0; i < len(path); i++ {
		c := path[i]
		switch {
		case c < 0x20 || c == 0x7f:
			return refuseControlChar
		case c == '%' && i+2 < len(path) && ishex(path[i+1]) && ishex(path[i+2]):
			return refuseDoubleEncoded
		}
	}
	if path == "" {
		return nil
	}
	// Walk the segments by hand: strings.FieldsFunc would hide empty ones.
	rest := path
	if rest[0] == '/' || rest[0] == '\\' {
		rest = rest[1:]
	}
	for {
		i := strings.IndexAny(rest, "/\\")
		seg := rest
		if i >= 0 {
			seg = rest[:i]
		}
		if s, _, _ := strings.Cut(seg, ";"); s == "." || s == ".." {
			return refuseDotSegment
		}
		if i < 0 {
			return nil
		}
		if seg == "" {
			return refuseEmptySegment
		}
		rest = rest[i+1:]
	}
}

func ishex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func isUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if 'a' <= s[i] && s[i] <= 'z' {
			return false
		}
	}
	return true
}

// stripQueryParam removes every name=value pair whose decoded name is name, leaving the others
// exactly as sent.
func stripQueryParam(q, name string) string {
	var b strings.Builder
	for part := range strings.SplitSeq(q, "&") {
		k, _, _ := strings.Cut(part, "=")
		if dk, err := url.QueryUnescape(k); err == nil && dk == name || k == name {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('&')
		}
		b.WriteString(part)
	}
	return b.String()
}
