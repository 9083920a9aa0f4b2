package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/policy"
)

// With xds set and no policy.dir, a sidecar starts with no policy set: every request is denied
// and /readyz is not ready until the control plane's first update is applied.
func TestBuild_WithXDSDeniesAndIsNotReadyUntilTheFirstUpdate(t *testing.T) {
	dir := t.TempDir()
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {spiffe: {socket: unix:///nonexistent}}
ca_dir: %s
xds: {address: controller.example:15490}
`, filepath.Join(dir, "ca"))))
	must(t, err)
	id, err := attest.NewStatic(testSPIFFEID)
	must(t, err)
	var applied atomic.Bool
	sc, err := Build(context.Background(), cfg, Deps{
		Identity: id, Audit: audit.SinkFunc(func(*audit.Record) {}),
		SystemRoots: func() ([]byte, error) { return nil, nil },
		ReadyChecks: map[string]ReadyCheck{"xds": func() error {
			if !applied.Load() {
				return errors.New("no config received from the control plane yet")
			}
			return nil
		}},
	})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	up := newPlainUpstream(t, okHandler(nil))
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(mustURL(t, "http://"+sc.ProxyAddr.String()))}}
	get := func() (*http.Response, string) {
		t.Helper()
		resp, err := client.Get("http://app.example.test/")
		must(t, err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b)
	}
	ready := func() (int, string) {
		resp, err := direct.Get("http://" + sc.AdminAddr.String() + "/readyz")
		must(t, err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}

	if code, body := ready(); code != http.StatusServiceUnavailable || !strings.Contains(body, "no config received") {
		t.Fatalf("readyz before any update = %d %s", code, body)
	}
	next, err := config.Parse([]byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {spiffe: {socket: unix:///nonexistent}}
ca_dir: %s
xds: {address: controller.example:15490}
egress: {allow_cidrs: [127.0.0.0/8]}
upstreams: [{host: app.example.test, port: 80, address: %q}]
`, filepath.Join(dir, "ca"), up.Addr)))
	must(t, err)
	// Routes alone: still no policy set, so still denied.
	must(t, sc.Update(context.Background(), Update{Config: next}))
	if resp, body := get(); resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(ReasonHeader) != string(ReasonPolicyUnavailable) {
		t.Fatalf("before any policy = %d %s", resp.StatusCode, body)
	}
	set, err := policy.Compile(policy.Source{Origin: "xds", Policies: map[string][]byte{"p.cedar": []byte(allowAll)}})
	must(t, err)
	must(t, sc.Update(context.Background(), Update{PolicySet: set}))
	applied.Store(true)
	if resp, body := get(); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("after the first update = %d %s", resp.StatusCode, body)
	}
	if code, body := ready(); code != 200 {
		t.Fatalf("readyz after the first update = %d %s", code, body)
	}
}

func TestBuild_RefusesAReadyCheckThatReplacesABuiltIn(t *testing.T) {
	dir := t.TempDir()
	cfg, err := config.Parse([]byte(fmt.Sprintf("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nidentity: {static: %s}\nca_dir: %s\nxds: {address: c:1}\n", testSPIFFEID, dir)))
	if err == nil {
		t.Fatal("xds with a static identity was accepted")
	}
	cfg, err = config.Parse([]byte(fmt.Sprintf("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nidentity: {spiffe: {}}\nca_dir: %s\nxds: {address: c:1}\n", dir)))
	must(t, err)
	id, _ := attest.NewStatic(testSPIFFEID)
	_, err = Build(context.Background(), cfg, Deps{Identity: id, Audit: audit.SinkFunc(func(*audit.Record) {}),
		SystemRoots: func() ([]byte, error) { return nil, nil },
		ReadyChecks: map[string]ReadyCheck{"policy": func() error { return nil }}})
	if err == nil || !strings.Contains(err.Error(), `"policy" is built in`) {
		t.Fatalf("Build = %v", err)
	}
}
