package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/escrowproxy/escrow/attest/attesttest"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
)

// controllerFiles writes an SVID for the controller, its key and the trust bundle.
func controllerFiles(t *testing.T) (cert, key, bundle string) {
	t.Helper()
	ca, err := controllertest.NewCA("example.org")
	if err != nil {
		t.Fatal(err)
	}
	svid, err := ca.SVID("spiffe://example.org/ns/escrow-system/sa/escrow-controller")
	if err != nil {
		t.Fatal(err)
	}
	cert, key, bundle, err = ca.WriteFiles(t.TempDir(), svid)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key, bundle
}

// unreachableKubeconfig points at a port nothing listens on.
func unreachableKubeconfig(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	p := filepath.Join(t.TempDir(), "kubeconfig")
	kc := "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://" + addr + "\", insecure-skip-tls-verify: true}}]\n" +
		"users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n"
	if err := os.WriteFile(p, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCmdController_Flags(t *testing.T) {
	cert, key, bundle := controllerFiles(t)
	kc := unreachableKubeconfig(t)
	ids := []string{"--svid-cert", cert, "--svid-key", key, "--bundle", bundle}
	with := func(extra ...string) []string {
		return append(append([]string{"--kubeconfig", kc, "--namespace", "escrow-system"}, ids...), extra...)
	}
	t.Setenv("POD_NAMESPACE", "")
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "")
	for _, tc := range []struct {
		name    string
		args    []string
		wantErr error
		want    string
	}{
		{"help", []string{"--help"}, flag.ErrHelp, "escrow controller [--listen ADDR]"},
		{"bad flag", []string{"--nope"}, errUsage, "flag provided but not defined"},
		{"stray argument", with("extra"), errUsage, "unexpected arguments"},
		{"no namespace", append([]string{"--kubeconfig", kc}, ids...), errUsage, "--namespace is required"},
		{"no identity", []string{"--kubeconfig", kc, "--namespace", "n"}, errUsage, "--spiffe-socket"},
		{"half the files", []string{"--kubeconfig", kc, "--namespace", "n", "--svid-cert", cert}, errUsage, "--svid-cert, --svid-key and --bundle go together"},
		{"bad listen", with("--listen", "15490"), errUsage, "--listen"},
		{"bad admin", with("--admin", "nope"), errUsage, "--admin"},
		{"bad trust domain", with("--trust-domain", "Not A Domain!"), errUsage, "--trust-domain"},
		{"bad coalesce", with("--coalesce", "0s"), errUsage, "--coalesce"},
		{"bad log level", with("--log-level", "loud"), errUsage, "--log-level"},
		{"missing kubeconfig", append([]string{"--kubeconfig", filepath.Join(t.TempDir(), "none"), "--namespace", "n"}, ids...), nil, "--kubeconfig"},
		{"missing svid", []string{"--kubeconfig", kc, "--namespace", "n", "--svid-cert", filepath.Join(t.TempDir(), "x"), "--svid-key", key, "--bundle", bundle}, nil, "--svid-cert"},
		{"listen taken", nil, nil, "--listen"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if tc.name == "listen taken" {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				defer l.Close()
				args = with("--listen", l.Addr().String(), "--admin", "127.0.0.1:0")
			}
			var stdout, stderr lockedBuffer
			err := cmdController(context.Background(), args, &stdout, &stderr)
			all := stdout.String() + stderr.String()
			if err != nil {
				all += err.Error()
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) || tc.wantErr == nil && err == nil {
				t.Errorf("err = %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(all, tc.want) {
				t.Errorf("output lacks %q:\n%s", tc.want, all)
			}
		})
	}
	// The binary's dispatch and its help know the command.
	var out, errOut lockedBuffer
	if code := run([]string{"controller", "--help"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "SIGTERM") {
		t.Errorf("escrow controller --help: exit %d:\n%s%s", code, out.String(), errOut.String())
	}
	out = lockedBuffer{}
	if run([]string{"--help"}, &out, &errOut); !strings.Contains(out.String(), "\n  controller ") {
		t.Errorf("escrow --help does not list controller:\n%s", out.String())
	}
}

// Without a reachable API server the controller serves its admin endpoints and says why it is
// not ready; SIGTERM stops it.
func TestCmdController_NotReadyUntilSyncedAndStopsOnSIGTERM(t *testing.T) {
	cert, key, bundle := controllerFiles(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- cmdController(ctx, []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--namespace", "escrow-system",
			"--kubeconfig", unreachableKubeconfig(t), "--svid-cert", cert, "--svid-key", key, "--bundle", bundle}, &stdout, &stderr)
	}()
	ads, admin := controllerAddrs(t, &stderr, done)

	get := func(path string) (int, string) {
		res, err := http.Get("http://" + admin + path)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "not synced") {
		t.Errorf("/readyz = %d %q, want 503 naming the sync", code, body)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "escrow_controller_connected_sidecars 0") ||
		!strings.Contains(body, "go_goroutines") {
		t.Errorf("/metrics = %d:\n%s", code, body)
	}
	if c, err := net.DialTimeout("tcp", ads, time.Second); err != nil {
		t.Errorf("ADS port: %v", err)
	} else {
		c.Close()
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("did not stop after SIGTERM")
	}
	for _, a := range []string{ads, admin} {
		if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			c.Close()
			t.Errorf("%s still listening", a)
		}
	}
}

func controllerAddrs(t *testing.T, log *lockedBuffer, done <-chan error) (ads, admin string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		for line := range strings.SplitSeq(log.String(), "\n") {
			var rec struct{ Msg, Addr, Admin string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "escrow controller listening" {
				return rec.Addr, rec.Admin
			}
		}
		select {
		case err := <-done:
			t.Fatalf("escrow controller exited: %v\n%s", err, log.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("escrow controller did not log its addresses:\n%s", log.String())
	return "", ""
}

// The controller's identity from the SPIFFE Workload API (the protocol spoken by a test server):
// a sidecar SVID of the same trust domain is accepted, and the controller presents its own ID.
func TestCmdController_IdentityFromTheWorkloadAPI(t *testing.T) {
	wl := attesttest.NewWorkloadAPI(t, "example.org")
	const controllerID = "spiffe://example.org/ns/escrow-system/sa/escrow-controller"
	const sidecarID = "spiffe://example.org/ns/agents/sa/coder"
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The sidecar's SVID, fetched as a workload would, before the API hands out the controller's.
	wl.SetSVID(sidecarID, time.Now().Add(time.Hour))
	sidecar, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(wl.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	wl.SetSVID(controllerID, time.Now().Add(time.Hour))

	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- cmdController(ctx, []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--namespace", "escrow-system",
			"--kubeconfig", unreachableKubeconfig(t), "--spiffe-socket", wl.Addr()}, &stdout, &stderr)
	}()
	ads, admin := controllerAddrs(t, &stderr, done)

	td := spiffeid.RequireTrustDomainFromString("example.org")
	bundle := x509bundle.FromX509Authorities(td, wl.X509Authorities())
	// The sidecar accepts only the controller's ID.
	conf := tlsconfig.MTLSClientConfig(sidecar, bundle, tlsconfig.AuthorizeID(spiffeid.RequireFromString(controllerID)))
	c, err := controllertest.Dial(ctx, ads, conf, sidecarID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		res, err := http.Get("http://" + admin + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if strings.Contains(string(b), "escrow_controller_connected_sidecars 1") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sidecar's stream was not accepted:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// client-go's own complaints (here: the API server is unreachable) are JSON lines of the
// controller's log, not klog's text.
func TestCmdController_ClientGoLogsAreJSON(t *testing.T) {
	cert, key, bundle := controllerFiles(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- cmdController(ctx, []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--namespace", "escrow-system",
			"--kubeconfig", unreachableKubeconfig(t), "--svid-cert", cert, "--svid-key", key, "--bundle", bundle}, &stdout, &stderr)
	}()
	controllerAddrs(t, &stderr, done)
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(stderr.String(), `"logger":"controller.client-go`) {
		if time.Now().After(deadline) {
			t.Fatalf("no client-go line in the log:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
	for line := range strings.SplitSeq(strings.TrimSpace(stderr.String()), "\n") {
		if !json.Valid([]byte(line)) {
			t.Errorf("not a JSON line: %q", line)
		}
	}
}
