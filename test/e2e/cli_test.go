package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runEscrow runs the binary to completion in the module root and returns its exit code and
// output.
func runEscrow(t testing.TB, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(escrowBin, args...)
	cmd.Dir = moduleRoot
	cmd.Env = escrowEnv()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("escrow %v did not finish within 60s", args)
	}
	everything.add(fmt.Sprintf("%s: escrow %v stdout", t.Name(), args), o.Bytes())
	everything.add(fmt.Sprintf("%s: escrow %v stderr", t.Name(), args), e.Bytes())
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("escrow %v: %v", args, err)
	}
	return code, o.String(), e.String()
}

// TestCLI covers the binary's commands other than a running proxy.
func TestCLI(t *testing.T) {
	t.Run("help_exits_0_and_lists_the_commands", func(t *testing.T) {
		code, out, errOut := runEscrow(t, "--help")
		if code != 0 {
			t.Fatalf("escrow --help: exit %d: %s", code, errOut)
		}
		for _, want := range []string{"proxy", "demo", "policy validate", "policy test", "version"} {
			if !strings.Contains(out, want) {
				t.Errorf("escrow --help does not mention %q:\n%s", want, out)
			}
		}
	})

	t.Run("proxy_help_exits_0_and_documents_config", func(t *testing.T) {
		code, out, errOut := runEscrow(t, "proxy", "--help")
		if code != 0 {
			t.Fatalf("escrow proxy --help: exit %d", code)
		}
		if all := out + errOut; !strings.Contains(all, "-config") || !strings.Contains(all, "-drain-timeout") {
			t.Errorf("escrow proxy --help does not document --config and --drain-timeout:\n%s", all)
		}
	})

	t.Run("proxy_without_config_is_a_usage_error", func(t *testing.T) {
		code, _, errOut := runEscrow(t, "proxy")
		if code != 2 || !strings.Contains(errOut, "--config") {
			t.Errorf("escrow proxy: exit %d, stderr %q; want 2 naming --config", code, errOut)
		}
	})

	t.Run("proxy_with_a_bad_config_exits_nonzero_naming_every_bad_key_path", func(t *testing.T) {
		code, _, errOut := runEscrow(t, "proxy", "--config", testdata("config", "bad-values.yaml"))
		if code == 0 {
			t.Fatal("escrow proxy with a bad config exited 0")
		}
		checkNamesEveryPath(t, errOut, []string{
			"listen:", "identity.static:", "policy.mode:", "policy.reload_interval:",
			"upstreams[0].credential:", "upstreams[0].inject.header:", "upstreams[1].host:",
			"upstreams[2].credential:", "credentials.both.static:", "egress.allow_cidrs[0]:",
		})
	})

	t.Run("unknown_keys_wrong_types_and_bad_values_are_reported_in_one_run", func(t *testing.T) {
		code, _, errOut := runEscrow(t, "proxy", "--config", testdata("config", "bad-keys-and-values.yaml"))
		if code == 0 {
			t.Fatal("escrow proxy with a bad config exited 0")
		}
		checkNamesEveryPath(t, errOut, []string{"listne:", "upstreams[0].port:", "policy.mode:", "egress.allow_cidrs[0]:"})
	})

	t.Run("proxy_check_accepts_the_quickstart_config", func(t *testing.T) {
		// --check proves the secrets the quickstart names are there.
		for _, k := range []string{"OPENAI_API_KEY", "GITHUB_TOKEN", "ANTHROPIC_API_KEY"} {
			t.Setenv(k, "x")
		}
		code, out, errOut := runEscrow(t, "proxy", "--config", "examples/quickstart/escrow.yaml", "--check")
		if code != 0 || !strings.Contains(out, "config ok") {
			t.Errorf("escrow proxy --check on the quickstart: exit %d, stdout %q, stderr %q", code, out, errOut)
		}
	})

	t.Run("proxy_refuses_to_start_when_the_policies_do_not_load", func(t *testing.T) {
		dir := t.TempDir()
		cfg := filepath.Join(dir, "escrow.yaml")
		if err := os.WriteFile(cfg, []byte(fmt.Sprintf("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nca_dir: %s\nidentity: {static: %s}\npolicy: {dir: %s}\n",
			filepath.Join(dir, "ca"), staticID, testdata("policies", "broken"))), 0o600); err != nil {
			t.Fatal(err)
		}
		code, _, errOut := runEscrow(t, "proxy", "--config", cfg)
		if code == 0 || !strings.Contains(errOut, "no-id.cedar") || !strings.Contains(errOut, "syntax.cedar") {
			t.Errorf("exit %d, stderr %q; want a non-zero exit naming both broken files", code, errOut)
		}
	})

	t.Run("policy_validate_accepts_the_quickstart_policies", func(t *testing.T) {
		code, out, errOut := runEscrow(t, "policy", "validate", "--dir", "examples/quickstart/policies")
		if code != 0 || !strings.Contains(out, "ok") {
			t.Errorf("exit %d, stdout %q, stderr %q; want 0 and ok", code, out, errOut)
		}
	})

	t.Run("policy_validate_rejects_a_broken_directory_naming_each_problem", func(t *testing.T) {
		code, _, errOut := runEscrow(t, "policy", "validate", "--dir", testdata("policies", "broken"))
		if code == 0 {
			t.Fatal("policy validate on a broken directory exited 0")
		}
		for _, want := range []string{"no-id.cedar:2", "@id", "syntax.cedar:2", "parse error"} {
			if !strings.Contains(errOut, want) {
				t.Errorf("stderr does not mention %q:\n%s", want, errOut)
			}
		}
	})

	t.Run("policy_test_passes_on_the_quickstart_cases", func(t *testing.T) {
		code, out, errOut := runEscrow(t, "policy", "test", "examples/quickstart/policies.test.yaml")
		if code != 0 || !strings.Contains(out, " 0 failed") {
			t.Errorf("exit %d, stdout %q, stderr %q; want 0 and 0 failed", code, out, errOut)
		}
	})

	t.Run("policy_test_fails_on_a_wrong_expectation", func(t *testing.T) {
		code, out, _ := runEscrow(t, "policy", "test", testdata("policy-tests", "wrong-expectation.test.yaml"))
		if code == 0 || !strings.Contains(out, "1 passed, 1 failed") || !strings.Contains(out, "forbid-deletes") {
			t.Errorf("exit %d, stdout %q; want non-zero, 1 passed 1 failed, naming forbid-deletes", code, out)
		}
	})

	t.Run("version_exits_0", func(t *testing.T) {
		if code, out, _ := runEscrow(t, "version"); code != 0 || !strings.HasPrefix(out, "escrow ") {
			t.Errorf("escrow version: exit %d, %q", code, out)
		}
	})

	t.Run("demo_runs_and_shows_an_allowed_call_and_both_denials", func(t *testing.T) {
		code, out, errOut := runEscrow(t, "demo")
		if code != 0 {
			t.Fatalf("escrow demo: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
		}
		for _, want := range []string{"200 allowed", "403 policy_denied", "403 unknown_destination", `"decision":"allow"`} {
			if !strings.Contains(out, want) {
				t.Errorf("demo output does not show %q:\n%s", want, out)
			}
		}
		if strings.Contains(out, "UNEXPECTED") {
			t.Errorf("demo reported an unexpected outcome:\n%s", out)
		}
	})
}

func checkNamesEveryPath(t *testing.T, stderr string, paths []string) {
	t.Helper()
	for _, p := range paths {
		if !strings.Contains(stderr, p) {
			t.Errorf("stderr does not name %q", strings.TrimSuffix(p, ":"))
		}
	}
	if t.Failed() {
		t.Logf("stderr:\n%s", stderr)
	}
}
