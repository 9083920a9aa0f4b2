package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/audit"
)

// The Unix-socket listener serves the same pipeline; its callers are identified by
// SO_PEERCRED, so a policy can require the calling process. A second instance cannot take a
// running one's socket away.
func TestSidecar_UnixListenerIdentifiesTheCallerBySOPeerCred(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("SO_PEERCRED and /proc are Linux")
	}
	plain := newPlainUpstream(t, okHandler(nil))
	sock := filepath.Join(t.TempDir(), "proxy.sock")
	cfg := sidecarConfig(t, "listen_unix: "+sock+"\negress: {allow_cidrs: [127.0.0.0/8]}\nupstreams:\n"+plain.route("plain.example.com"))
	cfg.Identity.Process = true
	// Only this test's process may call: the policy reads the kernel's answer, not a header.
	must(t, os.WriteFile(filepath.Join(cfg.Policy.Dir, "p.cedar"), []byte(fmt.Sprintf(
		"@id(\"this-process\")\npermit (principal, action, resource) when { context has caller && context.caller.pid == %d };\n", os.Getpid())), 0o644))
	recs := make(chan *audit.Record, 4)
	sc, err := Build(context.Background(), cfg, Deps{Audit: audit.SinkFunc(func(r *audit.Record) { recs <- r }),
		SystemRoots: func() ([]byte, error) { return nil, nil }})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Serve(ctx) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	defer stop()

	tr := &http.Transport{
		Proxy: http.ProxyURL(mustURL(t, "http://escrow.sock")),
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}
	defer tr.CloseIdleConnections()
	get := func() int {
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://plain.example.com/x")
		must(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(); code != http.StatusOK {
		t.Fatalf("status %d through the Unix socket, want 200", code)
	}
	select {
	case rec := <-recs:
		if rec.CallerPID != os.Getpid() || rec.CallerUID != uint32(os.Getuid()) || !strings.HasSuffix(rec.CallerExe, filepath.Base(os.Args[0])) {
			t.Errorf("record caller pid %d uid %d exe %q; want pid %d uid %d exe %s", rec.CallerPID, rec.CallerUID, rec.CallerExe, os.Getpid(), os.Getuid(), os.Args[0])
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no record")
	}

	// A second instance fails to start and leaves the running one's socket alone.
	second := sidecarConfig(t, "listen_unix: "+sock+"\n")
	if sc2, err := Build(context.Background(), second, Deps{SystemRoots: func() ([]byte, error) { return nil, nil }}); err == nil {
		sc2.Close()
		t.Fatal("a second instance started on a socket in use")
	} else if !strings.Contains(err.Error(), "in use") {
		t.Errorf("second instance: %v, want the socket reported in use", err)
	}
	tr.CloseIdleConnections()
	if code := get(); code != http.StatusOK {
		t.Fatalf("status %d after the failed second start, want 200", code)
	}

	// Stopped, the socket file is gone.
	tr.CloseIdleConnections()
	stop()
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket file after stop: %v, want it removed", err)
	}
}

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	must(t, err)
	return u
}

// Two different programs on the same loopback listener: a policy that permits only curl's
// executable (by its sha256, from the kernel's view of the connection) lets curl through and
// denies this Go test binary.
func TestSidecar_PolicyOnTheCallersExecutableLetsOneProgramThroughAndNotAnother(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the calling process is found from /proc")
	}
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed")
	}
	curl, _ = filepath.EvalSymlinks(curl)
	b, err := os.ReadFile(curl)
	must(t, err)
	sum := sha256.Sum256(b)
	plain := newPlainUpstream(t, okHandler(nil))
	cfg := sidecarConfig(t, "egress: {allow_cidrs: [127.0.0.0/8]}\nupstreams:\n"+plain.route("plain.example.com"))
	cfg.Identity.Process = true
	must(t, os.WriteFile(filepath.Join(cfg.Policy.Dir, "p.cedar"), []byte(fmt.Sprintf(
		"@id(\"curl-only\")\npermit (principal, action, resource) when { context has caller && context.caller.sha256 == %q };\n", hex.EncodeToString(sum[:]))), 0o644))
	recs := make(chan *audit.Record, 4)
	sc, err := Build(context.Background(), cfg, Deps{Audit: audit.SinkFunc(func(r *audit.Record) { recs <- r }),
		SystemRoots: func() ([]byte, error) { return nil, nil }})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	proxyURL := "http://" + sc.ProxyAddr.String()

	out, err := exec.Command(curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--proxy", proxyURL, "http://plain.example.com/from-curl").Output()
	if err != nil || string(out) != "200" {
		t.Errorf("curl: %q %v, want 200", out, err)
	}
	tr := &http.Transport{Proxy: http.ProxyURL(mustURL(t, proxyURL))}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://plain.example.com/from-go")
	must(t, err)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("the Go client: %d, want 403 (not curl's executable)", resp.StatusCode)
	}
	for range 2 {
		select {
		case rec := <-recs:
			if rec.Path == "/from-curl" && (rec.Decision != audit.Allow || rec.CallerExe != curl) {
				t.Errorf("curl's record: decision %s exe %q, want allow %s", rec.Decision, rec.CallerExe, curl)
			}
			if rec.Path == "/from-go" && rec.Decision != audit.Deny {
				t.Errorf("the Go client's record: decision %s, want deny", rec.Decision)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("missing record")
		}
	}
}
