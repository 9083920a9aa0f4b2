package scrub

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// chunkReader returns data in the given chunk sizes (then the rest), one chunk per Read at
// most, as a network body does.
type chunkReader struct {
	data   []byte
	sizes  []int
	err    error // returned after data instead of io.EOF
	closed bool
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		return 0, io.EOF
	}
	n := len(c.data)
	if len(c.sizes) > 0 {
		n = min(n, c.sizes[0])
		c.sizes = c.sizes[1:]
	}
	n = copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func (c *chunkReader) Close() error { c.closed = true; return nil }

// readAll reads r with buffers of the given sizes in turn (all of 32 KiB when none).
func readAll(t testing.TB, r io.Reader, bufSizes ...int) ([]byte, error) {
	t.Helper()
	var out []byte
	for i := 0; ; i++ {
		size := 32 << 10
		if len(bufSizes) > 0 {
			size = bufSizes[i%len(bufSizes)]
		}
		p := make([]byte, size)
		n, err := r.Read(p)
		out = append(out, p[:n]...)
		if err != nil {
			if err == io.EOF {
				err = nil
			}
			return out, err
		}
		if i > 1<<20 {
			t.Fatal("no end")
		}
	}
}

func TestBody_EqualsStringForAMatchSplitAtEveryChunkBoundary(t *testing.T) {
	s := New(secret)
	in := "data: {\"url\":\"https://x/?k=" + secret + "\"}\n\nplain " + url64(secret) + " end"
	want, n := s.String(in)
	if n != 2 {
		t.Fatalf("String found %d, want 2", n)
	}
	for i := 0; i <= len(in); i++ {
		var res BodyResult
		b := s.Body(&chunkReader{data: []byte(in), sizes: []int{i}}, BodyOptions{OnDone: func(r BodyResult) { res = r }})
		got, err := readAll(t, b)
		if err != nil || string(got) != want {
			t.Fatalf("split at %d: got %q, %v\nwant %q", i, got, err, want)
		}
		if res.Redacted != 2 || res.Scanned != int64(len(in)) || res.Unscanned {
			t.Fatalf("split at %d: result %+v", i, res)
		}
	}
}

func url64(v string) string { return base64.RawURLEncoding.EncodeToString([]byte(v)) }

func TestBody_EqualsStringForRandomChunkingsAndReadSizes(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	values := []string{secret, "0123456789abcdef", BasicPair("user", "pa55w0rd!")}
	s := New(values...)
	forms := formsOf(t, values...)
	for iter := 0; iter < 300; iter++ {
		// Text made of pieces of forms, whole forms and filler, so partial matches abound.
		var in []byte
		for len(in) < 2000 {
			f := forms[r.IntN(len(forms))]
			switch r.IntN(4) {
			case 0:
				in = append(in, f...)
			case 1:
				in = append(in, f[:r.IntN(len(f))]...)
			case 2:
				in = append(in, strings.ToUpper(f)...)
			default:
				in = append(in, "data: x\n\n"...)
			}
		}
		want, _ := s.String(string(in))
		var sizes, reads []int
		for range 50 {
			sizes = append(sizes, 1+r.IntN(80))
			reads = append(reads, 1+r.IntN(700))
		}
		got, err := readAll(t, s.Body(&chunkReader{data: in, sizes: sizes}, BodyOptions{}), reads...)
		if err != nil || string(got) != want {
			t.Fatalf("iteration %d: streamed output differs from String's", iter)
		}
		assertClean(t, string(got), values...)
	}
}

func TestBody_LimitBoundsTheScanExactly(t *testing.T) {
	s := New(secret)
	const limit = 100
	// An occurrence beginning at the last scanned offset is replaced; one beginning after
	// the whole scan window passes.
	in := strings.Repeat(".", limit-1) + secret + strings.Repeat(".", s.MaxMatchLen()) + secret
	var res BodyResult
	got, err := readAll(t, s.Body(&chunkReader{data: []byte(in), sizes: []int{7}}, BodyOptions{Limit: limit, OnDone: func(r BodyResult) { res = r }}), 13)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(in) {
		t.Fatalf("length %d, want %d", len(got), len(in))
	}
	first, second := string(got[limit-1:limit-1+len(secret)]), string(got[len(got)-len(secret):])
	if strings.Contains(first, secret) || second != secret {
		t.Fatalf("first %q second %q", first, second)
	}
	if res.Redacted != 1 || !res.Unscanned || res.Scanned != int64(limit+s.MaxMatchLen()-1) {
		t.Fatalf("result %+v", res)
	}
}

func TestBody_NegativeOrHugeLimitScansEverything(t *testing.T) {
	s := New(secret)
	in := strings.Repeat("x", 3*DefaultLimit) + secret
	for _, limit := range []int64{-1, math.MaxInt64} {
		got, err := readAll(t, s.Body(io.NopCloser(strings.NewReader(in)), BodyOptions{Limit: limit}))
		if err != nil || strings.Contains(string(got), secret) || len(got) != len(in) {
			t.Fatalf("limit %d: err %v, secret left %v", limit, err, strings.Contains(string(got), secret))
		}
	}
}

func TestBody_ACutOffBodyDoesNotPassOnTheHeldPrefix(t *testing.T) {
	s := New(secret)
	cut := errors.New("connection reset")
	in := "ok " + secret[:len(secret)-1] // all but the last byte of the secret, then a reset
	got, err := readAll(t, s.Body(&chunkReader{data: []byte(in), err: cut}, BodyOptions{}))
	if !errors.Is(err, cut) {
		t.Fatalf("err %v, want the read error", err)
	}
	if string(got) != "ok " {
		t.Fatalf("got %q, want only the decided bytes", got)
	}
}

func TestBody_AtEOFTheHeldPrefixIsPassedOn(t *testing.T) {
	s := New(secret)
	in := "ok " + secret[:len(secret)-1]
	got, err := readAll(t, s.Body(&chunkReader{data: []byte(in)}, BodyOptions{}))
	if err != nil || string(got) != in {
		t.Fatalf("got %q %v", got, err)
	}
}

func TestBody_ReportsOnceOnCloseBeforeEOF(t *testing.T) {
	s := New(secret)
	calls := 0
	var res BodyResult
	cr := &chunkReader{data: []byte("a " + secret + " b " + secret[:5])}
	b := s.Body(cr, BodyOptions{OnDone: func(r BodyResult) { calls++; res = r }})
	p := make([]byte, 4096)
	if _, err := b.Read(p); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil || !cr.closed {
		t.Fatalf("close: %v closed %v", err, cr.closed)
	}
	b.Close()
	if calls != 1 || res.Redacted != 1 {
		t.Fatalf("calls %d result %+v", calls, res)
	}
}

func TestBody_InactiveScrubberReturnsTheBodyItself(t *testing.T) {
	rc := io.NopCloser(bytes.NewReader(nil))
	if New("short").Body(rc, BodyOptions{}) != rc {
		t.Fatal("want rc itself")
	}
	if New(secret).Body(http.NoBody, BodyOptions{}) != http.NoBody {
		t.Fatal("want http.NoBody itself")
	}
}

func TestScrubbable(t *testing.T) {
	for ct, want := range map[string]bool{
		"":                                  true,
		"text/html; charset=utf-8":          true,
		"text/event-stream":                 true,
		"TEXT/PLAIN":                        true,
		"application/json":                  true,
		"application/problem+json":          true,
		"application/vnd.api+json; x=1":     true,
		"application/atom+xml":              true,
		"application/xml":                   true,
		"application/javascript":            true,
		"application/x-www-form-urlencoded": true,
		"application/x-ndjson":              true,
		"application/octet-stream":          false,
		"image/png":                         false,
		"application/zip":                   false,
		"application/pdf":                   false,
		"application/x-protobuf":            false,
		"application/grpc":                  false,
		"video/mp4":                         false,
		"application/json;;bad":             true,
	} {
		if got := Scrubbable(ct); got != want {
			t.Errorf("Scrubbable(%q) = %v, want %v", ct, got, want)
		}
	}
}

func TestPlanBody_RefusesEncodedBodiesAndSkipsBinaryTypes(t *testing.T) {
	for _, tc := range []struct {
		h    http.Header
		want Plan
	}{
		{http.Header{"Content-Type": {"application/json"}}, Plan{Scan: true}},
		{http.Header{"Content-Type": {"text/html"}, "Content-Encoding": {"identity"}}, Plan{Scan: true}},
		{http.Header{"Content-Type": {"application/json"}, "Content-Encoding": {"gzip"}}, Plan{Reason: ReasonEncoded}},
		{http.Header{"Content-Type": {"text/plain"}, "Content-Encoding": {"identity, br"}}, Plan{Reason: ReasonEncoded}},
		{http.Header{"Content-Type": {"image/png"}}, Plan{Reason: ReasonType}},
		{http.Header{"Content-Encoding": {"zstd"}, "Content-Type": {"image/png"}}, Plan{Reason: ReasonEncoded}},
		{http.Header{}, Plan{Scan: true}},
	} {
		if got := PlanBody(tc.h); got != tc.want {
			t.Errorf("PlanBody(%v) = %+v, want %+v", tc.h, got, tc.want)
		}
	}
}

func TestPrepareRequest_AsksForIdentityAndTheWholeBody(t *testing.T) {
	h := http.Header{"Accept-Encoding": {"gzip, br"}, "Range": {"bytes=0-9"}, "If-Range": {`"e1"`}, "Accept": {"*/*"}}
	PrepareRequest(h)
	want := http.Header{"Accept-Encoding": {"identity"}, "Accept": {"*/*"}}
	if fmt.Sprint(h) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", h, want)
	}
}

func TestBody_ReplacesEveryFormInAStreamedBody(t *testing.T) {
	s := New(secret)
	for _, f := range forms(secret) {
		in := `{"echo":"` + strings.ToUpper(f[:1]) + f[1:] + `"}` + "\n"
		var res BodyResult
		got, err := readAll(t, s.Body(&chunkReader{data: []byte(in), sizes: []int{5, 3, 11}}, BodyOptions{OnDone: func(r BodyResult) { res = r }}), 600)
		if err != nil || len(got) != len(in) || res.Redacted != 1 {
			t.Fatalf("form %q: err %v, %q, %+v", f, err, got, res)
		}
		assertClean(t, string(got), secret)
	}
}

// TestBody_CloseWhileAReadWaitsReportsOnce: the agent leaves while the upstream is silent; the
// proxy closes the body from another goroutine. The blocked Read ends, OnDone runs once, and
// the race detector has nothing to say.
func TestBody_CloseWhileAReadWaitsReportsOnce(t *testing.T) {
	s := New(secret)
	pr, pw := io.Pipe()
	var calls atomic.Int32
	b := s.Body(pr, BodyOptions{OnDone: func(BodyResult) { calls.Add(1) }})
	go pw.Write([]byte("data: " + secret[:10])) // a held prefix, then silence
	readDone := make(chan error)
	go func() {
		_, err := readAll(t, b)
		readDone <- err
	}()
	time.Sleep(10 * time.Millisecond) // let the Read block; the outcome does not depend on it
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-readDone; !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("Read: %v, want the closed pipe's error", err)
	}
	if calls.Load() != 1 {
		t.Fatalf("OnDone ran %d times", calls.Load())
	}
}
