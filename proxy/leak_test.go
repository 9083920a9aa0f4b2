package proxy

import (
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
)

func TestProxy_NeverLeaksSecret(t *testing.T) {
	var (
		mu             sync.Mutex
		seenByUpstream []string
	)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seenByUpstream = append(seenByUpstream, r.Header.Get("Authorization")+r.URL.RawQuery)
		mu.Unlock()
		w.Header().Set("X-Request-Path", r.URL.Path)
		_, _ = io.WriteString(w, "upstream body for "+r.URL.Path)
	})
	up := newTLSUpstream(t, handler, false, "api.example.com")
	basic := newTLSUpstream(t, handler, false, "basic.example.com")
	query := newTLSUpstream(t, handler, false, "query.example.com")
	untrusted := newTLSUpstream(t, handler, false, "untrusted.example.com")
	plain := newPlainUpstream(t, handler)
	dead := newPlainUpstream(t, handler)
	dead.Close()

	var auditJSON syncBuffer
	yaml := "upstreams:\n" +
		up.route("api.example.com", "credential: api") +
		basic.route("basic.example.com", "credential: api", "basic: {username: agent}") +
		query.route("query.example.com", "credential: api", "query: {param: key}") +
		fmt.Sprintf("  - host: untrusted.example.com\n    address: %s\n    credential: api\n    query: {param: key}\n", untrusted.Addr) +
		plain.route("legacy.example.com", "credential: api", "unsafe_plaintext_credential: true") +
		plain.route("plain.example.com", "credential: api") +
		dead.route("dead.example.com", "credential: api", "query: {param: key}", "unsafe_plaintext_credential: true") +
		up.route("broken.example.com", "credential: broken")
	tp := newTestProxy(t, yaml, withPolicy(denyDeletes), withAuditJSON(&auditJSON))

	var seenByAgent strings.Builder
	do := func(method, u string) {
		req, _ := http.NewRequest(method, u, nil)
		req.Header.Set("Authorization", "Bearer agent-placeholder")
		resp, err := tp.Client.Do(req)
		if err != nil {
			fmt.Fprintf(&seenByAgent, "%s %s: %v\n", method, u, err)
			return
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Fprintf(&seenByAgent, "%s %s: %s\n%v\n%v\n%s\n", method, u, resp.Status, resp.Header, resp.Trailer, body)
	}
	urls := []string{
		"https://api.example.com/ok",
		"https://basic.example.com/ok",
		"https://query.example.com/ok?key=agent-key&x=1",
		"https://untrusted.example.com/tls-fails?key=agent",
		"http://legacy.example.com/plaintext-allowed",
		"http://plain.example.com/plaintext-refused",
		"http://dead.example.com/upstream-down?x=1",
		"https://broken.example.com/credential-missing",
		"https://unknown.example.net/unknown",
	}
	for _, u := range urls {
		do(http.MethodGet, u)
	}
	do(http.MethodDelete, "https://api.example.com/denied")
	records := tp.WaitRecords(t, len(urls)+1)
	metrics := scrape(t, tp.AdminURL+"/metrics")

	// The test is only meaningful if the secret was really used upstream.
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(strings.Join(seenByUpstream, "\n"), testSecret); n != 3 {
		t.Fatalf("the secret reached the upstream %d times, want 3 (header, query, plaintext-allowed): %q", n, seenByUpstream)
	}

	forms := map[string]string{
		"raw":           testSecret,
		"basic base64":  base64.StdEncoding.EncodeToString([]byte("agent:" + testSecret)),
		"query escaped": url.QueryEscape(testSecret),
		"distinctive":   "escrowTEST-9f8e7d6c",
	}
	var recordText strings.Builder
	for _, r := range records {
		fmt.Fprintf(&recordText, "%+v\n%#v\n", r, r)
	}
	for where, text := range map[string]string{
		"audit JSON":         auditJSON.String(),
		"audit record (%+v)": recordText.String(),
		"ops log":            tp.Logs.String(),
		"agent responses":    seenByAgent.String(),
		"/metrics":           metrics,
	} {
		if text == "" {
			t.Errorf("%s: nothing captured", where)
		}
		for form, s := range forms {
			if strings.Contains(text, s) {
				t.Errorf("the secret (%s) appears in the %s:\n%s", form, where, text)
			}
		}
	}
	// And the capture did capture: each outcome is there.
	for _, want := range []string{"plaintext_credential_refused", "credential_unavailable", "upstream_unavailable", "policy_denied", "unknown_destination"} {
		if !strings.Contains(auditJSON.String(), want) {
			t.Errorf("audit JSON has no %s record", want)
		}
	}
}
