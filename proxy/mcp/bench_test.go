package mcp

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

// toolsCallBody returns a tools/call of about size bytes: a few arguments and one long string.
func toolsCallBody(size int) []byte {
	head := `{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"write_file","arguments":{"path":"/workspace/src/main.go","mode":420,"create":true,"tags":["a","b"],"content":"`
	tail := `"}}}`
	pad := max(size-len(head)-len(tail), 0)
	return []byte(head + strings.Repeat("x", pad) + tail)
}

// BenchmarkInspectToolsCall compares, side by side, reading a POST body (what any inspection
// must do at least) with Inspect (read, validate, extract, decode the arguments) on the same
// body. Run: go test -run XXX -bench InspectToolsCall -benchmem ./proxy/mcp/
func BenchmarkInspectToolsCall(b *testing.B) {
	i := newTestInspector(b, Options{MaxMessageBytes: 1 << 20})
	base := baseInput()
	for _, size := range []int{512, 4 << 10, 64 << 10} {
		body := toolsCallBody(size)
		b.Run(fmt.Sprintf("size=%d/read", size), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				r := benchRequest(body)
				buf := bytes.NewBuffer(make([]byte, 0, min(len(body)+1, 64<<10)))
				if _, err := buf.ReadFrom(io.LimitReader(r.Body, 1<<20+1)); err != nil {
					b.Fatal(err)
				}
				r.Body = io.NopCloser(bytes.NewReader(buf.Bytes()))
			}
		})
		b.Run(fmt.Sprintf("size=%d/inspect", size), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				c, err := i.Inspect(benchRequest(body), base)
				if err != nil || len(c.Inputs()) != 1 {
					b.Fatal(err)
				}
			}
		})
	}
}

func benchRequest(body []byte) *http.Request {
	r, _ := http.NewRequest(http.MethodPost, "https://"+testHost+"/mcp", bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	return r
}

// toolsListResponse is a tools/list result of n tools with realistic input schemas.
func toolsListResponse(n int) []byte {
	var b strings.Builder
	b.WriteString(`{"jsonrpc":"2.0","id":2,"result":{"tools":[`)
	for k := range n {
		if k > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"name":"tool_%d","description":"Does thing number %d to the repository, carefully.","inputSchema":{"type":"object","properties":{"owner":{"type":"string","description":"the owner"},"repo":{"type":"string"},"limit":{"type":"integer","minimum":1,"maximum":100}},"required":["owner","repo"],"additionalProperties":false}}`, k, k)
	}
	b.WriteString(`],"nextCursor":"abc"}}`)
	return []byte(b.String())
}

// BenchmarkFilterToolsList500 compares, side by side, filtering a 500-tool tools/list response
// (half the tools refused; JSON, and one SSE event) with what the client does with it anyway:
// decode it with encoding/json.
// Run: go test -run XXX -bench FilterToolsList500 -benchmem ./proxy/mcp/
func BenchmarkFilterToolsList500(b *testing.B) {
	body := toolsListResponse(500)
	sse := append(append([]byte("event: message\ndata: "), body...), "\n\n"...)
	c := listCall(b, `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`)
	c.maxList = DefaultMaxListBytes
	allowEven := func(name string) bool { return (len(name)+int(name[len(name)-1]))%2 == 0 }
	for _, tc := range []struct {
		name, ctype string
		body        []byte
	}{{"json", "application/json", body}, {"sse", "text/event-stream", sse}} {
		b.Run(tc.name+"/client-decode", func(b *testing.B) {
			// What the client does with the response anyway: decode it.
			b.SetBytes(int64(len(tc.body)))
			b.ReportAllocs()
			for b.Loop() {
				var v any
				if err := json.Unmarshal(body, &v); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(tc.name+"/filter", func(b *testing.B) {
			b.SetBytes(int64(len(tc.body)))
			b.ReportAllocs()
			for b.Loop() {
				resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {tc.ctype}}, Body: io.NopCloser(bytes.NewReader(tc.body))}
				if err := c.ResponseFilter(allowEven)(resp); err != nil {
					b.Fatal(err)
				}
				if _, err := io.Copy(io.Discard, resp.Body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
