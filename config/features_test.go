package config

import (
	"strings"
	"testing"
	"time"
)

// parseErr parses doc and returns its error text ("" when it parsed).
func parseErr(t *testing.T, doc string) string {
	t.Helper()
	_, err := Parse([]byte(doc))
	if err == nil {
		return ""
	}
	return err.Error()
}

func wantAll(t *testing.T, got string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(got, w) {
			t.Errorf("missing %q in:\n%s", w, got)
		}
	}
}

func TestParse_ResponseTimeoutDefaultsAndPerUpstreamOverride(t *testing.T) {
	c, err := Parse([]byte(minimal + `
upstreams:
  - {host: a.example}
  - {host: b.example, response_timeout: 30s}
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Egress.ResponseTimeout.D(); got != 10*time.Minute {
		t.Errorf("egress.response_timeout default = %v, want 10m", got)
	}
	if got := c.Upstreams[0].ResponseTimeout(); got != 10*time.Minute {
		t.Errorf("upstreams[0].ResponseTimeout() = %v, want the egress default", got)
	}
	if got := c.Upstreams[1].ResponseTimeout(); got != 30*time.Second {
		t.Errorf("upstreams[1].ResponseTimeout() = %v, want 30s", got)
	}

	c, err = Parse([]byte(minimal + "egress: {response_timeout: 2m}\nupstreams: [{host: a.example}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Upstreams[0].ResponseTimeout(); got != 2*time.Minute {
		t.Errorf("ResponseTimeout() = %v, want egress.response_timeout 2m", got)
	}

	got := parseErr(t, minimal+"egress: {response_timeout: 500ms}\nupstreams: [{host: a.example, response_timeout: 10ms}]\n")
	wantAll(t, got, "egress.response_timeout: must be at least 1s", "upstreams[0].response_timeout: must be at least 1s")
}

func TestParse_ScrubResponsesIsOnUnlessTurnedOff(t *testing.T) {
	c, err := Parse([]byte(minimal + `
upstreams:
  - {host: a.example}
  - {host: b.example, scrub_responses: false}
  - {host: c.example, scrub_responses: true}
`))
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{true, false, true} {
		if got := c.Upstreams[i].ScrubResponses(); got != want {
			t.Errorf("upstreams[%d].ScrubResponses() = %v, want %v", i, got, want)
		}
	}
	wantAll(t, parseErr(t, minimal+"upstreams: [{host: a.example, scrub_responses: \"no\"}]\n"), "upstreams[0].scrub_responses: want true or false")
}

func TestParse_NonLoopbackAdminNeedsUnsafeSwitch(t *testing.T) {
	for _, admin := range []string{"0.0.0.0:15481", "10.1.2.3:15481", "[::]:15481"} {
		got := parseErr(t, minimal+"admin: \""+admin+"\"\n")
		wantAll(t, got, "admin: ", "is not a loopback address", "unsafe_allow_non_loopback_admin")
		if got := parseErr(t, minimal+"admin: \""+admin+"\"\nunsafe_allow_non_loopback_admin: true\n"); got != "" {
			t.Errorf("admin %s with the unsafe switch: %s", admin, got)
		}
	}
	for _, admin := range []string{"127.0.0.1:0", "[::1]:15481", "localhost:15481"} {
		if got := parseErr(t, minimal+"admin: \""+admin+"\"\n"); got != "" {
			t.Errorf("loopback admin %s: %s", admin, got)
		}
	}
	// The listen switch does not open admin, nor the other way round.
	got := parseErr(t, minimal+"admin: 0.0.0.0:1\nlisten: 0.0.0.0:2\nunsafe_allow_non_loopback_listen: true\n")
	wantAll(t, got, "admin: ")
	if strings.Contains(got, "listen: ") {
		t.Errorf("listen reported though its switch is set: %s", got)
	}
}

func TestParse_ProcessIdentityAndUnixListener(t *testing.T) {
	c, err := Parse([]byte(`
identity: {static: spiffe://example.org/a, process: true}
policy: {dir: p}
listen_unix: /var/run/escrow/proxy.sock
`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Identity.Process || c.ListenUnix != "/var/run/escrow/proxy.sock" {
		t.Errorf("identity.process=%v listen_unix=%q", c.Identity.Process, c.ListenUnix)
	}
	wantAll(t, parseErr(t, minimal+"listen_unix: run/proxy.sock\n"), "listen_unix: want an absolute path")
	wantAll(t, parseErr(t, minimal+"listen_unix: /"+strings.Repeat("a", 107)+"\n"), "listen_unix: 108 bytes is too long for a Unix socket path (at most 107)")

	if err := c.CheckLocal(fakeLocal([]string{"p"}, nil)); err == nil || !strings.Contains(err.Error(), "listen_unix: directory /var/run/escrow") {
		t.Errorf("CheckLocal with the socket's directory missing: %v", err)
	}
	if err := c.CheckLocal(fakeLocal([]string{"p", "/var/run/escrow"}, nil)); err != nil {
		t.Errorf("CheckLocal with the directory present: %v", err)
	}
}

func TestParse_Delegation(t *testing.T) {
	c, err := Parse([]byte(`
identity: {spiffe: {socket: "unix:///run/spire/agent.sock"}}
policy: {dir: p}
delegation:
  audience: spiffe://example.org/escrow
  issuers:
    - spiffe: {}
    - oidc: {issuer: https://idp.example.com}
    - oidc: {issuer: "http://127.0.0.1:5556/dex", jwks_file: /etc/escrow/dex.jwks}
    - oidc: {issuer: "https://dex.internal:5554/dex", ca_file: /etc/escrow/dex-ca.pem}
`))
	if err != nil {
		t.Fatal(err)
	}
	d := c.Delegation
	if d.Audience != "spiffe://example.org/escrow" || len(d.Issuers) != 4 || d.Issuers[3].OIDC.CAFile != "/etc/escrow/dex-ca.pem" || d.Issuers[0].SPIFFE == nil || d.Issuers[1].OIDC.Issuer != "https://idp.example.com" {
		t.Errorf("decoded %+v", d)
	}
	if d.MaxActors() != 3 || d.Required {
		t.Errorf("defaults: max_depth %d required %v", d.MaxActors(), d.Required)
	}
	err = c.CheckLocal(fakeLocal([]string{"p"}, nil))
	wantAll(t, errText(err), "delegation.issuers[2].oidc.jwks_file: cannot read", "delegation.issuers[3].oidc.ca_file: cannot read")

	c, err = Parse([]byte(minimal + "delegation: {audience: a, issuers: [{oidc: {issuer: \"https://i.example\"}}], max_depth: 0, required: true}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Delegation.MaxActors() != 0 || !c.Delegation.Required {
		t.Errorf("max_depth 0 must stay 0 (direct callers only): %d, required %v", c.Delegation.MaxActors(), c.Delegation.Required)
	}

	got := parseErr(t, minimal+`
delegation:
  max_depth: 17
  issuers:
    - spiffe: {}
    - {}
    - {spiffe: {}, oidc: {issuer: "https://a.example"}}
    - oidc: {issuer: "http://idp.example.com"}
    - oidc: {jwks_url: "ftp://x.example/keys"}
    - oidc: {issuer: "https://a.example", jwks_url: "https://a.example/k", jwks_file: /k}
    - oidc: {issuer: "https://user:pw@a.example"}
`)
	wantAll(t, got,
		"delegation.audience: required",
		"delegation.max_depth: must be between 0",
		"delegation.issuers[0].spiffe: needs identity.spiffe",
		"delegation.issuers[1]: set one of spiffe",
		"delegation.issuers[2]: set exactly one of spiffe or oidc",
		"delegation.issuers[3].oidc.issuer: want https (http only on a loopback host)",
		"delegation.issuers[4].oidc.issuer: required",
		"delegation.issuers[4].oidc.jwks_url: want an https URL",
		"delegation.issuers[5].oidc: set at most one of jwks_url or jwks_file",
		"delegation.issuers[6].oidc.issuer: must not contain user information",
	)
	if strings.Contains(got, "pw@") {
		t.Errorf("an error repeats a URL's password:\n%s", got)
	}
	wantAll(t, parseErr(t, minimal+"delegation: {audience: a}\n"), "delegation.issuers: required")
}

func TestParse_MCPUpstream(t *testing.T) {
	c, err := Parse([]byte(minimal + `
upstreams:
  - {host: mcp.example, mcp: {}}
  - {host: mcp2.example, mcp: {path: /v1/mcp, max_message_bytes: 4096}}
  - {host: plain.example}
audit: {mcp_arguments: true}
`))
	if err != nil {
		t.Fatal(err)
	}
	if m := c.Upstreams[0].MCP; m == nil || m.Path != "/mcp" || m.MaxMessageBytes != 1<<20 {
		t.Errorf("mcp defaults: %+v", m)
	}
	if m := c.Upstreams[1].MCP; m.Path != "/v1/mcp" || m.MaxMessageBytes != 4096 {
		t.Errorf("mcp: %+v", m)
	}
	if c.Upstreams[2].MCP != nil {
		t.Error("an upstream without mcp became an MCP server")
	}
	if !c.Audit.MCPArguments {
		t.Error("audit.mcp_arguments not decoded")
	}
	c, _ = Parse([]byte(minimal))
	if c.Audit.MCPArguments {
		t.Error("audit.mcp_arguments is on by default")
	}

	got := parseErr(t, minimal+`
upstreams:
  - {host: a.example, tunnel: true, mcp: {}}
  - {host: b.example, mcp: {path: mcp}}
  - {host: c.example, mcp: {max_message_bytes: 1000}}
  - {host: d.example, mcp: {max_message_bytes: 67108865}}
`)
	wantAll(t, got,
		"upstreams[0].mcp: an MCP server's calls are decided one by one",
		`upstreams[1].mcp.path: must start with "/"`,
		"upstreams[2].mcp.max_message_bytes: must be between 1024",
		"upstreams[3].mcp.max_message_bytes: must be between 1024",
	)
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
