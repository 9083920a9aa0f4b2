package scrub

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"testing"
)

// The cost of scrubbing in context: a real loopback round trip agent → reverse proxy →
// upstream, with the proxy wired as escrow wires scrubbing (Memo per request, PrepareRequest,
// Header, PlanBody, Body) and without, in one run:
//
//	go test -run '^$' -bench 'ReverseProxy_' -benchmem -count 6 ./proxy/scrub/
func benchReverseProxy(b *testing.B, handler http.HandlerFunc) {
	upstream := httptest.NewServer(handler)
	defer upstream.Close()
	target, _ := url.Parse(upstream.URL)
	var memo Memo
	for _, scrubbed := range []bool{false, true} {
		name := "plain"
		if scrubbed {
			name = "scrub"
		}
		b.Run(name, func(b *testing.B) {
			proxy := httptest.NewServer(&httputil.ReverseProxy{
				Rewrite: func(pr *httputil.ProxyRequest) {
					pr.SetURL(target)
					if scrubbed {
						PrepareRequest(pr.Out.Header)
					}
				},
				FlushInterval: -1,
				ModifyResponse: func(resp *http.Response) error {
					if !scrubbed {
						return nil
					}
					s := memo.For(benchToken)
					s.Header(resp.Header)
					if PlanBody(resp.Header).Scan {
						resp.Body = s.Body(resp.Body, BodyOptions{})
					}
					return nil
				},
			})
			defer proxy.Close()
			tr := &http.Transport{MaxIdleConnsPerHost: 4}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			b.ReportAllocs()
			start := cpuNow(b)
			for b.Loop() {
				resp, err := client.Get(proxy.URL)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.Copy(io.Discard, resp.Body); err != nil {
					b.Fatal(err)
				}
				resp.Body.Close()
			}
			reportCPU(b, start)
		})
	}
}

func BenchmarkReverseProxy_JSON1KiB(b *testing.B) {
	benchReverseProxy(b, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(json1KiB)))
		w.Write(json1KiB)
	})
}

func BenchmarkReverseProxy_SSE100x200(b *testing.B) {
	benchReverseProxy(b, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		f := w.(http.Flusher)
		for i := 0; i < len(sse100x200); i += 200 {
			w.Write(sse100x200[i : i+200])
			f.Flush()
		}
	})
}
