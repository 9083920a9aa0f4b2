package k8s_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// readmeSection returns the code blocks of README's "Install on Kubernetes" section, by language.
func readmeSection(t *testing.T) (sh []string, yamlBlocks []string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "\n## Install on Kubernetes\n")
	if i < 0 {
		t.Fatal(`README has no "## Install on Kubernetes" section`)
	}
	s = s[i+1:]
	if j := strings.Index(s[3:], "\n## "); j >= 0 {
		s = s[:j+3]
	}
	for _, m := range regexp.MustCompile("(?s)```(sh|yaml)\n(.*?)```").FindAllStringSubmatch(s, -1) {
		if m[1] == "sh" {
			sh = append(sh, m[2])
		} else {
			yamlBlocks = append(yamlBlocks, m[2])
		}
	}
	if len(sh) < 2 || len(yamlBlocks) < 1 {
		t.Fatalf("README's Kubernetes section: want the install commands, agent.yaml and the checks; got %d sh and %d yaml blocks", len(sh), len(yamlBlocks))
	}
	return sh, yamlBlocks
}

// shell runs README lines with the tools first on PATH and the test cluster as KUBECONFIG.
func (c *cluster) shell(t *testing.T, dir, script string) (string, error) {
	t.Helper()
	cmd := exec.Command("sh", "-ec", script)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig, "PATH="+os.Getenv(toolsEnv)+":"+os.Getenv("PATH"),
		"HELM_CACHE_HOME="+filepath.Join(dir, ".helm", "cache"), "HELM_CONFIG_HOME="+filepath.Join(dir, ".helm", "config"),
		"HELM_DATA_HOME="+filepath.Join(dir, ".helm", "data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v\n%s", script, err, out)
	}
	return string(out), nil
}

func podJSON(name, ns string, labels map[string]string) []byte {
	p := map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": name, "namespace": ns, "labels": labels},
		"spec": map[string]any{"containers": []any{map[string]any{
			"name": "app", "image": "curlimages/curl:8.11.1", "command": []string{"sleep", "3600"},
			"env": []any{map[string]any{"name": "KEEP", "value": "me"}},
		}}},
	}
	b, _ := json.Marshal(p)
	return b
}

// injected reports whether escrow was injected, and checks the shape when it was.
func checkInjected(t *testing.T, what string, p pod, want bool) {
	t.Helper()
	_, annotated := p.Metadata.Annotations["escrow.dev/injected"]
	hasSidecar := false
	for _, c := range append(append([]container{}, p.Spec.InitContainers...), p.Spec.Containers...) {
		if c.Name == "escrow" {
			hasSidecar = true
		}
	}
	if !want {
		if annotated || hasSidecar {
			t.Errorf("%s: injected, want untouched (annotation %v, escrow container %v)", what, annotated, hasSidecar)
		}
		for _, c := range p.Spec.Containers {
			for _, e := range c.Env {
				if strings.EqualFold(e.Name, "HTTPS_PROXY") {
					t.Errorf("%s: %s got HTTPS_PROXY although not injected", what, c.Name)
				}
			}
		}
		return
	}
	if !annotated {
		t.Errorf("%s: no escrow.dev/injected annotation: %v", what, p.Metadata.Annotations)
	}
	if len(p.Spec.InitContainers) == 0 || p.Spec.InitContainers[0].Name != "escrow" {
		t.Fatalf("%s: escrow is not the first init container: %+v", what, p.Spec.InitContainers)
	}
	sc := p.Spec.InitContainers[0]
	if sc.RestartPolicy != "Always" {
		t.Errorf("%s: escrow restartPolicy = %q, want Always (a native sidecar)", what, sc.RestartPolicy)
	}
	if sc.StartupProbe == nil {
		t.Errorf("%s: escrow has no startup probe", what)
	}
	checkRestricted(t, what+" escrow sidecar", podSpec{InitContainers: []container{sc}})
	adminPort := false
	for _, p := range sc.Ports {
		adminPort = adminPort || (p.Name == sidecarAdminPortName && p.ContainerPort == 15481)
	}
	if !adminPort {
		t.Errorf("%s: escrow has no port %s 15481 (the chart's PodMonitor scrapes it): %+v", what, sidecarAdminPortName, sc.Ports)
	}
	for _, c := range p.Spec.Containers {
		env := map[string]string{}
		for _, e := range c.Env {
			env[e.Name] = e.Value
		}
		if env["HTTPS_PROXY"] == "" || env["HTTP_PROXY"] == "" || env["SSL_CERT_FILE"] == "" {
			t.Errorf("%s: container %s lacks the proxy/trust env: %v", what, c.Name, env)
		}
		if c.Name == "app" && env["KEEP"] != "me" { // podJSON's container
			t.Errorf("%s: the agent's own env was lost: %v", what, env)
		}
	}
}

// serverFields are set by the API server; a pod re-submitted has them removed.
func resubmittable(raw map[string]any, name string) map[string]any {
	b, _ := json.Marshal(raw)
	var p map[string]any
	_ = json.Unmarshal(b, &p)
	md := p["metadata"].(map[string]any)
	for _, k := range []string{"uid", "resourceVersion", "creationTimestamp", "managedFields", "generation"} {
		delete(md, k)
	}
	if name != "" {
		md["name"] = name
	}
	delete(p, "status")
	return p
}

// TestAgainstAPIServer: the chart against a real kube-apiserver, with the real escrow webhook.
func TestAgainstAPIServer(t *testing.T) {
	c := startCluster(t)
	objs := render(t)
	sh, yamls := readmeSection(t)

	// README: helm install, create and label the namespace, apply the agent. Run as written.
	work := t.TempDir()
	if err := os.Symlink(filepath.Join(repoRoot, "charts"), filepath.Join(work, "charts")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(work, "agent.yaml"), []byte(yamls[0]), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.shell(t, work, sh[0]); err != nil {
		t.Fatalf("README install steps: %v", err)
	} else {
		t.Logf("README install steps:\n%s", out)
	}
	c.kubectl(t, nil, "create", "serviceaccount", "default", "-n", "agents") // no controller-manager

	t.Run("kubectl_apply_of_the_rendered_chart_succeeds", func(t *testing.T) {
		out, err := helmTemplate(t)
		if err != nil {
			t.Fatal(err)
		}
		c.kubectl(t, []byte(out), "apply", "-f", "-")
		var d deployment
		got := c.kubectl(t, nil, "get", "deployment", "-n", releaseNS, "escrow-webhook", "-o", "json")
		if err := json.Unmarshal([]byte(got), &d); err != nil {
			t.Fatal(err)
		}
		if *d.Spec.Replicas != 2 {
			t.Errorf("replicas read back = %d", *d.Spec.Replicas)
		}
		for _, kind := range []string{"service/escrow-webhook", "serviceaccount/escrow-webhook", "poddisruptionbudget/escrow-webhook",
			"configmap/escrow-config", "configmap/escrow-policies", "configmap/escrow-injector", "configmap/escrow-dashboard", "secret/escrow-webhook-tls"} {
			c.kubectl(t, nil, "get", "-n", releaseNS, kind)
		}
		c.kubectl(t, nil, "get", "mutatingwebhookconfiguration", "escrow")
		// Applying the agent twice changes nothing.
		if out := c.kubectl(t, []byte(yamls[0]), "apply", "-n", "agents", "-f", "-"); !strings.Contains(out, "unchanged") {
			t.Errorf("second apply of agent.yaml: %q, want unchanged", out)
		}
	})

	t.Run("chart_pods_pass_restricted_pod_security", func(t *testing.T) {
		// Enforce the restricted profile on escrow's own namespace, then create each of the
		// chart's pod templates there as a pod (no controller-manager makes them).
		c.kubectl(t, nil, "label", "namespace", releaseNS, "pod-security.kubernetes.io/enforce=restricted")
		c.kubectl(t, nil, "create", "serviceaccount", "default", "-n", releaseNS)
		for name, tpl := range podTemplates(t, objs) {
			p := map[string]any{"apiVersion": "v1", "kind": "Pod",
				"metadata": map[string]any{"name": "from-template", "namespace": releaseNS, "labels": tpl.Metadata.Labels},
				"spec":     rawTemplateSpec(t, objs, name)}
			b, _ := json.Marshal(p)
			if _, err := c.kubectlErr(b, "create", "-f", "-"); err != nil {
				t.Errorf("%s's pod template refused in a restricted namespace: %v", name, err)
			}
			c.kubectl(t, nil, "delete", "pod", "-n", releaseNS, "from-template", "--wait=false")
		}
		// Negative control: the PodSecurity admission really enforces here.
		if _, err := c.kubectlErr(podJSON("loose", releaseNS, nil), "create", "-f", "-"); err == nil || !strings.Contains(err.Error(), "PodSecurity") {
			t.Errorf("a pod without a securityContext was not refused by PodSecurity: %v", err)
		}
	})

	// Register the webhook from the chart's MutatingWebhookConfiguration, pointed at the real
	// escrow webhook on loopback.
	w := startWebhook(t, objs)
	mwc := one(t, objs, "MutatingWebhookConfiguration").Raw
	for _, wh := range mwc["webhooks"].([]any) {
		wh.(map[string]any)["clientConfig"] = map[string]any{"url": w.url(), "caBundle": base64.StdEncoding.EncodeToString(w.caPEM)}
	}
	b, _ := json.Marshal(mwc)
	c.kubectl(t, b, "replace", "-f", "-")
	c.namespace(t, "plain")

	t.Run("injected_exactly_when_opted_in", func(t *testing.T) {
		cases := []struct {
			name, ns string
			labels   map[string]string
			want     bool
		}{
			{"ns-labelled", "agents", nil, true},
			{"ns-labelled-pod-true", "agents", map[string]string{"escrow.dev/inject": "true"}, true},
			{"ns-labelled-pod-false", "agents", map[string]string{"escrow.dev/inject": "false"}, false},
			{"plain", "plain", nil, false},
			{"plain-pod-true", "plain", map[string]string{"escrow.dev/inject": "true"}, true},
			{"plain-pod-false", "plain", map[string]string{"escrow.dev/inject": "false"}, false},
			{"kube-system-pod-true", "kube-system", map[string]string{"escrow.dev/inject": "true"}, false},
		}
		c.kubectl(t, nil, "label", "namespace", "kube-system", "escrow.dev/inject=enabled")
		c.kubectl(t, nil, "create", "serviceaccount", "default", "-n", "kube-system")
		for _, tc := range cases {
			if _, err := c.kubectlErr(podJSON(tc.name, tc.ns, tc.labels), "create", "-f", "-"); err != nil {
				t.Errorf("%s: create refused (the API server validates the injected pod): %v", tc.name, err)
				continue
			}
			p, _ := c.getPod(t, tc.ns, tc.name)
			checkInjected(t, tc.ns+"/"+tc.name, p, tc.want)
		}
	})

	t.Run("the_agent_deployment_pod_gets_escrow_readme_check", func(t *testing.T) {
		// No controller-manager: create the Deployment's pod template as a pod, as the
		// ReplicaSet controller would.
		var d deployment
		if err := json.Unmarshal([]byte(c.kubectl(t, nil, "get", "deployment", "-n", "agents", "agent", "-o", "json")), &d); err != nil {
			t.Fatal(err)
		}
		var raw map[string]any
		_ = json.Unmarshal([]byte(c.kubectl(t, nil, "get", "deployment", "-n", "agents", "agent", "-o", "json")), &raw)
		tpl := raw["spec"].(map[string]any)["template"].(map[string]any)
		p := map[string]any{"apiVersion": "v1", "kind": "Pod",
			"metadata": map[string]any{"name": "agent-7d4b9c-x2x5q", "namespace": "agents", "labels": d.Spec.Template.Metadata.Labels},
			"spec":     tpl["spec"]}
		b, _ := json.Marshal(p)
		c.kubectl(t, b, "create", "-f", "-")
		got, _ := c.getPod(t, "agents", "agent-7d4b9c-x2x5q")
		checkInjected(t, "agents/agent (Deployment template)", got, true)
		// The same Deployment in a namespace that did not opt in: its pod is left alone.
		c.kubectl(t, []byte(yamls[0]), "apply", "-n", "plain", "-f", "-")
		p["metadata"].(map[string]any)["namespace"] = "plain"
		b, _ = json.Marshal(p)
		c.kubectl(t, b, "create", "-f", "-")
		untouched, _ := c.getPod(t, "plain", "agent-7d4b9c-x2x5q")
		checkInjected(t, "plain/agent (Deployment template)", untouched, false)
		// Every ConfigMap the injected pod mounts exists in its namespace (the chart put them there).
		for _, v := range got.Spec.Volumes {
			if cm, ok := v["configMap"].(map[string]any); ok {
				if _, err := c.kubectlErr(nil, "get", "configmap", "-n", "agents", fmt.Sprint(cm["name"])); err != nil {
					t.Errorf("the injected pod mounts ConfigMap %v, which is not in its namespace: %v", cm["name"], err)
				}
			}
		}

		// README "See what happened": the first and third commands (logs need a kubelet).
		lines := strings.Split(strings.TrimSpace(sh[1]), "\n")
		out, err := c.shell(t, t.TempDir(), lines[0])
		if err != nil || !strings.HasPrefix(strings.TrimSpace(out), "escrow") {
			t.Errorf("README check %q: %q %v", lines[0], out, err)
		}
		out, err = c.shell(t, t.TempDir(), lines[2])
		if err != nil || !strings.Contains(out, "escrow-dashboard") {
			t.Errorf("README check %q: %q %v", lines[2], out, err)
		}
	})

	t.Run("second_pass_is_a_no_op", func(t *testing.T) {
		first, raw := c.getPod(t, "agents", "ns-labelled")
		// Straight to the webhook: an injected pod comes back without a patch.
		pj, _ := json.Marshal(resubmittable(raw, ""))
		res := w.review(t, "agents", pj)
		if !res.Allowed {
			t.Errorf("already-injected pod not allowed: %+v", res.Result)
		}
		if p := strings.TrimSpace(string(res.Patch)); p != "" && p != "[]" && p != "null" {
			t.Errorf("already-injected pod got a patch: %s", p)
		}
		// Through the API server: the injected pod submitted again is stored as it was.
		b, _ := json.Marshal(resubmittable(raw, "ns-labelled-again"))
		c.kubectl(t, b, "create", "-f", "-")
		second, _ := c.getPod(t, "agents", "ns-labelled-again")
		if !reflect.DeepEqual(first.Spec.InitContainers, second.Spec.InitContainers) ||
			!reflect.DeepEqual(first.Spec.Containers, second.Spec.Containers) ||
			!reflect.DeepEqual(first.Spec.Volumes, second.Spec.Volumes) ||
			first.Metadata.Annotations["escrow.dev/injected"] != second.Metadata.Annotations["escrow.dev/injected"] {
			a, _ := json.MarshalIndent(first.Spec, "", " ")
			b, _ := json.MarshalIndent(second.Spec, "", " ")
			t.Errorf("second pass changed the pod:\nfirst:\n%s\nsecond:\n%s", a, b)
		}
	})

	t.Run("failure_policy_fail_holds_with_the_webhook_down", func(t *testing.T) {
		w.proc.stop()
		if _, err := c.kubectlErr(podJSON("down-ns-labelled", "agents", nil), "create", "-f", "-"); err == nil {
			t.Errorf("pod in an opted-in namespace created with the webhook down (failurePolicy Fail)")
		} else if !strings.Contains(err.Error(), "escrow.dev") {
			t.Errorf("refused, but not by escrow's webhook: %v", err)
		}
		if _, err := c.kubectlErr(podJSON("down-pod-true", "plain", map[string]string{"escrow.dev/inject": "true"}), "create", "-f", "-"); err == nil {
			t.Errorf("opted-in pod created with the webhook down")
		}
		for _, p := range []struct {
			name, ns string
			labels   map[string]string
		}{
			{"down-plain", "plain", nil},
			{"down-opt-out", "agents", map[string]string{"escrow.dev/inject": "false"}},
		} {
			if _, err := c.kubectlErr(podJSON(p.name, p.ns, p.labels), "create", "-f", "-"); err != nil {
				t.Errorf("%s/%s did not opt in but was refused with the webhook down: %v", p.ns, p.name, err)
			}
		}
	})
	t.Run("helm_upgrade_keeps_the_webhook_certificate", func(t *testing.T) {
		secretCA := func() string {
			return c.kubectl(t, nil, "get", "secret", "-n", releaseNS, "escrow-webhook-tls", "-o", "jsonpath={.data.ca\\.crt}")
		}
		before := secretCA()
		// Put back the chart's own webhook configuration (service clientConfig) that the test
		// pointed at its loopback webhook.
		orig, _ := json.Marshal(one(t, render(t), "MutatingWebhookConfiguration").Raw)
		c.kubectl(t, orig, "replace", "-f", "-")
		work := t.TempDir()
		if err := os.Symlink(filepath.Join(repoRoot, "charts"), filepath.Join(work, "charts")); err != nil {
			t.Fatal(err)
		}
		if out, err := c.shell(t, work, "helm upgrade escrow ./charts/escrow --namespace escrow-system --reuse-values"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if after := secretCA(); after != before || before == "" {
			t.Errorf("helm upgrade replaced the webhook's CA (running webhooks would serve a certificate the API server no longer trusts)")
		}
		var mwc mutatingWebhookConfiguration
		if err := json.Unmarshal([]byte(c.kubectl(t, nil, "get", "mutatingwebhookconfiguration", "escrow", "-o", "json")), &mwc); err != nil {
			t.Fatal(err)
		}
		for _, w := range mwc.Webhooks {
			if w.ClientConfig["caBundle"] != before {
				t.Errorf("%s: caBundle after upgrade is not the kept CA", w.Name)
			}
		}
	})

	t.Run("control_plane_enabled_by_helm_upgrade", func(t *testing.T) {
		checkControllerOnAPIServer(t, c)
	})

}

// rawTemplateSpec returns a workload's pod template spec as rendered (every field, untyped).
func rawTemplateSpec(t *testing.T, objs []object, name string) any {
	t.Helper()
	for _, o := range objs {
		if o.Kind+"/"+o.Metadata.Name == name {
			return o.Raw["spec"].(map[string]any)["template"].(map[string]any)["spec"]
		}
	}
	t.Fatalf("no %s", name)
	return nil
}
