package main

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func runCmd(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRun_NoArgsPrintsUsageAndExits2(t *testing.T) {
	code, _, stderr := runCmd()
	if code != 2 || !strings.Contains(stderr, "Commands:") {
		t.Fatalf("code=%d stderr=%q", code, stderr)
	}
}

func TestRun_UnknownCommandExits2(t *testing.T) {
	code, _, stderr := runCmd("proxxy")
	if code != 2 || !strings.Contains(stderr, `unknown command "proxxy"`) {
		t.Fatalf("code=%d stderr=%q", code, stderr)
	}
}

// Every command's --help (and -h) prints that command's help to stdout and exits 0: not the
// command's output (the version, the schema), not an empty flag list.
func TestRun_EveryCommandHasHelp(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string // in the help
	}{
		{[]string{"proxy"}, []string{"escrow proxy --config FILE", "-config", "-drain-timeout", "SIGTERM or SIGINT", "-log-level", "-check"}},
		{[]string{"demo"}, []string{"escrow demo", "-keep-running", "-dir"}},
		{[]string{"webhook"}, []string{"escrow webhook", "-tls-cert", "SIGTERM or SIGINT"}},
		{[]string{"policy"}, []string{"escrow policy validate", "escrow policy test", "escrow policy schema"}},
		{[]string{"policy", "validate"}, []string{"escrow policy validate --dir DIR", "built-in schema", "-dir"}},
		{[]string{"policy", "test"}, []string{"escrow policy test FILE", "principal: spiffe://", "identity:", "time:", "expect:"}},
		{[]string{"policy", "schema"}, []string{"escrow policy schema", "schema.cedarschema"}},
		{[]string{"version"}, []string{"escrow version"}},
	} {
		for _, h := range []string{"--help", "-h"} {
			args := append(slices.Clone(c.args), h)
			code, stdout, stderr := runCmd(args...)
			if code != 0 || stderr != "" || !strings.HasPrefix(stdout, "Usage:") {
				t.Errorf("escrow %s: exit %d, stdout %q, stderr %q; want help on stdout, exit 0", strings.Join(args, " "), code, stdout, stderr)
				continue
			}
			for _, w := range c.want {
				if !strings.Contains(stdout, w) {
					t.Errorf("escrow %s does not mention %q:\n%s", strings.Join(args, " "), w, stdout)
				}
			}
			for _, never := range []string{"entity Workload", "escrow dev", "Flags:\n\n", "Flags:\n$"} {
				if strings.Contains(stdout, never) || strings.HasSuffix(stdout, "Flags:\n") {
					t.Errorf("escrow %s prints %q instead of help:\n%s", strings.Join(args, " "), never, stdout)
				}
			}
		}
	}
}

// escrow --help lists every command, including every policy subcommand.
func TestRun_HelpListsEveryCommand(t *testing.T) {
	code, stdout, _ := runCmd("--help")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, cmd := range []string{"proxy", "demo", "webhook", "policy validate", "policy test", "policy schema", "version"} {
		if !strings.Contains(stdout, "\n  "+cmd+" ") {
			t.Errorf("escrow --help does not list %q:\n%s", cmd, stdout)
		}
	}
}

func TestRun_ProxyWithoutConfigIsAUsageError(t *testing.T) {
	code, _, stderr := runCmd("proxy")
	if code != 2 || !strings.Contains(stderr, "--config is required") {
		t.Fatalf("code=%d stderr=%q", code, stderr)
	}
}

func TestRun_ProxyCheckReportsEveryConfigError(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(cfg, []byte("listen: nope\nidentity: {}\npolicy: {mode: loud}\nextra: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCmd("proxy", "--config", cfg, "--check")
	if code != 1 {
		t.Fatalf("code=%d", code)
	}
	for _, want := range []string{"extra: unknown key"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
}

// --check runs every check a start would (without binding a port) and reports every problem
// of every kind at once: before, it stopped at the first and said "config ok" for configs
// that could never start or serve.
func TestRun_ProxyCheckReportsEveryProblemAtOnce(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "policies")
	notPEM := filepath.Join(dir, "not-a-cert.pem")
	blocker := filepath.Join(dir, "a-file")
	for name, content := range map[string]string{
		filepath.Join(pol, "p.cedar"): `@id("typo") permit (principal, action, resource) when { context.methd == "GET" };`,
		notPEM:                        "not a certificate\n",
		blocker:                       "",
	} {
		if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("ESCROW_CHECK_TEST_UNSET", "")
	cfg := filepath.Join(dir, "escrow.yaml")
	if err := os.WriteFile(cfg, []byte(`listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {static: spiffe://example.org/ns/agents/sa/coder}
ca_dir: `+filepath.Join(blocker, "ca")+`
policy: {dir: `+pol+`}
upstreams:
  - host: api.example.com
    credential: api
    ca_file: `+notPEM+`
credentials:
  api: {static: {env: ESCROW_CHECK_TEST_UNSET}}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := runCmd("proxy", "--config", cfg, "--log-level", "loud", "--check")
	if code != 1 || strings.Contains(stdout, "config ok") {
		t.Fatalf("code=%d stdout=%q, want 1 and no \"config ok\"", code, stdout)
	}
	for _, want := range []string{
		`--log-level: "loud" is not a level`,
		"ca_dir:",                    // cannot be created under a file
		"upstreams[0].ca_file:",      // no PEM certificate
		"credentials.api.static.env", // set but empty
		"policy does not match escrow's built-in schema: attribute `methd`",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	// The same checks run at start: nothing is bound, the same problems are reported.
	code2, _, stderr2 := runCmd("proxy", "--config", cfg, "--log-level", "loud")
	if code2 != 1 || stderr2 != stderr {
		t.Errorf("start: code=%d stderr=%q; want the --check report", code2, stderr2)
	}
}

func TestRun_ProxyCheckAcceptsTheQuickstart(t *testing.T) {
	// The quickstart's paths are relative to the repository root.
	wd, _ := os.Getwd()
	t.Chdir(filepath.Join(wd, "..", ".."))
	t.Setenv("OPENAI_API_KEY", "x")
	t.Setenv("ANTHROPIC_API_KEY", "x")
	t.Setenv("GITHUB_TOKEN", "x")
	code, stdout, stderr := runCmd("proxy", "--config", "examples/quickstart/escrow.yaml", "--check")
	if code != 0 || !strings.Contains(stdout, "config ok") {
		t.Fatalf("code=%d stdout=%q stderr=%q", code, stdout, stderr)
	}
}

// Every example's policy tests pass (the quickstart's, the time-of-day one the docs show, ...).
func TestRun_PolicyTestRunsEveryExample(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "..", "examples", "*", "*.test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"quickstart", "office-hours", "mcp"} {
		if !slices.Contains(files, filepath.Join("..", "..", "examples", want, "policies.test.yaml")) {
			t.Errorf("no policy test for examples/%s (found %v)", want, files)
		}
	}
	for _, f := range files {
		code, stdout, stderr := runCmd("policy", "test", f)
		if code != 0 || !strings.Contains(stdout, " passed, 0 failed") || strings.Contains(stdout, "FAIL") {
			t.Errorf("%s: code=%d stdout=%q stderr=%q", f, code, stdout, stderr)
		}
	}
}

// Without schema.cedarschema, validate checks the policies against the built-in schema (a typo
// that would deny everything at run time is an error, at its position) and says which schema.
func TestRun_PolicyValidateUsesTheBuiltinSchema(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "a.cedar"), []byte(`@id("a") permit (principal, action, resource) when { context.methd == "GET" };`), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCmd("policy", "validate", "--dir", dir)
	if code != 1 || !strings.Contains(stderr, filepath.Join(dir, "a.cedar")+":1:61: ") || !strings.Contains(stderr, "built-in schema: attribute `methd`") {
		t.Fatalf("code=%d stderr=%q", code, stderr)
	}
	code, stdout, stderr := runCmd("policy", "validate", "--dir", filepath.Join("..", "..", "examples", "quickstart", "policies"))
	if code != 0 || !strings.Contains(stdout, "(validated against escrow's built-in schema)") {
		t.Fatalf("code=%d stdout=%q stderr=%q", code, stdout, stderr)
	}
}

func TestRun_PolicyValidateRejectsBadDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "a.cedar"), []byte(`permit (principal, action, resource);`), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCmd("policy", "validate", "--dir", dir)
	if code != 1 || !strings.Contains(stderr, "@id") {
		t.Fatalf("code=%d stderr=%q", code, stderr)
	}
}

func TestRun_DemoSucceeds(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the proxy and an HTTPS API")
	}
	code, stdout, stderr := runCmd("demo", "--dir", t.TempDir())
	if code != 0 {
		t.Fatalf("demo failed: code=%d\n%s\n%s", code, stdout, stderr)
	}
	for _, want := range []string{"200 allowed", "403 policy_denied", `"policy_ids":["forbid-deletes"]`, "403 unknown_destination",
		`"credential":"llm-token","credential_provider":"oauth2"`, "a short-lived token escrow minted"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}
