package mcp

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/policy"
)

const testHost = "mcp.example.test"

func newTestInspector(t testing.TB, o Options) *Inspector {
	t.Helper()
	if o.Path == "" {
		o.Path = "/mcp"
	}
	i, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return i
}

func postMCP(body string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "https://"+testHost+"/mcp", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Accept", "application/json, text/event-stream")
	return r
}

func baseInput() policy.Input {
	return policy.Input{Action: "POST", Scheme: "https", Host: "MCP.Example.Test.", Port: 443, Path: "/mcp", Credential: "mcp-token"}
}

func TestInspect_ToolsCallBecomesOneDecisionWithArguments(t *testing.T) {
	body := `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/workspace/a","limit":12345678901234567890,"opts":{"follow":true}}}}`
	r := postMCP(body)
	r.Header.Set("Mcp-Session-Id", "sess-1")
	r.Header.Set("Mcp-Protocol-Version", "2025-06-18")
	c, err := newTestInspector(t, Options{}).Inspect(r, baseInput())
	if err != nil {
		t.Fatal(err)
	}
	ins := c.Inputs()
	if len(ins) != 1 {
		t.Fatalf("inputs = %d, want 1", len(ins))
	}
	in := ins[0]
	if in.Action != policy.ActionToolsCall || in.Resource != (policy.Resource{Type: policy.TypeTool, ID: testHost + "/read_file"}) {
		t.Errorf("action/resource = %q %+v", in.Action, in.Resource)
	}
	if in.Scheme != "https" || in.Port != 443 || in.Path != "/mcp" || in.Credential != "mcp-token" {
		t.Errorf("the request's own fields were not kept: %+v", in)
	}
	if in.MCP == nil || in.MCP.Method != "tools/call" || in.MCP.Name != "read_file" {
		t.Fatalf("MCP = %+v", in.MCP)
	}
	if got := in.MCP.Arguments["path"]; got != "/workspace/a" {
		t.Errorf("arguments.path = %v", got)
	}
	if got, ok := in.MCP.Arguments["limit"].(json.Number); !ok || got.String() != "12345678901234567890" {
		t.Errorf("arguments.limit = %#v, want the json.Number as sent", in.MCP.Arguments["limit"])
	}
	if got, ok := in.MCP.Arguments["opts"].(map[string]any); !ok || got["follow"] != true {
		t.Errorf("arguments.opts = %#v", in.MCP.Arguments["opts"])
	}
	// The upstream receives the same bytes.
	fwd, _ := io.ReadAll(r.Body)
	if string(fwd) != body || r.ContentLength != int64(len(body)) {
		t.Errorf("forwarded body = %q (len %d), want the original", fwd, r.ContentLength)
	}
	a := c.Audit(false)
	args := `{"path":"/workspace/a","limit":12345678901234567890,"opts":{"follow":true}}`
	sum := sha256.Sum256([]byte(args))
	want := Audit{Method: "tools/call", Tool: "read_file", JSONRPCID: "7", Session: "sess-1", ArgumentsSHA256: hex.EncodeToString(sum[:])}
	if len(a) != 1 || !equalAudit(a[0], want) {
		t.Errorf("audit = %+v, want %+v", a, want)
	}
	if a[0].Arguments != nil {
		t.Error("arguments recorded without being asked for")
	}
	if got := c.Audit(true)[0].Arguments; string(got) != args {
		t.Errorf("audit with arguments = %s", got)
	}
	if c.ProtocolVersion != "2025-06-18" || c.Session != "sess-1" {
		t.Errorf("headers = %q %q", c.ProtocolVersion, c.Session)
	}
}

func equalAudit(a, b Audit) bool {
	return a.Method == b.Method && a.Tool == b.Tool && a.JSONRPCID == b.JSONRPCID && a.Session == b.Session &&
		a.ArgumentsSHA256 == b.ArgumentsSHA256 && bytes.Equal(a.Arguments, b.Arguments)
}

func TestInspect_ResourcesReadAndPromptsGetNameTheirEntities(t *testing.T) {
	body := `[{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///workspace/README.md"}},` +
		`{"jsonrpc":"2.0","id":"b","method":"prompts/get","params":{"name":"review","arguments":{"lang":"go"}}},` +
		`{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}]`
	c, err := newTestInspector(t, Options{}).Inspect(postMCP(body), baseInput())
	if err != nil {
		t.Fatal(err)
	}
	if !c.Batch || len(c.Messages) != 3 {
		t.Fatalf("batch=%v messages=%d", c.Batch, len(c.Messages))
	}
	ins := c.Inputs()
	if len(ins) != 2 {
		t.Fatalf("inputs = %d, want 2", len(ins))
	}
	if ins[0].Action != policy.ActionResourcesRead || ins[0].Resource != (policy.Resource{Type: policy.TypeResource, ID: testHost + "/file:///workspace/README.md"}) || ins[0].MCP.Arguments != nil {
		t.Errorf("resources/read input = %+v %+v", ins[0], ins[0].MCP)
	}
	if ins[1].Action != policy.ActionPromptsGet || ins[1].Resource != (policy.Resource{Type: policy.TypePrompt, ID: testHost + "/review"}) || ins[1].MCP.Arguments["lang"] != "go" {
		t.Errorf("prompts/get input = %+v %+v", ins[1], ins[1].MCP)
	}
	if c.Messages[2].Kind != KindNotification || c.Messages[2].ID != nil {
		t.Errorf("notification = %+v", c.Messages[2])
	}
}

func TestInspect_TransportMessagesNeedNoDecision(t *testing.T) {
	for name, body := range map[string]string{
		"initialize":   `{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"c","version":"1"}}}`,
		"initialized":  `{"jsonrpc":"2.0","method":"notifications/initialized"}`,
		"tools/list":   `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"abc"}}`,
		"ping":         `{"jsonrpc":"2.0","id":"p","method":"ping"}`,
		"response":     `{"jsonrpc":"2.0","id":3,"result":{"model":"m","role":"assistant","content":{"type":"text","text":"hi"}}}`,
		"error answer": `{"jsonrpc":"2.0","id":4,"error":{"code":-1,"message":"declined"}}`,
		"escaped keys": `{"jsonr\u0070c":"2.0","id":1,"method":"tools\/list"}`,
	} {
		t.Run(name, func(t *testing.T) {
			r := postMCP(body)
			r.Header.Set("Accept-Encoding", "gzip")
			c, err := newTestInspector(t, Options{}).Inspect(r, baseInput())
			if err != nil {
				t.Fatal(err)
			}
			if len(c.Inputs()) != 0 {
				t.Errorf("inputs = %+v, want none", c.Inputs())
			}
			lists := strings.Contains(body, "tools")
			if c.ListsTools() != lists {
				t.Errorf("ListsTools = %v, want %v", c.ListsTools(), lists)
			}
			if lists == (r.Header.Get("Accept-Encoding") != "") {
				t.Errorf("Accept-Encoding = %q with ListsTools %v: a tools/list response must come uncompressed", r.Header.Get("Accept-Encoding"), lists)
			}
		})
	}
}

func TestInspect_RefusesBadInputWithATypedError(t *testing.T) {
	call := func(params string) string {
		return `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":` + params + `}`
	}
	deep := strings.Repeat(`{"a":`, 65) + "1" + strings.Repeat("}", 65)
	for _, tc := range []struct {
		name, body string
		kind       error
	}{
		{"not JSON", `{"jsonrpc":"2.0",`, ErrMalformed},
		{"empty", ``, ErrMalformed},
		{"trailing data", `{"jsonrpc":"2.0","id":1,"method":"ping"} {}`, ErrMalformed},
		{"invalid UTF-8", "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"read_file\xff\"}}", ErrMalformed},
		{"lone surrogate", call(`{"name":"read_file\ud800"}`), ErrMalformed},
		{"control character", call("{\"name\":\"a\tb\"}"), ErrMalformed},
		{"leading zero", `{"jsonrpc":"2.0","id":01,"method":"ping"}`, ErrMalformed},
		{"too deep", call(`{"name":"x","arguments":` + deep + `}`), ErrTooDeep},
		{"duplicate key", call(`{"name":"search","name":"delete_repo"}`), ErrDuplicateKey},
		{"duplicate key ignoring case", call(`{"name":"read_file","arguments":{"path":"/workspace/a","Path":"/etc/passwd"}}`), ErrDuplicateKey},
		{"duplicate key escaped", call(`{"name":"search","\u006eame":"delete_repo"}`), ErrDuplicateKey},
		{"duplicate key Kelvin sign", call(`{"name":"x","arguments":{"k":1,"\u212a":2}}`), ErrDuplicateKey},
		{"duplicate method", `{"jsonrpc":"2.0","id":1,"method":"tools/list","METHOD":"tools/call"}`, ErrDuplicateKey},
		{"many keys", call(`{"name":"x","arguments":{` + manyKeys(40) + `}}`), nil},
		{"duplicate among many keys", call(`{"name":"x","arguments":{` + manyKeys(40) + `,"K05":0}}`), ErrDuplicateKey},
		{"arguments in another case", call(`{"name":"read_file","Arguments":{"path":"/etc/passwd"}}`), ErrInvalid},
		{"name in another case", call(`{"NAME":"delete_repo"}`), ErrInvalid},
		{"method in another case", `{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"x"}}`, ErrInvalid},
		{"no method", `{"jsonrpc":"2.0","id":1,"params":{}}`, ErrInvalid},
		{"no jsonrpc", `{"id":1,"method":"ping"}`, ErrInvalid},
		{"jsonrpc 1.0", `{"jsonrpc":"1.0","id":1,"method":"ping"}`, ErrInvalid},
		{"method not a string", `{"jsonrpc":"2.0","id":1,"method":7}`, ErrInvalid},
		{"id an object", `{"jsonrpc":"2.0","id":{},"method":"ping"}`, ErrInvalid},
		{"null request id", `{"jsonrpc":"2.0","id":null,"method":"ping"}`, ErrInvalid},
		{"method and result", `{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}`, ErrInvalid},
		{"tools/call without name", call(`{"arguments":{}}`), ErrInvalid},
		{"tools/call empty name", call(`{"name":""}`), ErrInvalid},
		{"tools/call name not a string", call(`{"name":["read_file"]}`), ErrInvalid},
		{"tools/call without params", `{"jsonrpc":"2.0","id":1,"method":"tools/call"}`, ErrInvalid},
		{"tools/call as a notification", `{"jsonrpc":"2.0","method":"tools/call","params":{"name":"delete_repo"}}`, ErrInvalid},
		{"arguments an array", call(`{"name":"x","arguments":["/etc/passwd"]}`), ErrInvalid},
		{"resources/read without uri", `{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"name":"x"}}`, ErrInvalid},
		{"prompts/get without name", `{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{}}`, ErrInvalid},
		{"scalar body", `"tools/call"`, ErrInvalid},
		{"empty batch", `[]`, ErrInvalid},
		{"batch of scalars", `[1]`, ErrInvalid},
		{"batch with a bad element", `[{"jsonrpc":"2.0","id":1,"method":"ping"},` + call(`{}`) + `]`, ErrInvalid},
		{"batch too large", "[" + strings.TrimSuffix(strings.Repeat(`{"jsonrpc":"2.0","method":"n"},`, 101), ",") + "]", ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newTestInspector(t, Options{}).Inspect(postMCP(tc.body), baseInput())
			if tc.kind == nil {
				if err != nil {
					t.Fatalf("err = %v, want none", err)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) || !errors.Is(err, tc.kind) {
				t.Fatalf("err = %v, want an *Error of kind %v", err, tc.kind)
			}
		})
	}
}

func manyKeys(n int) string {
	var b strings.Builder
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`"k` + string(rune('0'+i/10)) + string(rune('0'+i%10)) + `":0`)
	}
	return b.String() // "k00":0,"k01":0,...
}

func TestInspect_RefusesABodyOverTheBoundBeforeReadingIt(t *testing.T) {
	i := newTestInspector(t, Options{MaxMessageBytes: 64})
	big := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"` + strings.Repeat("x", 100) + `"}}`

	// Announced length: refused without reading.
	r := postMCP(big)
	sentinel := &readCounter{r: strings.NewReader(big)}
	r.Body = io.NopCloser(sentinel)
	if _, err := i.Inspect(r, baseInput()); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
	if sentinel.n != 0 {
		t.Errorf("read %d bytes of a body whose Content-Length is over the bound", sentinel.n)
	}
	// Unknown length (chunked): read up to the bound plus one byte.
	r = postMCP(big)
	r.ContentLength = -1
	sentinel = &readCounter{r: strings.NewReader(big)}
	r.Body = io.NopCloser(sentinel)
	if _, err := i.Inspect(r, baseInput()); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
	if sentinel.n > 65+512 {
		t.Errorf("read %d bytes of an unbounded body", sentinel.n)
	}
	// A body longer than its Content-Length is cut there by net/http; a lying ContentLength
	// in a hand-made request still cannot make Inspect read past the bound.
	r = postMCP(big)
	r.ContentLength = 10
	if _, err := i.Inspect(r, baseInput()); !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrMalformed) {
		t.Fatalf("err = %v", err)
	}
}

type readCounter struct {
	r io.Reader
	n int
}

func (c *readCounter) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += n
	return n, err
}

func TestInspect_RefusesEncodedBodies(t *testing.T) {
	r := postMCP(`{"jsonrpc":"2.0","id":1,"method":"ping"}`)
	r.Header.Set("Content-Encoding", "gzip")
	if _, err := newTestInspector(t, Options{}).Inspect(r, baseInput()); !errors.Is(err, ErrInvalid) {
		t.Fatalf("err = %v, want ErrInvalid", err)
	}
}

func TestInspect_RefusesMcpHeadersThatContradictTheBody(t *testing.T) {
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}`
	for _, tc := range []struct {
		method, name string
		ok           bool
	}{
		{"tools/call", "search", true},
		{"tools/call", "=?base64?c2VhcmNo?=", true},
		{"tools/call", "delete_repo", false},
		{"tools/call", "=?base64?ZGVsZXRlX3JlcG8=?=", false},
		{"tools/list", "", false},
	} {
		r := postMCP(body)
		r.Header.Set("Mcp-Method", tc.method)
		if tc.name != "" {
			r.Header.Set("Mcp-Name", tc.name)
		}
		_, err := newTestInspector(t, Options{}).Inspect(r, baseInput())
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrHeaderMismatch)) {
			t.Errorf("Mcp-Method %q Mcp-Name %q: err = %v, want ok=%v", tc.method, tc.name, err, tc.ok)
		}
	}
}

func TestInspector_AppliesToPostsToThePathOnly(t *testing.T) {
	i := newTestInspector(t, Options{Path: "/mcp/"})
	for _, tc := range []struct {
		method, target string
		want           bool
	}{
		{"POST", "/mcp", true},
		{"POST", "/mcp/", true},
		{"POST", "/mcp?session=1", true},
		{"POST", "/m%63p", true},
		{"GET", "/mcp", false},
		{"DELETE", "/mcp", false},
		{"POST", "/mcpx", false},
		{"POST", "/other", false},
	} {
		r := httptest.NewRequest(tc.method, "https://"+testHost+tc.target, nil)
		if got := i.Applies(r); got != tc.want {
			t.Errorf("%s %s: Applies = %v, want %v", tc.method, tc.target, got, tc.want)
		}
	}
	if _, err := New(Options{Path: "mcp"}); err == nil {
		t.Error("a relative path was accepted")
	}
}

func TestDeny_AnswersTheRequestIDWithAJSONRPCError(t *testing.T) {
	c, err := newTestInspector(t, Options{}).Inspect(postMCP(`{"jsonrpc":"2.0","id":"call-9","method":"tools/call","params":{"name":"delete_repo","arguments":{"name":"prod"}}}`), baseInput())
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	c.Deny(w, Denial{Input: 0, Reason: "policy_denied", RequestID: "req-1"})
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/json" || w.Header().Get(ReasonHeader) != "policy_denied" {
		t.Fatalf("status %d headers %v", w.Code, w.Header())
	}
	var got struct {
		JSONRPC string          `json:"jsonrpc"`
		ID      json.RawMessage `json:"id"`
		Error   rpcError        `json:"error"`
		Result  any             `json:"result"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.JSONRPC != "2.0" || string(got.ID) != `"call-9"` || got.Error.Code != CodeDenied || got.Result != nil ||
		got.Error.Message != "escrow denied this call: policy_denied" ||
		got.Error.Data != (ErrorData{Reason: "policy_denied", RequestID: "req-1"}) {
		t.Errorf("denial = %s", w.Body)
	}
}

func TestDeny_RefusesABatchWholeWithPerIDErrors(t *testing.T) {
	body := `[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}},` +
		`{"jsonrpc":"2.0","method":"notifications/progress"},` +
		`{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo"}},` +
		`{"jsonrpc":"2.0","id":3,"method":"ping"}]`
	c, err := newTestInspector(t, Options{}).Inspect(postMCP(body), baseInput())
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	c.Deny(w, Denial{Input: 1, Reason: "policy_denied"})
	var got []rpcResponse
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatalf("%v: %s", err, w.Body)
	}
	want := map[string]string{"1": ReasonBatchDenied, "2": "policy_denied", "3": ReasonBatchDenied}
	if len(got) != len(want) {
		t.Fatalf("answers = %s, want one per request (not the notification)", w.Body)
	}
	for _, g := range got {
		if want[string(g.ID)] != g.Error.Data.Reason || g.Error.Code != CodeDenied {
			t.Errorf("id %s: %+v, want reason %q", g.ID, g.Error, want[string(g.ID)])
		}
	}
}

func TestDeny_AnswersWithAnSSEEventWhenTheClientAcceptsOnlySSE(t *testing.T) {
	r := postMCP(`{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"delete_repo"}}`)
	r.Header.Set("Accept", "text/event-stream")
	c, err := newTestInspector(t, Options{}).Inspect(r, baseInput())
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	c.Deny(w, Denial{Input: 0, Reason: "policy_denied"})
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d content type %q", w.Code, w.Header().Get("Content-Type"))
	}
	data, ok := strings.CutPrefix(w.Body.String(), "event: message\ndata: ")
	data, ok2 := strings.CutSuffix(data, "\n\n")
	var got rpcResponse
	if !ok || !ok2 || json.Unmarshal([]byte(data), &got) != nil || string(got.ID) != "5" || got.Error.Code != CodeDenied {
		t.Errorf("SSE denial = %q", w.Body)
	}
}

func TestWriteError_NamesTheKindAndNeverTheDetail(t *testing.T) {
	secret := "/etc/shadow-SECRET-9d1e"
	_, err := newTestInspector(t, Options{}).Inspect(postMCP(`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"p":"`+secret+`","P":1}}}`), baseInput())
	if !errors.Is(err, ErrDuplicateKey) {
		t.Fatalf("err = %v", err)
	}
	w := httptest.NewRecorder()
	WriteError(w, err, "bad_request", "req-2")
	if w.Code != http.StatusBadRequest || w.Header().Get(ReasonHeader) != "bad_request" {
		t.Fatalf("status %d", w.Code)
	}
	var got rpcResponse
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	// The body is not valid JSON-RPC as escrow reads it: no id of it is trusted.
	if string(got.ID) != "null" || got.Error.Code != CodeParseError || got.Error.Data.Detail != "mcp_duplicate_key" || got.Error.Data.Reason != "bad_request" {
		t.Errorf("error = %s", w.Body)
	}
	if strings.Contains(w.Body.String(), "offset") || strings.Contains(w.Body.String(), secret) {
		t.Errorf("internal detail sent to the agent: %s", w.Body)
	}

	// A well-formed message that is not an acceptable call is answered with its id.
	_, err = newTestInspector(t, Options{}).Inspect(postMCP(`{"jsonrpc":"2.0","id":"x1","method":"tools/call","params":{}}`), baseInput())
	w = httptest.NewRecorder()
	WriteError(w, err, "bad_request", "")
	got = rpcResponse{}
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil || string(got.ID) != `"x1"` || got.Error.Code != CodeInvalidRequest || w.Code != http.StatusBadRequest {
		t.Errorf("tools/call without name: %d %s", w.Code, w.Body)
	}

	w = httptest.NewRecorder()
	WriteError(w, &Error{Kind: ErrTooLarge}, "bad_request", "")
	if w.Code != http.StatusRequestEntityTooLarge || !strings.Contains(w.Body.String(), `"id":null`) {
		t.Errorf("too large: %d %s", w.Code, w.Body)
	}
}

func TestOptionsFrom_TakesTheUpstreamsMCPBlock(t *testing.T) {
	o := OptionsFrom(config.MCP{MaxMessageBytes: 4096})
	if o.Path != config.DefaultMCPPath || o.MaxMessageBytes != 4096 {
		t.Errorf("options = %+v", o)
	}
	i, err := New(OptionsFrom(config.MCP{Path: "/v1/mcp"}))
	if err != nil || !i.Applies(httptest.NewRequest(http.MethodPost, "https://h/v1/mcp", nil)) || i.maxBytes != DefaultMaxMessageBytes {
		t.Errorf("inspector = %+v, %v", i, err)
	}
}
