package mcp

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
)

// responseMaxDepth bounds the nesting of a tools/list response (tool input schemas nest).
const responseMaxDepth = 512

// ErrResponse is the error a response filter returns (or its body's Read, for SSE) when it
// cannot filter a tools/list response: compressed, of another media type, over
// Options.MaxListBytes, or not valid JSON. The response is then not delivered (fails closed).
var ErrResponse = errors.New("mcp: the tools/list response cannot be filtered")

// ResponseFilter returns the hook that filters the upstream's response to this body's
// tools/list request(s), for ReverseProxy.ModifyResponse; nil when the body held none. The
// hook removes every tool for which allow(name) is false (and any tool without exactly one
// string name: with two, or one in another case, clients would disagree on which it is) from
// the result of each response whose id is one of those requests, keeping every other
// byte: other results and fields (nextCursor: each page of a paginated list is filtered on its
// own), other messages of the stream (notifications pass, notifications/tools/list_changed
// included, so clients list again, and that list is filtered too), and error responses.
//
// A JSON response is read whole (bounded) and replaced; an SSE response is rewritten as it
// streams, one event at a time (each bounded), so other events are not held back. Responses
// other than 200 pass untouched. A response the hook cannot filter (see ErrResponse; also a
// message with two ids or results, or a result with two tools lists) fails:
// the hook returns an error, or the SSE body's Read does, and nothing unfiltered reaches the
// agent. The hook must run once, on this call's response only.
func (c *Call) ResponseFilter(allow func(tool string) bool) func(*http.Response) error {
	if !c.ListsTools() {
		return nil
	}
	f := &listFilter{ids: c.toolsList, allow: allow, max: c.maxList}
	return f.apply
}

// StreamFilter returns the hook that filters the response to a GET of the endpoint (the
// server's SSE stream) for ReverseProxy.ModifyResponse, nil for any other request. A server
// replays responses on that stream when a client resumes a broken one (Last-Event-ID); escrow
// no longer knows which ids were tools/list requests, so every response there whose result has
// a tools list is filtered (and every other event passes as it comes). It drops r's
// Accept-Encoding, as Inspect does for a list.
func (i *Inspector) StreamFilter(r *http.Request, allow func(tool string) bool) func(*http.Response) error {
	if r.Method != http.MethodGet || strings.TrimSuffix(r.URL.Path, "/") != i.path {
		return nil
	}
	r.Header.Del("Accept-Encoding")
	f := &listFilter{anyID: true, allow: allow, max: i.maxList}
	return f.apply
}

type listFilter struct {
	anyID bool     // every response with a tools list is filtered (StreamFilter)
	ids   [][]byte // canonical ids of the tools/list requests
	allow func(string) bool
	max   int64
	s     scanner
}

func (f *listFilter) apply(resp *http.Response) error {
	if resp.StatusCode != http.StatusOK {
		return nil
	}
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return fmt.Errorf("%w: Content-Encoding %q", ErrResponse, ce)
	}
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	switch mt {
	case "application/json":
		body, err := io.ReadAll(io.LimitReader(resp.Body, f.max+1))
		_ = resp.Body.Close()
		if err != nil {
			return fmt.Errorf("mcp: reading the tools/list response: %w", err)
		}
		if int64(len(body)) > f.max {
			return fmt.Errorf("%w: more than %d bytes", ErrResponse, f.max)
		}
		out, err := f.filterPayload(body)
		if err != nil {
			return err
		}
		resp.Body = io.NopCloser(bytes.NewReader(out))
		resp.ContentLength = int64(len(out))
		resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
		return nil
	case "text/event-stream":
		resp.Body = &sseFilter{src: resp.Body, f: f}
		resp.ContentLength = -1
		resp.Header.Del("Content-Length")
		return nil
	}
	return fmt.Errorf("%w: media type %q", ErrResponse, mt)
}

// filterPayload filters one JSON-RPC message or batch; it returns body itself when nothing
// changed.
func (f *listFilter) filterPayload(body []byte) ([]byte, error) {
	f.s.reset(body, responseMaxDepth)
	f.s.noDup = true // the response is the server's: only its validity matters here
	if err := f.s.validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrResponse, err)
	}
	start := wsAt(body, 0)
	switch body[start] {
	case '{':
		m, err := f.filterMessage(body, start, len(body))
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(m, body[start:]) {
			return m, nil
		}
		return body, nil
	case '[':
		var out []byte
		var err error
		last := 0
		eachElement(body[start:], func(v []byte, s, e int) bool {
			if v[0] != '{' {
				return true
			}
			s, e = s+start, e+start
			var m []byte
			if m, err = f.filterMessage(body, s, e); err != nil {
				return false
			}
			if !bytes.Equal(m, body[s:e]) {
				out = append(append(out, body[last:s]...), m...)
				last = e
			}
			return true
		})
		if err != nil {
			return nil, err
		}
		if out == nil {
			return body, nil
		}
		return append(out, body[last:]...), nil
	}
	return body, nil
}

// filterMessage returns body with the message body[s:e] filtered (or body[s:e] alone, as
// is, when it is not a response to one of the tools/list requests).
func (f *listFilter) filterMessage(body []byte, s, e int) ([]byte, error) {
	obj := body[s:e]
	id, _, dupID := member1(obj, "id")
	result, rs, dupResult := member1(obj, "result")
	if dupID || dupResult {
		// Parsers disagree on which of two ids or results counts: do not guess.
		return nil, fmt.Errorf("%w: a response with two ids or results", ErrResponse)
	}
	if id == nil || result == nil || result[0] != '{' || !f.isListID(id) {
		return obj, nil
	}
	tools, ts, dup := member1(result, "tools")
	if dup {
		return nil, fmt.Errorf("%w: a result with two tools lists", ErrResponse)
	}
	if tools == nil || tools[0] != '[' {
		return obj, nil
	}
	kept := make([]byte, 0, len(tools))
	kept = append(kept, '[')
	n := 0
	eachElement(tools, func(tool []byte, _, _ int) bool {
		if f.keep(tool) {
			if n > 0 {
				kept = append(kept, ',')
			}
			kept = append(kept, tool...)
			n++
		}
		return true
	})
	kept = append(kept, ']')
	at := rs + ts // where the tools array starts in obj
	out := make([]byte, 0, len(obj)-len(tools)+len(kept))
	out = append(out, obj[:at]...)
	out = append(out, kept...)
	return append(out, obj[at+len(tools):]...), nil
}

// member1 returns the value of the member key of the validated object obj and where it starts;
// dup reports a second member of that name, or one that differs only in case (which decoders
// read differently: first or last wins, or case is ignored).
func member1(obj []byte, key string) (value []byte, start int, dup bool) {
	seen := 0
	eachMember(obj, func(m member) bool {
		if bytes.EqualFold(m.key, []byte(key)) {
			seen++
			if string(m.key) == key {
				value, start = m.value, m.start
			}
		}
		return true
	})
	return value, start, seen > 1 || (seen == 1 && value == nil)
}

func (f *listFilter) isListID(raw []byte) bool {
	if f.anyID {
		return true
	}
	c := canonicalID(raw)
	for _, id := range f.ids {
		if bytes.Equal(id, c) {
			return true
		}
	}
	return false
}

// keep reports whether a tool (one element of result.tools) stays listed: it has exactly one
// name (a second one, or one in another case, could be the one a client reads) and allow
// says yes.
func (f *listFilter) keep(tool []byte) bool {
	if tool[0] != '{' {
		return false
	}
	name, _, dup := member1(tool, "name")
	n, ok := stringValue(name)
	return !dup && ok && n != "" && f.allow(n)
}

// sseFilter rewrites an SSE stream event by event: an event whose data is a response to a
// tools/list request is re-emitted filtered; every other event passes byte for byte, as soon
// as it is complete.
type sseFilter struct {
	src    io.ReadCloser
	f      *listFilter
	in     []byte // read from src, not yet processed
	out    []byte // processed, not yet returned
	srcErr error  // src's error (io.EOF at the end), returned once in is drained
	failed error  // the stream cannot be filtered: returned at once, nothing more is passed
}

func (s *sseFilter) Close() error { return s.src.Close() }

func (s *sseFilter) Read(p []byte) (int, error) {
	for len(s.out) == 0 {
		if s.failed != nil {
			return 0, s.failed
		}
		end := eventEnd(s.in)
		if int64(end) > s.f.max || (end < 0 && int64(len(s.in)) > s.f.max) {
			s.failed = fmt.Errorf("%w: an event of more than %d bytes", ErrResponse, s.f.max)
			continue
		}
		if end >= 0 {
			ev := s.in[:end]
			s.in = s.in[end:]
			s.out, s.failed = s.f.filterEvent(ev)
			continue
		}
		if s.srcErr != nil {
			// An incomplete last event is dropped, as an SSE client would.
			return 0, s.srcErr
		}
		// Nothing is pending in out, so the buffer may be moved.
		if cap(s.in)-len(s.in) < 4<<10 {
			buf := make([]byte, len(s.in), max(2*cap(s.in), 32<<10))
			copy(buf, s.in)
			s.in = buf
		}
		n, err := s.src.Read(s.in[len(s.in):cap(s.in)])
		s.in = s.in[:len(s.in)+n]
		s.srcErr = err
	}
	n := copy(p, s.out)
	s.out = s.out[n:]
	return n, nil
}

// eventEnd returns the length of the first complete event in b (up to and including the blank
// line that ends it), or -1. Lines end with CRLF, LF or CR; a CR at the very end of b is not
// yet known to be a whole line ending.
func eventEnd(b []byte) int {
	lineStart := true
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c != '\r' && c != '\n' {
			lineStart = false
			continue
		}
		if c == '\r' {
			if i+1 == len(b) {
				return -1
			}
			if b[i+1] == '\n' {
				i++
			}
		}
		if lineStart {
			return i + 1
		}
		lineStart = true
	}
	return -1
}

// filterEvent returns the event ev, filtered when its data is a response to one of the
// tools/list requests.
func (f *listFilter) filterEvent(ev []byte) ([]byte, error) {
	var data []byte
	var other [][]byte
	hasData, n := false, 0
	for rest := ev; len(rest) > 0; {
		line, next := cutLine(rest)
		rest = next
		content := bytes.TrimRight(line, "\r\n")
		if len(content) == 0 {
			continue
		}
		field, value, found := bytes.Cut(content, []byte(":"))
		if string(field) != "data" {
			other = append(other, line)
			continue
		}
		if found && len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
		switch {
		case !hasData:
			data, hasData = value, true // one data line (the usual case): no copy
		case n == 1:
			data = append(append(append(make([]byte, 0, 2*len(data)+len(value)), data...), '\n'), value...)
		default:
			data = append(append(data, '\n'), value...)
		}
		n++
	}
	if !hasData {
		return ev, nil
	}
	if i := wsAt(data, 0); i == len(data) || (data[i] != '{' && data[i] != '[') {
		return ev, nil
	}
	out, err := f.filterPayload(data)
	if err != nil {
		return nil, err
	}
	if bytes.Equal(out, data) {
		return ev, nil
	}
	var b []byte
	for _, l := range other {
		b = append(b, l...)
		if l[len(l)-1] != '\n' && l[len(l)-1] != '\r' {
			b = append(b, '\n')
		}
	}
	for l := range bytes.SplitSeq(out, []byte("\n")) {
		b = append(append(append(b, "data: "...), bytes.TrimSuffix(l, []byte("\r"))...), '\n')
	}
	return append(b, '\n'), nil
}

// cutLine splits off the first line of b, with its ending (CRLF, LF or CR).
func cutLine(b []byte) (line, rest []byte) {
	for i, c := range b {
		switch c {
		case '\n':
			return b[:i+1], b[i+1:]
		case '\r':
			if i+1 < len(b) && b[i+1] == '\n' {
				return b[:i+2], b[i+2:]
			}
			return b[:i+1], b[i+1:]
		}
	}
	return b, nil
}
