package controlplane_test

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest/attesttest"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
)

// sidecarProc is one running `escrow proxy`.
type sidecarProc struct {
	cmd          *exec.Cmd
	log          *lockedBuf
	done         chan error
	proxy, admin string
}

// startSidecar starts escrow proxy with cfgFile and waits until it applied the controller's
// first bundle (and, with ready, until /readyz says so: a sidecar whose credentials cannot be
// fetched never does).
func startSidecar(t *testing.T, cfgFile string, ready bool) *sidecarProc {
	t.Helper()
	s := &sidecarProc{log: &lockedBuf{}, done: make(chan error, 1)}
	s.cmd = exec.Command(escrowBinary(t), "proxy", "--config", cfgFile, "--drain-timeout", "2s")
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		_ = s.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("escrow proxy log:\n%s", s.log.String())
		}
	})
	eventually(t, 30*time.Second, "escrow proxy listening", func() error {
		select {
		case err := <-s.done:
			t.Fatalf("escrow proxy exited: %v\n%s", err, s.log.String())
		default:
		}
		for line := range strings.SplitSeq(s.log.String(), "\n") {
			var rec struct{ Msg, Proxy, Admin string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "escrow proxy listening" {
				s.proxy, s.admin = rec.Proxy, rec.Admin
				return nil
			}
		}
		return fmt.Errorf("not yet")
	})
	eventually(t, 30*time.Second, "the controller's bundle applied", func() error {
		if !strings.Contains(s.log.String(), "control plane config applied") {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if !ready {
		return s
	}
	eventually(t, 30*time.Second, "escrow proxy /readyz", func() error {
		res, err := http.Get("http://" + s.admin + "/readyz")
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", res.StatusCode)
		}
		return nil
	})
	return s
}

// appliedVersion is the version of the last bundle s applied, from its log.
func appliedVersion(s *sidecarProc) string {
	v := ""
	for line := range strings.SplitSeq(s.log.String(), "\n") {
		var rec struct{ Msg, Version string }
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "control plane config applied" {
			v = rec.Version
		}
	}
	return v
}

func (s *sidecarProc) stop(t *testing.T) {
	t.Helper()
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		t.Fatal("escrow proxy did not stop after SIGTERM")
	}
}

// curl asks url through the sidecar with the real curl, trusting the pod CA; it returns the
// status, escrow's X-Escrow-Reason and the body.
func curl(t *testing.T, s *sidecarProc, caFile, url string) (int, string, string) {
	t.Helper()
	out, err := exec.Command("curl", "-sS", "--max-time", "20", "--proxy", "http://"+s.proxy, "--cacert", caFile,
		"-H", "Accept: application/vnd.github+json", "-D", "-", url).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", url, err, out)
	}
	head, body, _ := strings.Cut(strings.ReplaceAll(string(out), "\r\n", "\n"), "\n\n")
	// A CONNECT through the proxy shows its own "200 Connection established" first.
	for strings.HasPrefix(body, "HTTP/") {
		head, body, _ = strings.Cut(body, "\n\n")
	}
	var code int
	fmt.Sscanf(head, "HTTP/%s %d", new(string), &code)
	reason := ""
	for l := range strings.SplitSeq(head, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, "X-Escrow-Reason") {
			reason = strings.TrimSpace(v)
		}
	}
	return code, reason, body
}

// TestBroker_ASidecarGetsAGitHubAppTokenThroughTheControllerAndNeverTheKey: a GitHub App's
// private key is a Secret in escrow's namespace; a brokered Credential, an Upstream and a
// Policy are objects in the real API server. The real `escrow controller` (as its
// ServiceAccount, reading the Secret through its Role) mints installation tokens against a
// GitHub stand-in (controllertest.GitHub: the documented wire format of
// https://docs.github.com/en/rest/apps/apps#create-an-installation-access-token-for-an-app
// and https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app);
// a real `escrow proxy` of an allowed workload serves real curl with one token for several
// requests; a workload not in spiffe_ids is never sent the Credential nor its Upstream, so it
// becomes ready and its request to the brokered host is 403 unknown_destination, with no mint
// asked of the controller; a cluster-wide
// Revocation of the credential makes the controller revoke its token at GitHub. The key appears
// in none of the sidecars' files, environment, output or answers (nor in the controller's files
// or output).
func TestBroker_ASidecarGetsAGitHubAppTokenThroughTheControllerAndNeverTheKey(t *testing.T) {
	controlPlane(t) // escrow's namespace and the controller's RBAC
	ns := namespace(t, "cp-broker")
	coder, reviewer := workload(ns, "coder"), workload(ns, "reviewer")
	dir := t.TempDir()

	// The App's key, only in a Secret of escrow's namespace.
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
	keyBody := strings.Split(keyPEM, "\n")[5] // a line of base64 from the middle: what any leak would contain
	const appID, installation = 31337, 4711
	gh, err := controllertest.NewGitHub(appID, installation, &key.PublicKey, "api.github.com")
	if err != nil {
		t.Fatal(err)
	}
	defer gh.Close()
	ghCA := filepath.Join(dir, "github-ca.pem")
	if err := os.WriteFile(ghCA, gh.CAPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	secret, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "Secret",
		"metadata": map[string]any{"name": "github-app-e2e", "namespace": escrowNS}, "stringData": map[string]any{"private-key.pem": keyPEM}})
	kubectl(t, string(secret), "apply", "-f", "-")
	kubectl(t, yamlDoc("Credential", escrowNS, "github-e2e", fmt.Sprintf(`github_app:
  app_id: %d
  installation_id: %d
  api_url: %s
  ca_file: %s
  private_key_ref: {name: github-app-e2e, key: private-key.pem}
broker:
  spiffe_ids: [%q]`, appID, installation, gh.URL, ghCA, coder)), "apply", "-f", "-")
	kubectl(t, yamlDoc("Upstream", ns, "github", fmt.Sprintf("host: api.github.com\ncredential: github-e2e\naddress: %s\nca_file: %s", gh.Addr, ghCA)), "apply", "-f", "-")
	kubectl(t, yamlDoc("Policy", ns, "github", `cedar: |
  @id("github-read")
  permit(principal, action == Action::"GET", resource == Host::"api.github.com");`), "apply", "-f", "-")
	t.Cleanup(func() {
		kubectl(t, "", "delete", "credential", "-n", escrowNS, "github-e2e")
		kubectl(t, "", "delete", "secret", "-n", escrowNS, "github-app-e2e")
	})

	// One trust domain: the sidecars' SVIDs from a Workload API, the controller's from files.
	wl := attesttest.NewWorkloadAPI(t, td)
	wl.SetSVID(coder, time.Now().Add(time.Hour))
	cdir := filepath.Join(dir, "controller")
	if err := os.Mkdir(cdir, 0o700); err != nil {
		t.Fatal(err)
	}
	ctrl := startReplica(t, replicaArgs(t, wl, cdir)...)
	eventually(t, within, "the Credential accepted", func() error {
		out := kubectl(t, "", "get", "credential", "-n", escrowNS, "github-e2e", "-o", `jsonpath={.status.conditions[?(@.type=="Accepted")].status}`)
		if out != "True" {
			return fmt.Errorf("Accepted = %q", out)
		}
		return nil
	})

	// The sidecar: only what a pod of namespace ns has (no Secret of escrow's namespace).
	cfgFile := sidecarConfig(t, wl, dir, ctrl.ads, nil)
	sdir := filepath.Dir(cfgFile)
	podCA := filepath.Join(sdir, "ca", "ca.crt")
	sc := startSidecar(t, cfgFile, true)
	var answers []string
	for i := range 3 {
		code, reason, body := curl(t, sc, podCA, "https://api.github.com/repos/acme/widgets")
		answers = append(answers, body)
		if code != http.StatusOK || !strings.Contains(body, `"full_name":"acme/widgets"`) {
			t.Fatalf("request %d: %d %s %s\ncontroller:\n%s", i, code, reason, body, ctrl.log.String())
		}
	}
	if gh.Minted() != 1 || gh.APICalls() != 3 {
		t.Errorf("GitHub minted %d tokens and answered %d API calls; want one token for three requests", gh.Minted(), gh.APICalls())
	}
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", sc.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	sc.stop(t)

	// Another workload of the same namespace is not in spiffe_ids: its bundle has neither the
	// Credential nor the Upstream naming it, so it is ready (no credential it could never
	// fetch) and the host is unknown to it.
	wl.SetSVID(reviewer, time.Now().Add(time.Hour))
	other := startSidecar(t, cfgFile, true)
	code, reason, body := curl(t, other, podCA, "https://api.github.com/repos/acme/widgets")
	answers = append(answers, body)
	if code != http.StatusForbidden || reason != "unknown_destination" {
		t.Errorf("a workload not in spiffe_ids: %d %q %s", code, reason, body)
	}
	if gh.Minted() != 1 || gh.APICalls() != 3 {
		t.Errorf("after the workload not allowed: %d minted, %d API calls", gh.Minted(), gh.APICalls())
	}
	if strings.Contains(other.log.String(), "github-e2e") {
		t.Errorf("the workload not allowed learnt of the brokered Credential:\n%s", other.log.String())
	}
	if a, b := appliedVersion(sc), appliedVersion(other); a == "" || a == b {
		t.Errorf("applied bundle versions: allowed %q, not allowed %q; want two", a, b)
	}
	other.stop(t)

	// A cluster-wide Revocation of the credential: the controller drops its token and revokes
	// it at GitHub (DELETE /installation/token).
	kubectl(t, yamlDoc("Revocation", escrowNS, "github-e2e-incident", "credentials: [github-e2e]\nreason: key rotation"), "apply", "-f", "-")
	t.Cleanup(func() { kubectl(t, "", "delete", "revocation", "-n", escrowNS, "github-e2e-incident") })
	eventually(t, within, "the controller revokes its token at GitHub", func() error {
		if n := len(gh.Revoked()); n != 1 {
			return fmt.Errorf("%d tokens revoked", n)
		}
		return nil
	})

	res, err := http.Get("http://" + ctrl.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if want := `escrow_controller_broker_mints_total{credential="github-e2e",result="ok"} 1`; !bytes.Contains(metrics, []byte(want)) {
		t.Errorf("/metrics lacks %s", want)
	}
	// The workload not allowed never asked: it was not sent the Credential.
	if bytes.Contains(metrics, []byte(`escrow_controller_broker_mints_total{credential="github-e2e",result="denied"}`)) {
		t.Errorf("a mint was refused: the workload not allowed asked for a Credential it should not know of")
	}

	// The key is in none of the sidecar's files, environment, output or answers.
	where := map[string]string{"the sidecar's environment": string(environ), "the first sidecar's output": sc.log.String(),
		"the second sidecar's output": other.log.String(), "the answers": strings.Join(answers, "\n"), "the controller's output": ctrl.log.String()}
	// Nor in any file either process has (the controller's are its SVID files).
	for _, root := range []string{sdir, cdir} {
		_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				b, _ := os.ReadFile(path)
				where[path] = string(b)
			}
			return nil
		})
	}
	for what, text := range where {
		if strings.Contains(text, keyBody) || strings.Contains(text, "RSA PRIVATE KEY") {
			t.Errorf("the App's private key is in %s", what)
		}
	}
}
