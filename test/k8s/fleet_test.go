package k8s_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/escrowproxy/escrow/test/realparts/harness"
)

// The fleet walkthrough (docs/walkthrough.md), run as written against real parts: a
// kube-apiserver with etcd, the chart installed by helm, the escrow webhook registered from the
// chart, a SPIRE server and agent issuing the X509-SVIDs of both `escrow controller` and the
// injected `escrow proxy`, and real curl in the agent pod's network namespace. The test plays
// the kubelet where the page needs one (see the page's last section); everything else is the
// page's own commands and manifests, in its order.

const (
	// fleetRequireEnv=1 fails the fleet test instead of skipping it when a part is missing.
	fleetRequireEnv = "ESCROW_FLEET_REQUIRE"
	// revocationBound is how long a Revocation may take, from `kubectl apply` to the agent's
	// first refused call, on a loaded 2-core CI machine. The page promises "within seconds".
	revocationBound  = 10 * time.Second
	fleetTrustDomain = "example.org"
	// spireNodeAlias is the parent ID the page's entries name (SPIRE's Kubernetes quickstart).
	spireNodeAlias = "spiffe://example.org/ns/spire/sa/spire-agent"
)

// walkthroughSteps are the page's steps, in order; the test has a part for each.
var walkthroughSteps = []string{"install", "spire-entries", "controller-ready", "secret", "resources",
	"policy-accepted", "agent", "agent-ready", "call", "audit", "revoke", "denied", "unrevoke", "call-again"}

func fleetGate(t *testing.T) {
	t.Helper()
	var missing []string
	for _, env := range []string{toolsEnv, harness.BinEnv} {
		if os.Getenv(env) == "" {
			missing = append(missing, env)
		}
	}
	msg := ""
	switch {
	case len(missing) > 0:
		msg = fmt.Sprintf("%s not set: run `make test-fleet`", strings.Join(missing, " and "))
	case os.Getuid() != 0:
		msg = "playing the node (a mount namespace for the pod's volumes, nsenter for kubectl exec) needs root"
	}
	for _, tool := range []string{"unshare", "nsenter", "mount", "ip", "curl", "python3"} {
		if msg == "" {
			if _, err := exec.LookPath(tool); err != nil {
				msg = fmt.Sprintf("%s is needed to play the node: %v", tool, err)
			}
		}
	}
	if msg == "" {
		return
	}
	if os.Getenv(fleetRequireEnv) == "1" {
		t.Fatalf("%s=1 but %s", fleetRequireEnv, msg)
	}
	t.Skip(msg)
}

func TestFleet_WalkthroughRevokesAnAgentWithinSeconds(t *testing.T) {
	fleetGate(t)
	steps := docSteps(t, "walkthrough.md")
	checkStepNames(t, "walkthrough.md", steps, walkthroughSteps)
	step := map[string]docStep{}
	for _, s := range steps {
		step[s.Name] = s
	}

	const secret = "sk-fleet-walkthrough-7f3a91c2e5d8"
	c := startCluster(t)
	spire := harness.StartSPIRE(t, harness.SPIREOptions{TrustDomain: fleetTrustDomain, AgentID: spireNodeAlias})

	// Two copies of escrow: the unix workload attestor tells the controller from the sidecar by
	// the executable's path (the k8s attestor would by namespace, service account and container).
	root := harness.ShortTempDir(t)
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	controllerBin, sidecarBin := filepath.Join(root, "controller", "escrow"), filepath.Join(root, "sidecar", "escrow")
	for _, p := range []string{controllerBin, sidecarBin} {
		copyFile(t, escrow(t), p, 0o755)
	}

	work := t.TempDir()
	if err := os.Symlink(filepath.Join(repoRoot, "charts"), filepath.Join(work, "charts")); err != nil {
		t.Fatal(err)
	}
	f := &fleet{t: t, c: c, work: work, root: root, env: append(os.Environ(),
		"KUBECONFIG="+c.kubeconfig,
		"PATH="+filepath.Join(root, "bin")+":"+os.Getenv(toolsEnv)+":"+os.Getenv(harness.BinEnv)+":"+os.Getenv("PATH"),
		"HELM_CACHE_HOME="+filepath.Join(work, ".helm", "cache"), "HELM_CONFIG_HOME="+filepath.Join(work, ".helm", "config"),
		"HELM_DATA_HOME="+filepath.Join(work, ".helm", "data"),
		"API_TOKEN="+secret)}
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}

	// 1. install. The test API listens on the pod's loopback, which escrow refuses by default.
	f.run(step["install"].substituted(t, "helm install escrow ./charts/escrow",
		"helm install escrow ./charts/escrow --set 'config.egress.allow_cidrs={127.0.0.0/8}'"))
	manifest, err := f.try(docStep{Name: "helm get manifest", Lang: "sh", Body: "helm get manifest escrow -n escrow-system"})
	if err != nil {
		t.Fatal(err)
	}
	objs := parseManifests(t, manifest)
	// The webhook's Deployment, played: the real `escrow webhook` with the chart's injector
	// config, registered through the chart's MutatingWebhookConfiguration.
	w := startWebhook(t, objs)
	mwc := one(t, objs, "MutatingWebhookConfiguration").Raw
	for _, wh := range mwc["webhooks"].([]any) {
		wh.(map[string]any)["clientConfig"] = map[string]any{"url": w.url(), "caBundle": base64.StdEncoding.EncodeToString(w.caPEM)}
	}
	b, _ := json.Marshal(mwc)
	c.kubectl(t, b, "replace", "-f", "-")

	// 2. SPIRE entries, with unix:path selectors for the k8s ones.
	f.run(step["spire-entries"].
		substituted(t, "kubectl exec -n spire spire-server-0 -- /opt/spire/bin/spire-server entry create",
			"spire-server entry create -socketPath "+spire.ServerSocket).
		substituted(t, "-selector k8s:ns:escrow-system -selector k8s:sa:escrow-controller -selector k8s:container-name:controller",
			"-selector "+harness.PathSelector(controllerBin)).
		substituted(t, "-selector k8s:ns:agents -selector k8s:sa:agent -selector k8s:container-name:escrow",
			"-selector "+harness.PathSelector(sidecarBin)))

	// 3. controller-ready, played: the controller's Deployment as the kubelet runs it.
	ctl := f.playController(controllerBin, spire)

	// 4-6. The Secret, the Credential, Upstream and Policy; the controller accepts the Policy.
	f.run(step["secret"])
	f.run(step["resources"])
	f.runUntil(step["policy-accepted"], time.Minute, func(out string) bool {
		return strings.Contains(out, "True") && strings.Contains(out, "Valid")
	})

	// 7. The agent pod, through the real webhook; agent-ready played by the simulated node.
	f.run(step["agent"])
	pod := f.playPod(sidecarBin, spire, secret, upstreamHost(t, step["resources"]))

	// 8. The agent calls the API: escrow added the Secret's value.
	call := func(s docStep) docStep {
		return s.substituted(t, "kubectl exec -n agents agent -c agent --", pod.exec)
	}
	if out := f.run(call(step["call"])); !strings.Contains(out, `"object": "list"`) {
		t.Fatalf("the agent's call did not get the API's answer:\n%s", out)
	}
	// The API accepts nothing but the key: the same call without escrow is refused.
	if out, _ := f.try(docStep{Name: "without escrow", Lang: "sh", Body: pod.exec + " curl -sS --noproxy '*' --cacert " + pod.apiCA + " https://api.example.com/v1/models"}); !strings.Contains(out, "invalid api key") {
		t.Fatalf("the test API answered a call without the key: %s", out)
	}
	f.runUntil(step["audit"].substituted(t, "kubectl logs -n agents agent -c escrow", "cat "+pod.escrowLog), 10*time.Second,
		func(out string) bool {
			return strings.Contains(out, `"decision":"allow"`) &&
				strings.Contains(out, `"spiffe_id":"spiffe://example.org/ns/agents/sa/agent","attested":true,"source":"spiffe"`) &&
				strings.Contains(out, `"policy_ids":["agents-read-example-api"]`) && strings.Contains(out, `"credential":"example-api"`)
		})

	// 9. Revoke: the next calls are refused, within the bound.
	start := time.Now()
	f.run(step["revoke"])
	applied := time.Since(start)
	out := f.runUntil(call(step["denied"]), time.Minute, func(out string) bool { return strings.Contains(out, `"error":"revoked"`) })
	took := time.Since(start)
	t.Logf("Revocation: kubectl apply returned after %s; the agent's first refused call %s after the apply started", applied.Round(time.Millisecond), took.Round(time.Millisecond))
	if took > revocationBound {
		t.Errorf("the agent was denied %s after the Revocation was applied, want within %s", took.Round(time.Millisecond), revocationBound)
	}
	if !strings.Contains(out, "access has been revoked") {
		t.Errorf("denial body: %s", out)
	}
	status, _ := f.try(docStep{Name: "denied status", Lang: "sh", Body: pod.exec + ` curl -sS -o /dev/null -D - https://api.example.com/v1/models`})
	if !strings.Contains(status, " 403") || !strings.Contains(strings.ToLower(status), "x-escrow-reason: revoked") {
		t.Errorf("the refused call's status and headers: %s", status)
	}

	// 10. Lift it: allowed again.
	start = time.Now()
	f.run(step["unrevoke"])
	f.runUntil(call(step["call-again"]), time.Minute, func(out string) bool { return strings.Contains(out, `"object": "list"`) })
	t.Logf("Revocation deleted: the agent's call went through again %s after the delete started", time.Since(start).Round(time.Millisecond))

	// The Secret's value is nowhere the agent can read, nor in escrow's or the controller's output.
	for _, e := range pod.agentEnv {
		if strings.Contains(e, secret) {
			t.Errorf("the agent container's environment holds the secret: %s", strings.SplitN(e, "=", 2)[0])
		}
	}
	for _, dir := range pod.agentVolumes {
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), secret) {
				t.Errorf("a volume the agent container mounts holds the secret: %s", p)
			}
			return nil
		})
	}
	for name, log := range map[string]string{"escrow": string(readFile(t, pod.escrowLog)), "escrow controller": ctl.Output(),
		"escrow webhook": w.proc.output()} {
		if strings.Contains(log, secret) {
			t.Errorf("%s's output holds the secret", name)
		}
	}
	if p := c.kubectl(t, nil, "get", "pod", "agent", "-n", "agents", "-o", "json"); strings.Contains(p, secret) {
		t.Error("the agent pod's object holds the secret")
	}
}

// fleet runs the page's steps against the test cluster.
type fleet struct {
	t          *testing.T
	c          *cluster
	work, root string
	env        []string
}

// try runs a step: sh with `sh -e`, yaml with `kubectl apply -f -`.
func (f *fleet) try(s docStep) (string, error) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var cmd *exec.Cmd
	switch s.Lang {
	case "sh":
		cmd = exec.CommandContext(ctx, "sh", "-ec", s.Body)
	case "yaml":
		cmd = exec.CommandContext(ctx, "kubectl", "apply", "-f", "-")
		cmd.Stdin = strings.NewReader(s.Body)
	default:
		f.t.Fatalf("step %s: language %q", s.Name, s.Lang)
	}
	cmd.Dir, cmd.Env = f.work, f.env
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("step %s: %v\n%s\n%s", s.Name, err, s.Body, out)
	}
	return string(out), nil
}

func (f *fleet) run(s docStep) string {
	f.t.Helper()
	out, err := f.try(s)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Logf("step %s:\n%s", s.Name, out)
	return out
}

// runUntil runs a step until done accepts its output.
func (f *fleet) runUntil(s docStep, timeout time.Duration, done func(string) bool) string {
	f.t.Helper()
	var out string
	eventually(f.t, timeout, "step "+s.Name, func() error {
		var err error
		out, err = f.try(s)
		if err == nil && done(out) {
			return nil
		}
		return fmt.Errorf("output %q (%v)", tail(out, 2048), err)
	})
	f.t.Logf("step %s:\n%s", s.Name, out)
	return out
}

// playController runs the chart's controller Deployment as a kubelet would: `escrow controller`
// with the container's args (its ports moved to loopback ports the kernel picks) and env, as the
// Deployment's ServiceAccount, its Workload API socket the SPIRE agent's. It returns once the
// controller is ready, and serves it on a Unix socket (root/svc/controller.sock) for the pod's
// network namespace, as the Service does.
func (f *fleet) playController(bin string, spire *harness.SPIRE) *harness.Process {
	t := f.t
	t.Helper()
	var d appsv1.Deployment
	if err := json.Unmarshal([]byte(f.c.kubectl(t, nil, "get", "deployment", controllerName, "-n", releaseNS, "-o", "json")), &d); err != nil {
		t.Fatal(err)
	}
	ps := d.Spec.Template.Spec
	ctr := ps.Containers[0]
	grpcPort, adminPort := freePort(t), freePort(t)
	var args []string
	for _, a := range ctr.Args {
		switch {
		case strings.HasPrefix(a, "--listen="):
			a = fmt.Sprintf("--listen=127.0.0.1:%d", grpcPort)
		case strings.HasPrefix(a, "--admin="):
			a = fmt.Sprintf("--admin=127.0.0.1:%d", adminPort)
		}
		args = append(args, a)
	}
	args = append(args, "--kubeconfig", f.kubeconfigAs(t, "system:serviceaccount:"+releaseNS+":"+ps.ServiceAccountName))
	vols := map[string]string{}
	for _, v := range ps.Volumes {
		vols[v.Name] = filepath.Join(f.root, "controller-volumes", v.Name)
		if err := os.MkdirAll(vols[v.Name], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var env []string
	for _, e := range ctr.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace":
			env = append(env, e.Name+"="+releaseNS)
		case e.Name == "SPIFFE_ENDPOINT_SOCKET":
			env = append(env, e.Name+"=unix://"+workloadSocket(t, containerPaths{ctr.VolumeMounts, vols}, e.Value, spire))
		case e.ValueFrom == nil:
			env = append(env, e.Name+"="+e.Value)
		default:
			t.Fatalf("the controller's env %s comes from %+v, which this test cannot play", e.Name, e.ValueFrom)
		}
	}
	p := harness.StartProcess(t, harness.ProcessOptions{Name: "escrow controller", Path: bin, Args: args, Env: env})
	eventually(t, 2*time.Minute, "escrow controller /readyz (its SVID from SPIRE, the objects synced)", func() error {
		if p.Exited() {
			t.Fatalf("escrow controller exited: %v\n%s", p.Err(), p.Output())
		}
		return httpOK(fmt.Sprintf("http://127.0.0.1:%d/readyz", adminPort))
	})
	forwardUnix(t, filepath.Join(f.root, "svc", "controller.sock"), fmt.Sprintf("127.0.0.1:%d", grpcPort))
	return p
}

func (f *fleet) kubeconfigAs(t *testing.T, user string) string {
	kc := string(readFile(t, f.c.kubeconfig))
	as := strings.Replace(kc, "  user: {token:", "  user: {as: \""+user+"\", token:", 1)
	if as == kc {
		t.Fatal("could not add impersonation to the test kubeconfig")
	}
	p := filepath.Join(f.work, "kubeconfig-"+strings.ReplaceAll(user, ":", "-"))
	writeFile(t, p, []byte(as))
	return p
}

// simulatedPod is the agent pod as the test's node runs it.
type simulatedPod struct {
	pid          int      // a process in the pod's network and mount namespaces
	exec         string   // stands in for `kubectl exec -n agents agent -c agent --`
	escrowLog    string   // escrow's stdout and stderr
	agentEnv     []string // the agent container's environment
	agentVolumes []string // the directories of the volumes the agent container mounts
	apiCA        string   // the test API's CA
}

// playPod plays the kubelet for pod agents/agent as the API server stored it (injected by the
// real webhook): a network, mount and PID namespace of its own; each volume a directory holding
// what the API server holds (ConfigMaps, Secrets); volumes mounted under /var/run at their paths
// in the pod's mount namespace (the Credential's secret file is read at its real path), the
// others read through the containers' mounts; escrow from its container's args and env. In the
// pod, the upstream's host and the controller Service's name resolve to loopback, where the test
// API listens and a forwarder to the controller stands in for the Service.
func (f *fleet) playPod(bin string, spire *harness.SPIRE, secret, apiHost string) *simulatedPod {
	t := f.t
	t.Helper()
	var pod corev1.Pod
	if err := json.Unmarshal([]byte(f.c.kubectl(t, nil, "get", "pod", "agent", "-n", "agents", "-o", "json")), &pod); err != nil {
		t.Fatal(err)
	}
	if pod.Annotations["escrow.dev/injected"] == "" {
		t.Fatalf("the agent pod was not injected: %v", pod.Annotations)
	}
	var sidecar, agent *corev1.Container
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == "escrow" {
			sidecar = &pod.Spec.InitContainers[i]
		}
	}
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == "agent" {
			agent = &pod.Spec.Containers[i]
		}
	}
	if sidecar == nil || agent == nil || sidecar.StartupProbe == nil || sidecar.StartupProbe.HTTPGet == nil {
		t.Fatalf("the injected pod has no escrow init container with a startup probe, or no agent container")
	}

	// The volumes, as the kubelet fills them.
	dir := filepath.Join(f.root, "pod")
	vols := map[string]string{}
	for _, v := range pod.Spec.Volumes {
		d := filepath.Join(dir, "v", v.Name)
		vols[v.Name] = d
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		switch {
		case v.ConfigMap != nil:
			var cm corev1.ConfigMap
			if err := json.Unmarshal([]byte(f.c.kubectl(t, nil, "get", "configmap", v.ConfigMap.Name, "-n", "agents", "-o", "json")), &cm); err != nil {
				t.Fatal(err)
			}
			for k, val := range cm.Data {
				writeFile(t, filepath.Join(d, k), []byte(val))
			}
		case v.Secret != nil:
			var s corev1.Secret
			if err := json.Unmarshal([]byte(f.c.kubectl(t, nil, "get", "secret", v.Secret.SecretName, "-n", "agents", "-o", "json")), &s); err != nil {
				t.Fatal(err)
			}
			for k, val := range s.Data {
				if err := os.WriteFile(filepath.Join(d, k), val, 0o400); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	// Mounts under /var/run are made at their paths in the pod's mount namespace, on a tmpfs
	// over /run; one path, one volume.
	binds := map[string]string{}
	for _, ctr := range []*corev1.Container{sidecar, agent} {
		for _, m := range ctr.VolumeMounts {
			if !underRun(m.MountPath) {
				continue
			}
			if prev, ok := binds[m.MountPath]; ok && prev != vols[m.Name] {
				t.Fatalf("%s is mounted from two volumes", m.MountPath)
			}
			binds[m.MountPath] = vols[m.Name]
		}
	}
	escrowPaths := containerPaths{sidecar.VolumeMounts, vols}
	agentPaths := containerPaths{agent.VolumeMounts, vols}
	secretsMounted := false
	for _, m := range sidecar.VolumeMounts {
		secretsMounted = secretsMounted || strings.HasPrefix(m.MountPath, "/var/run/escrow-secrets/")
	}
	if !secretsMounted {
		t.Fatalf("the webhook mounted no Secret under /var/run/escrow-secrets/ into escrow (annotation escrow.dev/secrets): %+v", sidecar.VolumeMounts)
	}
	for _, m := range agent.VolumeMounts {
		if strings.HasPrefix(m.MountPath, "/var/run/escrow-secrets") || m.Name == "escrow-config" {
			t.Fatalf("the agent container mounts %s at %s", m.Name, m.MountPath)
		}
	}

	// escrow's config: the chart's, from the ConfigMap, with the paths outside /var/run read
	// through escrow's mounts.
	if len(sidecar.Args) != 3 || sidecar.Args[0] != "proxy" || sidecar.Args[1] != "--config" {
		t.Fatalf("escrow container args %q", sidecar.Args)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(readFile(t, escrowPaths.host(t, sidecar.Args[2])), &cfg); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"ca_dir", "ca_key_dir"} {
		cfg[k] = escrowPaths.host(t, cfg[k].(string))
	}
	pol := cfg["policy"].(map[string]any)
	pol["dir"] = escrowPaths.host(t, pol["dir"].(string))
	xds, _ := cfg["xds"].(map[string]any)
	xdsHost, xdsPort, err := net.SplitHostPort(fmt.Sprint(xds["address"]))
	if err != nil {
		t.Fatalf("the chart's sidecar config has no xds address: %v (%v)", cfg["xds"], err)
	}
	cb, _ := yaml.Marshal(cfg)
	cfgFile := filepath.Join(dir, "escrow-config-on-the-node.yaml")
	writeFile(t, cfgFile, cb)

	// escrow's environment: its container's, the socket path through its mounts, and the test
	// API's CA in its system roots.
	upCA, upCert, upKey := apiCert(t, dir, apiHost)
	caFile := filepath.Join(dir, "api-ca.pem")
	writeFile(t, caFile, upCA)
	escrowEnv := []string{"SSL_CERT_FILE=" + caFile}
	for _, e := range sidecar.Env {
		if e.ValueFrom != nil {
			t.Fatalf("escrow's env %s comes from %+v, which this test cannot play", e.Name, e.ValueFrom)
		}
		v := e.Value
		if e.Name == "SPIFFE_ENDPOINT_SOCKET" {
			v = "unix://" + workloadSocket(t, escrowPaths, v, spire)
		}
		escrowEnv = append(escrowEnv, e.Name+"="+v)
	}
	// The agent's: its container's, nothing else but a PATH to find curl.
	var agentEnv []string
	for _, e := range agent.Env {
		if e.ValueFrom != nil {
			t.Fatalf("the agent's env %s comes from %+v, which this test cannot play", e.Name, e.ValueFrom)
		}
		v := e.Value
		if strings.HasPrefix(v, "/") {
			v = agentPaths.host(t, v)
		}
		agentEnv = append(agentEnv, e.Name+"="+v)
	}
	sort.Strings(agentEnv)
	var agentVolumes []string
	for _, m := range agent.VolumeMounts {
		agentVolumes = append(agentVolumes, vols[m.Name])
	}

	hosts := filepath.Join(dir, "hosts")
	writeFile(t, hosts, []byte(fmt.Sprintf("127.0.0.1 localhost\n127.0.0.1 %s\n127.0.0.1 %s\n", apiHost, xdsHost)))
	writeFile(t, filepath.Join(dir, "api.py"), []byte(fleetAPIPy))
	writeFile(t, filepath.Join(dir, "forward.py"), []byte(forwardPy))
	escrowLog := filepath.Join(dir, "escrow.log")
	var script strings.Builder
	script.WriteString("set -eu\nmount -t tmpfs -o mode=0755 escrow-podsim /run\n")
	paths := make([]string, 0, len(binds))
	for p := range binds {
		paths = append(paths, p)
	}
	sort.Strings(paths) // parents before children
	for _, p := range paths {
		fmt.Fprintf(&script, "mkdir -p %[1]s\nmount --bind %[2]s %[1]s\n", shq(p), shq(binds[p]))
	}
	fmt.Fprintf(&script, `mount --bind %[1]s /etc/hosts
ip link set lo up
python3 %[2]s/api.py %[3]s %[4]s %[5]s >%[2]s/api.log 2>&1 &
python3 %[2]s/forward.py %[6]s %[7]s >%[2]s/forward.log 2>&1 &
env -i %[8]s %[9]s proxy --config %[10]s >%[11]s 2>&1 &
wait
`, shq(hosts), shq(dir), shq(secret), shq(upCert), shq(upKey), xdsPort, shq(filepath.Join(f.root, "svc", "controller.sock")),
		shqAll(escrowEnv), shq(bin), shq(cfgFile), shq(escrowLog))
	cmd := exec.Command("unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", script.String())
	var outMu sync.Mutex
	var outBuf bytes.Buffer
	out := lockedWriter{mu: &outMu, b: &outBuf}
	cmd.Stdout, cmd.Stderr = out, out
	output := func() string { outMu.Lock(); defer outMu.Unlock(); return outBuf.String() }
	cmd.SysProcAttr = dieWithParent()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			for _, f := range []string{"escrow.log", "api.log", "forward.log"} {
				b, _ := os.ReadFile(filepath.Join(dir, f))
				t.Logf("--- pod %s (last 6 KiB):\n%s", f, tail(string(b), 6<<10))
			}
			t.Logf("--- pod script output:\n%s", output())
		}
	})

	pod2 := &simulatedPod{pid: cmd.Process.Pid, escrowLog: escrowLog, agentEnv: agentEnv, agentVolumes: agentVolumes, apiCA: caFile}
	env := append(append([]string{}, agentEnv...), "PATH="+os.Getenv("PATH"))
	pod2.exec = filepath.Join(f.root, "bin", "podexec")
	if err := os.WriteFile(pod2.exec, []byte(fmt.Sprintf("#!/bin/sh\nexec nsenter -t %d -n -m -- env -i %s \"$@\"\n", pod2.pid, shqAll(env))), 0o755); err != nil {
		t.Fatal(err)
	}

	// The startup probe: the kubelet starts the agent once escrow is ready (the controller's
	// first bundle applied).
	probe := sidecar.StartupProbe.HTTPGet
	url := fmt.Sprintf("http://127.0.0.1:%d%s", probe.Port.IntValue(), probe.Path)
	eventually(t, 2*time.Minute, "escrow's startup probe "+url+" in the pod", func() error {
		select {
		case <-done:
			t.Fatalf("the simulated pod exited: %s", output())
		default:
		}
		b, err := exec.Command("nsenter", "-t", strconv.Itoa(pod2.pid), "-n", "curl", "-sf", url).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, b)
		}
		return nil
	})
	return pod2
}

// containerPaths maps a path in a container to the node: unchanged under /var/run (mounted at
// its path in the pod's mount namespace), else through the longest mount that contains it.
type containerPaths struct {
	mounts  []corev1.VolumeMount
	volumes map[string]string
}

func (c containerPaths) host(t *testing.T, p string) string {
	t.Helper()
	best, dir := "", ""
	for _, m := range c.mounts {
		mp := strings.TrimSuffix(m.MountPath, "/")
		if (p == mp || strings.HasPrefix(p, mp+"/")) && len(mp) > len(best) {
			best, dir = mp, c.volumes[m.Name]
		}
	}
	if best == "" {
		t.Fatalf("%s is on no volume the container mounts", p)
	}
	if underRun(best) {
		return p
	}
	return filepath.Join(dir, strings.TrimPrefix(p, best))
}

func underRun(p string) bool {
	return strings.HasPrefix(p, "/var/run/") || strings.HasPrefix(p, "/run/")
}

// workloadSocket puts the SPIRE agent's Workload API socket where a container's
// SPIFFE_ENDPOINT_SOCKET (unix:///dir/name) finds it through its mounts, and returns that path.
func workloadSocket(t *testing.T, c containerPaths, uri string, spire *harness.SPIRE) string {
	t.Helper()
	p, ok := strings.CutPrefix(uri, "unix://")
	if !ok {
		t.Fatalf("SPIFFE_ENDPOINT_SOCKET=%s is not a unix:// address", uri)
	}
	h := c.host(t, p)
	if err := os.MkdirAll(filepath.Dir(h), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(spire.AgentSocket, h); err != nil && !errors.Is(err, fs.ErrExist) {
		t.Fatal(err)
	}
	return h
}

// upstreamHost is the host of the step's Upstream.
func upstreamHost(t *testing.T, s docStep) string {
	t.Helper()
	for _, doc := range strings.Split(s.Body, "\n---\n") {
		var o struct {
			Kind string `json:"kind"`
			Spec struct {
				Host string `json:"host"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatal(err)
		}
		if o.Kind == "Upstream" {
			return o.Spec.Host
		}
	}
	t.Fatalf("step %s has no Upstream", s.Name)
	return ""
}

// forwardUnix serves a Unix socket that forwards each connection to addr (TCP).
func forwardUnix(t *testing.T, sock, addr string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", addr)
				if err != nil {
					return
				}
				defer out.Close()
				go func() { _, _ = io.Copy(out, in); out.(*net.TCPConn).CloseWrite() }()
				_, _ = io.Copy(in, out)
			}()
		}
	}()
}

func httpOK(url string) error {
	b, err := exec.Command("curl", "-sf", "--max-time", "5", url).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v %s", url, err, b)
	}
	return nil
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, readFile(t, from), mode); err != nil {
		t.Fatal(err)
	}
}

// shq quotes s for sh.
func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func shqAll(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = shq(s)
	}
	return strings.Join(q, " ")
}

// fleetAPIPy is the test API on the pod's loopback: the model list only with the Secret's value
// as a bearer token, 401 otherwise.
const fleetAPIPy = `import http.server, ssl, sys
secret, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == "Bearer " + secret
        body = b'{"object": "list", "data": []}\n' if ok else b'{"error": "invalid api key"}\n'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
`

// forwardPy stands in for the controller's Service in the pod's network namespace: TCP on
// loopback to the Unix socket the test serves the controller on.
const forwardPy = `import socket, sys, threading
port, path = int(sys.argv[1]), sys.argv[2]
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(64)
while True:
    c, _ = srv.accept()
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        u.connect(path)
    except OSError:
        c.close()
        continue
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
`
