package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// call is one request an agent makes through escrow.
type call struct {
	Method  string
	URL     string
	Headers [][2]string
	// CAFile is what the client trusts; default: escrow's trust bundle.
	CAFile string
	// HTTP2 asks curl for HTTP/2 (--http2).
	HTTP2 bool
	// Body is the request body, if any.
	Body []byte
}

// response is what the client saw.
type response struct {
	Status        int    // the final response's status; 0 if there was none
	ConnectStatus int    // the status of a refused CONNECT; 0 if none was refused
	ConnectReason string // X-Escrow-Reason of a refused CONNECT, when the client exposes it
	Header        http.Header
	Body          string
	HTTPVersion   string // "1.1" or "2"
	Err           string // the client's own error, if any
	// PeerCert is the leaf the client verified (Go client only).
	PeerCert *x509.Certificate
}

// denial is escrow's JSON denial body.
type denial struct {
	Error     string `json:"error"`
	Message   string `json:"message"`
	RequestID string `json:"request_id"`
}

func (r response) denial(t testing.TB) denial {
	t.Helper()
	var d denial
	if err := json.Unmarshal([]byte(r.Body), &d); err != nil {
		t.Fatalf("denial body is not JSON: %v: %q", err, r.Body)
	}
	if d.Error == "" || d.Message == "" || d.RequestID == "" {
		t.Fatalf("denial body must have error, message and request_id: %q", r.Body)
	}
	return d
}

// agentClient is a real HTTP client, configured as an agent would configure it.
type agentClient struct {
	name string
	// needs is the clientProblems key that must be absent ("" for the Go client).
	needs string
	do    func(t testing.TB, e *escrow, c call) response
}

var (
	curlFlags  = agentClient{"curl_proxy_flags", "curl", func(t testing.TB, e *escrow, c call) response { return doCurl(t, e, c, false) }}
	curlEnv    = agentClient{"curl_HTTPS_PROXY_env", "curl", func(t testing.TB, e *escrow, c call) response { return doCurl(t, e, c, true) }}
	pythonArgs = agentClient{"python_requests_proxies_arg", "python", func(t testing.TB, e *escrow, c call) response { return doPython(t, e, c, false) }}
	pythonEnv  = agentClient{"python_requests_HTTPS_PROXY_env", "python", func(t testing.TB, e *escrow, c call) response { return doPython(t, e, c, true) }}
	goClient   = agentClient{"go_net_http", "", doGo}

	allClients = []agentClient{curlFlags, curlEnv, pythonArgs, pythonEnv, goClient}
	// oneOfEach is one configuration of each real client.
	oneOfEach = []agentClient{curlFlags, pythonArgs, goClient}
)

// eachClient runs f as a subtest per client, skipping (or failing, in CI) missing clients.
func eachClient(t *testing.T, clients []agentClient, f func(t *testing.T, cl agentClient)) {
	t.Helper()
	for _, cl := range clients {
		t.Run(cl.name, func(t *testing.T) {
			if cl.needs != "" {
				requireClient(t, cl.needs)
			}
			f(t, cl)
		})
	}
}

// uniquePath makes a request path no other call uses, so its audit record and upstream record
// can be found.
func uniquePath(prefix, client string) string {
	return fmt.Sprintf("%s/%s-%s", prefix, client, randomHex(4))
}

// ---- curl ----

type curlWrite struct {
	HTTPCode    int    `json:"http_code"`
	HTTPConnect int    `json:"http_connect"`
	HTTPVersion string `json:"http_version"`
	ExitCode    int    `json:"exitcode"`
	ErrorMsg    string `json:"errormsg"`
}

func curlBase(e *escrow, c call, env bool) (args []string, cmdEnv []string) {
	ca := c.CAFile
	if ca == "" {
		ca = e.Bundle
	}
	args = []string{"-q", "-sS", "--max-time", "20"}
	if env {
		cmdEnv = cleanEnv("HTTPS_PROXY="+e.ProxyURL, "http_proxy="+e.ProxyURL, "CURL_CA_BUNDLE="+ca)
	} else {
		cmdEnv = cleanEnv()
		args = append(args, "--proxy", e.ProxyURL, "--cacert", ca)
	}
	if c.HTTP2 {
		args = append(args, "--http2")
	}
	if c.Method != "" && c.Method != http.MethodGet {
		args = append(args, "-X", c.Method)
	}
	for _, h := range c.Headers {
		args = append(args, "-H", h[0]+": "+h[1])
	}
	return args, cmdEnv
}

func doCurl(t testing.TB, e *escrow, c call, env bool) response {
	t.Helper()
	dir := t.TempDir()
	bodyFile, hdrFile := filepath.Join(dir, "body"), filepath.Join(dir, "headers")
	args, cmdEnv := curlBase(e, c, env)
	if c.Body != nil {
		reqFile := filepath.Join(dir, "request-body")
		if err := os.WriteFile(reqFile, c.Body, 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--data-binary", "@"+reqFile, "-H", "Content-Type: application/octet-stream")
	}
	args = append(args, "-o", bodyFile, "-D", hdrFile, "-w", "%{json}", c.URL)
	cmd := exec.Command(curlBin, args...)
	cmd.Env = cmdEnv
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	body, _ := os.ReadFile(bodyFile)
	hdrs, _ := os.ReadFile(hdrFile)
	what := fmt.Sprintf("%s: curl %s %s", t.Name(), c.Method, c.URL)
	e.Rec.add(what+" stdout", stdout.Bytes())
	e.Rec.add(what+" stderr", stderr.Bytes())
	e.Rec.add(what+" headers", hdrs)
	e.Rec.add(what+" body", body)

	var w curlWrite
	if err := json.Unmarshal(stdout.Bytes(), &w); err != nil {
		t.Fatalf("curl %v: no -w json output (%v): stdout %q stderr %q", args, runErr, stdout.String(), stderr.String())
	}
	r := response{Body: string(body), HTTPVersion: w.HTTPVersion}
	if w.ExitCode != 0 {
		r.Err = fmt.Sprintf("curl exit %d: %s", w.ExitCode, w.ErrorMsg)
	}
	blocks := headerBlocks(string(hdrs))
	if w.HTTPConnect != 0 && len(blocks) > 0 {
		// The first block answered the CONNECT.
		if w.HTTPConnect != http.StatusOK {
			r.ConnectStatus = w.HTTPConnect
			r.ConnectReason = blocks[0].hdr.Get("X-Escrow-Reason")
		}
		blocks = blocks[1:]
	}
	if len(blocks) > 0 {
		last := blocks[len(blocks)-1]
		r.Status, r.Header = last.status, last.hdr
	}
	if r.Status == 0 && r.ConnectStatus == 0 {
		r.Status = w.HTTPCode
	}
	return r
}

type headerBlock struct {
	status int
	hdr    http.Header
}

// headerBlocks parses curl's -D output: one block per response (CONNECT's first).
func headerBlocks(s string) []headerBlock {
	var out []headerBlock
	for _, raw := range strings.Split(strings.ReplaceAll(s, "\r\n", "\n"), "\n\n") {
		lines := strings.Split(strings.TrimSpace(raw), "\n")
		if len(lines) == 0 || !strings.HasPrefix(lines[0], "HTTP/") {
			continue
		}
		f := strings.Fields(lines[0])
		b := headerBlock{hdr: http.Header{}}
		if len(f) > 1 {
			b.status, _ = strconv.Atoi(f[1])
		}
		for _, l := range lines[1:] {
			if k, v, ok := strings.Cut(l, ":"); ok {
				b.hdr.Add(strings.TrimSpace(k), strings.TrimSpace(v))
			}
		}
		out = append(out, b)
	}
	return out
}

// ---- Python requests ----

const pythonScript = `
import json, sys, time, re
import requests
spec = json.loads(sys.argv[1])
kw = {"headers": dict(spec["headers"]), "timeout": 20}
if spec["body_file"]:
    kw["data"] = open(spec["body_file"], "rb").read()
if not spec["env"]:
    kw["proxies"] = {"http": spec["proxy"], "https": spec["proxy"]}
    kw["verify"] = spec["ca"]
out = {}
try:
    t0 = time.time()
    r = requests.request(spec["method"], spec["url"], stream=spec["sse"], **kw)
    out["status"] = r.status_code
    out["headers"] = dict(r.headers)
    out["version"] = {10: "1.0", 11: "1.1", 20: "2"}.get(r.raw.version, str(r.raw.version))
    if spec["sse"]:
        events = []
        for line in r.iter_lines(chunk_size=None):
            if line.startswith(b"data:"):
                events.append({"data": line[5:].strip().decode(), "t": time.time()})
        out["events"] = events
        out["start"] = t0
    else:
        out["body"] = r.text
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out))
`

type pythonOut struct {
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers"`
	Version string            `json:"version"`
	Body    string            `json:"body"`
	Error   string            `json:"error"`
	Events  []struct {
		Data string  `json:"data"`
		T    float64 `json:"t"`
	} `json:"events"`
}

var tunnelFailed = regexp.MustCompile(`Tunnel connection failed: (\d{3})`)

func runPython(t testing.TB, e *escrow, c call, env, sse bool) pythonOut {
	t.Helper()
	ca := c.CAFile
	if ca == "" {
		ca = e.Bundle
	}
	method := c.Method
	if method == "" {
		method = http.MethodGet
	}
	bodyFile := ""
	if c.Body != nil {
		bodyFile = filepath.Join(t.TempDir(), "request-body")
		if err := os.WriteFile(bodyFile, c.Body, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	spec, _ := json.Marshal(map[string]any{
		"method": method, "url": c.URL, "headers": c.Headers, "env": env, "sse": sse,
		"proxy": e.ProxyURL, "ca": ca, "body_file": bodyFile,
	})
	cmd := exec.Command(pythonBin, "-c", pythonScript, string(spec))
	cmd.Env = cleanEnv()
	if env {
		cmd.Env = cleanEnv("HTTPS_PROXY="+e.ProxyURL, "HTTP_PROXY="+e.ProxyURL, "REQUESTS_CA_BUNDLE="+ca)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	what := fmt.Sprintf("%s: python requests %s %s", t.Name(), method, c.URL)
	e.Rec.add(what+" stdout", stdout.Bytes())
	e.Rec.add(what+" stderr", stderr.Bytes())
	var out pythonOut
	if jerr := json.Unmarshal(stdout.Bytes(), &out); jerr != nil {
		t.Fatalf("python: %v (%v): stdout %q stderr %q", err, jerr, stdout.String(), stderr.String())
	}
	return out
}

func doPython(t testing.TB, e *escrow, c call, env bool) response {
	t.Helper()
	out := runPython(t, e, c, env, false)
	r := response{Status: out.Status, Body: out.Body, HTTPVersion: out.Version, Err: out.Error, Header: http.Header{}}
	for k, v := range out.Headers {
		r.Header.Set(k, v)
	}
	if m := tunnelFailed.FindStringSubmatch(out.Error); m != nil {
		r.ConnectStatus, _ = strconv.Atoi(m[1])
	}
	return r
}

// ---- Go net/http ----

// goTransport is an agent's Go client: the proxy from its URL, roots from the trust bundle,
// HTTP/2 when offered. onConnect sees a refused CONNECT's response.
func goTransport(t testing.TB, e *escrow, caFile string, onConnect func(*http.Response)) *http.Transport {
	t.Helper()
	if caFile == "" {
		caFile = e.Bundle
	}
	pemData, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemData) {
		t.Fatalf("no certificates in %s", caFile)
	}
	pu, _ := url.Parse(e.ProxyURL)
	return &http.Transport{
		Proxy:             http.ProxyURL(pu),
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true,
		OnProxyConnectResponse: func(_ context.Context, _ *url.URL, _ *http.Request, res *http.Response) error {
			if onConnect != nil {
				onConnect(res)
			}
			return nil
		},
	}
}

func doGo(t testing.TB, e *escrow, c call) response {
	t.Helper()
	var r response
	tr := goTransport(t, e, c.CAFile, func(res *http.Response) {
		if res.StatusCode != http.StatusOK {
			r.ConnectStatus, r.ConnectReason = res.StatusCode, res.Header.Get("X-Escrow-Reason")
			var hdr bytes.Buffer
			_ = res.Header.Write(&hdr)
			e.Rec.add(t.Name()+": go CONNECT response headers", hdr.Bytes())
		}
	})
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	method := c.Method
	if method == "" {
		method = http.MethodGet
	}
	var reqBody io.Reader
	if c.Body != nil {
		reqBody = bytes.NewReader(c.Body)
	}
	req, err := http.NewRequest(method, c.URL, reqBody)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range c.Headers {
		if http.CanonicalHeaderKey(h[0]) == "Host" {
			req.Host = h[1] // Go sends req.Host, never a Host entry of req.Header
			continue
		}
		req.Header.Add(h[0], h[1])
	}
	resp, err := client.Do(req)
	if err != nil {
		r.Err = err.Error()
		e.Rec.add(t.Name()+": go client error", []byte(r.Err))
		return r
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	r.Status, r.Header, r.Body = resp.StatusCode, resp.Header, string(body)
	r.HTTPVersion = "1.1"
	if resp.ProtoMajor == 2 {
		r.HTTPVersion = "2"
	}
	if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
		r.PeerCert = resp.TLS.PeerCertificates[0]
	}
	var hdr bytes.Buffer
	_ = resp.Header.Write(&hdr)
	e.Rec.add(t.Name()+": go response headers", hdr.Bytes())
	e.Rec.add(t.Name()+": go response body", body)
	return r
}

// ---- SSE: when each event arrived ----

type sseEvent struct {
	data string
	at   time.Time
}

// sseCurl runs curl -N and timestamps each data: line as it comes out of curl.
func sseCurl(t testing.TB, e *escrow, c call) []sseEvent {
	t.Helper()
	args, cmdEnv := curlBase(e, c, false)
	args = append(args, "-N", c.URL)
	cmd := exec.Command(curlBin, args...)
	cmd.Env = cmdEnv
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	events, all := readSSE(stdout)
	err = cmd.Wait()
	e.Rec.add(t.Name()+": curl -N stdout", []byte(all))
	e.Rec.add(t.Name()+": curl -N stderr", stderr.Bytes())
	if err != nil {
		t.Fatalf("curl -N: %v: %s", err, stderr.String())
	}
	return events
}

// sseGo reads the stream with the Go client.
func sseGo(t testing.TB, e *escrow, c call) []sseEvent {
	t.Helper()
	tr := goTransport(t, e, "", nil)
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodGet, c.URL, nil)
	for _, h := range c.Headers {
		req.Header.Add(h[0], h[1])
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("go SSE: %v", err)
	}
	defer resp.Body.Close()
	var hdr bytes.Buffer
	_ = resp.Header.Write(&hdr)
	e.Rec.add(t.Name()+": go SSE headers", hdr.Bytes())
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		e.Rec.add(t.Name()+": go SSE body", b)
		t.Fatalf("go SSE: status %d: %s", resp.StatusCode, b)
	}
	events, all := readSSE(resp.Body)
	e.Rec.add(t.Name()+": go SSE body", []byte(all))
	return events
}

// ssePython reads the stream with requests (stream=True, iter_lines as data arrives).
func ssePython(t testing.TB, e *escrow, c call) []sseEvent {
	t.Helper()
	out := runPython(t, e, c, false, true)
	if out.Error != "" || out.Status != http.StatusOK {
		t.Fatalf("python SSE: status %d error %q", out.Status, out.Error)
	}
	var events []sseEvent
	for _, ev := range out.Events {
		sec := int64(ev.T)
		events = append(events, sseEvent{data: ev.Data, at: time.Unix(sec, int64((ev.T-float64(sec))*1e9))})
	}
	return events
}

func readSSE(r io.Reader) ([]sseEvent, string) {
	var events []sseEvent
	var all strings.Builder
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		now := time.Now()
		all.WriteString(line)
		if d, ok := strings.CutPrefix(strings.TrimSpace(line), "data:"); ok {
			events = append(events, sseEvent{data: strings.TrimSpace(d), at: now})
		}
		if err != nil {
			return events, all.String()
		}
	}
}
