package controlplane_test

import (
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest/attesttest"
)

// service stands in for the controller's Kubernetes Service: a TCP forwarder that sends each new
// connection to the first replica that accepts it, as kube-proxy stops sending to a replica whose
// process died. It only relays bytes: the mTLS is between the sidecar and the replica.
type service struct {
	ln net.Listener

	mu       sync.Mutex
	backends []string
	conns    []net.Conn
}

func startService(t *testing.T) *service {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &service{ln: ln}
	t.Cleanup(s.close)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.relay(c)
		}
	}()
	return s
}

func (s *service) addr() string { return s.ln.Addr().String() }

func (s *service) setBackends(addrs ...string) {
	s.mu.Lock()
	s.backends = addrs
	s.mu.Unlock()
}

func (s *service) relay(c net.Conn) {
	s.mu.Lock()
	backends := append([]string(nil), s.backends...)
	s.conns = append(s.conns, c)
	s.mu.Unlock()
	var b net.Conn
	for _, a := range backends {
		var err error
		if b, err = net.DialTimeout("tcp", a, time.Second); err == nil {
			break
		}
	}
	if b == nil {
		c.Close()
		return
	}
	go func() {
		_, _ = io.Copy(b, c)
		b.Close()
	}()
	_, _ = io.Copy(c, b)
	c.Close()
}

func (s *service) close() {
	s.ln.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

// kill ends the replica at once (SIGKILL: no drain, no goodbye on its streams).
func (r *replica) kill(t *testing.T) {
	t.Helper()
	if err := r.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		t.Fatal("escrow controller did not exit after SIGKILL")
	}
}

// connected reports whether the replica has a sidecar stream open (its /metrics).
func (r *replica) connected() bool {
	res, err := http.Get("http://" + r.admin + "/metrics")
	if err != nil {
		return false
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return strings.Contains(string(b), "\nescrow_controller_connected_sidecars 1\n")
}

// TestEscrowController_ASidecarKeepsServingThroughReplicaDeathsAndFollowsTheSurvivor: a real
// `escrow proxy` follows two real `escrow controller` replicas behind one address. Killing the
// replica it is connected to (SIGKILL) does not interrupt it: it keeps serving the last bundle,
// reconnects to the other, and a Revocation created afterwards reaches it through that one.
// With both replicas dead it keeps serving what it last applied (the revocation still in force)
// and, when a new replica starts, converges on the objects as they are by then.
func TestEscrowController_ASidecarKeepsServingThroughReplicaDeathsAndFollowsTheSurvivor(t *testing.T) {
	controlPlane(t)
	ns := namespace(t, "cp-failover")
	agent, controllerID := workload(ns, "agent"), workload(escrowNS, controllerSA)
	dir := t.TempDir()

	// The API the agent calls (no credential: this test is about the control plane).
	api := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"ok":true}`)
	}))
	defer api.Close()
	apiCA := filepath.Join(dir, "api-ca.pem")
	if err := os.WriteFile(apiCA, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: api.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	kubectl(t, yamlDoc("Upstream", ns, "api", fmt.Sprintf("host: example.com\naddress: %s\nca_file: %s", api.Listener.Addr(), apiCA)), "apply", "-f", "-")
	kubectl(t, yamlDoc("Policy", ns, "api", `cedar: |
  @id("failover-read")
  permit(principal, action == Action::"GET", resource == Host::"example.com");`), "apply", "-f", "-")

	// SVIDs of one trust domain: the sidecar's from a Workload API, the replicas' from files.
	wl := attesttest.NewWorkloadAPI(t, td)
	wl.SetSVID(agent, time.Now().Add(time.Hour))
	own := wl.MintX509SVID(controllerID, time.Now().Add(time.Hour))
	certPEM, keyPEM, err := own.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var bundlePEM []byte
	for _, a := range wl.X509Authorities() {
		bundlePEM = append(bundlePEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Raw})...)
	}
	certFile, keyFile, bundleFile := filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"), filepath.Join(dir, "bundle.pem")
	for f, b := range map[string][]byte{certFile: certPEM, keyFile: keyPEM, bundleFile: bundlePEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	kc, err := kube(t).KubeconfigAs("system:serviceaccount:" + escrowNS + ":" + controllerSA)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--kubeconfig", kc, "--svid-cert", certFile, "--svid-key", keyFile, "--bundle", bundleFile}
	a, b := startReplica(t, args...), startReplica(t, args...)
	svc := startService(t)
	svc.setBackends(a.ads, b.ads)

	sdir := filepath.Join(dir, "sidecar")
	if err := os.Mkdir(sdir, 0o755); err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(sdir, "escrow.yaml")
	if err := os.WriteFile(cfgFile, []byte(fmt.Sprintf(`listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {spiffe: {socket: %q}}
ca_dir: %s
egress: {allow_cidrs: [127.0.0.0/8]}
xds: {address: %s, server_id: %s, max_backoff: 1s}
audit: {flush_interval: 0s}
`, wl.Addr(), filepath.Join(sdir, "ca"), svc.addr(), controllerID)), 0o644); err != nil {
		t.Fatal(err)
	}
	podCA := filepath.Join(sdir, "ca", "ca.crt")
	sc := startSidecar(t, cfgFile, true)
	call := func() (int, string) {
		code, reason, _ := curl(t, sc, podCA, "https://example.com/v1/things")
		return code, reason
	}
	if code, reason := call(); code != http.StatusOK {
		t.Fatalf("before any failure: %d %s", code, reason)
	}

	// Kill the replica the sidecar is connected to.
	var live, survivor *replica
	eventually(t, within, "the sidecar's stream on one replica", func() error {
		switch {
		case a.connected():
			live, survivor = a, b
		case b.connected():
			live, survivor = b, a
		default:
			return errors.New("no replica reports the sidecar")
		}
		return nil
	})
	live.kill(t)
	if code, reason := call(); code != http.StatusOK {
		t.Fatalf("right after its replica was killed: %d %s; want the last bundle to keep serving", code, reason)
	}
	eventually(t, 15*time.Second, "the sidecar reconnected to the surviving replica", func() error {
		if !survivor.connected() {
			return errors.New("not yet")
		}
		return nil
	})

	// A Revocation reaches it through the survivor.
	start := time.Now()
	kubectl(t, yamlDoc("Revocation", ns, "incident", fmt.Sprintf("spiffe_ids: [%q]\nreason: failover test", agent)), "apply", "-f", "-")
	eventually(t, 15*time.Second, "the revocation applied via the surviving replica", func() error {
		if code, reason := call(); code != http.StatusForbidden || reason != "revoked" {
			return fmt.Errorf("%d %s", code, reason)
		}
		return nil
	})
	t.Logf("Revocation created → sidecar denies, through the surviving replica: %v", time.Since(start).Round(time.Millisecond))

	// No replica at all: the sidecar keeps what it last applied (the revocation in force).
	survivor.kill(t)
	kubectl(t, "", "delete", "revocation", "-n", ns, "incident")
	if code, reason := call(); code != http.StatusForbidden || reason != "revoked" {
		t.Fatalf("with no controller: %d %s; want the last applied bundle (revoked)", code, reason)
	}

	// A new replica: the sidecar converges on the objects as they are now (no revocation).
	c := startReplica(t, args...)
	svc.setBackends(c.ads)
	eventually(t, 20*time.Second, "the sidecar converged on the new replica's bundle", func() error {
		if code, reason := call(); code != http.StatusOK {
			return fmt.Errorf("%d %s", code, reason)
		}
		return nil
	})
	sc.stop(t)
}
