package e2e

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// reflectingUpstream is an HTTPS API that reflects what it received, the injected credential
// included, as careless upstreams do: an echo body and a redirect quoting the URL.
func reflectingUpstream(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/redirect") {
			w.Header().Set("Location", "https://"+r.Host+r.URL.RequestURI()+"&next=1")
			w.Header().Set("X-Seen-Authorization", r.Header.Get("Authorization"))
			w.WriteHeader(http.StatusFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"url": r.URL.String(), "headers": r.Header})
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{upstreamCA.leaf}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

// runCurl runs curl with args (escrow as proxy, its bundle trusted) and returns the final
// status, the headers and the body it printed.
func runCurl(t *testing.T, e *escrow, args ...string) (int, string, string) {
	t.Helper()
	requireClient(t, "curl")
	dir := t.TempDir()
	hdr, body := filepath.Join(dir, "h"), filepath.Join(dir, "b")
	all := append([]string{"-q", "-sS", "--max-time", "20", "--proxy", e.ProxyURL, "--cacert", e.Bundle,
		"-D", hdr, "-o", body, "-w", "%{http_code}"}, args...)
	cmd := exec.Command(curlBin, all...)
	cmd.Env = cleanEnv()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	_ = cmd.Run()
	h, _ := os.ReadFile(hdr)
	b, _ := os.ReadFile(body)
	what := fmt.Sprintf("%s: curl %v", t.Name(), args)
	e.Rec.add(what+" headers", h)
	e.Rec.add(what+" body", b)
	e.Rec.add(what+" stderr", errb.Bytes())
	var status int
	fmt.Sscan(out.String(), &status)
	return status, string(h), string(b)
}

func reasonOf(t *testing.T, body string) denial {
	t.Helper()
	var d denial
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		t.Fatalf("not a JSON denial: %q", body)
	}
	return d
}

// TestHardening runs the wire-level guarantees of the hardening work with real clients: no
// path, method or upgrade trick reaches an upstream unjudged, the injected credential never
// comes back, a denied CONNECT is readable, a CONNECT for an http:// URL is served, and every
// answer names its audit record.
func TestHardening(t *testing.T) {
	refl := reflectingUpstream(t)
	plain := newUpstream(t, false, nil)
	e := startEscrow(t, fmt.Sprintf(`
identity: {static: %[1]s}
policy: {dir: %[2]s}
egress: {allow_cidrs: [127.0.0.0/8]}
upstreams:
  - host: api.example.test
    credential: api-key
    address: %[3]s
    ca_file: %[4]s
  - host: query.example.test
    credential: api-key
    query: {param: api_key}
    address: %[3]s
    ca_file: %[4]s
  - host: plain.example.test
    address: %[5]s
credentials:
  api-key: {static: {file: %[6]s}}
`, staticID, testdata("policies", "permit-all"), refl.Listener.Addr().String(), upstreamCA.certFile, plain.Addr, fileSecretPath), escrowOptions{})
	defer e.finish(t)

	t.Run("paths_upstreams_read_differently_are_refused", func(t *testing.T) {
		for _, p := range []string{"/v1//admin", "/v1/public/..;/admin", "/v1/%252e%252e/admin", "/v1/admin%00.json", "/v1/%c0%ae%c0%ae/admin"} {
			status, _, body := runCurl(t, e, "--path-as-is", "https://api.example.test"+p)
			if d := reasonOf(t, body); status != 400 || d.Error != "bad_request" {
				t.Errorf("%s: %d %s", p, status, body)
			}
		}
	})
	t.Run("trace_never_carries_the_credential", func(t *testing.T) {
		status, _, body := runCurl(t, e, "-X", "TRACE", "https://api.example.test/v1/x")
		if d := reasonOf(t, body); status != 405 || d.Error != "method_not_allowed" {
			t.Errorf("TRACE: %d %s", status, body)
		}
		requireClient(t, "python")
		r := doPython(t, e, call{Method: "TRACE", URL: "https://api.example.test/v1/y", Headers: [][2]string{}}, false)
		if r.Status != 405 {
			t.Errorf("python TRACE: %d %s", r.Status, r.Body)
		}
	})
	t.Run("h2c_upgrade_is_refused", func(t *testing.T) {
		status, _, body := runCurl(t, e, "-H", "Connection: Upgrade, HTTP2-Settings", "-H", "Upgrade: h2c",
			"-H", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA", "http://plain.example.test/x")
		if d := reasonOf(t, body); status != 400 || d.Error != "bad_request" {
			t.Errorf("h2c: %d %s", status, body)
		}
	})
	t.Run("the_injected_credential_never_comes_back", func(t *testing.T) {
		// The hygiene check at the end of the group scans everything the clients received.
		for _, u := range []string{"https://api.example.test/echo", "https://query.example.test/redirect?x=1"} {
			status, hdr, body := runCurl(t, e, u)
			if status != 200 && status != 302 || !strings.Contains(hdr+body, "[escrow:redacted") {
				t.Errorf("curl %s: %d\n%s\n%s", u, status, hdr, body)
			}
			if id := headerValue(hdr, "X-Escrow-Request-Id"); id == "" {
				t.Errorf("curl %s: no X-Escrow-Request-Id", u)
			} else if rec := e.auditByID(t, id); !strings.Contains(rec.Raw, `"redacted":`) || rec.Decision != "allow" {
				t.Errorf("record %s", rec.Raw)
			}
		}
		requireClient(t, "python")
		r := doPython(t, e, call{URL: "https://api.example.test/echo-py", Headers: [][2]string{}}, true)
		if r.Status != 200 || !strings.Contains(r.Body, "[escrow:redacted") {
			t.Errorf("python: %d %s", r.Status, r.Body)
		}
		if v := e.metrics(t).get("escrow_response_redactions_total"); v < 3 {
			t.Errorf("escrow_response_redactions_total = %v", v)
		}
	})
	t.Run("a_denied_connect_is_readable", func(t *testing.T) {
		status, hdr, body := runCurl(t, e, "https://unknown.example.test/v1/models")
		d := reasonOf(t, body)
		if status != 403 || d.Error != "unknown_destination" || headerValue(hdr, "X-Escrow-Request-Id") != d.RequestID {
			t.Errorf("curl: %d %s\n%s", status, body, hdr)
		}
		if rec := e.auditByID(t, d.RequestID); rec.Kind != "connect" || rec.Decision != "deny" || rec.Scheme != "https" {
			t.Errorf("record %s", rec.Raw)
		}
		requireClient(t, "python")
		r := doPython(t, e, call{URL: "https://unknown.example.test/v1/py", Headers: [][2]string{}}, true)
		if r.Status != 403 || !strings.Contains(r.Body, "unknown_destination") {
			t.Errorf("python: %d %s %s", r.Status, r.Body, r.Err)
		}
	})
	t.Run("connect_to_port_80_serves_http_inside", func(t *testing.T) {
		// curl -p tunnels http:// URLs through CONNECT host:80, as Node's env proxy does.
		status, hdr, body := runCurl(t, e, "-p", "http://plain.example.test/v1/tunnelled")
		if status != 200 || !strings.Contains(body, `"ok":true`) {
			t.Errorf("curl -p: %d %s %s", status, hdr, body)
		}
		if rec := e.auditFor(t, "/v1/tunnelled"); rec.Scheme != "http" || rec.Port != 80 || rec.Decision != "allow" {
			t.Errorf("record %s", rec.Raw)
		}
	})
	e.Stop(t)
	// A graceful stop with stdout on a pipe: fsync fails with EINVAL there, which is no error.
	if s := e.stderrText(); strings.Contains(s, "invalid argument") || strings.Contains(s, `"level":"error"`) {
		t.Errorf("error logged at stop:\n%s", tail(s, 10))
	}
}

func headerValue(block, name string) string {
	for _, l := range strings.Split(block, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(strings.TrimSpace(k), name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// TestFailedStartLeavesTheRunningInstancesTrustFiles starts a second escrow on the first one's
// port and ca_dir: it must fail without touching the CA the first one's agents trust.
func TestFailedStartLeavesTheRunningInstancesTrustFiles(t *testing.T) {
	cfg := fmt.Sprintf("identity: {static: %s}\npolicy: {dir: %s}\n", staticID, testdata("policies", "permit-all"))
	first := startEscrow(t, cfg, escrowOptions{})
	defer first.finish(t)
	caFile := filepath.Join(first.CADir, "ca.crt")
	before, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "second.yaml")
	second := fmt.Sprintf("listen: %s\nadmin: 127.0.0.1:0\nca_dir: %s\n%s", first.ProxyHP, first.CADir, cfg)
	if err := os.WriteFile(path, []byte(second), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(escrowBin, "proxy", "--config", path)
	cmd.Env = escrowEnv()
	out, err := cmd.CombinedOutput()
	first.Rec.add(t.Name()+": second escrow output", out)
	if err == nil {
		t.Fatalf("a second escrow on a used port started:\n%s", out)
	}
	after, _ := os.ReadFile(caFile)
	if !bytes.Equal(before, after) {
		t.Fatal("the failed start replaced the running escrow's ca.crt")
	}
}
