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

// replicaArgs writes the controller's X509-SVID (minted by wl's CA) and trust bundle into dir
// and returns the arguments that run escrow controller with them as its ServiceAccount.
func replicaArgs(t *testing.T, wl *attesttest.WorkloadAPI, dir string) []string {
	t.Helper()
	own := wl.MintX509SVID(workload(escrowNS, controllerSA), time.Now().Add(time.Hour))
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
	return []string{"--kubeconfig", kc, "--svid-cert", certFile, "--svid-key", keyFile, "--bundle", bundleFile}
}

// sidecarConfig writes the config of an escrow proxy that follows the controller at addr, with
// its own policy directory holding extra (file name → Cedar), and returns its path.
func sidecarConfig(t *testing.T, wl *attesttest.WorkloadAPI, dir, addr string, extra map[string]string) string {
	t.Helper()
	sdir := filepath.Join(dir, "sidecar")
	pdir := filepath.Join(sdir, "policies")
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		t.Fatal(err)
	}
	policy := ""
	if len(extra) > 0 {
		policy = fmt.Sprintf("policy: {dir: %s}\n", pdir)
		for name, text := range extra {
			if err := os.WriteFile(filepath.Join(pdir, name), []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	cfgFile := filepath.Join(sdir, "escrow.yaml")
	if err := os.WriteFile(cfgFile, []byte(fmt.Sprintf(`listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {spiffe: {socket: %q}}
ca_dir: %s
egress: {allow_cidrs: [127.0.0.0/8]}
xds: {address: %s, server_id: %s, max_backoff: 1s}
audit: {flush_interval: 0s}
%s`, wl.Addr(), filepath.Join(sdir, "ca"), addr, workload(escrowNS, controllerSA), policy)), 0o644); err != nil {
		t.Fatal(err)
	}
	return cfgFile
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
	agent := workload(ns, "agent")
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
	args := replicaArgs(t, wl, dir)
	a, b := startReplica(t, args...), startReplica(t, args...)
	svc := startService(t)
	svc.setBackends(a.ads, b.ads)

	cfgFile := sidecarConfig(t, wl, dir, svc.addr(), nil)
	podCA := filepath.Join(dir, "sidecar", "ca", "ca.crt")
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

// metricValue reads one series from an escrow /metrics page ("" when absent).
func metricValue(t *testing.T, admin, series string) string {
	t.Helper()
	res, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			return v
		}
	}
	return ""
}

// TestEscrowController_ABundleTheSidecarRejectsIsNotSentAgain: a Policy that is valid alone but
// clashes with the sidecar's own policy file (the same @id) makes the real sidecar reject the
// bundle (NACK). The real controller does not send that version again (a bare snapshot cache
// answers every NACK with it at once: hundreds of round trips a second), and the next version,
// without the clash, is applied.
func TestEscrowController_ABundleTheSidecarRejectsIsNotSentAgain(t *testing.T) {
	controlPlane(t)
	ns := namespace(t, "cp-nack-binary")
	dir := t.TempDir()
	wl := attesttest.NewWorkloadAPI(t, td)
	wl.SetSVID(workload(ns, "agent"), time.Now().Add(time.Hour))
	ctrl := startReplica(t, replicaArgs(t, wl, dir)...)
	cfgFile := sidecarConfig(t, wl, dir, ctrl.ads, map[string]string{"own.cedar": `@id("own-deny-deletes")
forbid (principal, action == Action::"DELETE", resource);`})
	sc := startSidecar(t, cfgFile, true)

	kubectl(t, yamlDoc("Policy", ns, "clash", `cedar: |
  @id("own-deny-deletes")
  forbid (principal, action == Action::"POST", resource);`), "apply", "-f", "-")
	eventually(t, within, "the sidecar rejects the bundle", func() error {
		if v := metricValue(t, sc.admin, `escrow_xds_updates_total{result="nack"}`); v != "1" {
			return fmt.Errorf("nack = %q", v)
		}
		return nil
	})
	time.Sleep(time.Second) // a resend loop would count hundreds in this second
	if v := metricValue(t, sc.admin, `escrow_xds_updates_total{result="nack"}`); v != "1" {
		t.Fatalf("%s NACKs of one bad version on one stream, want 1", v)
	}
	if v := metricValue(t, ctrl.admin, `escrow_controller_nacks_total{reason="conflict"}`) + metricValue(t, ctrl.admin, `escrow_controller_nacks_total{reason="policy"}`); v != "1" {
		t.Errorf("the controller counted %q NACKs, want 1", v)
	}

	kubectl(t, "", "delete", "policy", "-n", ns, "clash")
	eventually(t, within, "the next version applied", func() error {
		if v := metricValue(t, sc.admin, `escrow_xds_updates_total{result="ack"}`); v != "2" {
			return fmt.Errorf("ack = %q", v)
		}
		return nil
	})
	sc.stop(t)
}
