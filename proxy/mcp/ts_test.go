package mcp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"github.com/escrowproxy/escrow/internal/nodetest"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func tsClient(t *testing.T) string { return nodetest.Script(t, "testdata/ts-client") }

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
