package k8s_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	"sigs.k8s.io/yaml"
)

// There is no kubelet here, so this test plays one: it takes the pod the real webhook injected
// (configured from the chart) and runs it the way a node would, in a network namespace of its
// own (the pod's loopback) with each volume a directory: escrow from the injected container's
// args and mounts, with the config from the chart's ConfigMap; then the agent container's
// injected environment, and nothing else, given to real curl and Python requests. If the
// injector's proxy variables, trust variables, mounts and the chart's config disagree anywhere
// (a port, a ca_dir, a file name), the agent's call fails here.

// simPod is the part of a pod the simulation reads.
type simPod struct {
	Spec struct {
		InitContainers []simContainer `json:"initContainers"`
		Containers     []simContainer `json:"containers"`
		Volumes        []struct {
			Name      string `json:"name"`
			ConfigMap *struct {
				Name string `json:"name"`
			} `json:"configMap"`
			EmptyDir *struct{} `json:"emptyDir"`
			CSI      *struct{} `json:"csi"`
			HostPath *struct{} `json:"hostPath"`
		} `json:"volumes"`
	} `json:"spec"`
}

type simContainer struct {
	Name string   `json:"name"`
	Args []string `json:"args"`
	Env  []struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	} `json:"env"`
	VolumeMounts []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
	} `json:"volumeMounts"`
	StartupProbe *struct {
		HTTPGet struct {
			Path string `json:"path"`
			Port int    `json:"port"`
		} `json:"httpGet"`
	} `json:"startupProbe"`
}

// hostPath maps a path inside container c to the directory that plays its volume: the longest
// mount path that contains it wins, as in a container's mount table.
func (c simContainer) hostPath(t *testing.T, volumes map[string]string, p string) string {
	t.Helper()
	best, dir := "", ""
	for _, m := range c.VolumeMounts {
		if (p == m.MountPath || strings.HasPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/")) && len(m.MountPath) > len(best) {
			best, dir = m.MountPath, volumes[m.Name]
		}
	}
	if best == "" {
		t.Fatalf("container %s: %s is on no volume it mounts", c.Name, p)
	}
	return filepath.Join(dir, strings.TrimPrefix(p, best))
}

func (c simContainer) mountOf(t *testing.T, volume string) string {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == volume {
			return m.MountPath
		}
	}
	t.Fatalf("container %s does not mount %s", c.Name, volume)
	return ""
}

func TestInjectedPodServesTheAgentWithRealClients(t *testing.T) {
	bin := escrow(t)
	py := os.Getenv("ESCROW_E2E_PYTHON")
	if py == "" {
		py = "python3"
	}
	for _, tool := range []string{"unshare", "ip", "curl", py} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed to play the node (test/k8s/tools.sh installs iproute2): %v", tool, err)
		}
	}
	if out, err := exec.Command(py, "-c", "import requests").CombinedOutput(); err != nil {
		t.Fatalf("%s has no requests module (ESCROW_E2E_PYTHON names one that has): %v %s", py, err, out)
	}

	// The pod, as the webhook configured by the chart injects it.
	objs := render(t)
	w := startWebhook(t, objs)
	agent := podJSON("agent", "agents", map[string]string{"escrow.dev/inject": "true"})
	resp := w.review(t, "agents", agent)
	if !resp.Allowed || len(resp.Patch) == 0 {
		t.Fatalf("the webhook did not inject the agent pod: %+v", resp)
	}
	patch, err := jsonpatch.DecodePatch(resp.Patch)
	if err != nil {
		t.Fatal(err)
	}
	injected, err := patch.Apply(agent)
	if err != nil {
		t.Fatal(err)
	}
	var pod simPod
	if err := json.Unmarshal(injected, &pod); err != nil {
		t.Fatal(err)
	}
	var sidecar, app *simContainer
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == "escrow" {
			sidecar = &pod.Spec.InitContainers[i]
		}
	}
	app = &pod.Spec.Containers[0]
	if sidecar == nil || sidecar.StartupProbe == nil {
		t.Fatalf("no escrow init container with a startup probe in %s", injected)
	}

	// The node: a directory per volume. ConfigMaps hold the chart's data, with the user's
	// additions: a route to a local HTTPS API, its CA, and the API key escrow holds.
	root := t.TempDir()
	volumes := map[string]string{}
	configMapOf := map[string]string{} // volume → ConfigMap name
	for _, v := range pod.Spec.Volumes {
		if v.ConfigMap != nil {
			configMapOf[v.Name] = v.ConfigMap.Name
		}
		volumes[v.Name] = filepath.Join(root, "volumes", v.Name)
		if err := os.MkdirAll(volumes[v.Name], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmData := map[string]map[string]string{}
	for _, cm := range find(objs, "ConfigMap") {
		var c struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
			Data map[string]string `json:"data"`
		}
		cm.into(t, &c)
		cmData[c.Metadata.Name] = c.Data
	}
	const secret = "sk-podsim-9c1e2b7d4f"
	upCA, upCert, upKey := apiCert(t, root, "api.example.com")
	cfgMount := sidecar.mountOf(t, "escrow-config")
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(cmData[configMapOf["escrow-config"]]["config.yaml"]), &cfg); err != nil || cfg == nil {
		t.Fatalf("the chart's escrow-config ConfigMap has no config.yaml: %v", err)
	}
	cfg["identity"] = map[string]any{"static": "spiffe://cluster.local/ns/agents/sa/default"} // no SPIRE here
	cfg["upstreams"] = []any{map[string]any{
		"host": "api.example.com", "address": "127.0.0.1:18443", "credential": "api",
		"ca_file": cfgMount + "/upstream-ca.pem",
	}}
	cfg["credentials"] = map[string]any{"api": map[string]any{"static": map[string]any{"file": cfgMount + "/api-key"}}}
	cfg["egress"] = map[string]any{"allow_cidrs": []any{"127.0.0.0/8"}}
	podCfg, _ := yaml.Marshal(cfg)
	writeFile(t, filepath.Join(volumes["escrow-config"], "config.yaml"), podCfg)
	writeFile(t, filepath.Join(volumes["escrow-config"], "upstream-ca.pem"), upCA)
	writeFile(t, filepath.Join(volumes["escrow-config"], "api-key"), []byte(secret+"\n"))
	if len(cmData[configMapOf["escrow-policies"]]) == 0 {
		t.Fatalf("the chart renders no ConfigMap %q for the policies volume", configMapOf["escrow-policies"])
	}
	for name, text := range cmData[configMapOf["escrow-policies"]] {
		writeFile(t, filepath.Join(volumes["escrow-policies"], name), []byte(text))
	}
	writeFile(t, filepath.Join(volumes["escrow-policies"], "agent.cedar"),
		[]byte(`@id("agent-reads-api") permit (principal, action == Action::"GET", resource == Host::"api.example.com");`))

	// escrow, as its container runs it: its args, its config file found through its mounts, and
	// every path in that config (written for the pod) seen through the same mounts.
	if len(sidecar.Args) != 3 || sidecar.Args[0] != "proxy" || sidecar.Args[1] != "--config" {
		t.Fatalf("escrow container args %q", sidecar.Args)
	}
	var hostCfg map[string]any
	if err := yaml.Unmarshal(readFile(t, sidecar.hostPath(t, volumes, sidecar.Args[2])), &hostCfg); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"ca_dir", "ca_key_dir"} {
		hostCfg[k] = sidecar.hostPath(t, volumes, hostCfg[k].(string))
	}
	pol := hostCfg["policy"].(map[string]any)
	pol["dir"] = sidecar.hostPath(t, volumes, pol["dir"].(string))
	hostCfg["upstreams"].([]any)[0].(map[string]any)["ca_file"] = sidecar.hostPath(t, volumes, cfgMount+"/upstream-ca.pem")
	hostCfg["credentials"].(map[string]any)["api"].(map[string]any)["static"].(map[string]any)["file"] = sidecar.hostPath(t, volumes, cfgMount+"/api-key")
	hb, _ := yaml.Marshal(hostCfg)
	hostCfgFile := filepath.Join(root, "escrow-on-the-node.yaml")
	writeFile(t, hostCfgFile, hb)

	// The agent: the injected environment of its container, paths seen through its mounts.
	var agentEnv []string
	for _, e := range app.Env {
		v := e.Value
		if strings.HasPrefix(v, "/") {
			v = app.hostPath(t, volumes, v)
		}
		agentEnv = append(agentEnv, e.Name+"="+v)
	}
	sort.Strings(agentEnv)
	for _, want := range []string{"HTTPS_PROXY=", "https_proxy=", "SSL_CERT_FILE=", "REQUESTS_CA_BUNDLE=", "CURL_CA_BUNDLE="} {
		found := false
		for _, e := range agentEnv {
			found = found || strings.HasPrefix(e, want)
		}
		if !found {
			t.Fatalf("the agent container has no %s...: %q", want, agentEnv)
		}
	}
	agentEnv = append(agentEnv, "PATH="+os.Getenv("PATH"))

	upstreamPy := filepath.Join(root, "api.py")
	writeFile(t, upstreamPy, []byte(apiServerPy))
	envArgs := func() string {
		var b strings.Builder
		for _, e := range agentEnv {
			b.WriteString(" '" + strings.ReplaceAll(e, "'", `'\''`) + "'")
		}
		return b.String()
	}()
	probe := sidecar.StartupProbe.HTTPGet
	script := fmt.Sprintf(`set -eu
pids=""
trap 'st=$?; kill $pids 2>/dev/null || true; wait 2>/dev/null || true; exit $st' EXIT
ip link set lo up
%[1]s %[2]s %[3]s %[4]s %[5]s >%[8]s/api.log 2>&1 &
pids="$pids $!"
%[6]s proxy --config %[7]s >%[8]s/escrow.log 2>&1 &
pids="$pids $!"
ready() { for i in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not ready: $*"; cat %[8]s/escrow.log; exit 1; }
ready curl -sf http://127.0.0.1:%[9]d%[10]s
ready curl -sf --cacert %[11]s --resolve api.example.com:18443:127.0.0.1 https://api.example.com:18443/health
echo "curl: $(env -i %[12]s curl -sS https://api.example.com/v1/models)"
echo "requests: $(env -i %[12]s %[1]s -c 'import requests; print(requests.get("https://api.example.com/v1/models").text)')"
`, py, upstreamPy, secret, upCert, upKey, bin, hostCfgFile, root, probe.Port, probe.Path,
		filepath.Join(volumes["escrow-config"], "upstream-ca.pem"), envArgs)
	args := []string{"--net", "--fork", "--kill-child"}
	if os.Getuid() != 0 {
		args = append(args, "--map-root-user")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", append(args, "sh", "-c", script)...)
	cmd.WaitDelay = 5 * time.Second // a straggler holding the output open does not hang the test
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the simulated pod failed: %v\n%s", err, out)
	}
	for _, client := range []string{"curl", "requests"} {
		if !strings.Contains(string(out), client+": authorized") {
			t.Errorf("%s with the agent's injected environment did not get through escrow with the credential:\n%s", client, out)
		}
	}
	if strings.Contains(strings.Join(agentEnv, "\n"), secret) {
		t.Error("the agent's environment holds the secret")
	}
	// escrow wrote the trust files into the volume the agent reads, and the CA key only into
	// the one it alone mounts.
	for _, f := range []string{"ca.crt", "trust-bundle.pem"} {
		if _, err := os.Stat(filepath.Join(volumes["escrow-ca"], f)); err != nil {
			t.Errorf("%s is not in the shared CA volume: %v", f, err)
		}
	}
	if fi, err := os.Stat(filepath.Join(volumes["escrow-ca-key"], "ca.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("the CA key is not kept (0600) in escrow's own volume: %v", err)
	}
	for _, m := range app.VolumeMounts {
		if m.Name == "escrow-ca-key" || m.Name == "escrow-config" {
			t.Errorf("the agent container mounts %s", m.Name)
		}
	}
}

// apiServerPy is the local HTTPS API: 200 "authorized" only with escrow's key, 401 otherwise.
const apiServerPy = `import http.server, ssl, sys
secret, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" or self.headers.get("Authorization") == "Bearer " + secret
        body = b"authorized" if ok else b"missing credential"
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 18443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
`

// apiCert makes a CA and a certificate for host, and returns the CA's PEM and the files of the
// certificate and its key.
func apiCert(t *testing.T, dir, host string) (caPEM []byte, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "podsim API CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "api.crt"), filepath.Join(dir, "api.key")
	writeFile(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeFile(t, keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), certFile, keyFile
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
