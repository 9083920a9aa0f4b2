package e2e

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	// staticID is the identity of the static-identity groups.
	staticID = "spiffe://e2e.test/ns/agents/sa/coder"
	// agentAuth is the credential the agent sends on its own; it must never reach an upstream
	// through an intercepted route.
	agentAuth = "Bearer agent-fake"
)

var (
	agentHeaders  = [][2]string{{"Authorization", agentAuth}}
	credentialIDs = regexp.MustCompile(`^[0-9a-f]{8,64}$`)
)

func testdata(parts ...string) string {
	p, err := filepath.Abs(filepath.Join(append([]string{"testdata"}, parts...)...))
	if err != nil {
		panic(err)
	}
	return p
}

// TestProxyWithStaticIdentity runs one escrow with a static identity, enforcing the policies in
// testdata/policies/static, in front of: one HTTPS API reached under several names (each bound
// to a credential applied its own way: bearer from a file, bearer from escrow's environment, a
// query parameter, a custom header), a name pinned to a closed port, a plain-HTTP API, and a TLS
// server reached through blind tunnels. Every scenario is tried with the real clients where it
// makes sense.
func TestProxyWithStaticIdentity(t *testing.T) {
	api := newUpstream(t, true, map[string]expectation{
		"api.example.test":   bearer(fileSecret),
		"env.example.test":   bearer(envSecret),
		"query.example.test": {Secret: fileSecret, Query: "api_key"},
		"xkey.example.test":  {Secret: envSecret, Header: "X-Api-Key"},
	})
	plain := newUpstream(t, false, map[string]expectation{"plain-cred.example.test": bearer(fileSecret)})
	tunnel := newUpstream(t, true, nil)
	down := closedPort(t)
	e := startEscrow(t, fmt.Sprintf(`
identity:
  static: %[1]s
policy:
  dir: %[2]s
upstreams:
  - host: api.example.test
    credential: api-key
    address: %[3]s
    ca_file: %[4]s
  - host: env.example.test
    credential: env-key
    address: %[3]s
    ca_file: %[4]s
  - host: query.example.test
    credential: api-key
    query: {param: api_key}
    address: %[3]s
    ca_file: %[4]s
  - host: xkey.example.test
    credential: env-key
    inject: {header: X-Api-Key, value: "{{.Token}}"}
    address: %[3]s
    ca_file: %[4]s
  - host: down.example.test          # nothing listens there
    credential: api-key
    query: {param: api_key}
    address: %[9]s
    ca_file: %[4]s
  - host: pkg.example.test
    tunnel: true
    address: %[5]s
  - host: blocked-pkg.example.test
    tunnel: true
    address: %[5]s
  - host: plain.example.test
    address: %[6]s
  - host: plain-cred.example.test
    credential: api-key
    address: %[6]s
credentials:
  api-key: {static: {file: %[7]s}}
  env-key: {static: {env: %[8]s}}
egress:
  allow_cidrs: [127.0.0.0/8]
`, staticID, testdata("policies", "static"), api.Addr, upstreamCA.certFile, tunnel.Addr, plain.Addr,
		fileSecretPath, envSecretVar, down), escrowOptions{Env: []string{envSecretVar + "=" + envSecret}, DrainTimeout: 2 * time.Second})

	var fileCredID string
	t.Run("allowed_request_reaches_the_upstream_with_escrows_credential_instead_of_the_agents", func(t *testing.T) {
		eachClient(t, allClients, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders})
			if r.Status != http.StatusOK || r.Err != "" || !strings.Contains(r.Body, `"ok":true`) {
				t.Fatalf("got status %d err %q body %q, want 200 from the upstream", r.Status, r.Err, r.Body)
			}
			checkUpstreamSawOnlyTheRealKey(t, api, path)
			rec := e.auditFor(t, path)
			checkAllowedRecord(t, rec, "GET", "api.example.test", path, "api-key", []string{"agents-read-apis"})
			if rec.Identity.SPIFFEID != staticID || rec.Identity.Attested || rec.Identity.Source != "static" {
				t.Errorf("identity %+v, want %s, attested false, source static", rec.Identity, staticID)
			}
			if rec.BytesOut <= 0 {
				t.Errorf("bytes_out %d, want > 0", rec.BytesOut)
			}
			if fileCredID == "" {
				fileCredID = rec.CredentialID
			} else if rec.CredentialID != fileCredID {
				t.Errorf("credential_id %q changed from %q with the same secret", rec.CredentialID, fileCredID)
			}
		})
	})

	t.Run("credential_from_escrows_environment_is_injected", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{URL: "https://env.example.test" + path, Headers: agentHeaders})
			if r.Status != http.StatusOK {
				t.Fatalf("status %d err %q body %q, want 200", r.Status, r.Err, r.Body)
			}
			checkUpstreamSawOnlyTheRealKey(t, api, path)
			rec := e.auditFor(t, path)
			checkAllowedRecord(t, rec, "GET", "env.example.test", path, "env-key", []string{"agents-read-apis"})
			if fileCredID != "" && rec.CredentialID == fileCredID {
				t.Errorf("env credential has the same credential_id %q as the file credential", rec.CredentialID)
			}
		})
	})

	t.Run("credential_as_query_parameter_or_custom_header_replaces_what_the_agent_sent", func(t *testing.T) {
		eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
			for _, c := range []call{
				{URL: "https://query.example.test" + uniquePath("/v1/search", cl.name) + "?q=escrow&api_key=agent-fake", Headers: agentHeaders},
				{URL: "https://xkey.example.test" + uniquePath("/v1/models", cl.name), Headers: [][2]string{{"Authorization", agentAuth}, {"X-Api-Key", "agent-fake"}}},
			} {
				r := cl.do(t, e, c)
				if r.Status != http.StatusOK {
					t.Fatalf("%s: status %d err %q body %q, want 200", c.URL, r.Status, r.Err, r.Body)
				}
				path, _, _ := strings.Cut(strings.SplitN(c.URL, "example.test", 2)[1], "?")
				checkUpstreamSawOnlyTheRealKey(t, api, path)
				if rec := e.auditFor(t, path); rec.Decision != "allow" || rec.CredentialID == "" {
					t.Errorf("record %s, want allowed with a credential_id", rec.Raw)
				}
			}
		})
	})

	t.Run("upstream_failure_is_502_and_reveals_nothing_of_the_credential", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			r := cl.do(t, e, call{URL: "https://down.example.test" + uniquePath("/v1/models", cl.name) + "?api_key=agent-fake", Headers: agentHeaders})
			d := checkDenial(t, r, http.StatusBadGateway, "upstream_unavailable")
			if rec := e.auditByID(t, d.RequestID); rec.Decision != "allow" || rec.Outcome != "upstream_unavailable" {
				t.Errorf("record %s, want allow with outcome upstream_unavailable", rec.Raw)
			}
			// The ops log explains the failure; the hygiene check at the end makes sure it
			// does so without the credential (which was already in the request's URL).
		})
	})

	t.Run("Host_header_naming_another_host_is_refused_with_421_host_mismatch", func(t *testing.T) {
		// env.example.test is configured too, with another credential: an agent must not be
		// able to steer a connection intercepted for one host to another.
		eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{URL: "https://api.example.test" + path, Headers: [][2]string{{"Authorization", agentAuth}, {"Host", "env.example.test"}}})
			d := checkDenial(t, r, http.StatusMisdirectedRequest, "host_mismatch")
			if rec := e.auditByID(t, d.RequestID); rec.Reason != "host_mismatch" || rec.Host != "api.example.test" {
				t.Errorf("record %s, want host_mismatch recorded for the CONNECT host", rec.Raw)
			}
			if n := len(api.requests(path)); n != 0 {
				t.Errorf("the upstream was called %d time(s)", n)
			}
		})
	})

	t.Run("request_body_is_forwarded_and_counted", func(t *testing.T) {
		body := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
		eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/upload", cl.name)
			r := cl.do(t, e, call{Method: http.MethodPost, URL: "https://api.example.test" + path, Headers: agentHeaders, Body: body})
			if r.Status != http.StatusOK || !strings.Contains(r.Body, fmt.Sprintf(`"body_bytes":%d`, len(body))) {
				t.Fatalf("status %d err %q body %q, want 200 with body_bytes %d", r.Status, r.Err, r.Body, len(body))
			}
			checkUpstreamSawOnlyTheRealKey(t, api, path)
			rec := e.auditFor(t, path)
			if rec.Decision != "allow" || rec.BytesIn != int64(len(body)) || !slices.Equal(rec.PolicyIDs, []string{"agents-post-v1"}) {
				t.Errorf("record %s, want allowed by agents-post-v1 with bytes_in %d", rec.Raw, len(body))
			}
		})
	})

	t.Run("concurrent_requests_each_get_the_credential_and_one_audit_record", func(t *testing.T) {
		// One HTTP/2 connection multiplexing, plus separate HTTP/1.1 connections.
		h2 := goTransport(t, e, "", nil)
		h1 := goTransport(t, e, "", nil)
		h1.ForceAttemptHTTP2 = false
		h1.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		defer h2.CloseIdleConnections()
		defer h1.CloseIdleConnections()
		const n = 24
		paths := make([]string, n)
		statuses := make([]int, n)
		var wg sync.WaitGroup
		for i := range n {
			tr, proto := h2, "h2"
			if i%3 == 0 {
				tr, proto = h1, "h1"
			}
			paths[i] = uniquePath("/v1/models", fmt.Sprintf("concurrent-%s-%d", proto, i))
			wg.Add(1)
			go func() {
				defer wg.Done()
				req, _ := http.NewRequest(http.MethodGet, "https://api.example.test"+paths[i], nil)
				req.Header.Set("Authorization", agentAuth)
				resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Do(req)
				if err != nil {
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				e.Rec.add(t.Name()+": go concurrent body", b)
				statuses[i] = resp.StatusCode
			}()
		}
		wg.Wait()
		for i, p := range paths {
			if statuses[i] != http.StatusOK {
				t.Errorf("%s: status %d, want 200", p, statuses[i])
				continue
			}
			checkUpstreamSawOnlyTheRealKey(t, api, p)
			e.auditFor(t, p)
		}
		counts := map[string]int{}
		for _, r := range e.auditRecordsSnapshot() {
			counts[r.Path]++
		}
		for _, p := range paths {
			if counts[p] != 1 {
				t.Errorf("%s: %d audit records, want exactly 1", p, counts[p])
			}
		}
	})

	t.Run("websocket_upgrade_passes_with_the_injected_credential", func(t *testing.T) {
		path := uniquePath("/v1/realtime", "go-raw")
		status, echo := websocketEcho(t, e, "api.example.test", path, "hello")
		if status != http.StatusSwitchingProtocols || echo != "hello" {
			t.Fatalf("status %d echo %q, want 101 and the echo", status, echo)
		}
		checkUpstreamSawOnlyTheRealKey(t, api, path)
		if rec := e.auditFor(t, path); rec.Decision != "allow" || rec.UpstreamStatus != http.StatusSwitchingProtocols {
			t.Errorf("record %s, want allowed with upstream_status 101", rec.Raw)
		}
	})

	t.Run("policy_denial_is_403_with_reason_header_JSON_body_and_request_id_and_never_reaches_the_upstream", func(t *testing.T) {
		eachClient(t, allClients, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{Method: http.MethodDelete, URL: "https://api.example.test" + path, Headers: agentHeaders})
			d := checkDenial(t, r, http.StatusForbidden, "policy_denied")
			if n := len(api.requests(path)); n != 0 {
				t.Errorf("the upstream was called %d time(s) for a denied request", n)
			}
			rec := e.auditByID(t, d.RequestID)
			if rec.Path != path || rec.Method != "DELETE" || rec.Decision != "deny" || rec.Reason != "policy_denied" {
				t.Errorf("record %s, want DELETE %s denied policy_denied", rec.Raw, path)
			}
			if !slices.Equal(rec.PolicyIDs, []string{"forbid-deletes"}) {
				t.Errorf("policy_ids %v, want [forbid-deletes]", rec.PolicyIDs)
			}
			if rec.CredentialID != "" || rec.UpstreamStatus != 0 {
				t.Errorf("a denied request fetched a credential or reached the upstream: %s", rec.Raw)
			}
		})
		t.Run("default_deny_names_no_policy", func(t *testing.T) {
			requireClient(t, "curl")
			path := uniquePath("/admin", "curl")
			r := doCurl(t, e, call{Method: http.MethodPost, URL: "https://api.example.test" + path, Headers: agentHeaders}, false)
			d := checkDenial(t, r, http.StatusForbidden, "policy_denied")
			rec := e.auditByID(t, d.RequestID)
			if rec.Reason != "policy_denied" || len(rec.PolicyIDs) != 0 {
				t.Errorf("record %s, want policy_denied with policy_ids []", rec.Raw)
			}
		})
	})

	t.Run("unknown_host_over_CONNECT_gets_the_JSON_denial_inside", func(t *testing.T) {
		// The CONNECT is answered and intercepted, so each client reads the denial as an
		// ordinary answer (no opaque "tunnel failed").
		eachClient(t, allClients, func(t *testing.T, cl agentClient) {
			host := "unknown-" + randomHex(4) + ".example.test"
			r := cl.do(t, e, call{URL: "https://" + host + "/v1/models", Headers: agentHeaders})
			checkDenial(t, r, http.StatusForbidden, "unknown_destination")
			rec := e.waitAudit(t, "CONNECT "+host, func(r auditRecord) bool { return r.Host == host })
			if rec.Decision != "deny" || rec.Reason != "unknown_destination" || rec.Method != "CONNECT" || rec.Port != 443 {
				t.Errorf("record %s, want CONNECT :443 denied unknown_destination", rec.Raw)
			}
			if rec.Identity.SPIFFEID != staticID {
				t.Errorf("record identity %q, want %q (who tried is recorded)", rec.Identity.SPIFFEID, staticID)
			}
		})
	})

	t.Run("unknown_host_over_plain_http_gets_the_JSON_denial", func(t *testing.T) {
		eachClient(t, allClients, func(t *testing.T, cl agentClient) {
			host := "unknown-" + randomHex(4) + ".example.test"
			r := cl.do(t, e, call{URL: "http://" + host + "/v1/models", Headers: agentHeaders})
			d := checkDenial(t, r, http.StatusForbidden, "unknown_destination")
			rec := e.auditByID(t, d.RequestID)
			if rec.Host != host || rec.Scheme != "http" || rec.Reason != "unknown_destination" {
				t.Errorf("record %s, want http %s unknown_destination", rec.Raw, host)
			}
		})
	})

	t.Run("tunnel_is_relayed_blind_so_the_client_sees_the_upstreams_own_certificate", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, curlEnv, pythonArgs, goClient}, func(t *testing.T, cl agentClient) {
			since := e.auditCount()
			path := uniquePath("/simple", cl.name)
			// The client trusts the upstream's CA only, not escrow's: an intercepted connection
			// would fail verification.
			r := cl.do(t, e, call{URL: "https://pkg.example.test" + path, Headers: agentHeaders, CAFile: upstreamCA.certFile})
			if r.Status != http.StatusOK || !strings.Contains(r.Body, `"tls":true`) {
				t.Fatalf("status %d err %q body %q, want 200 from the tunnel upstream over TLS", r.Status, r.Err, r.Body)
			}
			if r.PeerCert != nil && !r.PeerCert.Equal(upstreamCA.leafCert) {
				t.Errorf("the client saw certificate %q, want the upstream's own", r.PeerCert.Subject)
			}
			seen := tunnel.requests(path)
			if len(seen) != 1 || !slices.Equal(seen[0].Authorization, []string{agentAuth}) {
				t.Errorf("tunnel upstream saw %+v; want the agent's own request, untouched (no credential injected)", seen)
			}
			// Written when the tunnel closes.
			rec := e.waitAuditFrom(t, since, "tunnel to pkg.example.test", func(r auditRecord) bool {
				return r.Kind == "tunnel" && r.Host == "pkg.example.test"
			})
			if rec.Decision != "allow" || rec.Reason != "allowed" || rec.Method != "CONNECT" || rec.Port != 443 ||
				!slices.Equal(rec.PolicyIDs, []string{"agents-tunnel-packages"}) || rec.Credential != "" {
				t.Errorf("tunnel record %s, want CONNECT :443 allowed by agents-tunnel-packages, no credential", rec.Raw)
			}
			if rec.BytesIn <= 0 || rec.BytesOut <= 0 {
				t.Errorf("tunnel record bytes_in %d bytes_out %d, want both > 0", rec.BytesIn, rec.BytesOut)
			}
		})
		t.Run("trusting_only_escrows_bundle_fails_because_escrow_does_not_intercept", func(t *testing.T) {
			requireClient(t, "curl")
			r := doCurl(t, e, call{URL: "https://pkg.example.test/simple/x"}, false)
			if r.Status != 0 || !strings.Contains(r.Err, "exit 60") {
				t.Errorf("status %d err %q; want curl to reject the upstream's certificate (exit 60)", r.Status, r.Err)
			}
		})
	})

	t.Run("tunnel_without_a_permit_is_refused_at_CONNECT_with_policy_denied", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			before := tunnel.conns.Load()
			r := cl.do(t, e, call{URL: "https://blocked-pkg.example.test/simple/", CAFile: upstreamCA.certFile})
			if r.ConnectStatus != http.StatusForbidden || r.ConnectReason != "policy_denied" {
				t.Fatalf("CONNECT status %d reason %q err %q, want 403 policy_denied", r.ConnectStatus, r.ConnectReason, r.Err)
			}
			if n := tunnel.conns.Load() - before; n != 0 {
				t.Errorf("escrow opened %d connection(s) to the upstream of a denied tunnel", n)
			}
		})
	})

	t.Run("SSE_events_reach_the_agent_as_the_upstream_sends_them", func(t *testing.T) {
		for _, c := range []struct {
			cl  agentClient
			run func(testing.TB, *escrow, call) []sseEvent
		}{{curlFlags, sseCurl}, {goClient, sseGo}, {pythonArgs, ssePython}} {
			t.Run(c.cl.name, func(t *testing.T) {
				if c.cl.needs != "" {
					requireClient(t, c.cl.needs)
				}
				path := uniquePath("/v1/stream", c.cl.name)
				events := c.run(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders})
				checkStreamed(t, events, api.sentTimes(path))
				rec := e.auditFor(t, path)
				checkAllowedRecord(t, rec, "GET", "api.example.test", path, "api-key", []string{"agents-read-apis"})
			})
		}
	})

	t.Run("agent_that_disconnects_mid_stream_gets_one_record_that_does_not_blame_the_upstream", func(t *testing.T) {
		for _, proto := range []string{"HTTP/1.1", "HTTP/2"} {
			t.Run(strings.ReplaceAll(proto, "/", ""), func(t *testing.T) {
				path := uniquePath("/v1/stream", "go-leaves")
				tr := goTransport(t, e, "", nil)
				if proto == "HTTP/1.1" {
					tr.ForceAttemptHTTP2 = false
					tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
				}
				req, _ := http.NewRequest(http.MethodGet, "https://api.example.test"+path, nil)
				req.Header.Set("Authorization", agentAuth)
				resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Do(req)
				if err != nil {
					t.Fatal(err)
				}
				// Leave after the first event, while the upstream is still streaming.
				line, err := bufio.NewReader(resp.Body).ReadString('\n')
				_ = resp.Body.Close()
				tr.CloseIdleConnections()
				e.Rec.add(t.Name()+": first line", []byte(line))
				if err != nil || !strings.HasPrefix(line, "data: event-1") {
					t.Fatalf("first line %q %v", line, err)
				}
				rec := e.auditFor(t, path)
				time.Sleep(sseGap) // a second record would come no later than the upstream's next event
				n := 0
				for _, r := range e.auditRecordsSnapshot() {
					if r.Path == path {
						n++
					}
				}
				if n != 1 {
					t.Errorf("%d records for one request, want 1", n)
				}
				if rec.Decision != "allow" || rec.UpstreamStatus != http.StatusOK || rec.BytesOut <= 0 {
					t.Errorf("record %s, want allowed, upstream_status 200, bytes_out > 0", rec.Raw)
				}
				if rec.Outcome == "upstream_unavailable" || rec.Outcome == "upstream_timeout" {
					t.Errorf("outcome %q, but the upstream answered 200 and was still streaming when the agent left; record: %s", rec.Outcome, rec.Raw)
				}
			})
		}
	})

	t.Run("agent_gets_HTTP2_on_the_intercepted_connection", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders, HTTP2: true})
			if r.Status != http.StatusOK || r.HTTPVersion != "2" {
				t.Fatalf("status %d HTTP version %q err %q, want 200 over HTTP/2", r.Status, r.HTTPVersion, r.Err)
			}
			checkUpstreamSawOnlyTheRealKey(t, api, path)
		})
	})

	t.Run("proxy_authorization_is_never_forwarded_upstream", func(t *testing.T) {
		hdrs := [][2]string{{"Authorization", agentAuth}, {"Proxy-Authorization", "Bearer agent-proxy-token"}}
		t.Run("intercepted_https", func(t *testing.T) {
			eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
				path := uniquePath("/v1/models", cl.name)
				r := cl.do(t, e, call{URL: "https://api.example.test" + path, Headers: hdrs})
				if r.Status != http.StatusOK {
					t.Fatalf("status %d err %q body %q, want 200", r.Status, r.Err, r.Body)
				}
				checkUpstreamSawOnlyTheRealKey(t, api, path)
			})
		})
		t.Run("plain_http_route_without_credential", func(t *testing.T) {
			eachClient(t, oneOfEach, func(t *testing.T, cl agentClient) {
				path := uniquePath("/status", cl.name)
				r := cl.do(t, e, call{URL: "http://plain.example.test" + path, Headers: hdrs})
				if r.Status != http.StatusOK {
					t.Fatalf("status %d err %q body %q, want 200", r.Status, r.Err, r.Body)
				}
				seen := plain.requests(path)
				if len(seen) != 1 {
					t.Fatalf("upstream saw %d requests, want 1", len(seen))
				}
				if len(seen[0].ProxyAuthorization) != 0 {
					t.Errorf("upstream saw Proxy-Authorization %q", seen[0].ProxyAuthorization)
				}
				rec := e.auditFor(t, path)
				if rec.Decision != "allow" || rec.Scheme != "http" || rec.Port != 80 || rec.Credential != "" || rec.UpstreamStatus != 200 {
					t.Errorf("record %s, want an allowed http :80 request without credential", rec.Raw)
				}
			})
		})
	})

	t.Run("credential_is_never_sent_over_plain_http", func(t *testing.T) {
		eachClient(t, []agentClient{curlFlags, goClient}, func(t *testing.T, cl agentClient) {
			path := uniquePath("/v1/models", cl.name)
			r := cl.do(t, e, call{URL: "http://plain-cred.example.test" + path, Headers: agentHeaders})
			checkDenial(t, r, http.StatusForbidden, "plaintext_credential_refused")
			if n := len(plain.requests(path)); n != 0 {
				t.Errorf("the plain-HTTP upstream was called %d time(s)", n)
			}
		})
	})

	t.Run("upstream_cannot_forge_an_escrow_denial_header", func(t *testing.T) {
		requireClient(t, "curl")
		path := uniquePath("/v1", "curl") + "/forge"
		r := doCurl(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders}, false)
		if r.Status != http.StatusOK {
			t.Fatalf("status %d err %q, want 200", r.Status, r.Err)
		}
		if v := r.Header.Get("X-Escrow-Reason"); v != "" {
			t.Errorf("the agent saw X-Escrow-Reason %q set by the upstream", v)
		}
	})

	t.Run("admin_listener_reports_health_readiness_and_decision_metrics", func(t *testing.T) {
		if code, body := e.adminGet(t, "/healthz"); code != http.StatusOK {
			t.Errorf("/healthz %d %q", code, body)
		}
		code, body := e.adminGet(t, "/readyz")
		for _, want := range []string{`"ready":true`, `"identity":"ok"`, `"policy":"ok"`, `"ca":"ok"`} {
			if code != http.StatusOK || !strings.Contains(body, want) {
				t.Errorf("/readyz %d %s, want 200 with %s", code, body, want)
			}
		}
		m := e.metrics(t)
		for _, s := range [][]string{
			{"escrow_requests_total", "decision", "allow", "reason", "allowed"},
			{"escrow_requests_total", "decision", "deny", "reason", "policy_denied"},
			{"escrow_requests_total", "decision", "deny", "reason", "unknown_destination"},
			{"escrow_credential_lookups_total", "result", "ok"},
		} {
			if v := m.get(s[0], s[1:]...); v < 1 {
				t.Errorf("%s%v = %v, want >= 1", s[0], s[1:], v)
			}
		}
		if v := m.get("escrow_policy_reloads_total", "result", "success"); v < 1 {
			t.Errorf(`escrow_policy_reloads_total{result="success"} = %v, want >= 1 (the initial load)`, v)
		}
		// Every agent connection so far has been closed: no intercepted connection or tunnel
		// may still be counted.
		waitFor(t, 20*time.Second, "escrow_tunnels_active to return to 0", func() bool {
			return e.metrics(t).get("escrow_tunnels_active") == 0
		})
		// Labels come from closed sets: no host, path or identity.
		for _, never := range []string{"example.test", "spiffe://", "/v1/", "agent-fake"} {
			if strings.Contains(m.text, never) {
				t.Errorf("/metrics contains %q", never)
			}
		}
	})

	e.metrics(t) // for the hygiene check: escrow stops in the next step
	t.Run("SIGTERM_drains_in_flight_requests_closes_idle_tunnels_after_the_drain_timeout_and_exits_0", func(t *testing.T) {
		// An open tunnel that never finishes: escrow must close it once the drain timeout
		// (2s for this group) is over, and still write its record.
		since := e.auditCount()
		tun := openTunnel(t, e, "pkg.example.test")
		defer tun.Close()

		path := uniquePath("/v1/slow", "go")
		done := make(chan response, 1)
		go func() {
			var r response
			defer func() { done <- r }() // also if doGo gives up on the test (Goexit)
			r = doGo(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders})
		}()
		waitFor(t, 10*time.Second, "the slow request to reach the upstream", func() bool { return len(api.requests(path)) > 0 })
		start := time.Now()
		e.Stop(t)
		if took := time.Since(start); took > 2*time.Second+3*time.Second {
			t.Errorf("escrow took %v to stop with a 2s drain timeout", took)
		}
		r := <-done
		if r.Status != http.StatusOK {
			t.Errorf("in-flight request: status %d err %q, want 200 (drained, not cut)", r.Status, r.Err)
		}
		rec := e.auditFor(t, path)
		if rec.Decision != "allow" || rec.UpstreamStatus != 200 {
			t.Errorf("record %s, want allowed with upstream_status 200", rec.Raw)
		}
		_ = tun.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := tun.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("the tunnel is still open after escrow stopped (read: %v)", err)
		}
		tr := e.waitAuditFrom(t, since, "the tunnel's record", func(r auditRecord) bool { return r.Kind == "tunnel" })
		if tr.Host != "pkg.example.test" || tr.Decision != "allow" || tr.BytesIn <= 0 || tr.BytesOut <= 0 {
			t.Errorf("tunnel record %s, want pkg.example.test allowed with bytes both ways", tr.Raw)
		}
	})

	e.finish(t)
}

// checkUpstreamSawOnlyTheRealKey: exactly one request, with exactly one Authorization, escrow's
// (the upstream checks the value), and neither the agent's credential nor Proxy-Authorization.
// It never prints the secret.
func checkUpstreamSawOnlyTheRealKey(t testing.TB, u *upstream, path string) {
	t.Helper()
	seen := u.requests(path)
	if len(seen) != 1 {
		t.Fatalf("upstream saw %d requests for %s, want 1", len(seen), path)
	}
	s := seen[0]
	if !s.Authorized {
		t.Errorf("upstream did not get exactly one Authorization with the configured key (%d Authorization header(s))", len(s.Authorization))
	}
	for _, v := range s.Authorization {
		if strings.Contains(v, "agent-fake") {
			t.Errorf("upstream saw the agent's own Authorization %q", v)
		}
	}
	if len(s.ProxyAuthorization) != 0 {
		t.Errorf("upstream saw Proxy-Authorization %q", s.ProxyAuthorization)
	}
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

func checkAllowedRecord(t testing.TB, rec auditRecord, method, host, path, cred string, policies []string) {
	t.Helper()
	if rec.Kind != "request" || rec.Method != method || rec.Scheme != "https" || rec.Host != host || rec.Port != 443 || rec.Path != path {
		t.Errorf("record %s, want request %s https://%s:443%s", rec.Raw, method, host, path)
	}
	if rec.Decision != "allow" || rec.Reason != "allowed" || rec.Mode != "enforce" || rec.WouldDeny {
		t.Errorf("record %s, want decision allow, reason allowed, mode enforce", rec.Raw)
	}
	if !slices.Equal(rec.PolicyIDs, policies) {
		t.Errorf("policy_ids %v, want %v", rec.PolicyIDs, policies)
	}
	if rec.Credential != cred || !credentialIDs.MatchString(rec.CredentialID) {
		t.Errorf("credential %q credential_id %q, want %s and a short hex instance id", rec.Credential, rec.CredentialID, cred)
	}
	if rec.UpstreamStatus != http.StatusOK {
		t.Errorf("upstream_status %d, want 200", rec.UpstreamStatus)
	}
}

// checkDenial checks an escrow denial: status, X-Escrow-Reason, and the JSON body.
func checkDenial(t testing.TB, r response, status int, reason string) denial {
	t.Helper()
	if r.Status != status {
		t.Fatalf("status %d (CONNECT %d, err %q, body %q), want %d %s", r.Status, r.ConnectStatus, r.Err, r.Body, status, reason)
	}
	if got := r.Header.Get("X-Escrow-Reason"); got != reason {
		t.Errorf("X-Escrow-Reason %q, want %q", got, reason)
	}
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	d := r.denial(t)
	if d.Error != reason {
		t.Errorf("body error %q, want %q", d.Error, reason)
	}
	return d
}

// checkStreamed asserts that the three events were not batched: each arrived before the
// upstream sent the next one, and consecutive arrivals are at least half the send gap apart.
// No absolute latency bound, so a loaded machine does not make it flaky.
func checkStreamed(t testing.TB, events []sseEvent, sent []time.Time) {
	t.Helper()
	if len(events) != 3 || len(sent) != 3 {
		t.Fatalf("got %d events (%v), upstream sent %d; want 3", len(events), events, len(sent))
	}
	for i, ev := range events {
		if want := fmt.Sprintf("event-%d", i+1); ev.data != want {
			t.Errorf("event %d is %q, want %q", i, ev.data, want)
		}
	}
	t0 := sent[0]
	var timeline []string
	for i := range events {
		timeline = append(timeline, fmt.Sprintf("event-%d sent +%v arrived +%v", i+1,
			sent[i].Sub(t0).Round(time.Millisecond), events[i].at.Sub(t0).Round(time.Millisecond)))
	}
	t.Logf("timeline: %s", strings.Join(timeline, "; "))
	for i := 0; i < 2; i++ {
		if !events[i].at.Before(sent[i+1]) {
			t.Errorf("event-%d arrived after event-%d was sent: the stream was buffered (%s)", i+1, i+2, strings.Join(timeline, "; "))
		}
		if gap := events[i+1].at.Sub(events[i].at); gap < sseGap/2 {
			t.Errorf("event-%d arrived %v after event-%d, want >= %v: batched (%s)", i+2, gap, i+1, sseGap/2, strings.Join(timeline, "; "))
		}
	}
}

// websocketEcho is an agent's WebSocket handshake, by hand: CONNECT, TLS (HTTP/1.1, trusting
// escrow's bundle), an Upgrade request, then msg sent and read back on the switched connection.
func websocketEcho(t testing.TB, e *escrow, host, path, msg string) (status int, echo string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", e.ProxyHP, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "CONNECT %[1]s:443 HTTP/1.1\r\nHost: %[1]s:443\r\n\r\n", host)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	pemData, err := os.ReadFile(e.Bundle)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pemData)
	tc := tls.Client(conn, &tls.Config{ServerName: host, RootCAs: roots, NextProtos: []string{"http/1.1"}})
	fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: %s\r\n\r\n", path, host, agentAuth)
	tbr := bufio.NewReader(tc)
	resp, err = http.ReadResponse(tbr, nil)
	if err != nil {
		t.Fatalf("upgrade response: %v", err)
	}
	var hdr bytes.Buffer
	_ = resp.Header.Write(&hdr)
	e.Rec.add(t.Name()+": websocket response headers", hdr.Bytes())
	if resp.StatusCode != http.StatusSwitchingProtocols {
		b, _ := io.ReadAll(resp.Body)
		e.Rec.add(t.Name()+": websocket response body", b)
		return resp.StatusCode, ""
	}
	if _, err := tc.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(tbr, buf); err != nil {
		t.Fatalf("reading the echo: %v", err)
	}
	e.Rec.add(t.Name()+": websocket echo", buf)
	return resp.StatusCode, string(buf)
}

// openTunnel CONNECTs to host:443 through escrow and completes a TLS handshake with the upstream
// (trusting its own CA), leaving the connection open and idle.
func openTunnel(t testing.TB, e *escrow, host string) *tls.Conn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", e.ProxyHP, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "CONNECT %[1]s:443 HTTP/1.1\r\nHost: %[1]s:443\r\n\r\n", host)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != http.StatusOK {
		conn.Close()
		t.Fatalf("CONNECT %s: %v %v", host, resp, err)
	}
	pemData, err := os.ReadFile(upstreamCA.certFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pemData)
	tc := tls.Client(conn, &tls.Config{ServerName: host, RootCAs: roots})
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		conn.Close()
		t.Fatalf("TLS through the tunnel: %v", err)
	}
	_ = tc.SetDeadline(time.Time{})
	return tc
}
