package mcp

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/policy"
)

// Defaults of Options.
const (
	DefaultMaxMessageBytes = 1 << 20 // as the config's default for upstreams[].mcp.max_message_bytes
	DefaultMaxDepth        = 64
	DefaultMaxBatch        = 100
	DefaultMaxListBytes    = 16 << 20
)

// Options configure an Inspector for one MCP upstream.
type Options struct {
	// Path is the MCP endpoint (upstreams[].mcp.path), e.g. "/mcp". Required.
	Path string
	// MaxMessageBytes bounds a POSTed body (upstreams[].mcp.max_message_bytes); 0 means
	// DefaultMaxMessageBytes. A larger body is refused, never forwarded unparsed.
	MaxMessageBytes int64
	// MaxDepth bounds the nesting of arrays and objects in a body; 0 means DefaultMaxDepth.
	MaxDepth int
	// MaxBatch bounds the number of messages in a batch; 0 means DefaultMaxBatch.
	MaxBatch int
	// MaxListBytes bounds a tools/list response the filter reads: a JSON body, or one SSE
	// event; 0 means DefaultMaxListBytes. A larger one fails the response (closed).
	MaxListBytes int64
}

// OptionsFrom returns the options of an upstream's mcp block (config upstreams[].mcp): its
// path (config.DefaultMCPPath when empty) and max_message_bytes; the other limits keep their
// defaults.
func OptionsFrom(m config.MCP) Options {
	o := Options{Path: m.Path, MaxMessageBytes: m.MaxMessageBytes}
	if o.Path == "" {
		o.Path = config.DefaultMCPPath
	}
	return o
}

// Inspector parses the JSON-RPC messages POSTed to one MCP upstream's endpoint. It is
// immutable and safe for concurrent use.
type Inspector struct {
	path     string
	maxBytes int64
	maxDepth int
	maxBatch int
	maxList  int64
}

// New checks o and returns an Inspector.
func New(o Options) (*Inspector, error) {
	if o.Path == "" || o.Path[0] != '/' {
		return nil, fmt.Errorf("mcp: path %q must start with /", o.Path)
	}
	if o.MaxMessageBytes < 0 || o.MaxDepth < 0 || o.MaxBatch < 0 || o.MaxListBytes < 0 {
		return nil, errors.New("mcp: limits must not be negative")
	}
	i := &Inspector{
		path: strings.TrimSuffix(o.Path, "/"), maxBytes: o.MaxMessageBytes, maxDepth: o.MaxDepth,
		maxBatch: o.MaxBatch, maxList: o.MaxListBytes,
	}
	if i.maxBytes == 0 {
		i.maxBytes = DefaultMaxMessageBytes
	}
	if i.maxDepth == 0 {
		i.maxDepth = DefaultMaxDepth
	}
	if i.maxBatch == 0 {
		i.maxBatch = DefaultMaxBatch
	}
	if i.maxList == 0 {
		i.maxList = DefaultMaxListBytes
	}
	return i, nil
}

// Applies reports whether r carries JSON-RPC messages to inspect: a POST to the endpoint path
// (a trailing slash ignored; the decoded path, so "/m%63p" is "/mcp"). Every other request on
// the host (the GET stream, session DELETE, other paths) is decided as plain HTTP only.
func (i *Inspector) Applies(r *http.Request) bool {
	return r.Method == http.MethodPost && strings.TrimSuffix(r.URL.Path, "/") == i.path
}

// Kind says what a JSON-RPC message is.
type Kind uint8

// Kinds of message.
const (
	KindRequest      Kind = iota + 1 // a method and an id
	KindNotification                 // a method and no id
	KindResponse                     // an id and a result or an error (the client answering a server request)
)

// Message is one JSON-RPC message of a POSTed body.
type Message struct {
	Kind   Kind
	Method string          // "" for a response
	ID     json.RawMessage // as sent; nil for a notification
	// Name is the tool or prompt name (tools/call, prompts/get) or the URI (resources/read).
	Name string
	// Arguments is the raw "arguments" of a tools/call or prompts/get, nil when absent.
	Arguments json.RawMessage
	// decide is the index of the message's policy input in Call.Inputs, or -1.
	decide int
}

// Call is what Inspect found in one POSTed body.
type Call struct {
	Batch           bool
	Session         string // Mcp-Session-Id
	ProtocolVersion string // MCP-Protocol-Version
	Messages        []Message

	inputs    []policy.Input
	decided   []int    // message index of each input
	toolsList [][]byte // canonical ids of the tools/list requests
	sseOnly   bool     // the client accepts text/event-stream and not JSON
	maxList   int64    // Inspector.maxList
}

// Inputs returns one policy input per tools/call, resources/read and prompts/get message, in
// body order; empty when the body holds none (initialize, tools/list, notifications...). Each
// is the request's own input (the base passed to Inspect) with Action, Resource and MCP set:
//
//	tools/call     → Action "tools/call",     Resource{Tool,     "<host>/<name>"}
//	resources/read → Action "resources/read", Resource{Resource, "<host>/<uri>"}
//	prompts/get    → Action "prompts/get",    Resource{Prompt,   "<host>/<name>"}
//
// with MCP {Method, Name, Arguments decoded with UseNumber}. Identity and Time are the
// caller's to fill in. Every input must be allowed for the body to be forwarded.
func (c *Call) Inputs() []policy.Input { return c.inputs }

// ListsTools reports whether the body holds a tools/list request, whose response the filter of
// Call.ResponseFilter must rewrite.
func (c *Call) ListsTools() bool { return len(c.toolsList) > 0 }

// Audit is what an audit record keeps of one MCP message (record field "mcp").
type Audit struct {
	Method string `json:"method,omitempty"`
	// Tool is the tool or prompt name or the resource URI of a decided call.
	Tool string `json:"tool,omitempty"`
	// JSONRPCID is the id as sent, in JSON: a number, or a string with its quotes.
	JSONRPCID string `json:"jsonrpc_id,omitempty"`
	Session   string `json:"session,omitempty"`
	// ArgumentsSHA256 is the hex SHA-256 of the arguments' bytes exactly as sent, so a record
	// can be matched to a server's log without keeping the arguments.
	ArgumentsSHA256 string `json:"arguments_sha256,omitempty"`
	// Arguments are the arguments as sent, only when asked for (audit.mcp_arguments: they may
	// hold data the record should not keep by default).
	Arguments json.RawMessage `json:"arguments,omitempty"`
}

// Audit returns one entry per message of the body, in order. withArguments adds the
// arguments themselves (audit.mcp_arguments); by default only their hash is kept.
func (c *Call) Audit(withArguments bool) []Audit {
	out := make([]Audit, len(c.Messages))
	for i, m := range c.Messages {
		a := Audit{Method: m.Method, Tool: m.Name, JSONRPCID: string(m.ID), Session: c.Session}
		if m.Arguments != nil {
			sum := sha256.Sum256(m.Arguments)
			a.ArgumentsSHA256 = hex.EncodeToString(sum[:])
			if withArguments {
				a.Arguments = m.Arguments
			}
		}
		out[i] = a
	}
	return out
}

// Inspect reads r's body (bounded by MaxMessageBytes), parses it as one JSON-RPC 2.0 message
// or a batch, and puts back an equivalent body (the same bytes) for the upstream. base is the
// request's own policy input (host, path, credential...); the host names the MCP entities.
// Bad input is an *Error (see the Err* kinds): the caller denies the request with WriteError
// and forwards nothing. Inspect also drops the request's Accept-Encoding when the body lists
// tools, so the response comes uncompressed for the filter.
func (i *Inspector) Inspect(r *http.Request, base policy.Input) (*Call, error) {
	body, err := i.readBody(r)
	if err != nil {
		return nil, err
	}
	c, err := i.parse(body, base.Host)
	if err != nil {
		return nil, err
	}
	for k, own := range c.inputs {
		in := base
		in.Action, in.Resource, in.MCP = own.Action, own.Resource, own.MCP
		c.inputs[k] = in
	}
	c.Session = r.Header.Get("Mcp-Session-Id")
	c.ProtocolVersion = r.Header.Get("Mcp-Protocol-Version")
	c.sseOnly = acceptsOnlySSE(r.Header)
	c.maxList = i.maxList
	if err := checkHeaders(r.Header, c); err != nil {
		return nil, err
	}
	if c.ListsTools() {
		r.Header.Del("Accept-Encoding")
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	return c, nil
}

func (i *Inspector) readBody(r *http.Request) ([]byte, error) {
	if ce := r.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return nil, invalid("content-encoded body (%q)", ce)
	}
	if r.ContentLength > i.maxBytes {
		return nil, &Error{Kind: ErrTooLarge, Detail: "Content-Length " + strconv.FormatInt(r.ContentLength, 10)}
	}
	if r.Body == nil || r.Body == http.NoBody {
		return nil, syntaxErr("empty body", 0)
	}
	defer r.Body.Close()
	size := i.maxBytes + 1
	if r.ContentLength >= 0 {
		size = r.ContentLength + 1 // one more byte to see a body longer than announced
	}
	buf := bytes.NewBuffer(make([]byte, 0, min(size, 64<<10)))
	n, err := buf.ReadFrom(io.LimitReader(r.Body, i.maxBytes+1))
	if err != nil {
		return nil, fmt.Errorf("mcp: reading the body: %w", err)
	}
	if n > i.maxBytes {
		return nil, &Error{Kind: ErrTooLarge, Detail: "more than " + strconv.FormatInt(i.maxBytes, 10) + " bytes"}
	}
	return buf.Bytes(), nil
}

// parse validates body and extracts its messages. host names the MCP entities.
func (i *Inspector) parse(body []byte, host string) (*Call, error) {
	var s scanner
	s.reset(body, i.maxDepth)
	if err := s.validate(); err != nil {
		return nil, err
	}
	host = normalizeHost(host)
	c := &Call{}
	start := wsAt(body, 0)
	switch body[start] {
	case '{':
		if err := c.add(body[start:], host); err != nil {
			return nil, err
		}
	case '[':
		c.Batch = true
		var err error
		n := 0
		eachElement(body[start:], func(v []byte, _, _ int) bool {
			if n++; n > i.maxBatch {
				err = invalid("batch of more than %d messages", i.maxBatch)
				return false
			}
			if v[0] != '{' {
				err = invalid("batch element %d is not an object", n-1)
				return false
			}
			if err = c.add(v, host); err != nil {
				if e, ok := err.(*Error); ok {
					e.ID = nil // the id of one element does not answer a batch
					e.Detail = fmt.Sprintf("batch element %d: %s", n-1, e.Detail)
				}
				return false
			}
			return true
		})
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, invalid("empty batch")
		}
	default:
		return nil, invalid("the body is neither an object nor an array")
	}
	return c, nil
}

// envelope is the raw members of one JSON-RPC message.
type envelope struct {
	jsonrpc, id, method, params, result, errv []byte
}

// add parses one message (a validated object) and appends it to c.
func (c *Call) add(obj []byte, host string) error {
	var e envelope
	var bad *Error
	eachMember(obj, func(m member) bool {
		if bad = caseVariant(m.key, envelopeKeys); bad != nil {
			return false
		}
		switch string(m.key) {
		case "jsonrpc":
			e.jsonrpc = m.value
		case "id":
			e.id = m.value
		case "method":
			e.method = m.value
		case "params":
			e.params = m.value
		case "result":
			e.result = m.value
		case "error":
			e.errv = m.value
		}
		return true
	})
	if bad != nil {
		return bad
	}
	msg := Message{decide: -1}
	if e.id != nil {
		switch e.id[0] {
		case '"', '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
			msg.ID = json.RawMessage(e.id)
		case 'n':
			if e.method != nil {
				return invalid("a request id must be a string or a number")
			}
			msg.ID = json.RawMessage(e.id) // an error response to an unparsable request
		default:
			return invalid("the id must be a string or a number")
		}
	}
	if string(e.jsonrpc) != `"2.0"` {
		return &Error{Kind: ErrInvalid, Detail: `"jsonrpc" is not "2.0"`, ID: msg.ID}
	}
	switch {
	case e.method != nil:
		if e.result != nil || e.errv != nil {
			return &Error{Kind: ErrInvalid, Detail: "a message with both a method and a result or error", ID: msg.ID}
		}
		method, ok := stringValue(e.method)
		if !ok || method == "" {
			return &Error{Kind: ErrInvalid, Detail: "the method is not a non-empty string", ID: msg.ID}
		}
		msg.Method, msg.Kind = method, KindNotification
		if msg.ID != nil {
			msg.Kind = KindRequest
		}
	case msg.ID != nil && (e.result != nil) != (e.errv != nil):
		msg.Kind = KindResponse
	default:
		return &Error{Kind: ErrInvalid, Detail: "a message with no method that is not a response", ID: msg.ID}
	}

	var in policy.Input
	switch msg.Method {
	case policy.ActionToolsCall, policy.ActionPromptsGet, policy.ActionResourcesRead:
		if msg.Kind != KindRequest {
			return invalid("%s sent as a notification", msg.Method)
		}
		if err := msg.callParams(e.params); err != nil {
			err.ID = msg.ID
			return err
		}
		call := &policy.MCPCall{Method: msg.Method, Name: msg.Name}
		if msg.Arguments != nil {
			args, _ := decodeValue(msg.Arguments, 0) // an object: callParams checked
			call.Arguments = args.(map[string]any)
		}
		in = policy.Input{Action: msg.Method, MCP: call}
		switch msg.Method {
		case policy.ActionToolsCall:
			in.Resource = policy.Resource{Type: policy.TypeTool, ID: host + "/" + msg.Name}
		case policy.ActionPromptsGet:
			in.Resource = policy.Resource{Type: policy.TypePrompt, ID: host + "/" + msg.Name}
		default:
			in.Resource = policy.Resource{Type: policy.TypeResource, ID: host + "/" + msg.Name}
		}
		msg.decide = len(c.inputs)
		c.inputs = append(c.inputs, in)
		c.decided = append(c.decided, len(c.Messages))
	case "tools/list":
		if msg.Kind == KindRequest {
			c.toolsList = append(c.toolsList, canonicalID(msg.ID))
		}
	}
	c.Messages = append(c.Messages, msg)
	return nil
}

// callParams reads the name (or uri) and arguments of a decided call.
func (m *Message) callParams(params []byte) *Error {
	if params == nil || params[0] != '{' {
		return invalid("%s without params", m.Method)
	}
	field := "name"
	if m.Method == policy.ActionResourcesRead {
		field = "uri"
	}
	var name, args []byte
	var bad *Error
	eachMember(params, func(mb member) bool {
		if bad = caseVariant(mb.key, paramKeys); bad != nil {
			return false
		}
		switch string(mb.key) {
		case field:
			name = mb.value
		case "arguments":
			if m.Method != policy.ActionResourcesRead {
				args = mb.value
			}
		}
		return true
	})
	if bad != nil {
		return bad
	}
	n, ok := stringValue(name)
	if !ok || n == "" {
		return invalid("%s without a %s", m.Method, field)
	}
	m.Name = n
	if args != nil {
		switch args[0] {
		case '{':
			m.Arguments = json.RawMessage(args)
		case 'n': // null: no arguments
		default:
			return invalid("%s arguments are not an object", m.Method)
		}
	}
	return nil
}

// The members escrow reads, of a message and of a decided call's params.
var (
	envelopeKeys = []string{"jsonrpc", "id", "method", "params", "result", "error"}
	paramKeys    = []string{"name", "uri", "arguments"}
)

// caseVariant refuses a key that is one of names but for case ("Arguments", "NAME"). escrow
// reads members by their exact name, as JSON-RPC servers in most languages do, but Go's
// encoding/json matches struct fields ignoring case: a server built on it would execute the
// call with the "Arguments" escrow did not decide on.
func caseVariant(key []byte, names []string) *Error {
	for _, n := range names {
		if string(key) != n && bytes.EqualFold(key, []byte(n)) {
			return invalid("member %q differs from %q only in case", key, n)
		}
	}
	return nil
}

// stringValue decodes a raw JSON string value; ok is false for any other value.
func stringValue(raw []byte) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' {
		return "", false
	}
	inner := raw[1 : len(raw)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return string(inner), true
	}
	return string(appendUnescaped(nil, inner)), true
}

// canonicalID is an id in a form that compares equal however it was spelled: a string's
// decoded value, a number's digits without a fraction or exponent when it has none.
func canonicalID(raw []byte) []byte {
	if len(raw) > 0 && raw[0] == '"' {
		s, _ := stringValue(raw)
		return append([]byte{'s'}, s...)
	}
	if n, err := strconv.ParseInt(string(raw), 10, 64); err == nil {
		return strconv.AppendInt([]byte{'n'}, n, 10)
	}
	if f, err := strconv.ParseFloat(string(raw), 64); err == nil {
		return strconv.AppendFloat([]byte{'n'}, f, 'g', -1, 64)
	}
	return append([]byte{'r'}, raw...)
}

// normalizeHost lower-cases the host and removes one trailing dot, as the policy engine does
// for Host entities, so "<host>/<name>" names the same host the request was decided on.
func normalizeHost(h string) string {
	h = strings.ToLower(h)
	if len(h) > 1 {
		h = strings.TrimSuffix(h, ".")
	}
	return h
}

// checkHeaders refuses a single message whose Mcp-Method or Mcp-Name header (protocol
// 2026-07-28 and later) says something else than its body: a server or gateway that routes on
// the headers must not see a call other than the one decided.
func checkHeaders(h http.Header, c *Call) error {
	hm, hn := h.Values("Mcp-Method"), h.Values("Mcp-Name")
	if len(hm) == 0 && len(hn) == 0 {
		return nil
	}
	if c.Batch || len(hm) > 1 || len(hn) > 1 {
		return &Error{Kind: ErrHeaderMismatch, Detail: "Mcp-Method or Mcp-Name on a batch, or repeated"}
	}
	m := c.Messages[0]
	if len(hm) == 1 && hm[0] != m.Method {
		return &Error{Kind: ErrHeaderMismatch, Detail: "Mcp-Method", ID: m.ID}
	}
	if len(hn) == 1 {
		name := hn[0]
		if b64, ok := strings.CutPrefix(name, "=?base64?"); ok {
			if b64, ok = strings.CutSuffix(b64, "?="); ok {
				dec, err := base64.StdEncoding.DecodeString(b64)
				if err != nil {
					return &Error{Kind: ErrHeaderMismatch, Detail: "Mcp-Name is not valid base64", ID: m.ID}
				}
				name = string(dec)
			}
		}
		if name != m.Name {
			return &Error{Kind: ErrHeaderMismatch, Detail: "Mcp-Name", ID: m.ID}
		}
	}
	return nil
}

// acceptsOnlySSE reports whether the Accept header admits text/event-stream but no JSON.
func acceptsOnlySSE(h http.Header) bool {
	sse, js := false, false
	for _, v := range h.Values("Accept") {
		for part := range strings.SplitSeq(v, ",") {
			mt, params, err := mime.ParseMediaType(strings.TrimSpace(part))
			if err != nil || params["q"] == "0" {
				continue
			}
			switch mt {
			case "text/event-stream":
				sse = true
			case "application/json", "application/*", "*/*":
				js = true
			}
		}
	}
	return sse && !js
}
