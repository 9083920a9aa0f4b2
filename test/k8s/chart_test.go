package k8s_test

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestHelmLint(t *testing.T) {
	helm := tool(t, "helm")
	for _, args := range [][]string{
		nil,
		{"--set", "tls.certManager.enabled=true"},
		{"--set", "metrics.podMonitor.enabled=true,metrics.serviceMonitor.enabled=true"},
		{"--set", "sidecar.processIdentity.enabled=true"},
		{"--set", "controller.enabled=true"},
		{"--set", "controller.enabled=true,controller.replicas=1,metrics.serviceMonitor.enabled=true,controller.spiffeID=spiffe://example.org/ns/escrow-system/sa/escrow-controller"},
	} {
		mustRun(t, nil, helm, append([]string{"lint", "--strict", chartDir, "--namespace", releaseNS}, args...)...)
	}
}

func chartAppVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return c.AppVersion
}

func TestChartDefaults(t *testing.T) {
	objs := render(t)
	t.Logf("rendered: %s", kinds(objs))

	t.Run("webhook_deployment_has_2_replicas_anti_affinity_and_the_image_at_appVersion", func(t *testing.T) {
		var d deployment
		one(t, objs, "Deployment").into(t, &d)
		if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
			t.Errorf("replicas = %v, want 2", d.Spec.Replicas)
		}
		ps := d.Spec.Template.Spec
		if ps.Affinity == nil || ps.Affinity.PodAntiAffinity["preferredDuringSchedulingIgnoredDuringExecution"] == nil {
			t.Errorf("no pod anti-affinity: %+v", ps.Affinity)
		}
		if !d.Spec.Selector.matches(d.Spec.Template.Metadata.Labels) {
			t.Errorf("selector %+v does not match the template's labels", d.Spec.Selector)
		}
		want := "escrowproxy/escrow:" + chartAppVersion(t)
		if got := ps.Containers[0].Image; got != want {
			t.Errorf("image = %q, want %q", got, want)
		}
		if ps.Containers[0].Args[0] != "webhook" {
			t.Errorf("args = %v, want the webhook command", ps.Containers[0].Args)
		}
		if d.Spec.Template.Metadata.Labels["escrow.dev/inject"] != "false" {
			t.Errorf("the webhook's own pods must be labelled escrow.dev/inject=false")
		}
	})

	t.Run("pdb_keeps_one_webhook_replica_and_selects_its_pods", func(t *testing.T) {
		var d deployment
		one(t, objs, "Deployment").into(t, &d)
		var pdb struct {
			Spec struct {
				MinAvailable any           `json:"minAvailable"`
				Selector     labelSelector `json:"selector"`
			} `json:"spec"`
		}
		one(t, objs, "PodDisruptionBudget").into(t, &pdb)
		if pdb.Spec.MinAvailable != float64(1) {
			t.Errorf("minAvailable = %v, want 1", pdb.Spec.MinAvailable)
		}
		if !pdb.Spec.Selector.matches(d.Spec.Template.Metadata.Labels) {
			t.Errorf("PDB selector does not select the webhook's pods")
		}
	})

	t.Run("every_pod_template_is_restricted", func(t *testing.T) {
		tpls := podTemplates(t, objs)
		if len(tpls) == 0 {
			t.Fatal("no pod template rendered")
		}
		for name, tpl := range tpls {
			checkRestricted(t, name, tpl.Spec)
		}
	})

	t.Run("rbac_is_minimal_no_role_and_no_token", func(t *testing.T) {
		for _, k := range []string{"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} {
			if f := find(objs, k); len(f) > 0 {
				t.Errorf("the webhook needs nothing from the API, but the chart grants a %s: %s", k, kinds(f))
			}
		}
		var sa struct {
			AutomountServiceAccountToken *bool `json:"automountServiceAccountToken"`
		}
		one(t, objs, "ServiceAccount").into(t, &sa)
		if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
			t.Errorf("ServiceAccount must not automount a token")
		}
		var d deployment
		one(t, objs, "Deployment").into(t, &d)
		if p := d.Spec.Template.Spec.AutomountServiceAccountToken; p == nil || *p {
			t.Errorf("webhook pods must not mount an API token")
		}
	})

	t.Run("webhook_configuration", func(t *testing.T) {
		var mwc mutatingWebhookConfiguration
		one(t, objs, "MutatingWebhookConfiguration").into(t, &mwc)
		checkWebhookConfiguration(t, mwc, "Fail")
		var sec struct {
			Type string            `json:"type"`
			Data map[string]string `json:"data"`
		}
		one(t, objs, "Secret").into(t, &sec)
		for _, w := range mwc.Webhooks {
			if w.ClientConfig["caBundle"] != sec.Data["ca.crt"] {
				t.Errorf("%s: caBundle is not the CA of the webhook's Secret", w.Name)
			}
			svc, _ := w.ClientConfig["service"].(map[string]any)
			if svc["name"] != "escrow-webhook" || svc["namespace"] != releaseNS || svc["path"] != "/mutate" {
				t.Errorf("%s: clientConfig.service = %v", w.Name, svc)
			}
		}
		checkServingCert(t, sec.Data, "escrow-webhook."+releaseNS+".svc")
	})

	t.Run("service_targets_the_webhook_port", func(t *testing.T) {
		var d deployment
		one(t, objs, "Deployment").into(t, &d)
		var svc struct {
			Spec struct {
				Selector map[string]string `json:"selector"`
				Ports    []struct {
					Port       int `json:"port"`
					TargetPort any `json:"targetPort"`
				} `json:"ports"`
			} `json:"spec"`
		}
		one(t, objs, "Service").into(t, &svc)
		if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 443 || svc.Spec.Ports[0].TargetPort != "https" {
			t.Errorf("service ports = %+v", svc.Spec.Ports)
		}
		if !(labelSelector{MatchLabels: svc.Spec.Selector}).matches(d.Spec.Template.Metadata.Labels) {
			t.Errorf("service selector does not select the webhook's pods")
		}
	})

	t.Run("dashboard_configmap_is_labelled_for_grafana", func(t *testing.T) {
		var found bool
		for _, cm := range find(objs, "ConfigMap") {
			if cm.Metadata.Labels["grafana_dashboard"] == "1" {
				found = true
			}
		}
		if !found {
			t.Errorf("no ConfigMap labelled grafana_dashboard=1")
		}
	})

	t.Run("no_monitors_by_default", func(t *testing.T) {
		if f := append(find(objs, "PodMonitor"), find(objs, "ServiceMonitor")...); len(f) > 0 {
			t.Errorf("monitors are opt-in: %s", kinds(f))
		}
	})

	t.Run("no_latest_tag_anywhere", func(t *testing.T) {
		for _, o := range objs {
			if strings.Contains(o.YAML, ":latest") {
				t.Errorf("%s/%s mentions a latest tag", o.Kind, o.Metadata.Name)
			}
		}
	})
}

// checkRestricted asserts the Pod Security "restricted" profile's requirements.
func checkRestricted(t *testing.T, name string, ps podSpec) {
	t.Helper()
	podNonRoot := ps.SecurityContext != nil && ps.SecurityContext.RunAsNonRoot != nil && *ps.SecurityContext.RunAsNonRoot
	podSeccomp := ps.SecurityContext != nil && ps.SecurityContext.SeccompProfile != nil && ps.SecurityContext.SeccompProfile.Type == "RuntimeDefault"
	for _, c := range append(append([]container{}, ps.InitContainers...), ps.Containers...) {
		sc := c.SecurityContext
		if sc == nil {
			t.Errorf("%s: container %s has no securityContext", name, c.Name)
			continue
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s/%s: allowPrivilegeEscalation must be false", name, c.Name)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s/%s: readOnlyRootFilesystem must be true", name, c.Name)
		}
		if !podNonRoot && (sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot) {
			t.Errorf("%s/%s: runAsNonRoot must be true", name, c.Name)
		}
		if !podSeccomp && (sc.SeccompProfile == nil || sc.SeccompProfile.Type != "RuntimeDefault") {
			t.Errorf("%s/%s: seccompProfile must be RuntimeDefault", name, c.Name)
		}
		if sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || len(sc.Capabilities.Add) > 0 {
			t.Errorf("%s/%s: capabilities must drop ALL and add none: %+v", name, c.Name, sc.Capabilities)
		}
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("%s/%s: privileged", name, c.Name)
		}
	}
	if ps.HostNetwork {
		t.Errorf("%s: hostNetwork", name)
	}
}

// checkWebhookConfiguration asserts the webhook entries and, semantically, which pods the API
// server sends to the webhook: opted in, never escrow's namespace or kube-system.
func checkWebhookConfiguration(t *testing.T, mwc mutatingWebhookConfiguration, failurePolicy string) {
	t.Helper()
	if len(mwc.Webhooks) == 0 {
		t.Fatal("no webhooks")
	}
	for _, w := range mwc.Webhooks {
		if w.FailurePolicy != failurePolicy {
			t.Errorf("%s: failurePolicy = %q, want %q", w.Name, w.FailurePolicy, failurePolicy)
		}
		if w.SideEffects != "None" || w.ReinvocationPolicy != "IfNeeded" {
			t.Errorf("%s: sideEffects=%q reinvocationPolicy=%q", w.Name, w.SideEffects, w.ReinvocationPolicy)
		}
		if strings.Join(w.AdmissionReviewVersions, ",") != "v1" {
			t.Errorf("%s: admissionReviewVersions = %v", w.Name, w.AdmissionReviewVersions)
		}
		if w.TimeoutSeconds < 1 || w.TimeoutSeconds > 10 {
			t.Errorf("%s: timeoutSeconds = %d, want small (1-10)", w.Name, w.TimeoutSeconds)
		}
		if len(w.Rules) != 1 || strings.Join(w.Rules[0].Resources, ",") != "pods" ||
			strings.Join(w.Rules[0].Operations, ",") != "CREATE" || strings.Join(w.Rules[0].APIGroups, ",") != "" {
			t.Errorf("%s: rules = %+v, want pods CREATE only", w.Name, w.Rules)
		}
	}
	ns := func(name string, labels ...string) map[string]string {
		m := map[string]string{"kubernetes.io/metadata.name": name}
		for i := 0; i+1 < len(labels); i += 2 {
			m[labels[i]] = labels[i+1]
		}
		return m
	}
	podLabels := func(v string) map[string]string {
		if v == "" {
			return map[string]string{"app": "agent"}
		}
		return map[string]string{"app": "agent", "escrow.dev/inject": v}
	}
	cases := []struct {
		what      string
		ns, pod   map[string]string
		wantCalls int
	}{
		{"labelled namespace, unlabelled pod", ns("agents", "escrow.dev/inject", "enabled"), podLabels(""), 1},
		{"labelled namespace, pod true", ns("agents", "escrow.dev/inject", "enabled"), podLabels("true"), 1},
		{"labelled namespace, pod false wins", ns("agents", "escrow.dev/inject", "enabled"), podLabels("false"), 0},
		{"unlabelled namespace, unlabelled pod", ns("plain"), podLabels(""), 0},
		{"unlabelled namespace, pod true", ns("plain"), podLabels("true"), 1},
		{"unlabelled namespace, pod false", ns("plain"), podLabels("false"), 0},
		{"escrow's own namespace even if labelled", ns(releaseNS, "escrow.dev/inject", "enabled"), podLabels("true"), 0},
		{"kube-system even if labelled", ns("kube-system", "escrow.dev/inject", "enabled"), podLabels("true"), 0},
		{"kube-system, pod true", ns("kube-system"), podLabels("true"), 0},
	}
	for _, c := range cases {
		calls := 0
		for _, w := range mwc.Webhooks {
			if w.NamespaceSelector.matches(c.ns) && w.ObjectSelector.matches(c.pod) {
				calls++
			}
		}
		if calls != c.wantCalls {
			t.Errorf("%s: the API server would call the webhook %d times, want %d", c.what, calls, c.wantCalls)
		}
	}
}

// checkServingCert verifies the Secret's serving certificate chains to its ca.crt for dnsName.
func checkServingCert(t *testing.T, data map[string]string, dnsName string) {
	t.Helper()
	dec := func(k string) *x509.Certificate {
		b, err := base64.StdEncoding.DecodeString(data[k])
		if err != nil {
			t.Fatalf("%s: %v", k, err)
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			t.Fatalf("%s: no PEM", k)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatalf("%s: %v", k, err)
		}
		return c
	}
	ca, leaf := dec("ca.crt"), dec("tls.crt")
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: dnsName, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("serving certificate does not verify for %s: %v", dnsName, err)
	}
	if data["tls.key"] == "" {
		t.Errorf("no tls.key")
	}
}

func TestChartValues(t *testing.T) {
	t.Run("image_by_digest", func(t *testing.T) {
		dig := "sha256:" + strings.Repeat("ab", 32)
		var d deployment
		one(t, render(t, "--set", "image.digest="+dig, "--set", "image.repository=images.example/escrow"), "Deployment").into(t, &d)
		if got := d.Spec.Template.Spec.Containers[0].Image; got != "images.example/escrow@"+dig {
			t.Errorf("image = %q", got)
		}
	})
	t.Run("cert_manager_issues_the_certificate_and_injects_the_ca", func(t *testing.T) {
		objs := render(t, "--set", "tls.certManager.enabled=true")
		if f := find(objs, "Secret"); len(f) > 0 {
			t.Errorf("with cert-manager the chart must not generate a Secret: %s", kinds(f))
		}
		mwcObj := one(t, objs, "MutatingWebhookConfiguration")
		ann := mwcObj.Metadata.Annotations["cert-manager.io/inject-ca-from"]
		var certNames []string
		for _, c := range find(objs, "Certificate") {
			certNames = append(certNames, releaseNS+"/"+c.Metadata.Name)
		}
		if !contains(certNames, ann) {
			t.Errorf("inject-ca-from = %q, want one of the rendered Certificates %v", ann, certNames)
		}
		var mwc mutatingWebhookConfiguration
		mwcObj.into(t, &mwc)
		for _, w := range mwc.Webhooks {
			if w.ClientConfig["caBundle"] != nil {
				t.Errorf("%s: caBundle set although cert-manager injects it", w.Name)
			}
		}
		if len(find(objs, "Issuer")) == 0 {
			t.Errorf("no Issuer")
		}
		var d deployment
		one(t, objs, "Deployment").into(t, &d)
		var cert struct {
			Spec struct {
				SecretName string   `json:"secretName"`
				DNSNames   []string `json:"dnsNames"`
			} `json:"spec"`
		}
		for _, c := range find(objs, "Certificate") {
			if releaseNS+"/"+c.Metadata.Name == ann {
				c.into(t, &cert)
			}
		}
		if !contains(cert.Spec.DNSNames, "escrow-webhook."+releaseNS+".svc") {
			t.Errorf("certificate dnsNames = %v", cert.Spec.DNSNames)
		}
		mounted := false
		for _, v := range d.Spec.Template.Spec.Volumes {
			if s, ok := v["secret"].(map[string]any); ok && s["secretName"] == cert.Spec.SecretName {
				mounted = true
			}
		}
		if !mounted {
			t.Errorf("the webhook does not mount the certificate's Secret %q", cert.Spec.SecretName)
		}
	})
	t.Run("monitors_when_enabled", func(t *testing.T) {
		objs := render(t, "--set", "metrics.podMonitor.enabled=true,metrics.serviceMonitor.enabled=true")
		var pm struct {
			Spec struct {
				Endpoints []struct {
					Port string `json:"port"`
					Path string `json:"path"`
				} `json:"podMetricsEndpoints"`
			} `json:"spec"`
		}
		one(t, objs, "PodMonitor").into(t, &pm)
		// escrow-admin: the port name the injector gives escrow's admin port (checked on a real
		// injected pod in TestAgainstAPIServer).
		if len(pm.Spec.Endpoints) != 1 || pm.Spec.Endpoints[0].Port != sidecarAdminPortName || pm.Spec.Endpoints[0].Path != "/metrics" {
			t.Errorf("PodMonitor does not scrape the sidecars' admin port /metrics: %+v", pm.Spec.Endpoints)
		}
		one(t, objs, "ServiceMonitor")
	})
	t.Run("failure_policy_ignore_and_extra_excluded_namespaces", func(t *testing.T) {
		objs := render(t, "--set", "webhook.failurePolicy=Ignore", "--set", "webhook.excludeNamespaces={kube-system,monitoring}")
		var mwc mutatingWebhookConfiguration
		one(t, objs, "MutatingWebhookConfiguration").into(t, &mwc)
		checkWebhookConfiguration(t, mwc, "Ignore")
		for _, w := range mwc.Webhooks {
			if w.NamespaceSelector.matches(map[string]string{"kubernetes.io/metadata.name": "monitoring", "escrow.dev/inject": "enabled"}) {
				t.Errorf("%s: monitoring is excluded but selected", w.Name)
			}
		}
	})
	t.Run("hard_anti_affinity_and_replicas", func(t *testing.T) {
		objs := render(t, "--set", "webhook.antiAffinity=hard,webhook.replicas=3")
		var d deployment
		one(t, objs, "Deployment").into(t, &d)
		if d.Spec.Template.Spec.Affinity.PodAntiAffinity["requiredDuringSchedulingIgnoredDuringExecution"] == nil || *d.Spec.Replicas != 3 {
			t.Errorf("affinity = %+v replicas = %d", d.Spec.Template.Spec.Affinity, *d.Spec.Replicas)
		}
		checkRestricted(t, "Deployment", d.Spec.Template.Spec)
	})
	t.Run("config_and_policies_in_every_agent_namespace", func(t *testing.T) {
		objs := render(t, "--set", "agentNamespaces={agents,team-b}")
		got := map[string]int{}
		for _, cm := range find(objs, "ConfigMap") {
			if cm.Metadata.Name == "escrow-config" || cm.Metadata.Name == "escrow-policies" {
				got[cm.Metadata.Namespace]++
			}
		}
		for _, ns := range []string{releaseNS, "agents", "team-b"} {
			if got[ns] != 2 {
				t.Errorf("namespace %s has %d of escrow-config and escrow-policies, want both", ns, got[ns])
			}
		}
	})
	t.Run("process_identity_config_in_every_agent_namespace_and_named_to_the_webhook", func(t *testing.T) {
		for _, args := range [][]string{
			{"--set", "agentNamespaces={agents}"},
			{"--set", "agentNamespaces={agents},sidecar.processIdentity.enabled=true", "--set", "config.identity.process=false"},
		} {
			objs := render(t, args...)
			var inj struct {
				ProcessIdentity struct {
					Enabled   bool   `json:"enabled"`
					ConfigMap string `json:"config_map"`
				} `json:"process_identity"`
			}
			if err := yaml.Unmarshal([]byte(injectorConfig(t, objs)), &inj); err != nil {
				t.Fatal(err)
			}
			if want := strings.Contains(strings.Join(args, " "), "enabled=true"); inj.ProcessIdentity.Enabled != want {
				t.Errorf("%v: injector process_identity.enabled = %v, want %v", args, inj.ProcessIdentity.Enabled, want)
			}
			for _, ns := range []string{releaseNS, "agents"} {
				base, proc := configYAML(t, objs, ns, "escrow-config"), configYAML(t, objs, ns, inj.ProcessIdentity.ConfigMap)
				if proc == nil {
					t.Fatalf("%v: no ConfigMap %q (the webhook's process_identity.config_map) in %s", args, inj.ProcessIdentity.ConfigMap, ns)
				}
				if id, _ := proc["identity"].(map[string]any); id["process"] != true {
					t.Errorf("%v: %s/%s identity = %v, want process: true", args, ns, inj.ProcessIdentity.ConfigMap, proc["identity"])
				}
				// Otherwise the same config: identity.process is the only difference.
				delete(base["identity"].(map[string]any), "process")
				delete(proc["identity"].(map[string]any), "process")
				if !reflect.DeepEqual(base, proc) {
					t.Errorf("%v: %s: the process config differs from the base config beyond identity.process:\n%v\n%v", args, ns, base, proc)
				}
			}
		}
	})
	t.Run("pdb_and_dashboard_can_be_turned_off", func(t *testing.T) {
		objs := render(t, "--set", "webhook.podDisruptionBudget.enabled=false,dashboard.enabled=false")
		if len(find(objs, "PodDisruptionBudget")) != 0 {
			t.Errorf("PDB rendered although disabled")
		}
		for _, cm := range find(objs, "ConfigMap") {
			if cm.Metadata.Labels["grafana_dashboard"] != "" {
				t.Errorf("dashboard rendered although disabled")
			}
		}
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// TestChartSchemaRejectsBadValues: values.schema.json makes helm refuse bad values before anything
// reaches the cluster.
func TestChartSchemaRejectsBadValues(t *testing.T) {
	for _, set := range []string{
		"webhook.replicas=-1",
		"webhook.replicas=0",
		"webhook.replicas=two",
		"webhook.failurePolicy=Sometimes",
		"webhook.timeoutSeconds=120",
		"webhook.reinvocationPolicy=Always",
		"webhook.antiAffinity=medium",
		"webhook.replicaCount=2",
		"image.tag=latest",
		"image.digest=sha256:nothex",
		"tls.certManager.enabled=yes",
		"tls.certManager.issuerRef.kind=Secret",
		"sidecar.spiffe.source=magic",
		"sidecar.runAsUser=0",
		"sidecar.processIdentity.enabled=yes",
		"sidecar.processIdentity.enable=true",
		"agentNamespaces={Agents}",
		"sidecar.serviceCIDRs={everything}",
		"metrics.podMonitor.interval=often",
		"unknownTopLevel=1",
		"controller.enabled=yes",
		"controller.replicas=0",
		"controller.replicas=-2",
		"controller.replicaCount=2",
		"controller.port=0",
		"controller.port=80",
		"controller.port=65536",
		"controller.adminPort=70000",
		"controller.antiAffinity=medium",
		"controller.spiffeID=example.org/controller",
		"controller.trustDomain=spiffe://example.org",
		"controller.logLevel=chatty",
		"controller.podDisruptionBudget.minAvailable=-1",
	} {
		out, err := helmTemplate(t, "--set", set)
		if err == nil {
			t.Errorf("--set %s: rendered, want a schema error; output starts:\n%s", set, tail(out, 300))
			continue
		}
		if !strings.Contains(err.Error(), "schema") {
			t.Errorf("--set %s: failed, but not on the schema: %v", set, err)
		}
	}
}

// TestChartDefaultConfigIsValid: the sidecar's default configs (the base one and the one with
// identity.process) and policies from the chart pass escrow's own validation (`escrow proxy
// --check`), without and with the controller (whose xds block needs identity.spiffe).
func TestChartDefaultConfigIsValid(t *testing.T) {
	for _, args := range [][]string{
		nil,
		{"--set", "controller.enabled=true"},
		{"--set", "controller.enabled=true,controller.spiffeID=spiffe://example.org/ns/escrow-system/sa/escrow-controller"},
	} {
		t.Run(strings.Join(append([]string{"values"}, args...), " "), func(t *testing.T) {
			checkChartSidecarConfigs(t, args...)
		})
	}
}

func checkChartSidecarConfigs(t *testing.T, args ...string) {
	objs := render(t, args...)
	bin := escrow(t)
	dir := t.TempDir()
	pdir := filepath.Join(dir, "policies")
	if err := os.Mkdir(pdir, 0o755); err != nil {
		t.Fatal(err)
	}
	configs := map[string]string{} // ConfigMap name → config.yaml
	for _, cm := range find(objs, "ConfigMap") {
		if cm.Metadata.Namespace != releaseNS {
			continue
		}
		var c struct {
			Data map[string]string `json:"data"`
		}
		cm.into(t, &c)
		for k, v := range c.Data {
			switch {
			case k == "config.yaml":
				configs[cm.Metadata.Name] = v
			case strings.HasSuffix(k, ".cedar"):
				if err := os.WriteFile(filepath.Join(pdir, k), []byte(v), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if len(configs) != 2 || configs["escrow-config"] == "" || configs["escrow-config-process"] == "" {
		t.Fatalf("want config.yaml in escrow-config and escrow-config-process, got %d: %v", len(configs), configs)
	}
	for name, cfgText := range configs {
		var cfg map[string]any
		if err := yaml.Unmarshal([]byte(cfgText), &cfg); err != nil {
			t.Fatal(err)
		}
		// The paths are where the injector mounts them in a pod; here they are a temp dir.
		cfg["policy"].(map[string]any)["dir"] = pdir
		cfg["ca_dir"] = filepath.Join(dir, "ca")
		cfg["ca_key_dir"] = filepath.Join(dir, "ca-key")
		b, _ := yaml.Marshal(cfg)
		cfgFile := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(cfgFile, b, 0o644); err != nil {
			t.Fatal(err)
		}
		// The injector sets SPIFFE_ENDPOINT_SOCKET in the pod; the config leaves the socket to it.
		check := exec.Command(bin, "proxy", "--config", cfgFile, "--check")
		check.Env = append(os.Environ(), "SPIFFE_ENDPOINT_SOCKET=unix:///spiffe-workload-api/spire-agent.sock")
		if out, err := check.CombinedOutput(); err != nil {
			t.Errorf("escrow proxy --check of the chart's %s: %v\n%s\n%s", name, err, out, b)
		}
		if !strings.Contains(strings.Join(args, ","), "controller.enabled=true") {
			continue
		}
		// With the controller the config subscribes to it, and --check really looks at xds: the
		// same config with a static identity is refused.
		if xds, _ := cfg["xds"].(map[string]any); xds["address"] != controllerAddr {
			t.Errorf("%s: xds = %v, want address %s", name, cfg["xds"], controllerAddr)
		}
		cfg["identity"] = map[string]any{"static": "spiffe://example.org/agent"}
		b, _ = yaml.Marshal(cfg)
		if err := os.WriteFile(cfgFile, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(bin, "proxy", "--config", cfgFile, "--check").CombinedOutput(); err == nil || !strings.Contains(string(out), "identity.spiffe") {
			t.Errorf("%s with a static identity: --check = %v\n%s, want xds refused for want of identity.spiffe", name, err, out)
		}
	}
	mustRun(t, nil, bin, "policy", "validate", "--dir", pdir)
}

// configYAML returns the parsed config.yaml of ConfigMap name in namespace ns, or nil.
func configYAML(t *testing.T, objs []object, ns, name string) map[string]any {
	t.Helper()
	for _, cm := range find(objs, "ConfigMap") {
		if cm.Metadata.Namespace != ns || cm.Metadata.Name != name {
			continue
		}
		var c struct {
			Data map[string]string `json:"data"`
		}
		cm.into(t, &c)
		var cfg map[string]any
		if err := yaml.Unmarshal([]byte(c.Data["config.yaml"]), &cfg); err != nil || cfg == nil {
			t.Fatalf("%s/%s: config.yaml: %v", ns, name, err)
		}
		return cfg
	}
	return nil
}

// TestChartInjectorConfigIsValid: the injector config the chart renders, for default and varied
// values, passes the real webhook's own validation (`escrow webhook --check`).
func TestChartInjectorConfigIsValid(t *testing.T) {
	bin := escrow(t)
	dir := t.TempDir()
	_, certFile, keyFile := serveCert(t, dir)
	for i, args := range [][]string{
		nil,
		{"--set", "image.digest=sha256:" + strings.Repeat("0f", 32)},
		{"--set", "sidecar.spiffe.source=hostPath,sidecar.spiffe.hostPath=/run/spire/sockets"},
		{"--set", "sidecar.trustEnv=false,sidecar.noProxy={internal.example.com,.corp}"},
		{"--set", "sidecar.serviceCIDRs={10.0.0.0/16,fd00:10:96::/112}", "--set", "sidecar.resources.limits.cpu=500m"},
		{"--set", "sidecar.processIdentity.enabled=true"},
		{"--set", "controller.enabled=true,sidecar.processIdentity.enabled=true"},
	} {
		cfg := filepath.Join(dir, fmt.Sprintf("injector-%d.yaml", i))
		if err := os.WriteFile(cfg, []byte(injectorConfig(t, render(t, args...))), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := run(t, nil, bin, "webhook", "--check", "--config", cfg, "--tls-cert", certFile, "--tls-key", keyFile); err != nil {
			b, _ := os.ReadFile(cfg)
			t.Errorf("values %v: the webhook rejects the chart's injector config: %v\n%s\n%s", args, err, out, b)
		}
	}
	// hostPath without the directory is refused at install, with the value named.
	if _, err := helmTemplate(t, "--set", "sidecar.spiffe.source=hostPath"); err == nil || !strings.Contains(err.Error(), "sidecar.spiffe.hostPath") {
		t.Errorf("spiffe hostPath without a directory: %v", err)
	}
}
