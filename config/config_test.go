package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const minimal = `
identity: {static: spiffe://example.org/ns/agents/sa/coder}
policy: {dir: policies}
`

func TestParse_FillsDefaults(t *testing.T) {
	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != DefaultListen || c.Admin != DefaultAdmin || c.CADir != DefaultCADir {
		t.Errorf("listen/admin/ca_dir defaults not applied: %q %q %q", c.Listen, c.Admin, c.CADir)
	}
	if c.Policy.Mode != PolicyModeEnforce {
		t.Errorf("policy.mode default = %q, want enforce", c.Policy.Mode)
	}
	if c.LeafTTL.D() != DefaultLeafTTL || c.Egress.DialTimeout.D() != DefaultDialTimeout {
		t.Errorf("durations not defaulted: %v %v", c.LeafTTL.D(), c.Egress.DialTimeout.D())
	}
}

func TestParse_ReportsEveryErrorWithKeyPath(t *testing.T) {
	_, err := Parse([]byte(`
listen: 0.0.0.0:15480
identity: {}
policy: {mode: audit}
upstreams:
  - host: "bad host"
    credential: nope
    inject: {header: "X Bad", value: "Bearer"}
    basic: {username: u}
  - host: pypi.org
    tunnel: true
    credential: openai
credentials:
  openai: {static: {}}
egress:
  allow_cidrs: [10.0.0.0/33]
`))
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("want Errors, got %v", err)
	}
	for _, want := range []string{
		"listen: ", "identity: ", "policy.dir: ", "policy.mode: ",
		"upstreams[0].host: ", "upstreams[0].credential: ", "upstreams[0]: set at most one",
		"upstreams[0].inject.header: ", "upstreams[0].inject.value: ",
		"upstreams[1].credential: a tunnel", "credentials.openai.static: ",
		"egress.allow_cidrs[0]: ",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
}

func TestParse_RejectsUnknownKeysEverywhereAtOnce(t *testing.T) {
	_, err := Parse([]byte(`
identity: {static: spiffe://example.org/a}
policy: {dir: p, mdoe: report}
upstreams:
  - host: api.example.com
    credentail: x
lisen: 127.0.0.1:1
`))
	if err == nil {
		t.Fatal("unknown keys accepted")
	}
	for _, want := range []string{
		`lisen: unknown key (did you mean "listen"?)`,
		`policy.mdoe: unknown key (did you mean "mode"?)`,
		`upstreams[0].credentail: unknown key (did you mean "credential"?)`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in:\n%v", want, err)
		}
	}
}

func TestParse_WrongTypesNamePath(t *testing.T) {
	_, err := Parse([]byte(`
identity: {static: spiffe://example.org/a}
policy: {dir: p, reload_interval: 5}
upstreams: {host: x}
egress: {dial_timeout: soon}
`))
	for _, want := range []string{"policy.reload_interval: want a duration", "upstreams: want a list", `egress.dial_timeout: invalid duration "soon"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in: %v", want, err)
		}
	}
}

func TestParse_NonLoopbackListenNeedsUnsafeSwitch(t *testing.T) {
	base := minimal + "listen: 0.0.0.0:15480\n"
	if _, err := Parse([]byte(base)); err == nil {
		t.Fatal("0.0.0.0 listen accepted without the unsafe switch")
	}
	if _, err := Parse([]byte(base + "unsafe_allow_non_loopback_listen: true\n")); err != nil {
		t.Fatalf("with the unsafe switch: %v", err)
	}
}

func TestParse_SPIFFESocketFromEnvironment(t *testing.T) {
	doc := "identity: {spiffe: {}}\npolicy: {dir: p}\n"
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "")
	if _, err := Parse([]byte(doc)); err == nil || !strings.Contains(err.Error(), "identity.spiffe.socket") {
		t.Fatalf("want a socket error, got %v", err)
	}
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent.sock")
	if _, err := Parse([]byte(doc)); err != nil {
		t.Fatal(err)
	}
}

func TestParse_UpstreamChecks(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Parse([]byte(minimal + `
upstreams:
  - host: API.Example.com.
    credential: k
    query: {param: key}
    address: 127.0.0.1:8443
    ca_file: ` + ca + `
  - host: "*.internal.example"
    port: 8443
    tunnel: true
credentials:
  k: {static: {env: K}}
policy: {dir: p, reload_interval: 500ms}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Upstreams[0].Host != "api.example.com" {
		t.Errorf("host not normalized: %q", c.Upstreams[0].Host)
	}
	if c.Policy.ReloadInterval.D() != 500*time.Millisecond {
		t.Errorf("reload_interval = %v", c.Policy.ReloadInterval.D())
	}
	_, err = Parse([]byte(minimal + `
upstreams:
  - {host: a.example, credential: k}
  - {host: a.example, credential: k}
credentials:
  k: {static: {env: K, file: /x}}
`))
	for _, want := range []string{"upstreams[1].host: duplicates upstreams[0]", "credentials.k.static: set exactly one"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in %v", want, err)
		}
	}
}

func TestParse_RejectsBadYAML(t *testing.T) {
	if _, err := Parse([]byte("listen: [unclosed")); err == nil {
		t.Fatal("bad YAML accepted")
	}
}

func TestLoad_MissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if err == nil || !strings.HasPrefix(err.Error(), "config: ") {
		t.Fatalf("want a config: error, got %v", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	f.Add([]byte("upstreams: [{host: '*.x', port: 70000, inject: {header: a, value: '{{.Token'}}]"))
	f.Add([]byte("credentials: {a: {static: {file: x}}}\negress: {allow_cidrs: [1.2.3.4/40]}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err == nil && c == nil {
			t.Fatal("nil config without error")
		}
		if err != nil && c != nil {
			t.Fatal("config returned with an error")
		}
	})
}

func TestParse_InjectTemplateNeedsExactlyOneToken(t *testing.T) {
	for _, tc := range []struct {
		value string
		ok    bool
	}{
		{"Bearer {{.Token}}", true},
		{"{{ .Token }}", true},
		{"token={{.Token}};v=1", true},
		{"Bearer", false},
		{"{{.Token}}{{.Token}}", false},
		{"{{if .Token}}x{{end}}{{.Token}}", false},
		{"{{.Token | printf}}", false},
	} {
		_, err := Parse([]byte(minimal + `
upstreams: [{host: a.example, credential: k, inject: {header: X-Key, value: "` + tc.value + `"}}]
credentials: {k: {static: {env: K}}}
`))
		if (err == nil) != tc.ok {
			t.Errorf("value %q: err=%v, want ok=%v", tc.value, err, tc.ok)
		}
	}
}

func TestParse_ReportsShapeAndValueErrorsInOneRun(t *testing.T) {
	_, err := Parse([]byte(`
listne: 127.0.0.1:1
identity: {static: spiffe://example.org/a}
policy: {dir: p, mode: strict}
upstreams: [{host: a.example, port: "443"}]
egress: {allow_cidrs: [nope]}
`))
	var errs Errors
	if !errors.As(err, &errs) || len(errs) != 4 {
		t.Fatalf("want 4 errors, got %v", err)
	}
	for _, want := range []string{"listne: unknown key", "policy.mode: want enforce or report", "upstreams[0].port: want an integer", "egress.allow_cidrs[0]: want a CIDR"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in:\n%v", want, err)
		}
	}
}

// TestMain runs the tests in a directory where the policy directories the configs name exist.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "escrow-config-test-")
	if err != nil {
		panic(err)
	}
	for _, d := range []string{"policies", "p"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			panic(err)
		}
	}
	if err := os.Chdir(dir); err != nil {
		panic(err)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

func TestParse_PolicyDirMustBeADirectory(t *testing.T) {
	for doc, want := range map[string]string{
		"identity: {static: spiffe://example.org/a}\npolicy: {dir: /nonexistent/policies}\n": "policy.dir: cannot read /nonexistent/policies",
		"identity: {static: spiffe://example.org/a}\npolicy: {dir: /dev/null}\n":             "policy.dir: /dev/null is not a directory",
	} {
		if _, err := Parse([]byte(doc)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want %q", err, want)
		}
	}
}

func TestParse_AuditFlushInterval(t *testing.T) {
	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Audit.FlushEvery(); got != DefaultAuditFlush {
		t.Errorf("default audit flush interval %v, want %v", got, DefaultAuditFlush)
	}
	c, err = Parse([]byte(minimal + "audit: {flush_interval: 0s}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Audit.FlushEvery(); got != 0 {
		t.Errorf("flush_interval 0s gives %v, want 0 (write every record at once)", got)
	}
	c, err = Parse([]byte(minimal + "audit: {flush_interval: 250ms}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Audit.FlushEvery(); got != 250*time.Millisecond {
		t.Errorf("flush_interval 250ms gives %v", got)
	}
	for _, bad := range []string{"2s", "-1s", "soon"} {
		_, err := Parse([]byte(minimal + "audit: {flush_interval: " + bad + "}\n"))
		if err == nil || !strings.Contains(err.Error(), "audit.flush_interval") {
			t.Errorf("flush_interval %s: want an error naming audit.flush_interval, got %v", bad, err)
		}
	}
}
