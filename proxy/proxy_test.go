package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"net/textproto"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/credential"
)

func TestProxy_InjectsCredentialAndReplacesAgentAuthorization(t *testing.T) {
	type seen struct {
		auth      []string
		proxyAuth string
		apiKey    []string
		host      string
		path      string
		xff       string
	}
	got := make(chan seen, 1)
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- seen{auth: r.Header.Values("Authorization"), proxyAuth: r.Header.Get("Proxy-Authorization"),
			apiKey: r.Header.Values("X-Api-Key"), host: r.Host, path: r.URL.RequestURI(), xff: r.Header.Get("X-Forwarded-For")}
		w.Header().Set("X-Upstream", "yes")
		_, _ = io.WriteString(w, "hello from upstream")
	}), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"))
	// The agent also authenticates to the proxy on the CONNECT; that must not travel either.
	tp.Transport.ProxyConnectHeader = http.Header{"Proxy-Authorization": {"Bearer agent-proxy-token"}}

	resp := tp.Get(t, "https://api.example.com/v1/models?limit=2",
		"Authorization", "Bearer agent-placeholder-key",
		"authorization", "Bearer second-agent-key",
		"Proxy-Authorization", "Basic YWdlbnQ6cGFzcw==")
	if resp.StatusCode != http.StatusOK || string(readBody(t, resp)) != "hello from upstream" || resp.Header.Get("X-Upstream") != "yes" {
		t.Fatalf("response = %d %v", resp.StatusCode, resp.Header)
	}
	s := <-got
	if len(s.auth) != 1 || s.auth[0] != "Bearer "+testSecret {
		t.Errorf("upstream Authorization = %q, want exactly one: the real token", s.auth)
	}
	if s.proxyAuth != "" {
		t.Errorf("upstream saw Proxy-Authorization %q", s.proxyAuth)
	}
	if s.host != "api.example.com" || s.path != "/v1/models?limit=2" {
		t.Errorf("upstream saw host %q path %q", s.host, s.path)
	}
	if s.xff != "" {
		t.Errorf("upstream saw X-Forwarded-For %q: the agent's address leaks", s.xff)
	}

	rec := tp.Record(t, 1)
	if rec.Decision != audit.Allow || rec.Reason != string(ReasonAllowed) || rec.Kind != "request" ||
		rec.Scheme != "https" || rec.Host != "api.example.com" || rec.Port != 443 || rec.Path != "/v1/models" ||
		rec.Method != "GET" || rec.UpstreamStatus != 200 || rec.SPIFFEID != testSPIFFEID || rec.Attested ||
		rec.Credential != "api" || rec.BytesOut != int64(len("hello from upstream")) {
		t.Errorf("record = %+v", rec)
	}
	if rec.CredentialProvider != "static" {
		t.Errorf("record credential_provider = %q, want static", rec.CredentialProvider)
	}
	if want := credential.NewToken("api", testSecret, time.Time{}).ID(); rec.CredentialID != want {
		t.Errorf("record credential id = %q, want %q", rec.CredentialID, want)
	}
	if !slices.Equal(rec.PolicyIDs, []string{"allow-all"}) {
		t.Errorf("record policy ids = %q", rec.PolicyIDs)
	}
}

func TestProxy_InjectsCustomHeaderBasicAndQuery(t *testing.T) {
	got := make(chan *http.Request, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { got <- r })
	custom := newTLSUpstream(t, h, false, "custom.example.com")
	basic := newTLSUpstream(t, h, false, "basic.example.com")
	query := newTLSUpstream(t, h, false, "query.example.com")
	tp := newTestProxy(t, "upstreams:\n"+
		custom.route("custom.example.com", "credential: api", `inject: {header: X-Api-Key, value: "key {{.Token}}"}`)+
		basic.route("basic.example.com", "credential: api", "basic: {username: bot}")+
		query.route("query.example.com", "credential: api", "query: {param: key}"))

	do := func(u string, hdr ...string) *http.Request {
		t.Helper()
		if resp := tp.Get(t, u, hdr...); resp.StatusCode != 200 {
			t.Fatalf("%s: status %d", u, resp.StatusCode)
		}
		return <-got
	}
	r := do("https://custom.example.com/", "X-API-KEY", "agent-key", "Authorization", "Bearer agent")
	if v := r.Header.Values("X-Api-Key"); len(v) != 1 || v[0] != "key "+testSecret {
		t.Errorf("X-Api-Key = %q", v)
	}
	if v := r.Header.Values("Authorization"); len(v) != 0 {
		t.Errorf("the agent's Authorization reached the upstream: %q", v)
	}
	r = do("https://basic.example.com/", "Authorization", "Basic YWdlbnQ6cGxhY2Vob2xkZXI=")
	if user, pass, ok := r.BasicAuth(); !ok || user != "bot" || pass != testSecret || len(r.Header.Values("Authorization")) != 1 {
		t.Errorf("basic auth = %q %q %v (%q)", user, pass, ok, r.Header.Values("Authorization"))
	}
	r = do("https://query.example.com/search?q=1&KEY=agent&key=agent2")
	if v := r.URL.Query(); v.Get("q") != "1" || len(v["key"]) != 1 || v.Get("key") != testSecret || v.Has("KEY") {
		t.Errorf("query = %q", r.URL.RawQuery)
	}
	// The record names the path, never the query that now holds the secret.
	if rec := tp.Record(t, 3); rec.Path != "/search" {
		t.Errorf("record path = %q", rec.Path)
	}
}

func TestProxy_PlainHTTPAbsoluteForm(t *testing.T) {
	var calls counter
	got := make(chan *http.Request, 4)
	up := newPlainUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.inc()
		got <- r
		_, _ = io.WriteString(w, "plain ok")
	}))
	yaml := "upstreams:\n" +
		up.route("plain.example.com") +
		up.route("secret.example.com", "credential: api") +
		up.route("legacy.example.com", "credential: api", "unsafe_plaintext_credential: true")
	tp := newTestProxy(t, yaml)

	// No credential: forwarded as is, Host from the absolute URL.
	resp := tp.Get(t, "http://plain.example.com/a/b?c=d", "Authorization", "Bearer agent-own")
	if resp.StatusCode != 200 || string(readBody(t, resp)) != "plain ok" {
		t.Fatalf("plain: %d", resp.StatusCode)
	}
	r := <-got
	if r.Host != "plain.example.com" || r.URL.RequestURI() != "/a/b?c=d" || r.Header.Get("Proxy-Connection") != "" {
		t.Errorf("upstream saw host %q uri %q headers %v", r.Host, r.URL.RequestURI(), r.Header)
	}
	rec := tp.Record(t, 1)
	if rec.Scheme != "http" || rec.Port != 80 || rec.Decision != audit.Allow || rec.UpstreamStatus != 200 {
		t.Errorf("record = %+v", rec)
	}

	// A credential over plain http is refused before anything is sent.
	resp = tp.Get(t, "http://secret.example.com/")
	d := denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonPlaintextCredential)
	rec = tp.Record(t, 2)
	if rec.Decision != audit.Deny || rec.Reason != string(ReasonPlaintextCredential) || rec.RequestID != d.RequestID || rec.CredentialID != "" {
		t.Errorf("record = %+v", rec)
	}
	if calls.get() != 1 {
		t.Errorf("upstream calls = %d, want 1", calls.get())
	}

	// ... unless the operator says otherwise.
	resp = tp.Get(t, "http://legacy.example.com/x")
	if resp.StatusCode != 200 {
		t.Fatalf("legacy: %d", resp.StatusCode)
	}
	r = <-got
	if a := r.Header.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+testSecret {
		t.Errorf("legacy upstream Authorization = %q", a)
	}

	// Not an absolute-form http:// request: 400.
	req, _ := http.NewRequest(http.MethodGet, tp.URL.String()+"/direct", nil)
	resp, err := direct.Do(req)
	must(t, err)
	body := readBody(t, resp)
	resp.Body.Close()
	denialOf(t, resp, body, http.StatusBadRequest, ReasonBadRequest)
}

func TestProxy_DeniesUnknownHostWith403(t *testing.T) {
	tp := newTestProxy(t, "")

	t.Run("plain", func(t *testing.T) {
		resp := tp.Get(t, "http://unknown.example.net/path")
		d := denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonUnknownDestination)
		rec := findRecord(t, tp, d.RequestID)
		if rec.Decision != audit.Deny || rec.Reason != string(ReasonUnknownDestination) || rec.Host != "unknown.example.net" ||
			rec.SPIFFEID != testSPIFFEID {
			t.Errorf("record = %+v", rec)
		}
	})
	t.Run("connect", func(t *testing.T) {
		// The CONNECT is answered 200 and intercepted: the agent's HTTP client reads the
		// denial inside, as it would read any answer.
		resp, err := tp.Client.Get("https://unknown.example.net/")
		must(t, err)
		body := readBody(t, resp)
		resp.Body.Close()
		d := denialOf(t, resp, body, http.StatusForbidden, ReasonUnknownDestination)
		rec := findRecord(t, tp, d.RequestID)
		if rec.Decision != audit.Deny || rec.Kind != "connect" || rec.Host != "unknown.example.net" || rec.Port != 443 || rec.Scheme != "https" {
			t.Errorf("record = %+v", rec)
		}
	})
	t.Run("connect without port", func(t *testing.T) {
		_, _, resp, body := tp.rawConnect(t, "unknown.example.net", nil)
		denialOf(t, resp, body, http.StatusBadRequest, ReasonBadRequest)
	})
	t.Run("tunnel route over plain http", func(t *testing.T) {
		// A tunnel-only entry has no route for plain requests.
		tp := newTestProxy(t, "upstreams:\n  - host: pypi.example.org\n    tunnel: true\n")
		resp := tp.Get(t, "http://pypi.example.org/simple/")
		denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonUnknownDestination)
	})
}

// findRecord waits for the record with the request id.
func findRecord(t testing.TB, tp *testProxy, id string) *audit.Record {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, r := range tp.Records() {
			if r.RequestID == id {
				return r
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no audit record with request id %q", id)
	return nil
}

const denyDeletes = allowAll + `
@id("forbid-deletes")
forbid (principal, action == Action::"DELETE", resource == Host::"api.example.com");
`

func TestProxy_PolicyDenyHas403AndPolicyIDInRecord(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"), withPolicy(denyDeletes))

	req, _ := http.NewRequest(http.MethodDelete, "https://api.example.com/repos/x", nil)
	resp := tp.Do(t, req)
	d := denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonPolicyDenied)
	if calls.get() != 0 {
		t.Fatalf("a denied request reached the upstream")
	}
	rec := tp.Record(t, 1)
	if rec.RequestID != d.RequestID || rec.Decision != audit.Deny || rec.Reason != string(ReasonPolicyDenied) ||
		!slices.Equal(rec.PolicyIDs, []string{"forbid-deletes"}) || rec.Mode != "enforce" || rec.WouldDeny || rec.CredentialID != "" {
		t.Errorf("record = %+v", rec)
	}

	// Default deny: nothing permits, no policy ids.
	tp2 := newTestProxy(t, "upstreams:\n"+up.route("api.example.com"), withPolicy(`@id("other") permit (principal, action, resource == Host::"elsewhere.example.com");`))
	resp = tp2.Get(t, "https://api.example.com/")
	denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonPolicyDenied)
	if rec := tp2.Record(t, 1); len(rec.PolicyIDs) != 0 {
		t.Errorf("default deny policy ids = %q", rec.PolicyIDs)
	}
}

func TestProxy_ReportModeAllowsAndRecordsWouldDeny(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"), withPolicy(denyDeletes), withReportMode())

	req, _ := http.NewRequest(http.MethodDelete, "https://api.example.com/repos/x", nil)
	resp := tp.Do(t, req)
	if resp.StatusCode != 200 || resp.Header.Get(ReasonHeader) != "" {
		t.Fatalf("report mode: status %d, reason %q", resp.StatusCode, resp.Header.Get(ReasonHeader))
	}
	if calls.get() != 1 {
		t.Fatalf("upstream calls = %d", calls.get())
	}
	rec := tp.Record(t, 1)
	if rec.Decision != audit.WouldDeny || !rec.WouldDeny || rec.Reason != string(ReasonPolicyDenied) || rec.Mode != "report" ||
		!slices.Equal(rec.PolicyIDs, []string{"forbid-deletes"}) || rec.UpstreamStatus != 200 {
		t.Errorf("record = %+v", rec)
	}
	if !strings.Contains(tp.Logs.String(), "report mode: would deny") {
		t.Errorf("no would-deny log line")
	}
}

func TestProxy_PolicyErrorDenies(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	broken := allowAll + `
@id("broken-forbid")
forbid (principal, action, resource)
when { context.port * 9223372036854775807 == 0 };
`
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"), withPolicy(broken))
	resp := tp.Get(t, "https://api.example.com/")
	denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonPolicyError)
	if calls.get() != 0 {
		t.Fatal("a request whose policy errored reached the upstream")
	}
	rec := tp.Record(t, 1)
	if rec.Decision != audit.Deny || rec.Reason != string(ReasonPolicyError) || !slices.Equal(rec.PolicyIDs, []string{"broken-forbid"}) {
		t.Errorf("record = %+v", rec)
	}
	// The evaluation error goes to the ops log, not to the agent.
	if body := readBody(t, resp); strings.Contains(string(body), "overflow") {
		t.Errorf("evaluation error leaked to the agent: %s", body)
	}
	if !strings.Contains(tp.Logs.String(), "policy evaluation errors") {
		t.Errorf("evaluation error not logged")
	}
}

func TestProxy_IdentityUnavailableIs503(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api")+
		"  - host: tunnel.example.com\n    tunnel: true\n    address: "+up.Addr+"\n",
		withIdentity(unavailableIdentity{}))

	resp := tp.Get(t, "https://api.example.com/")
	denialOf(t, resp, readBody(t, resp), http.StatusServiceUnavailable, ReasonIdentityUnavailable)
	_, _, cresp, body := tp.rawConnect(t, "tunnel.example.com:443", nil)
	denialOf(t, cresp, body, http.StatusServiceUnavailable, ReasonIdentityUnavailable)
	if calls.get() != 0 {
		t.Fatal("a request without identity reached the upstream")
	}
	for _, rec := range tp.WaitRecords(t, 2) {
		if rec.Decision != audit.Deny || rec.Reason != string(ReasonIdentityUnavailable) || rec.SPIFFEID != "" || rec.CredentialID != "" {
			t.Errorf("record = %+v", rec)
		}
	}
	if strings.Contains(string(readBody(t, resp)), "SVID") {
		t.Error("internal error text sent to the agent")
	}
}

// providerFunc adapts a function to credential.Provider.
type providerFunc func(ctx context.Context, args credential.FetchArgs) (credential.Token, error)

func (f providerFunc) Fetch(ctx context.Context, a credential.FetchArgs) (credential.Token, error) {
	return f(ctx, a)
}

func TestProxy_CredentialUnavailableIs503(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	routes := "upstreams:\n" + up.route("api.example.com", "credential: api") +
		up.route("broken.example.com", "credential: broken")

	check := func(t *testing.T, tp *testProxy, url string) {
		t.Helper()
		before := calls.get()
		resp := tp.Get(t, url)
		d := denialOf(t, resp, readBody(t, resp), http.StatusServiceUnavailable, ReasonCredentialUnavailable)
		if calls.get() != before {
			t.Fatal("a request without its credential reached the upstream")
		}
		rec := findRecord(t, tp, d.RequestID)
		if rec.Decision != audit.Deny || rec.Reason != string(ReasonCredentialUnavailable) || rec.Credential == "" || rec.CredentialID != "" {
			t.Errorf("record = %+v", rec)
		}
	}

	t.Run("missing file", func(t *testing.T) {
		tp := newTestProxy(t, routes)
		check(t, tp, "https://broken.example.com/")
	})
	t.Run("empty file", func(t *testing.T) {
		tp := newTestProxy(t, routes, withSecretContent("\n"))
		check(t, tp, "https://api.example.com/")
	})
	t.Run("file deleted after use", func(t *testing.T) {
		tp := newTestProxy(t, routes, withCredentialOptions(credential.Options{RecheckEvery: time.Millisecond}))
		if resp := tp.Get(t, "https://api.example.com/"); resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		must(t, os.Remove(tp.SecretFile))
		time.Sleep(5 * time.Millisecond) // past RecheckEvery
		check(t, tp, "https://api.example.com/")
	})
	t.Run("provider fails", func(t *testing.T) {
		tp := newTestProxy(t, routes, withProvider("api", providerFunc(func(context.Context, credential.FetchArgs) (credential.Token, error) {
			return credential.Token{}, errors.New("vault: permission denied")
		})))
		check(t, tp, "https://api.example.com/")
		if !strings.Contains(tp.Logs.String(), "credential_unavailable") {
			t.Error("cause not logged")
		}
	})
}

func TestProxy_EgressDeniedForLoopbackWithoutAllowCIDR(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	plain := newPlainUpstream(t, okHandler(&calls))
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api")+plain.route("plain.example.com"),
		withoutLoopbackEgress())

	for _, u := range []string{"https://api.example.com/", "http://plain.example.com/"} {
		resp := tp.Get(t, u)
		d := denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonEgressDenied)
		rec := findRecord(t, tp, d.RequestID)
		if rec.Decision != audit.Deny || rec.Reason != string(ReasonEgressDenied) || rec.UpstreamStatus != 0 {
			t.Errorf("%s: record = %+v", u, rec)
		}
	}
	if calls.get() != 0 {
		t.Fatal("a loopback upstream was reached without an allow CIDR")
	}
}

func TestProxy_EgressDeniedForNameResolvingToDeniedIP(t *testing.T) {
	var dialed counter
	res := &fakeResolver{answers: map[string][]netip.Addr{
		"internal.example.com": {netip.MustParseAddr("10.1.2.3")},
		"meta.example.com":     {netip.MustParseAddr("169.254.169.254")},
	}}
	tp := newTestProxy(t, `upstreams:
  - host: internal.example.com
    credential: api
  - host: meta.example.com
`, withResolver(res), withDial(func(ctx context.Context, network, addr string) (net.Conn, error) {
		dialed.inc()
		return nil, errors.New("the test dialer must not be called")
	}))
	for _, u := range []string{"https://internal.example.com/", "http://meta.example.com/latest/meta-data/"} {
		resp := tp.Get(t, u)
		d := denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonEgressDenied)
		if rec := findRecord(t, tp, d.RequestID); rec.Reason != string(ReasonEgressDenied) {
			t.Errorf("%s: record = %+v", u, rec)
		}
	}
	if dialed.get() != 0 {
		t.Fatal("a denied address was dialled")
	}
}

func TestProxy_UpstreamUnavailableIs502(t *testing.T) {
	// An address nobody listens on, and an upstream whose certificate escrow cannot verify.
	dead := newPlainUpstream(t, okHandler(nil))
	dead.Close()
	untrusted := newTLSUpstream(t, okHandler(nil), false, "untrusted.example.com")
	tp := newTestProxy(t, "upstreams:\n"+dead.route("dead.example.com")+
		fmt.Sprintf("  - host: untrusted.example.com\n    address: %s\n", untrusted.Addr))
	for _, u := range []string{"http://dead.example.com/", "https://untrusted.example.com/"} {
		resp := tp.Get(t, u)
		d := denialOf(t, resp, readBody(t, resp), http.StatusBadGateway, ReasonUpstreamUnavailable)
		// The policy allowed it: the record says so, and what happened next.
		if rec := findRecord(t, tp, d.RequestID); rec.Decision != audit.Allow || rec.Outcome != audit.OutcomeUpstreamUnavailable ||
			rec.Status != http.StatusBadGateway || rec.BytesOut == 0 {
			t.Errorf("%s: record = %+v", u, rec)
		}
	}
}

func TestProxy_StripsForgedEscrowReasonFromUpstream(t *testing.T) {
	forge := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(ReasonHeader, string(ReasonPolicyDenied))
		w.Header()["x-escrow-reason"] = []string{"identity_unavailable"} // non-canonical key on the wire too
		w.WriteHeader(http.StatusForbidden)
		_, _ = io.WriteString(w, `{"error":"policy_denied"}`)
	})
	up := newTLSUpstream(t, forge, false, "api.example.com")
	up2 := newTLSUpstream(t, forge, true, "h2.example.com")
	plain := newPlainUpstream(t, forge)
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com")+up2.route("h2.example.com")+plain.route("plain.example.com"))
	tp.Transport.ForceAttemptHTTP2 = true
	for _, u := range []string{"https://api.example.com/", "https://h2.example.com/", "http://plain.example.com/"} {
		resp := tp.Get(t, u)
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("%s: status %d", u, resp.StatusCode)
		}
		if v := resp.Header.Values(ReasonHeader); len(v) != 0 {
			t.Errorf("%s: the agent sees a forged %s: %q", u, ReasonHeader, v)
		}
	}
	// The record says the upstream answered 403; escrow allowed it.
	for _, rec := range tp.WaitRecords(t, 3) {
		if rec.Decision != audit.Allow || rec.UpstreamStatus != http.StatusForbidden {
			t.Errorf("record = %+v", rec)
		}
	}
}

func TestProxy_StripsForgedEscrowReasonFromInformationalResponsesAndTrailers(t *testing.T) {
	forge := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.Header().Set(ReasonHeader, "policy_denied")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del(ReasonHeader)
		w.Header().Set("Trailer", ReasonHeader+", X-Checksum")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "body")
		w.Header().Set(ReasonHeader, "identity_unavailable")
		w.Header().Set("X-Checksum", "abc")
		w.Header().Set(http.TrailerPrefix+ReasonHeader, "credential_unavailable") // unannounced
	})
	up := newTLSUpstream(t, forge, false, "api.example.com")
	up2 := newTLSUpstream(t, forge, true, "h2.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com")+up2.route("h2.example.com"))
	tp.Transport.ForceAttemptHTTP2 = true
	for _, u := range []string{"https://api.example.com/", "https://h2.example.com/"} {
		var early []string
		trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			early = append(early, fmt.Sprintf("%d %v", code, h))
			if v := h.Values(ReasonHeader); len(v) != 0 {
				t.Errorf("%s: a %d response carries a forged %s: %q", u, code, ReasonHeader, v)
			}
			return nil
		}}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, u, nil)
		resp := tp.Do(t, req)
		if string(readBody(t, resp)) != "body" {
			t.Fatalf("%s: body", u)
		}
		if len(early) == 0 {
			t.Errorf("%s: the 103 Early Hints did not reach the agent", u)
		}
		if v := resp.Trailer.Values(ReasonHeader); len(v) != 0 {
			t.Errorf("%s: trailers carry a forged %s: %q", u, ReasonHeader, v)
		}
		if resp.Trailer.Get("X-Checksum") != "abc" {
			t.Errorf("%s: other trailers lost: %v", u, resp.Trailer)
		}
	}
	for _, rec := range tp.WaitRecords(t, 2) {
		if rec.Decision != audit.Allow || rec.UpstreamStatus != http.StatusOK {
			t.Errorf("record = %+v", rec)
		}
	}
}

func TestProxy_MetricsCountDecisions(t *testing.T) {
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"), withPolicy(denyDeletes))

	tp.Get(t, "https://api.example.com/secret-path-1")
	tp.Get(t, "https://api.example.com/secret-path-2")
	tp.Get(t, "http://unknown.example.net/secret-path-3")
	req, _ := http.NewRequest(http.MethodDelete, "https://api.example.com/secret-path-4", nil)
	tp.Do(t, req)
	tp.WaitRecords(t, 4)

	counts := map[[2]string]float64{}
	mfs, err := tp.Metrics.Registry.Gather()
	must(t, err)
	for _, mf := range mfs {
		if mf.GetName() != "escrow_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var names []string
			lv := map[string]string{}
			for _, l := range m.GetLabel() {
				names = append(names, l.GetName())
				lv[l.GetName()] = l.GetValue()
			}
			if !slices.Equal(names, []string{"decision", "reason"}) {
				t.Errorf("escrow_requests_total labels = %q, want only decision, reason", names)
			}
			counts[[2]string{lv["decision"], lv["reason"]}] = m.GetCounter().GetValue()
		}
	}
	want := map[[2]string]float64{
		{"allow", "allowed"}:            2,
		{"deny", "unknown_destination"}: 1,
		{"deny", "policy_denied"}:       1,
	}
	if fmt.Sprint(counts) != fmt.Sprint(want) {
		t.Errorf("escrow_requests_total = %v, want %v", counts, want)
	}
	// No label anywhere carries a host or a path.
	out := scrape(t, tp.AdminURL+"/metrics")
	for _, s := range []string{"example.com", "example.net", "secret-path", testSPIFFEID} {
		if strings.Contains(out, s) {
			t.Errorf("/metrics mentions %q", s)
		}
	}
	// Two lookups, served by one provider fetch (the second from the cache).
	if !strings.Contains(out, `escrow_credential_lookups_total{result="ok"} 2`) ||
		!strings.Contains(out, `escrow_credential_fetches_total{provider="static",result="success"} 1`) {
		t.Errorf("credential lookups and fetches not counted:\n%s", grepLines(out, "escrow_credential"))
	}
}

func scrape(t testing.TB, url string) string {
	t.Helper()
	resp, err := direct.Get(url)
	must(t, err)
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d", url, resp.StatusCode)
	}
	return string(readBody(t, resp))
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestProxy_AuditRecordIsOneJSONLine(t *testing.T) {
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	var buf syncBuffer
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"), withAuditJSON(&buf))
	tp.Get(t, "https://api.example.com/x")
	tp.WaitRecords(t, 1)
	var m map[string]any
	if err := json.Unmarshal([]byte(strings.TrimSpace(buf.String())), &m); err != nil {
		t.Fatalf("audit line %q: %v", buf.String(), err)
	}
	if m["decision"] != "allow" || m["credential"] != "api" || m["host"] != "api.example.com" || m["log_type"] != "audit" {
		t.Errorf("audit line = %v", m)
	}
}

func TestProxy_RefusesDotSegmentsThatWouldBypassPathPolicy(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	plain := newPlainUpstream(t, okHandler(&calls))
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api")+plain.route("plain.example.com"),
		withPolicy(`@id("public-only") permit (principal, action, resource) when { context.path like "/public/*" };`))

	if resp := tp.Get(t, "https://api.example.com/public/docs"); resp.StatusCode != 200 {
		t.Fatalf("allowed path: %d", resp.StatusCode)
	}
	for _, u := range []string{
		"https://api.example.com/public/../admin",
		"https://api.example.com/public/%2e%2e/admin",
		"https://api.example.com/public/..%5Cadmin",
		"https://api.example.com/public/./../admin",
		"http://plain.example.com/public/../admin",
	} {
		resp := tp.Get(t, u)
		d := denialOf(t, resp, readBody(t, resp), http.StatusBadRequest, ReasonBadRequest)
		if rec := findRecord(t, tp, d.RequestID); rec.Decision != audit.Deny || rec.SPIFFEID != testSPIFFEID {
			t.Errorf("%s: record = %+v", u, rec)
		}
	}
	if calls.get() != 1 {
		t.Errorf("upstream calls = %d, want 1", calls.get())
	}
	// Dots inside a segment are ordinary.
	if resp := tp.Get(t, "https://api.example.com/public/v1.2/..hidden/file..txt"); resp.StatusCode != 200 {
		t.Errorf("dots within segments: %d", resp.StatusCode)
	}
}

func TestProxy_PolicySeesRequestContext(t *testing.T) {
	var calls counter
	up := newTLSUpstream(t, okHandler(&calls), false, "api.example.com")
	plain := newPlainUpstream(t, okHandler(&calls))
	tp := newTestProxy(t, "upstreams:\n"+
		up.route("api.example.com", "credential: api")+
		up.route("api.example.com", "port: 8443")+
		plain.route("plain.example.com"), withPolicy(`
@id("https-api-read")
permit (principal in Namespace::"agents", action in Action::"read", resource == Host::"api.example.com")
when { context.scheme == "https" && context.port == 443 && context.credential == "api" &&
       context.method == "GET" && context.path == "/v1/read" && !context.attestation.attested &&
       context.attestation.source == "static" && principal.trust_domain == "example.org" };

@id("https-api-post-8443")
permit (principal in ServiceAccount::"agents/coder", action == Action::"POST", resource == Host::"api.example.com")
when { context.port == 8443 && context.credential == "" && context.method == "POST" };

@id("plain-read")
permit (principal, action == Action::"HEAD", resource == Host::"plain.example.com")
when { context.scheme == "http" && context.port == 80 && context.path == "/h" };
`))
	for _, c := range []struct {
		method, url string
		want        int
	}{
		{"GET", "https://api.example.com/v1/read", 200},
		{"GET", "https://api.example.com/v1/other", 403},
		{"POST", "https://api.example.com/v1/read", 403},
		{"POST", "https://api.example.com:8443/x", 200},
		{"GET", "https://api.example.com:8443/v1/read", 403},
		{"HEAD", "http://plain.example.com/h", 200},
		{"GET", "http://plain.example.com/h", 403},
	} {
		req, _ := http.NewRequest(c.method, c.url, nil)
		if resp := tp.Do(t, req); resp.StatusCode != c.want {
			t.Errorf("%s %s = %d, want %d", c.method, c.url, resp.StatusCode, c.want)
		}
	}
	if calls.get() != 3 {
		t.Errorf("upstream calls = %d, want 3", calls.get())
	}
}

func TestProxy_DialsTheCheckedIPAndVerifiesTheName(t *testing.T) {
	// No address: the name is resolved (127.0.0.1, opened by allow_cidrs), the checked IP is
	// dialled, and TLS is verified against the host name, not the IP.
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	var mu sync.Mutex
	var dialed []string
	tp := newTestProxy(t, "upstreams:\n  - host: api.example.com\n    credential: api\n    ca_file: "+up.CAFile+"\n",
		withResolver(&fakeResolver{answers: map[string][]netip.Addr{"api.example.com": {netip.MustParseAddr("127.0.0.1")}}}),
		withDial(func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			dialed = append(dialed, addr)
			mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, network, up.Addr)
		}))
	if resp := tp.Get(t, "https://api.example.com/"); resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(dialed) != 1 || dialed[0] != "127.0.0.1:443" {
		t.Errorf("dialled %q, want the checked IP on 443", dialed)
	}
}

// peerRecorder is an identity source that remembers the Peer it was asked about.
type peerRecorder struct {
	mu    sync.Mutex
	peers []attest.Peer
	inner Identifier
}

func (p *peerRecorder) Identify(ctx context.Context, pr attest.Peer) (attest.Identity, error) {
	p.mu.Lock()
	p.peers = append(p.peers, pr)
	p.mu.Unlock()
	return p.inner.Identify(ctx, pr)
}

func TestProxy_PassesProxyAuthorizationToIdentity(t *testing.T) {
	st, err := attest.NewStatic(testSPIFFEID)
	if err != nil {
		t.Fatal(err)
	}
	rec := &peerRecorder{inner: st}
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), false, "api.example.com")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.com", "credential: api"), withIdentity(rec))
	rec.mu.Lock()
	rec.peers = nil // start-up asked who the workload is (to warm its credentials): no peer then
	rec.mu.Unlock()

	// On a CONNECT: the token comes with the CONNECT request and applies to its inner requests.
	tp.Transport.ProxyConnectHeader = http.Header{"Proxy-Authorization": {"Bearer delegation-on-connect"}}
	resp := tp.Get(t, "https://api.example.com/")
	readBody(t, resp)
	// On a plain request (here to an unknown host, which still identifies the caller for the record).
	resp = tp.Get(t, "http://unknown.example.net/", "Proxy-Authorization", "Bearer delegation-on-plain")
	readBody(t, resp)

	rec.mu.Lock()
	defer rec.mu.Unlock()
	var got []string
	for _, p := range rec.peers {
		got = append(got, p.ProxyAuthorization)
		if !p.RemoteAddr.IsValid() {
			t.Errorf("peer without remote address: %+v", p)
		}
	}
	if !slices.Contains(got, "Bearer delegation-on-connect") || !slices.Contains(got, "Bearer delegation-on-plain") {
		t.Fatalf("identity saw Proxy-Authorization values %q", got)
	}
}
