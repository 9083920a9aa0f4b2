package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzParse checks Inspect on arbitrary bodies: it never panics, refuses with an *Error or
// accepts, and what it accepts is valid JSON that encoding/json (which matches keys ignoring
// case, last one winning) reads as the same method, name and arguments: the call that is
// decided is the call the server sees.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/workspace/a"}}}`,
		`{"jsonrpc":"2.0","id":"x","method":"resources/read","params":{"uri":"file:///a"}}`,
		`{"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"p","arguments":{"a":"b"}}}`,
		`[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","method":"notifications/initialized"}]`,
		`{"jsonrpc":"2.0","id":3,"result":{}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"n\u0061me":"a\ud83d\ude00"}}`,
		`{"jsonrpc":"2.0","id":1e3,"method":"ping","params":[1,2.5e-3,-0,true,false,null]}`,
		`[[[[{}]]]]`,
	} {
		f.Add([]byte(s))
	}
	i, err := New(Options{Path: "/mcp", MaxMessageBytes: 1 << 16, MaxDepth: 16, MaxBatch: 8})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest(http.MethodPost, "https://h.test/mcp", bytes.NewReader(body))
		c, err := i.Inspect(r, baseInput())
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v is not an *Error", err)
			}
			return
		}
		if !json.Valid(body) {
			t.Fatalf("accepted invalid JSON %q", body)
		}
		if fwd, _ := io.ReadAll(r.Body); !bytes.Equal(fwd, body) {
			t.Fatalf("forwarded %q, want %q", fwd, body)
		}
		var msgs []json.RawMessage
		if c.Batch {
			if err := json.Unmarshal(body, &msgs); err != nil {
				t.Fatal(err)
			}
		} else {
			msgs = []json.RawMessage{body}
		}
		if len(msgs) != len(c.Messages) {
			t.Fatalf("%d messages, encoding/json sees %d", len(c.Messages), len(msgs))
		}
		for k, raw := range msgs {
			// encoding/json's struct decoding: case-insensitive keys, last one wins.
			var std struct {
				Method string
				Params struct {
					Name      string
					URI       string
					Arguments map[string]any
				}
			}
			dec := json.NewDecoder(bytes.NewReader(raw))
			dec.UseNumber()
			_ = dec.Decode(&std)
			m := c.Messages[k]
			if std.Method != m.Method {
				t.Fatalf("method %q, encoding/json reads %q in %s", m.Method, std.Method, raw)
			}
			if m.decide < 0 {
				continue
			}
			in := c.Inputs()[m.decide]
			want := std.Params.Name
			if m.Method == "resources/read" {
				want = std.Params.URI
			}
			if in.MCP.Name != want || want == "" || in.Resource.ID != "mcp.example.test/"+want {
				t.Fatalf("name %q (%q), encoding/json reads %q in %s", in.MCP.Name, in.Resource.ID, want, raw)
			}
			a, _ := json.Marshal(in.MCP.Arguments)
			b, _ := json.Marshal(std.Params.Arguments)
			if m.Method != "resources/read" && !bytes.Equal(a, b) {
				t.Fatalf("arguments %s, encoding/json reads %s in %s", a, b, raw)
			}
		}
	})
}

// FuzzResponseFilter checks the tools/list filter on arbitrary responses, JSON or SSE: it never
// panics, and what it lets through never lists a refused tool in the answer to the list.
func FuzzResponseFilter(f *testing.F) {
	list := `{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"search"},{"name":"delete_repo"}],"nextCursor":"x"}}`
	f.Add([]byte(list), false)
	f.Add([]byte("event: message\nid: 1\ndata: "+list+"\n\n"), true)
	f.Add([]byte("data: {\"jsonrpc\":\"2.0\",\r\ndata: \"id\":2,\"result\":{\"tools\":[{\"name\":\"delete_repo\"}]}}\r\n\r\n"), true)
	f.Add([]byte(`[`+list+`,{"jsonrpc":"2.0","id":3,"result":{}}]`), false)
	c, err := newTestInspector(f, Options{MaxListBytes: 1 << 16}).Inspect(postMCP(listReq), baseInput())
	if err != nil {
		f.Fatal(err)
	}
	filter := c.ResponseFilter(func(name string) bool { return name != "delete_repo" })
	f.Fuzz(func(t *testing.T, body []byte, sse bool) {
		ct := "application/json"
		if sse {
			ct = "text/event-stream"
		}
		resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {ct}}, Body: io.NopCloser(bytes.NewReader(body))}
		if err := filter(resp); err != nil {
			return
		}
		out, err := io.ReadAll(resp.Body)
		if err != nil && !errors.Is(err, ErrResponse) {
			t.Fatalf("read error %v", err)
		}
		var payloads [][]byte
		if !sse {
			payloads = [][]byte{out}
		} else {
			// The data of each complete event, as an SSE client assembles it.
			for ev := range strings.SplitSeq(strings.ReplaceAll(strings.ReplaceAll(string(out), "\r\n", "\n"), "\r", "\n"), "\n\n") {
				var data []string
				for l := range strings.SplitSeq(ev, "\n") {
					if v, ok := strings.CutPrefix(l, "data:"); ok {
						data = append(data, strings.TrimPrefix(v, " "))
					} else if l == "data" {
						data = append(data, "")
					}
				}
				payloads = append(payloads, []byte(strings.Join(data, "\n")))
			}
		}
		for _, p := range payloads {
			var msg map[string]json.RawMessage
			if json.Unmarshal(p, &msg) != nil || string(msg["id"]) != "2" {
				continue
			}
			var res map[string]json.RawMessage
			var tools []map[string]json.RawMessage
			if json.Unmarshal(msg["result"], &res) != nil || json.Unmarshal(res["tools"], &tools) != nil {
				continue
			}
			for _, tl := range tools {
				if string(tl["name"]) == `"delete_repo"` {
					t.Fatalf("a refused tool was listed: %s", p)
				}
			}
		}
	})
}
