package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
)

func listCall(t testing.TB, body string) *Call {
	t.Helper()
	c, err := newTestInspector(t, Options{MaxListBytes: 4 << 10}).Inspect(postMCP(body), baseInput())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const listReq = `{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"cursor":"page-2"}}`

// allowReadOnly is the allow callback of the tests: read_file and search, not delete_repo.
func allowReadOnly(name string) bool { return name == "read_file" || name == "search" }

const toolsResult = `{"tools":[{"name":"read_file","inputSchema":{"type":"object","properties":{"path":{"type":"string"}}}},` +
	`{"name":"delete_repo","description":"deletes \"name\"","inputSchema":{"type":"object"}},` +
	`{"name":"search","inputSchema":{"type":"object"}},{"description":"no name"},"junk"],"nextCursor":"page-3","_meta":{"k":[1,2]}}`

func jsonResponse(body string) *http.Response {
	return &http.Response{
		StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}, "Content-Length": {"9999"}},
		Body: io.NopCloser(strings.NewReader(body)), ContentLength: int64(len(body)),
	}
}

func toolNames(t *testing.T, msg []byte) []string {
	t.Helper()
	var r struct {
		Result struct {
			Tools []struct {
				Name string `json:"name"`
			} `json:"tools"`
			NextCursor string         `json:"nextCursor"`
			Meta       map[string]any `json:"_meta"`
		} `json:"result"`
	}
	if err := json.Unmarshal(msg, &r); err != nil {
		t.Fatalf("%v: %s", err, msg)
	}
	if r.Result.NextCursor != "page-3" || r.Result.Meta == nil {
		t.Errorf("other result fields were lost: %s", msg)
	}
	var names []string
	for _, tl := range r.Result.Tools {
		names = append(names, tl.Name)
	}
	return names
}

func TestResponseFilter_RemovesRefusedToolsFromAJSONList(t *testing.T) {
	resp := jsonResponse(`{"jsonrpc":"2.0","id":2,"result":` + toolsResult + `}`)
	filter := listCall(t, listReq).ResponseFilter(allowReadOnly)
	if err := filter(resp); err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	if got := toolNames(t, out); strings.Join(got, ",") != "read_file,search" {
		t.Errorf("tools = %v, want read_file,search", got)
	}
	if resp.ContentLength != int64(len(out)) || resp.Header.Get("Content-Length") != strconv.Itoa(len(out)) {
		t.Errorf("Content-Length %d / %q for %d bytes", resp.ContentLength, resp.Header.Get("Content-Length"), len(out))
	}
	if !json.Valid(out) || !bytes.Contains(out, []byte(`"properties":{"path":{"type":"string"}}`)) {
		t.Errorf("kept tools were altered: %s", out)
	}
}

func TestResponseFilter_DropsAToolWithTwoNames(t *testing.T) {
	// JavaScript's JSON.parse takes the last "name", Go's encoding/json any "Name".
	for _, tool := range []string{`{"name":"search","name":"delete_repo"}`, `{"name":"search","Name":"delete_repo"}`, `{"NAME":"search"}`} {
		resp := jsonResponse(`{"jsonrpc":"2.0","id":2,"result":{"tools":[` + tool + `,{"name":"read_file"}]}}`)
		if err := listCall(t, listReq).ResponseFilter(allowReadOnly)(resp); err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		if want := `{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"read_file"}]}}`; string(out) != want {
			t.Errorf("%s: got %s, want %s", tool, out, want)
		}
	}
}

func TestResponseFilter_LeavesOtherResponsesAlone(t *testing.T) {
	for name, body := range map[string]string{
		"another id":     `{"jsonrpc":"2.0","id":3,"result":` + toolsResult + `}`,
		"string id":      `{"jsonrpc":"2.0","id":"2","result":` + toolsResult + `}`,
		"error response": `{"jsonrpc":"2.0","id":2,"error":{"code":-32602,"message":"bad cursor"}}`,
	} {
		t.Run(name, func(t *testing.T) {
			resp := jsonResponse(body)
			if err := listCall(t, listReq).ResponseFilter(allowReadOnly)(resp); err != nil {
				t.Fatal(err)
			}
			if out, _ := io.ReadAll(resp.Body); string(out) != body {
				t.Errorf("changed to %s", out)
			}
		})
	}
	if listCall(t, `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}`).ResponseFilter(allowReadOnly) != nil {
		t.Error("a filter for a body without tools/list")
	}
	resp := jsonResponse(`not json`)
	resp.StatusCode = http.StatusNotFound
	if err := listCall(t, listReq).ResponseFilter(allowReadOnly)(resp); err != nil {
		t.Errorf("a 404 was not passed: %v", err)
	}
}

func TestResponseFilter_FiltersEachResponseOfABatch(t *testing.T) {
	c := listCall(t, `[{"jsonrpc":"2.0","id":"a","method":"tools/list"},{"jsonrpc":"2.0","id":"b","method":"ping"},{"jsonrpc":"2.0","id":"c","method":"tools/list","params":{"cursor":"x"}}]`)
	resp := jsonResponse(`[{"jsonrpc":"2.0","id":"a","result":` + toolsResult + `}, {"jsonrpc":"2.0","id":"b","result":{}},{"jsonrpc":"2.0","id":"c","result":` + toolsResult + `}]`)
	if err := c.ResponseFilter(allowReadOnly)(resp); err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	var msgs []json.RawMessage
	if err := json.Unmarshal(out, &msgs); err != nil || len(msgs) != 3 {
		t.Fatalf("%v: %s", err, out)
	}
	for _, k := range []int{0, 2} {
		if got := toolNames(t, msgs[k]); strings.Join(got, ",") != "read_file,search" {
			t.Errorf("message %d tools = %v", k, got)
		}
	}
	if string(msgs[1]) != `{"jsonrpc":"2.0","id":"b","result":{}}` {
		t.Errorf("ping answer changed: %s", msgs[1])
	}
}

func TestResponseFilter_FailsClosedOnWhatItCannotFilter(t *testing.T) {
	filter := listCall(t, listReq).ResponseFilter(allowReadOnly)
	gz := jsonResponse(`{}`)
	gz.Header.Set("Content-Encoding", "gzip")
	plain := jsonResponse(`{}`)
	plain.Header.Set("Content-Type", "text/plain")
	big := jsonResponse(`{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"` + strings.Repeat("x", 5<<10) + `"}]}}`)
	broken := jsonResponse(`{"jsonrpc":"2.0","id":2,"result":{"tools":[`)
	twoIDs := jsonResponse(`{"jsonrpc":"2.0","id":3,"id":2,"result":{"tools":[{"name":"delete_repo"}]}}`)
	twoLists := jsonResponse(`{"jsonrpc":"2.0","id":2,"result":{"tools":[],"Tools":[{"name":"delete_repo"}]}}`)
	for name, resp := range map[string]*http.Response{
		"gzip": gz, "text/plain": plain, "over the bound": big, "broken JSON": broken,
		"two ids": twoIDs, "two tools lists": twoLists,
	} {
		if err := filter(resp); !errors.Is(err, ErrResponse) {
			t.Errorf("%s: err = %v, want ErrResponse", name, err)
		}
	}
}

func sseResponse(r io.Reader) *http.Response {
	return &http.Response{
		StatusCode: 200, Header: http.Header{"Content-Type": {"text/event-stream"}},
		Body: io.NopCloser(r), ContentLength: -1,
	}
}

func TestResponseFilter_RewritesTheListEventOfAnSSEStreamAndPassesTheRest(t *testing.T) {
	progress := "event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\r\n\r\n"
	changed := "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n"
	priming := "id: 0\nretry: 100\ndata:\n\n"
	// The response split over two data lines, as SSE allows.
	list := "event: message\nid: 2\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\n" + "data: \"result\":" + toolsResult + "}\n\n"
	stream := priming + progress + list + changed
	for name, r := range map[string]io.Reader{
		"one byte a read": iotest.OneByteReader(strings.NewReader(stream)),
		// The last data comes with io.EOF, as net/http's body reader returns it.
		"EOF with the data": iotest.DataErrReader(strings.NewReader(stream)),
	} {
		t.Run(name, func(t *testing.T) { testSSEList(t, r, priming+progress, changed) })
	}
}

func testSSEList(t *testing.T, r io.Reader, priming, changed string) {
	resp := sseResponse(r)
	if err := listCall(t, listReq).ResponseFilter(allowReadOnly)(resp); err != nil {
		t.Fatal(err)
	}
	if resp.ContentLength != -1 {
		t.Errorf("ContentLength = %d", resp.ContentLength)
	}
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	s := string(out)
	if !strings.HasPrefix(s, priming) || !strings.HasSuffix(s, changed) {
		t.Fatalf("other events were not passed byte for byte:\n%q", s)
	}
	ev := strings.TrimSuffix(strings.TrimPrefix(s, priming), changed)
	if !strings.HasPrefix(ev, "event: message\nid: 2\ndata: ") || !strings.HasSuffix(ev, "\n\n") {
		t.Fatalf("list event = %q", ev)
	}
	var data []string
	for _, l := range strings.Split(strings.TrimSpace(ev), "\n") {
		if d, ok := strings.CutPrefix(l, "data: "); ok {
			data = append(data, d)
		}
	}
	if got := toolNames(t, []byte(strings.Join(data, "\n"))); strings.Join(got, ",") != "read_file,search" {
		t.Errorf("tools = %v", got)
	}
}

func TestResponseFilter_StreamsSSEEventsAsTheyArrive(t *testing.T) {
	pr, pw := io.Pipe()
	resp := sseResponse(pr)
	if err := listCall(t, listReq).ResponseFilter(allowReadOnly)(resp); err != nil {
		t.Fatal(err)
	}
	first := "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\n\n"
	go func() { _, _ = pw.Write([]byte(first)) }()
	buf := make([]byte, 4096)
	n, err := io.ReadAtLeast(resp.Body, buf, len(first))
	if err != nil || string(buf[:n]) != first {
		t.Fatalf("first event = %q, %v: it must be delivered before the stream goes on", buf[:n], err)
	}
	go func() {
		_, _ = pw.Write([]byte("data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":" + toolsResult + "}\n\n"))
		_ = pw.Close()
	}()
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(rest, []byte("delete_repo")) || !bytes.Contains(rest, []byte("read_file")) {
		t.Errorf("list event = %s", rest)
	}
}

func TestResponseFilter_CutsAnSSEStreamItCannotFilter(t *testing.T) {
	for name, stream := range map[string]string{
		"event over the bound": "data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"" + strings.Repeat("x", 5<<10) + "\"}]}}\n\n",
		"broken JSON":          "data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[\n\n",
	} {
		resp := sseResponse(strings.NewReader(stream))
		if err := listCall(t, listReq).ResponseFilter(allowReadOnly)(resp); err != nil {
			t.Fatal(err)
		}
		out, err := io.ReadAll(resp.Body)
		if !errors.Is(err, ErrResponse) || bytes.Contains(out, []byte("xxxx")) {
			t.Errorf("%s: read %d bytes, err %v; want ErrResponse and nothing of the event", name, len(out), err)
		}
	}
}

func TestEventEnd_KnowsEveryLineEnding(t *testing.T) {
	for in, want := range map[string]int{
		"data: x\n\n":     9,
		"data: x\r\n\r\n": 11,
		"data: x\r\rdata": 9,
		"data: x\r\r":     -1, // the last CR may be the start of a CRLF
		"data: x\n":       -1,
		"data: x\r":       -1, // a CR at the end may be the start of a CRLF
		"data: x\r\n\r":   -1,
		"\n":              1,
		"a\nb\n\nc\n\n":   5,
	} {
		if got := eventEnd([]byte(in)); got != want {
			t.Errorf("eventEnd(%q) = %d, want %d", in, got, want)
		}
	}
}

func TestStreamFilter_FiltersListsReplayedOnTheGETStream(t *testing.T) {
	i := newTestInspector(t, Options{})
	get := httptest.NewRequest(http.MethodGet, "https://"+testHost+"/mcp", nil)
	get.Header.Set("Last-Event-ID", "7")
	get.Header.Set("Accept-Encoding", "gzip")
	filter := i.StreamFilter(get, allowReadOnly)
	if filter == nil || get.Header.Get("Accept-Encoding") != "" {
		t.Fatalf("filter %v, Accept-Encoding %q", filter != nil, get.Header.Get("Accept-Encoding"))
	}
	sampling := "id: 8\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"sampling/createMessage\",\"params\":{}}\n\n"
	replayed := "id: 9\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"any\",\"result\":" + toolsResult + "}\n\n"
	resp := sseResponse(strings.NewReader(sampling + replayed))
	if err := filter(resp); err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(out), sampling) || bytes.Contains(out, []byte("delete_repo")) || !bytes.Contains(out, []byte("read_file")) {
		t.Errorf("stream = %q", out)
	}
	for _, r := range []*http.Request{
		httptest.NewRequest(http.MethodPost, "https://"+testHost+"/mcp", nil),
		httptest.NewRequest(http.MethodGet, "https://"+testHost+"/other", nil),
	} {
		if i.StreamFilter(r, allowReadOnly) != nil {
			t.Errorf("a stream filter for %s %s", r.Method, r.URL.Path)
		}
	}
}
