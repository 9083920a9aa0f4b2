package mcp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// tsClient prepares testdata/ts-client (the TypeScript MCP SDK's client and undici, versions
// pinned in its package.json) in a cache directory, installing them with npm the first time,
// and returns that directory. It skips the test, saying why, when node or npm is missing or
// too old, or when npm cannot install (no registry access).
func tsClient(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("skipping the TypeScript SDK test: node is not installed")
	}
	npm, err := exec.LookPath("npm")
	if err != nil {
		t.Skip("skipping the TypeScript SDK test: npm is not installed")
	}
	v, err := exec.Command(node, "-p", "process.versions.node").Output()
	if err != nil {
		t.Skipf("skipping the TypeScript SDK test: node -p failed: %v", err)
	}
	var major, minor int
	if _, err := fmtSscanVersion(strings.TrimSpace(string(v)), &major, &minor); err != nil || major < 20 || (major == 20 && minor < 18) {
		t.Skipf("skipping the TypeScript SDK test: node %s is older than 20.18 (undici 7 needs it)", strings.TrimSpace(string(v)))
	}
	pkg, err := os.ReadFile("testdata/ts-client/package.json")
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(pkg)
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "escrow-test", "ts-mcp-client-"+hex.EncodeToString(sum[:6]))
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "@modelcontextprotocol", "sdk")); err != nil {
		// Install into a fresh directory and rename it into place: concurrent runs never see
		// a half-installed one.
		if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
			t.Fatal(err)
		}
		tmp, err := os.MkdirTemp(filepath.Dir(dir), "install-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(tmp)
		if err := os.WriteFile(filepath.Join(tmp, "package.json"), pkg, 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, npm, "install", "--no-audit", "--no-fund", "--omit=dev", "--loglevel=error")
		cmd.Dir = tmp
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Skipf("skipping the TypeScript SDK test: npm install failed (no registry access?): %v\n%s", err, tail(out, 2000))
		}
		if err := os.Rename(tmp, dir); err != nil && !os.IsExist(err) {
			if _, statErr := os.Stat(dir); statErr != nil {
				t.Fatal(err)
			}
		}
	}
	client, err := os.ReadFile("testdata/ts-client/client.mjs")
	if err != nil {
		t.Fatal(err)
	}
	// A per-test copy next to node_modules, where Node resolves the imports from.
	csum := sha256.Sum256(client)
	name := "client-" + hex.EncodeToString(csum[:6]) + ".mjs"
	if err := os.WriteFile(filepath.Join(dir, name), client, 0o644); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, name)
}

func fmtSscanVersion(v string, major, minor *int) (int, error) {
	parts := strings.SplitN(v, ".", 3)
	n := 0
	for i, p := range parts[:min(2, len(parts))] {
		x := 0
		for _, c := range p {
			if c < '0' || c > '9' {
				break
			}
			x = x*10 + int(c-'0')
		}
		if i == 0 {
			*major = x
		} else {
			*minor = x
		}
		n++
	}
	return n, nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// cleanEnv is the environment without proxy settings: the test talks to its gate directly.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "NODE_OPTIONS":
			continue
		}
		env = append(env, kv)
	}
	return env
}

func TestTypeScriptSDK_ClientThroughTheGate(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping the TypeScript SDK test in -short mode")
	}
	script := tsClient(t)
	// SSE responses: the streamed tools/list filter under a second client implementation (the
	// Go SDK tests cover both modes).
	upstream, log := newSDKServer(t, false, false)
	g := newGate(t, sdkPolicies, upstream.URL, sdkHost)
	front := httptest.NewServer(g)
	defer front.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", script)
	cmd.Env = append(cleanEnv(), "MCP_ENDPOINT="+front.URL+"/mcp")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.Bytes())
	}
	steps := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var s struct {
			Step    string `json:"step"`
			OK      bool   `json:"ok"`
			Session string `json:"session"`
		}
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			t.Fatalf("%v: %s", err, sc.Bytes())
		}
		if !s.OK {
			t.Errorf("step not as expected: %s", sc.Bytes())
		}
		if s.Step == "connect" && s.Session == "" {
			t.Error("no session")
		}
		steps[s.Step]++
	}
	if steps["connect"] != 1 || steps["tools/list"] != 1 || steps["tools/call"] != 4 {
		t.Errorf("steps = %v\n%s", steps, out)
	}
	seen := log.all()
	if strings.Contains(seen, "/etc/passwd") || strings.Contains(seen, "delete_repo") {
		t.Errorf("the server executed a denied call:\n%s", seen)
	}
	if !strings.Contains(seen, "search flaky test") || !strings.Contains(seen, "read_file /workspace/a") {
		t.Errorf("the server did not execute the allowed calls:\n%s", seen)
	}
}
