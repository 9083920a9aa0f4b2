package config

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const minimal = identityOnly + "policy: {dir: policies}\n"

// identityOnly is minimal without its policy key, for tests that write their own (a key written
// twice is an error).
const identityOnly = `
identity: {static: spiffe://example.org/ns/agents/sa/coder}
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

// fakeLocal is a machine with the given directories and environment, for CheckLocal.
func fakeLocal(dirs []string, env map[string]string) Local {
	return Local{
		Stat: func(name string) (fs.FileInfo, error) {
			if slices.Contains(dirs, name) {
				return os.Stat(".") // any directory
			}
			return nil, &fs.PathError{Op: "stat", Path: name, Err: fs.ErrNotExist}
		},
		LookupEnv: func(k string) (string, bool) { v, ok := env[k]; return v, ok },
	}
}

func TestCheckLocal_SPIFFESocketFromEnvironment(t *testing.T) {
	c, err := Parse([]byte("identity: {spiffe: {}}\npolicy: {dir: p}\n"))
	if err != nil {
		t.Fatalf("Parse must not look at the environment: %v", err)
	}
	if err := c.CheckLocal(fakeLocal([]string{"p"}, nil)); err == nil || !strings.Contains(err.Error(), "identity.spiffe.socket: required") {
		t.Fatalf("want a socket error, got %v", err)
	}
	if err := c.CheckLocal(fakeLocal([]string{"p"}, map[string]string{"SPIFFE_ENDPOINT_SOCKET": "/no/scheme"})); err == nil || !strings.Contains(err.Error(), "SPIFFE_ENDPOINT_SOCKET: want unix://") {
		t.Fatalf("want a bad-socket error, got %v", err)
	}
	if err := c.CheckLocal(fakeLocal([]string{"p"}, map[string]string{"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock"})); err != nil {
		t.Fatal(err)
	}
}

func TestParse_IsPureAndCheckLocalReportsEveryMachineProblem(t *testing.T) {
	doc := minimal + `
upstreams:
  - {host: a.example, ca_file: /nonexistent/ca.pem}
`
	c, err := Parse([]byte(doc))
	if err != nil {
		t.Fatalf("Parse read the filesystem: %v", err)
	}
	err = c.CheckLocal(fakeLocal(nil, nil))
	for _, want := range []string{"policy.dir: cannot read policies", "upstreams[0].ca_file: cannot read"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in %v", want, err)
		}
	}
	if err := c.CheckLocal(fakeLocal([]string{"policies", "/nonexistent/ca.pem"}, nil)); err != nil {
		t.Errorf("all present: %v", err)
	}
}

func TestParse_CompilesTypedValuesOnce(t *testing.T) {
	c, err := Parse([]byte(identityOnly + `
upstreams:
  - {host: a.example, credential: k}
  - {host: b.example, credential: k, inject: {header: x-api-key, value: "key {{ .Token }}!"}}
  - {host: c.example, credential: k, basic: {username: bot}}
  - {host: d.example, credential: k, query: {param: api_key}}
  - {host: e.example, tunnel: true}
credentials:
  k: {static: {env: K}}
egress: {allow_cidrs: [10.0.0.0/8, "fd00::/8"]}
policy: {dir: p, mode: report}
`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Validated() {
		t.Error("Parse did not mark the config validated")
	}
	if c.Policy.Mode != PolicyModeReport {
		t.Errorf("mode %q", c.Policy.Mode)
	}
	want := []Injection{
		{Kind: InjectHeader, Header: "Authorization", Prefix: "Bearer "},
		{Kind: InjectHeader, Header: "X-Api-Key", Prefix: "key ", Suffix: "!"},
		{Kind: InjectBasic, Header: "Authorization", Username: "bot"},
		{Kind: InjectQuery, Param: "api_key"},
		{},
	}
	for i, w := range want {
		if got := c.Upstreams[i].Injection(); got != w {
			t.Errorf("upstreams[%d].Injection() = %+v, want %+v", i, got, w)
		}
	}
	if got := c.Egress.Allow(); len(got) != 2 || got[0] != netip.MustParsePrefix("10.0.0.0/8") || got[1] != netip.MustParsePrefix("fd00::/8") {
		t.Errorf("Egress.Allow() = %v", got)
	}
	var hand Config
	if hand.Validated() || len(hand.Egress.Allow()) != 0 {
		t.Error("a Config built by hand claims compiled values")
	}
}

func TestParse_InjectHeaderThatFramesTheMessageIsRejected(t *testing.T) {
	for _, h := range []string{"Host", "content-length", "Proxy-Authorization", "transfer-encoding"} {
		_, err := Parse([]byte(minimal + "upstreams:\n  - {host: a.example, credential: k, inject: {header: " + h + "}}\ncredentials:\n  k: {static: {env: K}}\n"))
		if err == nil || !strings.Contains(err.Error(), "upstreams[0].inject.header") {
			t.Errorf("header %s: want an error naming upstreams[0].inject.header, got %v", h, err)
		}
	}
}

func TestParse_CAKeyDirMustNotBeReadableByTheAgent(t *testing.T) {
	for _, dir := range []string{"/var/run/escrow", "/var/run/escrow/", "/var/run/escrow/key"} {
		_, err := Parse([]byte(minimal + "ca_dir: /var/run/escrow\nca_key_dir: " + dir + "\n"))
		if err == nil || !strings.Contains(err.Error(), "ca_key_dir: must not be ca_dir") {
			t.Errorf("ca_key_dir %s: got %v", dir, err)
		}
	}
	if _, err := Parse([]byte(minimal + "ca_dir: /var/run/escrow\nca_key_dir: /var/run/escrow-ca\n")); err != nil {
		t.Errorf("a separate directory: %v", err)
	}
}

func TestParse_UpstreamChecks(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Parse([]byte(identityOnly + `
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
	f.Add([]byte(spiffeIdentity + issue10Credentials))
	f.Add([]byte("egress: {dial_timeout: 10}\nlisten: 0.0.0.0:1\nupstreams: [{host: 'a b', mcp: {path: x}, response_timeout: 5}]"))
	f.Add([]byte("delegation: {audience: a, max_depth: 99, issuers: [{spiffe: {}, oidc: {issuer: 'http://x'}}]}\nlisten_unix: rel"))
	// The machine check also runs on what was decoded of a bad file (Load): it must not panic.
	nothing := Local{
		Stat:        func(name string) (fs.FileInfo, error) { return nil, fs.ErrNotExist },
		LookupEnv:   func(string) (string, bool) { return "", false },
		ReadFile:    func(string) ([]byte, error) { return nil, fs.ErrPermission },
		WritableDir: func(string) error { return fs.ErrPermission },
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err == nil && c == nil {
			t.Fatal("nil config without error")
		}
		if err != nil && c != nil {
			t.Fatal("config returned with an error")
		}
		if c, _, _, err := parse(data); err == nil {
			_ = c.CheckLocal(nothing)
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

func TestCheckLocal_PolicyDirMustBeADirectory(t *testing.T) {
	for doc, want := range map[string]string{
		"identity: {static: spiffe://example.org/a}\npolicy: {dir: /nonexistent/policies}\n": "policy.dir: cannot read /nonexistent/policies",
		"identity: {static: spiffe://example.org/a}\npolicy: {dir: /dev/null}\n":             "policy.dir: /dev/null is not a directory",
	} {
		c, err := Parse([]byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		if err := c.CheckLocal(OSLocal()); err == nil || !strings.Contains(err.Error(), want) {
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
