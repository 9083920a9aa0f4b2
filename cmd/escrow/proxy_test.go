package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// lockedBuffer is a bytes.Buffer safe for the concurrent writes of escrow's loggers.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestCmdProxy_WritesEveryAuditRecordBeforeExiting: audit records are buffered (here for the
// longest allowed interval), and a graceful stop (what SIGTERM does: the context ends) writes
// every one of them before escrow proxy returns.
func TestCmdProxy_WritesEveryAuditRecordBeforeExiting(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the proxy")
	}
	dir := t.TempDir()
	pol := filepath.Join(dir, "policies")
	if err := os.MkdirAll(pol, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pol, "p.cedar"), []byte(`@id("allow-all") permit (principal, action, resource);`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "escrow.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {static: spiffe://example.org/ns/agents/sa/test}
ca_dir: %s
policy: {dir: %s}
audit: {flush_interval: 1s}
`, filepath.Join(dir, "ca"), pol)), 0o644); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() { done <- cmdProxy(ctx, []string{"--config", cfg, "--drain-timeout", "5s"}, &stdout, &stderr) }()

	proxyAddr := ""
	deadline := time.Now().Add(20 * time.Second)
	for proxyAddr == "" {
		for _, l := range strings.Split(stderr.String(), "\n") {
			var m struct{ Msg, Proxy string }
			if json.Unmarshal([]byte(l), &m) == nil && m.Msg == "escrow proxy listening" {
				proxyAddr = m.Proxy
			}
		}
		select {
		case err := <-done:
			t.Fatalf("escrow proxy returned before listening: %v\n%s", err, stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("escrow proxy did not listen within 20s:\n%s", stderr.String())
		}
	}

	// Unknown destinations: each is denied at once and recorded.
	const n = 50
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: proxyAddr})}}
	for i := range n {
		resp, err := client.Get(fmt.Sprintf("http://unknown.example/r/%d", i))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("status %d, want 403", resp.StatusCode)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("escrow proxy: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("escrow proxy did not return 20s after its context ended")
	}

	paths := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(stdout.String()))
	for sc.Scan() {
		var r struct {
			LogType string `json:"log_type"`
			Path    string `json:"path"`
		}
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.LogType != "audit" {
			t.Errorf("stdout line is not an audit record: %q", sc.Text())
			continue
		}
		paths[r.Path] = true
	}
	for i := range n {
		if p := fmt.Sprintf("/r/%d", i); !paths[p] {
			t.Errorf("no audit record for %s after escrow stopped", p)
		}
	}
}
