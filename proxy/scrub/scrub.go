package scrub

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"html"
	"net/http"
	"net/url"
	"strings"
	"unicode/utf8"
)

// Marker is what a redacted occurrence reads as when it is exactly len(Marker) bytes long.
// Every occurrence is replaced by the same number of bytes (so a Content-Length stays true):
// a shorter one by Marker cut short, keeping its closing bracket ("[escrow]" for 8 bytes), a
// longer one by Marker padded with '*' before the closing bracket. When a secret itself
// contains '[' or ']', other delimiters are used (see New).
const Marker = "[escrow:redacted]"

// MinLen is the shortest value New accepts, in bytes. A shorter value would match ordinary
// text (a 4-byte value occurs by chance in a few megabytes of random text, a common word
// anywhere) and its base64 forms shrink further; a credential that short is not one escrow
// can protect by scrubbing anyway.
const MinLen = 8

// PrefixLen is how much of the start of a searched form is enough to be replaced: a value cut
// short (a truncated echo, a log line that shortens long strings) is replaced as far as it
// goes once at least PrefixLen bytes of a form are present. A form shorter than that is
// replaced only whole.
const PrefixLen = 32

const markerText = "escrow:redacted" // Marker between its brackets

// Scrubber finds the secrets it was built with, in their common encodings, and replaces each
// occurrence. It is immutable and safe for concurrent use; a nil *Scrubber scrubs nothing.
type Scrubber struct {
	m           *matcher
	open, close byte   // first and last byte of every replacement; in no pattern
	text        string // the replacement's interior, then fill
	fill        byte
	// weak: no delimiter byte is free of the secrets' bytes, so the output may still contain
	// a form made of a replacement's edge and its neighbours (see New).
	weak    bool
	ignored int
}

// BasicPair is the user:pass string of HTTP Basic authentication: pass it to New (with the
// password on its own) and the Authorization header's base64 form is covered as well.
func BasicPair(user, pass string) string { return user + ":" + pass }

// New returns a Scrubber for values. Each value of at least MinLen bytes is searched, ASCII
// case-insensitively, as:
//
//   - itself;
//   - URL-escaped as a query component and as a path segment (either case of hex digits);
//   - standard and URL-safe base64, padded and unpadded, and, so that a value inside a larger
//     base64 text is found too, the characters of its base64 form that depend on the value
//     alone at each of the three byte alignments (the one or two characters at each end that
//     mix in neighbouring bytes may remain: at most 6 bits of the value's first and last byte);
//   - standard base64 URL-escaped;
//   - hexadecimal;
//   - as a JSON string body (Go's escaping, and with "\/") and HTML-escaped, where they differ.
//
// A form cut short is replaced as far as it goes once its first PrefixLen bytes are present.
// Shorter values are ignored (see MinLen and Ignored). The replacement of each occurrence
// starts and ends with a byte that occurs in no searched form (normally '[' and ']'), and its
// interior contains none, so an output can never contain a searched form made of a replacement
// and its neighbours. Only a set of values whose forms use every byte value leaves no such
// byte; the Scrubber is then Weak.
func New(values ...string) *Scrubber {
	s := &Scrubber{}
	seen := map[string]bool{}
	var patterns []string
	for _, v := range values {
		if len(v) < MinLen {
			if v != "" {
				s.ignored++
			}
			continue
		}
		for _, p := range forms(v) {
			f := foldString(p)
			if len(f) >= MinLen && !seen[f] {
				seen[f] = true
				patterns = append(patterns, f)
			}
		}
	}
	s.m = newMatcher(patterns, PrefixLen)
	if s.m == nil {
		return s
	}
	var used [256]bool
	for _, p := range patterns {
		for i := 0; i < len(p); i++ {
			used[p[i]] = true
		}
	}
	s.open, s.close, s.weak = delimiters(&used)
	s.text, s.fill = markerText, '*'
	interior := foldString(markerText + strings.Repeat("*", s.m.maxLen))
	for _, p := range patterns {
		if strings.Contains(interior, p[:min(len(p), PrefixLen)]) {
			// A value that is part of the marker: fill with the delimiter instead.
			s.text, s.fill = "", s.open
			break
		}
	}
	return s
}

// delimiters picks the bytes that start and end every replacement: bytes no pattern contains
// (compared folded), preferring a bracket pair, then printable ASCII, then anything but CR, LF
// and NUL (header values cannot carry those).
func delimiters(used *[256]bool) (open, close byte, weak bool) {
	free := func(b byte) bool { return !used[fold(b)] }
	for _, pair := range [][2]byte{{'[', ']'}, {'<', '>'}, {'{', '}'}, {'(', ')'}} {
		if free(pair[0]) && free(pair[1]) {
			return pair[0], pair[1], false
		}
	}
	for _, b := range []byte("|#~^!*_-.+=@$%&?;,/\\'\"`") {
		if free(b) {
			return b, b, false
		}
	}
	for b := 0x21; b < 0x100; b++ {
		if c := byte(b); !('A' <= c && c <= 'Z') && free(c) {
			return c, c, false
		}
	}
	return '[', ']', true
}

// Ignored is how many non-empty values New was given that are shorter than MinLen.
func (s *Scrubber) Ignored() int {
	if s == nil {
		return 0
	}
	return s.ignored
}

// Active reports whether s has anything to look for.
func (s *Scrubber) Active() bool { return s != nil && s.m != nil }

// Weak reports that s could find no delimiter byte absent from its secrets' forms (see New).
func (s *Scrubber) Weak() bool { return s != nil && s.weak }

// MaxMatchLen is the length of the longest form searched: a streaming scan holds back at most
// this many bytes.
func (s *Scrubber) MaxMatchLen() int {
	if !s.Active() {
		return 0
	}
	return s.m.maxLen
}

// forms lists the encodings of v that New searches for (before folding and deduplication).
func forms(v string) []string {
	b := []byte(v)
	out := []string{
		v,
		url.QueryEscape(v),
		url.PathEscape(v),
		hex.EncodeToString(b),
		html.EscapeString(v),
	}
	if utf8.ValidString(v) {
		// Invalid UTF-8 would be re-encoded as U+FFFD by an encoder, not reflected.
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		if enc.Encode(v) == nil {
			js := strings.TrimSuffix(strings.TrimSpace(buf.String()), "\n")
			js = js[1 : len(js)-1] // the quotes
			out = append(out, js, strings.ReplaceAll(js, "/", `\/`))
			buf.Reset()
			enc.SetEscapeHTML(false)
			if enc.Encode(v) == nil {
				js := strings.TrimSpace(buf.String())
				out = append(out, js[1:len(js)-1])
			}
		}
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
		padded := enc.EncodeToString(b)
		b64 := []string{padded, strings.TrimRight(padded, "=")}
		raw := enc.WithPadding(base64.NoPadding)
		for a := 0; a < 3; a++ {
			// Character k of the encoding of a leading bytes then v carries bits [6k, 6k+6);
			// the characters whose bits all lie within v are the same wherever v sits at
			// this alignment in a longer text.
			shifted := raw.EncodeToString(append(make([]byte, a), b...))
			first, end := (8*a+5)/6, 8*(a+len(b))/6
			b64 = append(b64, shifted[first:end])
		}
		out = append(out, b64...)
		if enc == base64.StdEncoding {
			for _, f := range b64 {
				out = append(out, url.QueryEscape(f), url.PathEscape(f))
			}
		}
	}
	return out
}

func foldString(s string) string {
	b := []byte(s)
	for i, c := range b {
		b[i] = fold(c)
	}
	return string(b)
}

// markerAt is the replacement byte at absolute offset pos inside run r. It depends only on
// pos-r.start, except for r's last byte: so a run's bytes can be written out before the run is
// known to be complete, all but its last one.
func (s *Scrubber) markerAt(r run, pos int64) byte {
	switch {
	case pos == r.start:
		return s.open
	case pos == r.end-1:
		return s.close
	}
	if k := pos - r.start - 1; k < int64(len(s.text)) {
		return s.text[k]
	}
	return s.fill
}

// redact overwrites the bytes of b (whose first byte is at absolute offset base) that lie in
// the runs.
func (s *Scrubber) redact(b []byte, base int64, rs []run) {
	end := base + int64(len(b))
	for _, r := range rs {
		for p := max(r.start, base); p < min(r.end, end); p++ {
			b[p-base] = s.markerAt(r, p)
		}
	}
}

// String returns v with every occurrence replaced, and how many occurrences (overlapping
// ones count once) it replaced.
func (s *Scrubber) String(v string) (string, int) {
	if !s.Active() || len(v) < MinLen {
		return v, 0
	}
	var rs runs
	s.m.scanString(v, &rs)
	if rs.found == 0 {
		return v, 0
	}
	b := []byte(v)
	s.redact(b, 0, rs.list)
	return string(b), rs.found
}

// Header replaces every occurrence in every value of h, whatever the header (Location,
// Content-Location, Link, Refresh, Set-Cookie, WWW-Authenticate and any other), and removes
// any header whose name contains one (a name cannot carry the marker). It returns the number
// of occurrences replaced plus headers removed. Use it on response headers and, once the body
// has been read to its end, on trailers.
func (s *Scrubber) Header(h http.Header) int {
	if !s.Active() {
		return 0
	}
	n := 0
	for name, vs := range h {
		if _, c := s.String(name); c > 0 {
			delete(h, name)
			n++
			continue
		}
		for i, v := range vs {
			if r, c := s.String(v); c > 0 {
				vs[i] = r
				n += c
			}
		}
	}
	return n
}
