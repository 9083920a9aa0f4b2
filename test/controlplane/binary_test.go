package controlplane_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/controlplane/bundle"
)

var (
	buildOnce sync.Once
	escrowBin string
	buildErr  error
)

// escrowBinary builds ./cmd/escrow once per test binary (or uses ESCROW_BIN).
func escrowBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("ESCROW_BIN"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "escrow-controlplane-bin-")
		if err != nil {
			buildErr = err
			return
		}
		escrowBin = filepath.Join(dir, "escrow")
		cmd := exec.Command("go", "build", "-o", escrowBin, "./cmd/escrow")
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/escrow: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return escrowBin
}

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// replica is one running `escrow controller` process.
type replica struct {
	cmd        *exec.Cmd
	log        *lockedBuf
	done       chan error
	ads, admin string
}

func startReplica(t *testing.T, args ...string) *replica {
	t.Helper()
	r := &replica{log: &lockedBuf{}, done: make(chan error, 1)}
	r.cmd = exec.Command(escrowBinary(t), append([]string{"controller", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
		"--namespace", escrowNS, "--coalesce", "50ms"}, args...)...)
	r.cmd.Stdout, r.cmd.Stderr = r.log, r.log
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.done <- r.cmd.Wait() }()
	t.Cleanup(func() {
		_ = r.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("escrow controller log:\n%s", r.log.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for r.ads == "" {
		for line := range strings.SplitSeq(r.log.String(), "\n") {
			var rec struct{ Msg, Addr, Admin string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "escrow controller listening" {
				r.ads, r.admin = rec.Addr, rec.Admin
			}
		}
		select {
		case err := <-r.done:
			t.Fatalf("escrow controller exited: %v\n%s", err, r.log.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("escrow controller did not start:\n%s", r.log.String())
		}
	}
	eventually(t, 30*time.Second, "/readyz", func() error {
		res, err := http.Get("http://" + r.admin + "/readyz")
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			return fmt.Errorf("status %d", res.StatusCode)
		}
		return nil
	})
	return r
}

func (r *replica) sigterm(t *testing.T) {
	t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, r.log.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("escrow controller did not stop after SIGTERM")
	}
}

// The real binary, as the controller's ServiceAccount: it serves a sidecar; after SIGTERM the
// sidecar reconnects to another replica and gets the same version (the content decides it).
func TestEscrowController_ReplicasServeTheSameVersionAndStopOnSIGTERM(t *testing.T) {
	p := controlPlane(t) // the namespace, the RBAC and the CA
	kc, err := kube(t).KubeconfigAs("system:serviceaccount:" + escrowNS + ":" + controllerSA)
	if err != nil {
		t.Fatal(err)
	}
	own, err := p.ca.SVID(workload(escrowNS, controllerSA))
	if err != nil {
		t.Fatal(err)
	}
	cert, key, bundleFile, err := p.ca.WriteFiles(t.TempDir(), own)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--kubeconfig", kc, "--svid-cert", cert, "--svid-key", key, "--bundle", bundleFile}
	ns := namespace(t, "cp-binary")
	kubectl(t, yamlDoc("Upstream", ns, "api", "host: binary.example.com"), "apply", "-f", "-")

	first := startReplica(t, args...)
	second := startReplica(t, args...)
	id := workload(ns, "agent")
	dial := func(r *replica) *stream {
		svid, err := p.ca.SVID(id)
		if err != nil {
			t.Fatal(err)
		}
		c, err := controllertestDial(r.ads, svid, p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return follow(c)
	}
	s1 := dial(first)
	b1 := s1.await(t, within, "bundle from the first replica", func(b bundle.Bundle) bool { return hasHost(b, "binary.example.com", 0) })

	first.sigterm(t)
	// The stream ends; the sidecar reconnects to the other replica.
	select {
	case r := <-s1.ch:
		if r.err == nil {
			t.Fatalf("stream went on after SIGTERM: %+v", r.b)
		}
	case <-time.After(within):
		t.Fatal("stream not closed by SIGTERM")
	}
	s2 := dial(second)
	b2 := s2.await(t, within, "bundle from the second replica", func(b bundle.Bundle) bool { return hasHost(b, "binary.example.com", 0) })
	if b1.Version != b2.Version {
		t.Errorf("replicas serve versions %s and %s for the same objects", b1.Version, b2.Version)
	}
	kubectl(t, yamlDoc("Revocation", ns, "stop", fmt.Sprintf("spiffe_ids: [%q]", id)), "apply", "-f", "-")
	s2.await(t, within, "revocation via the second replica", func(b bundle.Bundle) bool { return hasRevocation(b, ns+"/stop") })

	res, err := http.Get("http://" + second.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	_, _ = body.ReadFrom(res.Body)
	res.Body.Close()
	for _, want := range []string{"escrow_controller_connected_sidecars 1", "escrow_controller_pushes_total", "escrow_controller_push_latency_seconds_count"} {
		if !strings.Contains(body.String(), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	second.sigterm(t)
}
