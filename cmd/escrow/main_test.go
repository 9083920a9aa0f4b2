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

func TestRun_ProxyHelpExits0AndListsFlags(t *testing.T) {
	code, _, stderr := runCmd("proxy", "--help")
	if code != 0 {
		t.Fatalf("code=%d", code)
	}
	for _, f := range []string{"-config", "-drain-timeout", "-log-level", "-check"} {
		if !strings.Contains(stderr, f) {
			t.Errorf("help does not list %s:\n%s", f, stderr)
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
	for _, want := range []string{"quickstart", "office-hours"} {
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
	for _, want := range []string{"200 allowed", "403 policy_denied", `"policy_ids":["forbid-deletes"]`, "403 unknown_destination"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}
