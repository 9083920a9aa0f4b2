package scrub

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// This file is the reference wiring for a reverse proxy that injects a credential (as escrow
// does), exercised end to end with real clients against an upstream that reflects the
// credential in every way it can: a redirect's Location, 103 Early Hints, an echoed request
// in a fixed-length JSON body, an event stream, trailers, and a gzip body it was not asked
// for. The agent must never receive the token in any form.

// reflectingUpstream echoes what it received, the injected credential included.
func reflectingUpstream(t *testing.T) *httptest.Server {
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		self := "http://" + r.Host + r.URL.RequestURI()
		switch r.URL.Path {
		case "/redirect":
			w.Header().Set("Location", self+"&next=1")
			w.Header().Set("Link", "<"+self+`>; rel="canonical"`)
			w.Header().Set("Set-Cookie", "t="+url.QueryEscape(r.URL.Query().Get("access_token"))+"; Path=/")
			w.WriteHeader(http.StatusFound)
		case "/early":
			w.Header().Set("Link", "<"+self+`>; rel=preload`)
			w.WriteHeader(http.StatusEarlyHints)
			w.Header().Del("Link")
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintln(w, "ok")
		case "/echo":
			body, _ := json.Marshal(map[string]any{"url": self, "headers": r.Header})
			w.Header().Set("Content-Type", "application/json")
			if strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
				// As real servers do when the client accepts it.
				var b bytes.Buffer
				gz := gzip.NewWriter(&b)
				gz.Write(body)
				gz.Close()
				body = b.Bytes()
				w.Header().Set("Content-Encoding", "gzip")
			}
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.Write(body)
		case "/sse":
			w.Header().Set("Content-Type", "text/event-stream")
			auth := r.Header.Get("Authorization")
			fmt.Fprintf(w, "data: one\n\ndata: %s", auth[:20])
			w.(http.Flusher).Flush()
			fmt.Fprintf(w, "%s\n\ndata: [DONE]\n\n", auth[20:]) // the rest in a later write
		case "/trailer":
			w.Header().Set("Trailer", "X-Echo-Auth")
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintln(w, "body")
			w.Header().Set("X-Echo-Auth", r.Header.Get("Authorization"))
		case "/gzip":
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Encoding", "gzip") // although asked for identity
			gz := gzip.NewWriter(w)
			fmt.Fprintf(gz, `{"auth":%q}`, r.Header.Get("Authorization"))
			gz.Close()
		default:
			http.NotFound(w, r)
		}
	}))
}

var errEncoded = errors.New("upstream answered with a content coding that cannot be scanned")

// scrubbingProxy injects token and scrubs the answer the way the package recommends.
func scrubbingProxy(t *testing.T, upstream string, token string, redacted *atomic.Int64) *httptest.Server {
	target, _ := url.Parse(upstream)
	var memo Memo
	rp := &httputil.ReverseProxy{
		// As escrow's: the agent's Accept-Encoding is passed on, nothing is decoded.
		Transport: &http.Transport{DisableCompression: true},
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			q := pr.Out.URL.Query()
			q.Set("access_token", token)
			pr.Out.URL.RawQuery = q.Encode()
			pr.Out.Header.Set("Authorization", "Bearer "+token)
			PrepareRequest(pr.Out.Header)
		},
		FlushInterval: -1,
		ModifyResponse: func(resp *http.Response) error {
			s := memo.For(token)
			redacted.Add(int64(s.Header(resp.Header)))
			plan := PlanBody(resp.Header)
			if plan.Reason == ReasonEncoded {
				return errEncoded // fail closed: never pass an unscanned body on
			}
			if plan.Scan {
				resp.Body = s.Body(resp.Body, BodyOptions{OnDone: func(r BodyResult) { redacted.Add(int64(r.Redacted)) }})
			}
			if resp.Trailer != nil {
				resp.Body = &trailerScrubber{ReadCloser: resp.Body, s: s, resp: resp, redacted: redacted}
			}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			w.Header().Set("X-Reason", "upstream_encoding_unscannable")
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rp.ServeHTTP(&informationalScrubber{ResponseWriter: w, s: memo.For(token), redacted: redacted}, r)
	}))
}

// informationalScrubber scrubs the headers of 1xx responses (103 Early Hints), which
// httputil.ReverseProxy copies to the client without calling ModifyResponse.
type informationalScrubber struct {
	http.ResponseWriter
	s        *Scrubber
	redacted *atomic.Int64
}

func (w *informationalScrubber) WriteHeader(code int) {
	if code < 200 {
		w.redacted.Add(int64(w.s.Header(w.Header())))
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *informationalScrubber) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// trailerScrubber scrubs the trailers, which the transport fills in when the body ends.
type trailerScrubber struct {
	io.ReadCloser
	s        *Scrubber
	resp     *http.Response
	redacted *atomic.Int64
}

func (t *trailerScrubber) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if err == io.EOF {
		t.redacted.Add(int64(t.s.Header(t.resp.Trailer)))
	}
	return n, err
}

func TestWiring_TheAgentNeverReceivesTheInjectedToken(t *testing.T) {
	token := "tok_" + strings.Repeat("Xy7+/Q", 6) // '+' and '/' make every encoding differ
	upstream := reflectingUpstream(t)
	defer upstream.Close()
	var redacted atomic.Int64
	proxy := scrubbingProxy(t, upstream.URL, token, &redacted)
	defer proxy.Close()

	client := &http.Client{
		Timeout:       10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	get := func(path string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, proxy.URL+path+"?q=1", nil)
		req.Header.Set("Accept-Encoding", "gzip") // as agents send it
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("%s: %v (a wrong Content-Length would show here)", path, err)
		}
		if resp.Header.Get("Content-Encoding") == "gzip" {
			// What the agent would read: the scan below must see the decoded bytes.
			zr, err := gzip.NewReader(bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			body, _ = io.ReadAll(zr)
		}
		return resp, string(body)
	}
	dump := func(resp *http.Response, body string) string {
		var b strings.Builder
		resp.Header.Write(&b)
		resp.Trailer.Write(&b)
		return b.String() + "\n" + body
	}

	for _, tc := range []struct {
		path   string
		status int
		check  func(*http.Response, string) error
	}{
		{"/redirect", http.StatusFound, func(r *http.Response, _ string) error {
			if !strings.Contains(r.Header.Get("Location"), "access_token=[escrow:redacted") {
				return fmt.Errorf("Location %q", r.Header.Get("Location"))
			}
			return nil
		}},
		{"/echo", http.StatusOK, func(r *http.Response, body string) error {
			if fmt.Sprint(len(body)) != r.Header.Get("Content-Length") || !strings.Contains(body, "Bearer [escrow:redacted") {
				return fmt.Errorf("Content-Length %s, body %s", r.Header.Get("Content-Length"), body)
			}
			return nil
		}},
		{"/sse", http.StatusOK, func(_ *http.Response, body string) error {
			if !strings.HasPrefix(body, "data: one\n\ndata: Bearer [escrow:redacted") || !strings.HasSuffix(body, "]\n\ndata: [DONE]\n\n") {
				return fmt.Errorf("body %q", body)
			}
			return nil
		}},
		{"/trailer", http.StatusOK, func(r *http.Response, _ string) error {
			if !strings.HasPrefix(r.Trailer.Get("X-Echo-Auth"), "Bearer [escrow:redacted") {
				return fmt.Errorf("trailer %q", r.Trailer.Get("X-Echo-Auth"))
			}
			return nil
		}},
		{"/gzip", http.StatusBadGateway, func(r *http.Response, _ string) error {
			if r.Header.Get("X-Reason") != "upstream_encoding_unscannable" {
				return fmt.Errorf("reason %q", r.Header.Get("X-Reason"))
			}
			return nil
		}},
	} {
		resp, body := get(tc.path)
		if resp.StatusCode != tc.status {
			t.Errorf("%s: status %d, want %d", tc.path, resp.StatusCode, tc.status)
		}
		if err := tc.check(resp, body); err != nil {
			t.Errorf("%s: %v", tc.path, err)
		}
		assertClean(t, dump(resp, body), token)
	}

	// curl: 103 Early Hints (which a Go client does not surface) and the redirect, as raw
	// bytes on the wire.
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("no curl")
	}
	for _, path := range []string{"/early", "/redirect", "/echo", "/sse"} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := exec.CommandContext(ctx, "curl", "-sS", "-i", "-N", "--compressed", proxy.URL+path+"?q=1").CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("curl %s: %v\n%s", path, err, out)
		}
		if path == "/early" && !strings.Contains(string(out), "HTTP/1.1 103") {
			t.Fatalf("curl %s: no 103 in\n%s", path, out)
		}
		if !strings.Contains(string(out), "[escrow:redacted") {
			t.Errorf("curl %s: nothing redacted:\n%s", path, out)
		}
		assertClean(t, string(out), token)
	}
	if redacted.Load() == 0 {
		t.Error("no redaction counted")
	}
}
