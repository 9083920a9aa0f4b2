// Package e2e tests the real escrow binary with real clients (curl, Python requests, Go
// net/http) against local HTTPS upstreams that check the credential escrow injects.
//
// TestMain builds cmd/escrow once (with the race detector when the suite runs under -race). Each
// test starts `escrow proxy --config F` as a subprocess for a group of scenarios that share a
// config, reads its audit records (stdout) and ops logs (stderr), and stops it with SIGTERM,
// asserting a clean exit. Every byte a client, escrow or the admin listener produced is kept and
// searched for the configured secrets at the end of each group (and once more for the whole run).
//
// Clients: curl and Python requests are skipped when missing, unless
// ESCROW_E2E_REQUIRE_CLIENTS=1 (CI), which makes a missing client a failure.
//
// Environment:
//
//	ESCROW_E2E_REQUIRE_CLIENTS=1  a missing curl or Python requests fails instead of skipping
//	ESCROW_E2E_PYTHON=P           the Python interpreter with requests (default python3)
//	ESCROW_E2E_BIN=F              test this escrow binary instead of building ./cmd/escrow
//	ESCROW_E2E_VERBOSE=1          log every group's escrow stdout and stderr when it stops
package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var (
	// escrowBin is the binary under test, built by TestMain.
	escrowBin string
	// moduleRoot is the escrow module's directory (examples/ and cmd/ live there).
	moduleRoot string
	// workDir holds run-wide files (test CA, secret files); removed after the run.
	workDir string

	// fileSecret and envSecret are the configured credentials: random per run, given to
	// escrow through credentials.<name>.static.file and .static.env. No client may ever see
	// them, and neither may escrow's logs, records or metrics.
	fileSecret, envSecret string
	// fileSecretPath is the file fileSecret is in.
	fileSecretPath string
	// envSecretVar is the environment variable of escrow holding envSecret.
	envSecretVar = "ESCROW_E2E_ENV_SECRET"

	// pythonBin is the Python interpreter with requests, "" if unavailable.
	pythonBin string
	curlBin   string
	// clientProblems says why a client is unavailable.
	clientProblems = map[string]string{}
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		fmt.Fprintf(os.Stderr, "e2e: cannot locate the module (go env GOMOD: %q, %v)\n", gomod, err)
		return 1
	}
	moduleRoot = filepath.Dir(gomod)

	workDir, err = os.MkdirTemp("", "escrow-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(workDir)

	if err := buildEscrow(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}

	fileSecret, envSecret = newSecret("file secret"), newSecret("env secret")
	fileSecretPath = filepath.Join(workDir, "secrets", "api-key")
	if err := os.MkdirAll(filepath.Dir(fileSecretPath), 0o700); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	if err := os.WriteFile(fileSecretPath, []byte(fileSecret+"\n"), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	if err := initTestCA(filepath.Join(workDir, "upstream-ca")); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: test CA:", err)
		return 1
	}
	findClients()

	code := m.Run()
	// Every group checks what it saw; this checks the whole run once more, including anything
	// recorded outside a group.
	if hits := everything.findSecrets(); len(hits) > 0 {
		fmt.Fprintf(os.Stderr, "e2e: SECRET LEAK: a configured secret appeared in %d place(s):\n", len(hits))
		for _, h := range hits {
			fmt.Fprintln(os.Stderr, "  "+h)
		}
		code = 1
	}
	return code
}

// buildEscrow builds ./cmd/escrow into workDir, with the race detector when the suite runs under
// -race (a race in escrow under real traffic then fails the group: DATA RACE on stderr and a
// non-zero exit). ESCROW_E2E_BIN runs a prebuilt binary instead (e.g. a release build).
func buildEscrow() error {
	if bin := os.Getenv("ESCROW_E2E_BIN"); bin != "" {
		abs, err := filepath.Abs(bin)
		escrowBin = abs
		return err
	}
	escrowBin = filepath.Join(workDir, "escrow")
	args := []string{"build", "-o", escrowBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "./cmd/escrow")...)
	build.Dir = moduleRoot
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/escrow: %v\n%s", err, out)
	}
	return nil
}

func findClients() {
	if p, err := exec.LookPath("curl"); err == nil {
		curlBin = p
	} else {
		clientProblems["curl"] = "curl not found in PATH (Debian: apt-get install curl)"
	}
	py := os.Getenv("ESCROW_E2E_PYTHON")
	if py == "" {
		py = "python3"
	}
	if out, err := exec.Command(py, "-c", "import requests, sys; print(requests.__version__)").CombinedOutput(); err == nil {
		pythonBin = py
	} else {
		clientProblems["python"] = fmt.Sprintf("%s with requests not usable (Debian: apt-get install python3-requests; or set ESCROW_E2E_PYTHON): %v: %s",
			py, err, lastLine(string(out)))
	}
}

// requireClient skips the test when a real client is missing, or fails it when
// ESCROW_E2E_REQUIRE_CLIENTS=1.
func requireClient(t testing.TB, name string) {
	t.Helper()
	problem, missing := clientProblems[name]
	if !missing {
		return
	}
	if os.Getenv("ESCROW_E2E_REQUIRE_CLIENTS") == "1" {
		t.Fatalf("client %s is required (ESCROW_E2E_REQUIRE_CLIENTS=1): %s", name, problem)
	}
	t.Skipf("client %s unavailable: %s", name, problem)
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// cleanEnv is this process's environment without proxy, CA-bundle and SPIFFE settings, so that
// subprocesses see only what a test gives them.
func cleanEnv(extra ...string) []string {
	drop := map[string]bool{
		"HTTP_PROXY": true, "HTTPS_PROXY": true, "ALL_PROXY": true, "NO_PROXY": true,
		"SSL_CERT_FILE": true, "SSL_CERT_DIR": true, "REQUESTS_CA_BUNDLE": true, "CURL_CA_BUNDLE": true,
		"SPIFFE_ENDPOINT_SOCKET": true, "CURL_HOME": true,
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if drop[strings.ToUpper(k)] || k == envSecretVar {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// escrowEnv is the environment of an escrow subprocess. A race-detector build reports races
// without stopping, exits 66 if it found one, and does not sleep a second at exit.
//
// It also points the proxy variables at a dead address: escrow must never follow the
// environment's own proxy settings, so every allowed request in the suite proves it does not.
func escrowEnv(extra ...string) []string {
	dead := "http://127.0.0.1:1"
	env := cleanEnv(append([]string{"HTTP_PROXY=" + dead, "HTTPS_PROXY=" + dead, "ALL_PROXY=" + dead,
		"http_proxy=" + dead, "https_proxy=" + dead}, extra...)...)
	if raceEnabled {
		env = append(env, "GORACE=halt_on_error=0 exitcode=66 atexit_sleep_ms=0")
	}
	return env
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
