package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// benchWorkload is the agent's identity in every escrow run.
const benchWorkload = "spiffe://bench.example/ns/agents/sa/coder"

// escrowArgs configures one escrow under test.
type escrowArgs struct {
	Bin      string
	Policies int // size of the policy set (the benchmark workload's permits are among them)
	Up       *upstream
	Key      string
}

// startEscrow writes a realistic config (static identity, a policy set, a static credential
// from escrow's environment, routes pinned to the loopback upstream) and starts escrow.
func startEscrow(ctx context.Context, a startArgs, e escrowArgs) (*proc, error) {
	polDir := filepath.Join(a.Dir, "policies")
	if err := os.MkdirAll(polDir, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(polDir, "bench.cedar"), []byte(benchPolicies(e.Policies)), 0o644); err != nil {
		return nil, err
	}
	admin, err := freePort()
	if err != nil {
		return nil, err
	}
	_, hp, _ := net.SplitHostPort(e.Up.HTTPAddr)
	_, sp, _ := net.SplitHostPort(e.Up.HTTPSAddr)
	addr := fmt.Sprintf("127.0.0.1:%d", a.Port)
	cfg := fmt.Sprintf(`# escrow benchmark config (generated)
listen: %[1]s
admin: 127.0.0.1:%[2]d
identity: {static: %[3]s}
ca_dir: %[4]s
policy: {dir: %[5]s, reload_interval: 2s}
upstreams:
  - host: %[6]s
    port: %[7]s
    address: 127.0.0.1:%[7]s
    credential: api
    unsafe_plaintext_credential: true   # plain-HTTP scenario: the credential on http:// to loopback
  - host: %[8]s
    port: %[9]s
    address: 127.0.0.1:%[9]s
    ca_file: %[10]s
    credential: api
  - host: "*%[11]s"
    port: %[9]s
    address: 127.0.0.1:%[9]s
    ca_file: %[10]s
    credential: api
  - host: %[12]s
    port: %[9]s
    address: 127.0.0.1:%[9]s
    tunnel: true
credentials:
  api: {static: {env: BENCH_API_KEY}}
egress:
  allow_cidrs: [127.0.0.1/32]
`, addr, admin, benchWorkload, filepath.Join(a.Dir, "ca"), polDir,
		hostPlain, hp, hostAPI, sp, e.Up.CAFile, leafSuffix, hostTunnel)
	cfgPath := filepath.Join(a.Dir, "escrow.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	env := append(cleanEnv(), "BENCH_API_KEY="+e.Key)
	p, err := startProc(ctx, "escrow", addr, a, env, e.Bin, "proxy", "--config", cfgPath)
	if err != nil {
		return nil, err
	}
	// The listener opens once the CA files are written; check rather than assume.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(escrowCAFile(a.Dir)); err == nil {
			return p, nil
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("bench: escrow wrote no ca.crt:\n%s", p.LogTail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func escrowCAFile(dir string) string { return filepath.Join(dir, "ca", "ca.crt") }

// benchPolicies returns n policies: the benchmark workload's own permits and forbid (the ones
// its requests hit), and n-4 policies for other teams in the shapes a real set has (==, in
// Namespace, in ServiceAccount, is ... in; read/write/connect; a condition each).
func benchPolicies(n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, `@id("coder-calls-api") permit (principal in ServiceAccount::"agents/coder", action in Action::"read", resource) when { resource in [Host::"%s", Host::"%s"] && context.path like "/v1/*" && context.credential == "api" };`+"\n", hostAPI, hostPlain)
	fmt.Fprintf(&b, `@id("coder-leaf-hosts") permit (principal in Namespace::"agents", action == Action::"GET", resource) when { context.scheme == "https" && context.credential == "api" };`+"\n")
	fmt.Fprintf(&b, `@id("coder-tunnel") permit (principal in Namespace::"agents", action == Action::"connect", resource == Host::"%s");`+"\n", hostTunnel)
	b.WriteString(`@id("no-deletes") forbid (principal, action == Action::"DELETE", resource);` + "\n")
	for i := 4; i < n; i++ {
		switch i % 4 {
		case 0:
			fmt.Fprintf(&b, `@id("p%d") permit (principal == Workload::"spiffe://bench.example/ns/team%d/sa/agent", action in Action::"read", resource == Host::"api%d.example.com") when { context.path like "/v1/*" };`, i, i, i)
		case 1:
			fmt.Fprintf(&b, `@id("p%d") permit (principal in Namespace::"team%d", action == Action::"POST", resource == Host::"api%d.example.com") when { context.credential == "cred%d" };`, i, i, i, i)
		case 2:
			fmt.Fprintf(&b, `@id("p%d") forbid (principal in ServiceAccount::"team%d/agent", action in Action::"write", resource == Host::"api%d.example.com") when { context.path like "/admin/*" };`, i, i, i)
		case 3:
			fmt.Fprintf(&b, `@id("p%d") permit (principal is Workload in Namespace::"team%d", action == Action::"connect", resource == Host::"mirror%d.example.com") when { context.port == 443 };`, i, i, i)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// cleanEnv is the environment without proxy variables, so no process under test proxies
// its own upstream connections.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY":
			continue
		}
		env = append(env, kv)
	}
	return env
}
