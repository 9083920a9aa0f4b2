package mcp

import (
	"bytes"
	"encoding/json"
	"unicode"
	"unicode/utf8"
)

// scanner validates a JSON text strictly, in one pass and without building values: RFC 8259
// syntax, valid UTF-8 (no lone surrogate escapes either), nesting bounded by maxDepth, and no
// object with two keys that are equal under Unicode case folding. The last rule is stricter
// than JSON's: decoders disagree on duplicate keys (first or last wins) and some (Go's
// encoding/json) match keys case-insensitively, so an object like {"path":"/workspace/a",
// "Path":"/etc/passwd"} could be decided on one value and executed with the other. Refusing
// it removes the ambiguity instead of guessing which decoder the server uses.
type scanner struct {
	data     []byte
	maxDepth int

	// keys holds the folded keys of the objects being scanned, back to back; ends[i] is where
	// key i ends. An object truncates both back to where they were when it ends.
	keys []byte
	ends []int
	tmp  []byte // unescape scratch

	// noDup turns the duplicate-key check off (for responses, where only validity matters).
	noDup bool
}

// smallObject is the number of keys up to which duplicates are found by linear search; larger
// objects use a map, so a message of many keys cannot make the check quadratic.
const smallObject = 16

func (s *scanner) reset(data []byte, maxDepth int) {
	s.data, s.maxDepth = data, maxDepth
	s.keys, s.ends = s.keys[:0], s.ends[:0]
}

// validate checks that data is exactly one JSON value surrounded by optional whitespace.
func (s *scanner) validate() error {
	i := s.ws(0)
	i, err := s.value(i, 0)
	if err != nil {
		return err
	}
	if i = s.ws(i); i != len(s.data) {
		return syntaxErr("data after the top-level value", i)
	}
	return nil
}

func (s *scanner) ws(i int) int {
	for i < len(s.data) {
		switch s.data[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

func (s *scanner) value(i, depth int) (int, error) {
	if i >= len(s.data) {
		return i, syntaxErr("unexpected end of input", i)
	}
	switch c := s.data[i]; {
	case c == '{':
		return s.object(i, depth)
	case c == '[':
		return s.array(i, depth)
	case c == '"':
		end, _, err := s.str(i)
		return end, err
	case c == 't':
		return s.literal(i, "true")
	case c == 'f':
		return s.literal(i, "false")
	case c == 'n':
		return s.literal(i, "null")
	case c == '-' || ('0' <= c && c <= '9'):
		return s.number(i)
	}
	return i, syntaxErr("invalid character", i)
}

func (s *scanner) literal(i int, lit string) (int, error) {
	if !bytes.HasPrefix(s.data[i:], []byte(lit)) {
		return i, syntaxErr("invalid literal", i)
	}
	return i + len(lit), nil
}

func (s *scanner) number(i int) (int, error) {
	d, start := s.data, i
	if i < len(d) && d[i] == '-' {
		i++
	}
	switch {
	case i < len(d) && d[i] == '0':
		i++
	case i < len(d) && '1' <= d[i] && d[i] <= '9':
		for i < len(d) && '0' <= d[i] && d[i] <= '9' {
			i++
		}
	default:
		return i, syntaxErr("invalid number", start)
	}
	if i < len(d) && d[i] == '.' {
		i++
		n := i
		for i < len(d) && '0' <= d[i] && d[i] <= '9' {
			i++
		}
		if i == n {
			return i, syntaxErr("invalid number", start)
		}
	}
	if i < len(d) && (d[i] == 'e' || d[i] == 'E') {
		i++
		if i < len(d) && (d[i] == '+' || d[i] == '-') {
			i++
		}
		n := i
		for i < len(d) && '0' <= d[i] && d[i] <= '9' {
			i++
		}
		if i == n {
			return i, syntaxErr("invalid number", start)
		}
	}
	return i, nil
}

// str scans the string starting at the quote at i and returns the index after its closing
// quote and whether it contains escapes.
func (s *scanner) str(i int) (end int, escaped bool, err error) {
	d := s.data
	start := i
	i++
	for i < len(d) {
		c := d[i]
		switch {
		case c == '"':
			return i + 1, escaped, nil
		case c == '\\':
			escaped = true
			if i+1 >= len(d) {
				return i, escaped, syntaxErr("unterminated string", start)
			}
			switch d[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				r, ok := hex4(d, i+2)
				if !ok {
					return i, escaped, syntaxErr("invalid \\u escape", i)
				}
				i += 6
				switch {
				case 0xDC00 <= r && r <= 0xDFFF:
					return i, escaped, syntaxErr("lone surrogate escape", i)
				case 0xD800 <= r && r <= 0xDBFF:
					if i+1 >= len(d) || d[i] != '\\' || d[i+1] != 'u' {
						return i, escaped, syntaxErr("lone surrogate escape", i)
					}
					lo, ok := hex4(d, i+2)
					if !ok || lo < 0xDC00 || lo > 0xDFFF {
						return i, escaped, syntaxErr("lone surrogate escape", i)
					}
					i += 6
				}
			default:
				return i, escaped, syntaxErr("invalid escape", i)
			}
		case c < 0x20:
			return i, escaped, syntaxErr("control character in string", i)
		case c < utf8.RuneSelf:
			i++
		default:
			r, size := utf8.DecodeRune(d[i:])
			if r == utf8.RuneError && size <= 1 {
				return i, escaped, syntaxErr("invalid UTF-8", i)
			}
			i += size
		}
	}
	return i, escaped, syntaxErr("unterminated string", start)
}

func hex4(d []byte, i int) (rune, bool) {
	if i+4 > len(d) {
		return 0, false
	}
	var r rune
	for _, c := range d[i : i+4] {
		r <<= 4
		switch {
		case '0' <= c && c <= '9':
			r |= rune(c - '0')
		case 'a' <= c && c <= 'f':
			r |= rune(c - 'a' + 10)
		case 'A' <= c && c <= 'F':
			r |= rune(c - 'A' + 10)
		default:
			return 0, false
		}
	}
	return r, true
}

func (s *scanner) array(i, depth int) (int, error) {
	if depth++; depth > s.maxDepth {
		return i, errTooDeep(i)
	}
	i = s.ws(i + 1)
	if i < len(s.data) && s.data[i] == ']' {
		return i + 1, nil
	}
	for {
		var err error
		if i, err = s.value(i, depth); err != nil {
			return i, err
		}
		i = s.ws(i)
		if i >= len(s.data) {
			return i, syntaxErr("unterminated array", i)
		}
		switch s.data[i] {
		case ',':
			i = s.ws(i + 1)
		case ']':
			return i + 1, nil
		default:
			return i, syntaxErr("expected , or ] in array", i)
		}
	}
}

func (s *scanner) object(i, depth int) (int, error) {
	if depth++; depth > s.maxDepth {
		return i, errTooDeep(i)
	}
	keysBase, endsBase := len(s.keys), len(s.ends)
	defer func() { s.keys, s.ends = s.keys[:keysBase], s.ends[:endsBase] }()
	var big map[string]struct{}

	i = s.ws(i + 1)
	if i < len(s.data) && s.data[i] == '}' {
		return i + 1, nil
	}
	for {
		if i >= len(s.data) || s.data[i] != '"' {
			return i, syntaxErr("expected a key", i)
		}
		end, esc, err := s.str(i)
		if err != nil {
			return end, err
		}
		if !s.noDup {
			if err := s.addKey(i, end, esc, keysBase, endsBase, &big); err != nil {
				return i, err
			}
		}

		i = s.ws(end)
		if i >= len(s.data) || s.data[i] != ':' {
			return i, syntaxErr("expected : after a key", i)
		}
		if i, err = s.value(s.ws(i+1), depth); err != nil {
			return i, err
		}
		i = s.ws(i)
		if i >= len(s.data) {
			return i, syntaxErr("unterminated object", i)
		}
		switch s.data[i] {
		case ',':
			i = s.ws(i + 1)
		case '}':
			return i + 1, nil
		default:
			return i, syntaxErr("expected , or } in object", i)
		}
	}
}

// addKey records the key of the string s.data[i:end] for the object whose keys start at
// keysBase/endsBase, and refuses it if the object already has it (folded).
func (s *scanner) addKey(i, end int, esc bool, keysBase, endsBase int, big *map[string]struct{}) error {
	k0 := len(s.keys)
	s.keys = s.appendFolded(s.keys, s.data[i+1:end-1], esc)
	key := s.keys[k0:]
	n := len(s.ends) - endsBase
	switch {
	case *big != nil:
		if _, dup := (*big)[string(key)]; dup {
			return errDuplicate(i)
		}
		(*big)[string(key)] = struct{}{}
	default:
		prev := keysBase
		for _, e := range s.ends[endsBase:] {
			if bytes.Equal(s.keys[prev:e], key) {
				return errDuplicate(i)
			}
			prev = e
		}
		if n+1 > smallObject {
			m := make(map[string]struct{}, 2*smallObject)
			prev := keysBase
			for _, e := range s.ends[endsBase:] {
				m[string(s.keys[prev:e])] = struct{}{}
				prev = e
			}
			m[string(key)] = struct{}{}
			*big = m
		}
	}
	s.ends = append(s.ends, len(s.keys))
	return nil
}

// appendFolded appends the case-folded form of the raw (still escaped, already validated)
// string contents: every rune becomes the smallest rune of its simple case-folding orbit, so
// two keys fold equal exactly when strings.EqualFold would call them equal ("K", "k" and the
// Kelvin sign all fold to "K").
func (s *scanner) appendFolded(dst, raw []byte, escaped bool) []byte {
	if escaped {
		s.tmp = appendUnescaped(s.tmp[:0], raw)
		raw = s.tmp
	}
	for i := 0; i < len(raw); {
		c := raw[i]
		if c < utf8.RuneSelf {
			if 'a' <= c && c <= 'z' {
				c -= 'a' - 'A'
			}
			// 'K' and 'S' have non-ASCII orbit members but are their orbits' minimum anyway.
			dst = append(dst, c)
			i++
			continue
		}
		r, size := utf8.DecodeRune(raw[i:])
		i += size
		m := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			m = min(m, f)
		}
		dst = utf8.AppendRune(dst, m)
	}
	return dst
}

// appendUnescaped appends the decoded contents of a validated JSON string (without quotes).
func appendUnescaped(dst, raw []byte) []byte {
	for i := 0; i < len(raw); {
		c := raw[i]
		if c != '\\' {
			dst = append(dst, c)
			i++
			continue
		}
		switch e := raw[i+1]; e {
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r, _ := hex4(raw, i+2)
			if 0xD800 <= r && r <= 0xDBFF {
				lo, _ := hex4(raw, i+8)
				r = 0x10000 + (r-0xD800)<<10 + (lo - 0xDC00)
				i += 6
			}
			dst = utf8.AppendRune(dst, r)
			i += 6
			continue
		default: // " \ /
			dst = append(dst, e)
		}
		i += 2
	}
	return dst
}

// skip returns the index after the (validated) value starting at i. It re-scans without the
// checks, which validate already made.
func skip(d []byte, i int) int {
	switch d[i] {
	case '{', '[':
		depth := 0
		for ; i < len(d); i++ {
			switch d[i] {
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			case '"':
				i = skipString(d, i) - 1
			}
		}
		return i
	case '"':
		return skipString(d, i)
	}
	for i < len(d) {
		switch d[i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return i
		}
		i++
	}
	return i
}

func skipString(d []byte, i int) int {
	for i++; i < len(d); i++ {
		switch d[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return i
}

func wsAt(d []byte, i int) int {
	for i < len(d) && (d[i] == ' ' || d[i] == '\t' || d[i] == '\n' || d[i] == '\r') {
		i++
	}
	return i
}

// member is one key and value of a validated JSON object: key is decoded (valid only during
// the callback), value is raw, and [start, end) is where the value sits in the object's bytes.
type member struct {
	key        []byte
	value      []byte
	start, end int
}

// eachMember calls fn for each member of the validated object obj (which starts at '{'), in
// order, until fn returns false. Keys are compared by the caller exactly, as the JSON-RPC
// server will: the scanner already refused keys equal under case folding.
func eachMember(obj []byte, fn func(m member) bool) {
	i := wsAt(obj, 1)
	var buf []byte
	for i < len(obj) && obj[i] == '"' {
		end := skipString(obj, i)
		raw := obj[i+1 : end-1]
		key := raw
		if bytes.IndexByte(raw, '\\') >= 0 {
			buf = appendUnescaped(buf[:0], raw)
			key = buf
		}
		i = wsAt(obj, wsAt(obj, end)+1) // past ':'
		vend := skip(obj, i)
		if !fn(member{key: key, value: obj[i:vend], start: i, end: vend}) {
			return
		}
		i = wsAt(obj, vend)
		if i < len(obj) && obj[i] == ',' {
			i = wsAt(obj, i+1)
		}
	}
}

// eachElement calls fn for each element of the validated array arr (which starts at '['),
// with its bounds in arr.
func eachElement(arr []byte, fn func(v []byte, start, end int) bool) {
	i := wsAt(arr, 1)
	for i < len(arr) && arr[i] != ']' {
		end := skip(arr, i)
		if !fn(arr[i:end], i, end) {
			return
		}
		i = wsAt(arr, end)
		if i < len(arr) && arr[i] == ',' {
			i = wsAt(arr, i+1)
		}
	}
}

// decodeValue decodes the validated JSON value at d[i:] as encoding/json would into an any
// with UseNumber (map[string]any, []any, string, json.Number, bool, nil), in one pass, and
// returns the index after it.
func decodeValue(d []byte, i int) (any, int) {
	switch d[i] {
	case '{':
		m := map[string]any{}
		i = wsAt(d, i+1)
		if d[i] == '}' {
			return m, i + 1
		}
		for {
			end := skipString(d, i)
			k := decodeString(d[i+1 : end-1])
			i = wsAt(d, wsAt(d, end)+1) // past ':'
			var v any
			v, i = decodeValue(d, i)
			m[k] = v
			i = wsAt(d, i)
			if d[i] == '}' {
				return m, i + 1
			}
			i = wsAt(d, i+1) // past ','
		}
	case '[':
		a := []any{}
		i = wsAt(d, i+1)
		if d[i] == ']' {
			return a, i + 1
		}
		for {
			var v any
			v, i = decodeValue(d, i)
			a = append(a, v)
			i = wsAt(d, i)
			if d[i] == ']' {
				return a, i + 1
			}
			i = wsAt(d, i+1)
		}
	case '"':
		end := skipString(d, i)
		return decodeString(d[i+1 : end-1]), end
	case 't':
		return true, i + 4
	case 'f':
		return false, i + 5
	case 'n':
		return nil, i + 4
	}
	end := skip(d, i)
	return json.Number(d[i:end]), end
}

func decodeString(raw []byte) string {
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw)
	}
	return string(appendUnescaped(make([]byte, 0, len(raw)), raw))
}
