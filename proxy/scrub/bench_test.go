package scrub

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// The cost of scrubbing a response body next to copying it, in one run:
//
//	go test -run '^$' -bench 'Body_' -benchmem -count 6 ./proxy/scrub/
//
// Each pair reads the same bytes in the same chunks through a 32 KiB buffer, as
// httputil.ReverseProxy copies a response; "copy" is the plain io.CopyBuffer.

var benchToken = "ghp_" + strings.Repeat("0123456789abcdefABCD", 2) // 44 bytes, like a real token

// json1KiB is a 1 KiB JSON answer without the secret (the common case).
var json1KiB = func() []byte {
	var b bytes.Buffer
	b.WriteString(`{"items":[`)
	for i := 0; b.Len() < 1000; i++ {
		fmt.Fprintf(&b, `{"id":%d,"name":"item-%d","url":"https://api.example.com/v1/items/%d"},`, i, i, i)
	}
	b.Truncate(1022)
	b.WriteString("]}")
	return b.Bytes()
}()

// sse100x200 is 100 events of 200 bytes each, as an LLM streams them.
var sse100x200 = func() []byte {
	var b bytes.Buffer
	for i := 0; i < 100; i++ {
		ev := fmt.Sprintf(`data: {"id":"chatcmpl-%03d","object":"chat.completion.chunk","choices":[{"delta":{"content":"`, i)
		ev += strings.Repeat("w", 200-len(ev)-len(`"}}]}`+"\n\n")) + `"}}]}` + "\n\n"
		b.WriteString(ev)
	}
	return b.Bytes()
}()

type onlyWriter struct{ io.Writer }

func benchBody(b *testing.B, data []byte, chunk int, wrap func(io.ReadCloser) io.ReadCloser) {
	buf := make([]byte, 32<<10)
	sizes := make([]int, len(data)/chunk+1)
	for i := range sizes {
		sizes[i] = chunk
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	start := cpuNow(b)
	for b.Loop() {
		var rc io.ReadCloser = &chunkReader{data: data, sizes: sizes}
		rc = wrap(rc)
		if _, err := io.CopyBuffer(onlyWriter{io.Discard}, rc, buf); err != nil {
			b.Fatal(err)
		}
		rc.Close()
	}
	reportCPU(b, start)
}

// reportCPU adds cpu-ns/op: the process's CPU time per operation (all goroutines, both ends of
// a loopback round trip included), steadier than wall time when other work shares the cores.
func reportCPU(b *testing.B, start time.Duration) {
	if start < 0 || b.N == 0 {
		return
	}
	b.ReportMetric(float64(cpuNow(b)-start)/float64(b.N), "cpu-ns/op")
}

func BenchmarkBody_JSON1KiB(b *testing.B) {
	s := New(benchToken)
	b.Run("copy", func(b *testing.B) {
		benchBody(b, json1KiB, len(json1KiB), func(rc io.ReadCloser) io.ReadCloser { return rc })
	})
	b.Run("scrub", func(b *testing.B) {
		benchBody(b, json1KiB, len(json1KiB), func(rc io.ReadCloser) io.ReadCloser { return s.Body(rc, BodyOptions{}) })
	})
}

func BenchmarkBody_SSE100x200(b *testing.B) {
	s := New(benchToken)
	b.Run("copy", func(b *testing.B) { benchBody(b, sse100x200, 200, func(rc io.ReadCloser) io.ReadCloser { return rc }) })
	b.Run("scrub", func(b *testing.B) {
		benchBody(b, sse100x200, 200, func(rc io.ReadCloser) io.ReadCloser { return s.Body(rc, BodyOptions{}) })
	})
}

// BenchmarkMatcher_* decide whether the automaton pays off against the simple alternative, one
// case-insensitive bytes.Index per searched form (not counting the tail bookkeeping it would
// need on top), on the same 1 KiB, for one value and for four (token, password, user:password,
// a second token: a Basic route during a rotation).
func BenchmarkMatcher(b *testing.B) {
	for _, values := range [][]string{
		{benchToken},
		{benchToken, "hunter2-but-longer", BasicPair("svc-reporting", "hunter2-but-longer"), "ghp_" + strings.Repeat("ZYXWVUTSRQ9876543210", 2)},
	} {
		s := New(values...)
		in := json1KiB
		b.Run(fmt.Sprintf("automaton/values=%d", len(values)), func(b *testing.B) {
			b.SetBytes(int64(len(in)))
			for b.Loop() {
				var rs runs
				s.m.scan(0, in, 0, &rs)
				if rs.found != 0 {
					b.Fatal("found")
				}
			}
		})
		patterns := formsOf(b, values...)
		folded := make([]byte, len(in))
		b.Run(fmt.Sprintf("index-per-form/values=%d", len(values)), func(b *testing.B) {
			b.SetBytes(int64(len(in)))
			for b.Loop() {
				for i, c := range in {
					folded[i] = fold(c)
				}
				for _, p := range patterns {
					if bytes.Contains(folded, []byte(p)) {
						b.Fatal("found")
					}
				}
			}
		})
	}
}

// BenchmarkNew is the cost of building a Scrubber: build it once per credential value (Memo),
// not per request. "jwt" is a 2 KiB value, as Azure and many OAuth servers issue.
func BenchmarkNew(b *testing.B) {
	jwt := base64.RawURLEncoding.EncodeToString(bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstu\xff"), 47))[:2000]
	for _, tc := range []struct{ name, v string }{{"token=44B", benchToken}, {"jwt=2000B", jwt}} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				New(tc.v)
			}
		})
	}
}

func BenchmarkHeader_Typical(b *testing.B) {
	s := New(benchToken)
	h := map[string][]string{
		"Content-Type":   {"application/json"},
		"Date":           {"Tue, 01 Dec 2026 22:00:00 GMT"},
		"Location":       {"https://api.example.com/v1/items/42"},
		"Cache-Control":  {"no-store"},
		"X-Request-Id":   {"3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"},
		"Content-Length": {"1024"},
	}
	b.ReportAllocs()
	for b.Loop() {
		if s.Header(h) != 0 {
			b.Fatal("found")
		}
	}
}
