package k8s_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// TestInjectedPodWithProcessIdentityNamesTheCallingProcess plays the node for a pod injected
// with escrow.dev/process-identity: "true", as TestInjectedPodServesTheAgentWithRealClients
// does for a plain one, and also runs each container as its security context says, the way the
// container runtime (runc) does: its uid and gid, a capability bounding set of the added
// capabilities (uid 0 then holds exactly those; a non-root uid holds none after exec), and no
// new privileges. The pod's containers share one PID namespace (shareProcessNamespace).
//
// escrow, with the chart's process config, names real curl running as the agent's uid, and a
// policy on context.caller.uid lets the agent through and denies another uid of the same pod.
// The agent, in turn, cannot read escrow's environment, memory, file descriptors, root
// directory or memory map, nor signal it: what docs/security.md promises.
func TestInjectedPodWithProcessIdentityNamesTheCallingProcess(t *testing.T) {
	bin := escrow(t)
	if os.Getuid() != 0 {
		t.Skip("running the pod's containers as their uids needs root")
	}
	py := os.Getenv("ESCROW_E2E_PYTHON")
	if py == "" {
		py = "python3"
	}
	for _, tool := range []string{"unshare", "ip", "setpriv", py} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed to play the node: %v", tool, err)
		}
	}
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal(err)
	}
	if curl, err = filepath.EvalSymlinks(curl); err != nil {
		t.Fatal(err)
	}

	objs := render(t)
	w := startWebhook(t, objs)
	sent, _ := json.Marshal(agentPod("agent", "agents", map[string]string{processAnnotation: "true"}))
	resp := w.review(t, "agents", sent)
	if !resp.Allowed || len(resp.Patch) == 0 {
		t.Fatalf("the webhook did not inject the pod: %+v", resp)
	}
	patch, err := jsonpatch.DecodePatch(resp.Patch)
	if err != nil {
		t.Fatal(err)
	}
	injected, err := patch.Apply(sent)
	if err != nil {
		t.Fatal(err)
	}
	var pod simPod
	var typed corev1.Pod
	if err := json.Unmarshal(injected, &pod); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(injected, &typed); err != nil {
		t.Fatal(err)
	}
	if typed.Spec.ShareProcessNamespace == nil || !*typed.Spec.ShareProcessNamespace {
		t.Fatal("the injected pod does not share its process namespace")
	}
	sidecar, app := &pod.Spec.InitContainers[0], &pod.Spec.Containers[0]
	if sidecar.Name != "escrow" || sidecar.StartupProbe == nil {
		t.Fatalf("escrow is not the first init container with a startup probe: %s", injected)
	}
	escrowRun := runtimeArgs(t, &typed, &typed.Spec.InitContainers[0])
	agentRun := runtimeArgs(t, &typed, &typed.Spec.Containers[0])
	agentUID := *typed.Spec.SecurityContext.RunAsUser
	otherUID := agentUID + 1

	// The node: a directory per volume, readable by the containers' uids (a kubelet's volumes
	// are); the ConfigMaps hold the chart's data with the user's additions.
	root, err := os.MkdirTemp("", "escrow-podsim-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	volumes := map[string]string{}
	configMapOf := map[string]string{}
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
			Data map[string]string `json:"data"`
		}
		cm.into(t, &c)
		cmData[cm.Metadata.Name] = c.Data
	}
	const secret = "sk-podsim-process-51d0e8a3"
	upCA, upCert, upKey := apiCert(t, root, "api.example.com")
	cfgMount := sidecar.mountOf(t, "escrow-config")
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(cmData[configMapOf["escrow-config"]]["config.yaml"]), &cfg); err != nil || cfg == nil {
		t.Fatalf("ConfigMap %q has no config.yaml: %v", configMapOf["escrow-config"], err)
	}
	identity, _ := cfg["identity"].(map[string]any)
	if identity["process"] != true {
		t.Fatalf("the config the webhook mounts (ConfigMap %q) does not turn identity.process on: %v", configMapOf["escrow-config"], cfg["identity"])
	}
	delete(identity, "spiffe") // no SPIRE here
	identity["static"] = "spiffe://cluster.local/ns/agents/sa/default"
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
	for name, text := range cmData[configMapOf["escrow-policies"]] {
		writeFile(t, filepath.Join(volumes["escrow-policies"], name), []byte(text))
	}
	writeFile(t, filepath.Join(volumes["escrow-policies"], "agent.cedar"), fmt.Appendf(nil,
		`@id("agent-process-reads-api") permit (principal, action == Action::"GET", resource == Host::"api.example.com")
when { context has caller && context.caller.uid == %d };`, agentUID))

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

	var agentEnv strings.Builder
	for _, e := range app.Env {
		v := e.Value
		if strings.HasPrefix(v, "/") {
			v = app.hostPath(t, volumes, v)
		}
		agentEnv.WriteString(" '" + strings.ReplaceAll(e.Name+"="+v, "'", `'\''`) + "'")
	}
	otherRun := strings.Replace(agentRun, "--reuid "+strconv.FormatInt(agentUID, 10), "--reuid "+strconv.FormatInt(otherUID, 10), 1)
	if otherRun == agentRun {
		t.Fatalf("cannot derive another uid's command from %q", agentRun)
	}
	writeFile(t, filepath.Join(root, "api.py"), []byte(apiServerPy))
	probe := sidecar.StartupProbe.HTTPGet
	// Each reads of escrow's /proc entries prints "<what> ok" or "<what> denied".
	procChecks := `for f in environ maps cmdline status; do if cat /proc/$E/$f >/dev/null 2>&1; then echo "$f ok"; else echo "$f denied"; fi; done
if (exec 3</proc/$E/mem) 2>/dev/null; then echo "mem ok"; else echo "mem denied"; fi
if ls /proc/$E/fd >/dev/null 2>&1; then echo "fd ok"; else echo "fd denied"; fi
if ls /proc/$E/root/ >/dev/null 2>&1; then echo "root ok"; else echo "root denied"; fi
if kill -0 $E 2>/dev/null; then echo "signal ok"; else echo "signal denied"; fi`
	// What escrow, as its container runs, may read of an agent process: fdinfo (the lookup's
	// way in) but not the fd directory (which would take CAP_DAC_OVERRIDE).
	escrowChecks := `if ls /proc/$A/fd >/dev/null 2>&1; then echo "fd ok"; else echo "fd denied"; fi
if cat /proc/$A/fdinfo/0 >/dev/null 2>&1; then echo "fdinfo ok"; else echo "fdinfo denied"; fi
if readlink /proc/$A/exe >/dev/null 2>&1; then echo "exe ok"; else echo "exe denied"; fi`
	script := fmt.Sprintf(`set -eu
pids=""
trap 'st=$?; kill $pids 2>/dev/null || true; wait 2>/dev/null || true; exit $st' EXIT
ip link set lo up
%[1]s %[2]s/api.py %[3]s %[4]s %[5]s >%[2]s/api.log 2>&1 &
pids="$pids $!"
%[6]s %[7]s proxy --config %[8]s >%[2]s/escrow.log 2>%[2]s/escrow.err &
E=$!
pids="$pids $E"
ready() { for i in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not ready: $*"; cat %[2]s/escrow.err; exit 1; }
ready curl -sf http://127.0.0.1:%[9]d%[10]s
ready curl -sf --cacert %[11]s --resolve api.example.com:18443:127.0.0.1 https://api.example.com:18443/health
echo "escrow: $(grep -E '^(Uid|Gid|CapEff|NoNewPrivs)' /proc/$E/status | tr -s '\t' ' ' | tr '\n' ';')"
echo "agent: $(%[12]s env -i %[13]s %[14]s -sS https://api.example.com/v1/models)"
echo "other: $(%[15]s env -i %[13]s %[14]s -sS -o /dev/null -w '%%{http_code}' https://api.example.com/v1/models)"
%[12]s env E=$E sh -c '%[16]s' | sed 's/^/agent-reads /'
E=$E sh -c '%[16]s' | sed 's/^/node-reads /'
%[12]s sleep 60 &
A=$!
pids="$pids $A"
ready grep -q "^Uid:[[:space:]]*%[18]d[[:space:]]" /proc/$A/status
%[6]s env A=$A sh -c '%[17]s' | sed 's/^/escrow-reads-agent /'
`, py, root, secret, upCert, upKey, escrowRun, bin, hostCfgFile, probe.Port, probe.Path,
		filepath.Join(volumes["escrow-config"], "upstream-ca.pem"), agentRun, agentEnv.String(), curl, otherRun, procChecks,
		escrowChecks, agentUID)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// One network and one PID namespace for the whole pod, with its own /proc.
	cmd := exec.CommandContext(ctx, "unshare", "--net", "--pid", "--mount-proc", "--fork", "--kill-child", "sh", "-c", script)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the simulated pod failed: %v\n%s", err, out)
	}
	t.Logf("simulated pod:\n%s", out)
	lines := map[string]bool{}
	for _, l := range strings.Split(string(out), "\n") {
		lines[strings.TrimSpace(l)] = true
	}

	// escrow runs as the runtime would run its container: uid 0, exactly the one capability
	// the injector adds (CAP_SYS_PTRACE, bit 19).
	if !strings.Contains(string(out), "Uid: 0 0 0 0;Gid: 65532 65532 65532 65532;CapEff: 0000000000080000;NoNewPrivs: 1;") {
		t.Errorf("escrow did not run as uid 0 gid 65532 with only SYS_PTRACE and no new privileges")
	}
	// The lookup that names the agent below cannot have listed the agent's fd directory.
	for what, want := range map[string]string{"fd": "denied", "fdinfo": "ok", "exe": "ok"} {
		if !lines["escrow-reads-agent "+what+" "+want] {
			t.Errorf("escrow's read of an agent process's %s: want %s", what, want)
		}
	}
	if !lines["agent: authorized"] {
		t.Errorf("the agent's curl (uid %d) was not let through by the policy on context.caller.uid", agentUID)
	}
	if !lines["other: 403"] {
		t.Errorf("a process of another uid (%d) in the same pod was not denied", otherUID)
	}
	// What the agent sees of escrow in the shared process namespace; the node (root with every
	// capability) reads all of it, so the denials are the kernel's ptrace and permission checks.
	for what, want := range map[string]string{
		"environ": "denied", "mem": "denied", "fd": "denied", "root": "denied", "maps": "denied", "signal": "denied",
		"cmdline": "ok", "status": "ok",
	} {
		if !lines["agent-reads "+what+" "+want] {
			t.Errorf("the agent's read of escrow's %s: want %s", what, want)
		}
		if what != "signal" && !lines["node-reads "+what+" ok"] {
			t.Errorf("control: the node cannot read escrow's %s either, so the agent's denial proves nothing", what)
		}
	}

	// The audit records name the calling process: the agent's curl by uid and executable.
	records := auditRecords(t, filepath.Join(root, "escrow.log"))
	var allowed, denied bool
	for _, r := range records {
		if r.Host != "api.example.com" || r.Kind != "request" {
			continue
		}
		switch {
		case r.Decision == "allow" && r.Caller.UID == agentUID && r.Caller.Exe == curl && r.Caller.PID > 1:
			allowed = true
		case r.Decision == "deny" && r.Caller.UID == otherUID:
			denied = true
		}
	}
	if !allowed || !denied {
		t.Errorf("audit records do not show the agent's curl (uid %d, %s) allowed and uid %d denied: %+v", agentUID, curl, otherUID, records)
	}
	if strings.Contains(string(out), secret) {
		t.Error("the secret reached the pod's output")
	}
}

// runtimeArgs is how the container runtime starts container c of pod p, as a setpriv command:
// the effective uid and gid (the container's, else the pod's), a bounding set of exactly the
// added capabilities (the runtimes put no capability in the ambient set, so a non-root uid
// keeps none across exec, and uid 0 gets the bounding set), and no_new_privs when privilege
// escalation is off.
func runtimeArgs(t *testing.T, p *corev1.Pod, c *corev1.Container) string {
	t.Helper()
	var uid, gid *int64
	if psc := p.Spec.SecurityContext; psc != nil {
		uid, gid = psc.RunAsUser, psc.RunAsGroup
	}
	sc := c.SecurityContext
	if sc == nil {
		t.Fatalf("container %s has no security context", c.Name)
	}
	if sc.RunAsUser != nil {
		uid = sc.RunAsUser
	}
	if sc.RunAsGroup != nil {
		gid = sc.RunAsGroup
	}
	if uid == nil {
		t.Fatalf("container %s has no uid in its pod spec", c.Name)
	}
	if gid == nil {
		gid = uid // this test's images have no USER group of their own
	}
	if sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Fatalf("container %s does not drop ALL capabilities: %+v", c.Name, sc.Capabilities)
	}
	caps := "-all"
	for _, a := range sc.Capabilities.Add {
		caps += ",+" + strings.ToLower(strings.TrimPrefix(string(a), "CAP_"))
	}
	args := fmt.Sprintf("setpriv --reuid %d --regid %d --clear-groups --bounding-set %s --inh-caps -all", *uid, *gid, caps)
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		args += " --no-new-privs"
	}
	return args
}

type auditRecord struct {
	Kind     string `json:"kind"`
	Host     string `json:"host"`
	Decision string `json:"decision"`
	Reason   string `json:"reason"`
	Caller   struct {
		PID int    `json:"pid"`
		UID int64  `json:"uid"`
		Exe string `json:"exe"`
	} `json:"caller"`
}

func auditRecords(t *testing.T, path string) []auditRecord {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []auditRecord
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r auditRecord
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.Kind != "" {
			out = append(out, r)
		}
	}
	return out
}
