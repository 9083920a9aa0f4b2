package k8s_test

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// processAnnotation turns on escrow's lookup of the calling process for one pod.
const processAnnotation = "escrow.dev/process-identity"

// agentPod is a pod whose containers cannot become root or trace processes (and that passes the
// restricted Pod Security profile by itself), with the given annotations.
func agentPod(name, ns string, ann map[string]string) *corev1.Pod {
	return &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Annotations: ann},
		Spec: corev1.PodSpec{
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot:   ptrTo(true),
				RunAsUser:      ptrTo(int64(1000)),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{{
				Name: "agent", Image: "curlimages/curl:8.11.1", Command: []string{"sleep", "3600"},
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: ptrTo(false),
					Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				},
			}},
		},
	}
}

func ptrTo[T any](v T) *T { return &v }

func (c *cluster) createPod(t *testing.T, p *corev1.Pod) error {
	t.Helper()
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.kubectlErr(b, "create", "-f", "-")
	return err
}

func (c *cluster) readPod(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	var p corev1.Pod
	if err := json.Unmarshal([]byte(c.kubectl(t, nil, "get", "pod", "-n", ns, name, "-o", "json")), &p); err != nil {
		t.Fatal(err)
	}
	return &p
}

func escrowContainer(t *testing.T, p *corev1.Pod) corev1.Container {
	t.Helper()
	if len(p.Spec.InitContainers) == 0 || p.Spec.InitContainers[0].Name != "escrow" {
		t.Fatalf("%s/%s: escrow is not the first init container", p.Namespace, p.Name)
	}
	return p.Spec.InitContainers[0]
}

func configVolume(p *corev1.Pod) string {
	for _, v := range p.Spec.Volumes {
		if v.Name == "escrow-config" && v.ConfigMap != nil {
			return v.ConfigMap.Name
		}
	}
	return ""
}

// TestProcessIdentityAgainstAPIServer: pods created through a real kube-apiserver, with the real
// webhook registered from the chart. An annotated pod comes back with a shared process namespace,
// escrow with exactly SYS_PTRACE and the config that turns identity.process on;
// an un-annotated one comes back as before. The refusals reach the pod's author with the
// webhook's message, and Pod Security treats the two kinds of pod as docs/kubernetes.md says.
func TestProcessIdentityAgainstAPIServer(t *testing.T) {
	c := startCluster(t)
	c.namespace(t, releaseNS)
	c.namespace(t, "agents", "escrow.dev/inject=enabled")
	c.namespace(t, "agents-baseline", "escrow.dev/inject=enabled", "pod-security.kubernetes.io/enforce=baseline")
	c.namespace(t, "agents-restricted", "escrow.dev/inject=enabled", "pod-security.kubernetes.io/enforce=restricted")
	values := []string{"--set", "agentNamespaces={agents,agents-baseline,agents-restricted}"}
	manifests, err := helmTemplate(t, values...)
	if err != nil {
		t.Fatal(err)
	}
	c.kubectl(t, []byte(manifests), "apply", "-f", "-")
	objs := render(t, values...)
	w := startWebhook(t, objs)
	mwc := one(t, objs, "MutatingWebhookConfiguration").Raw
	for _, wh := range mwc["webhooks"].([]any) {
		wh.(map[string]any)["clientConfig"] = map[string]any{"url": w.url(), "caBundle": base64.StdEncoding.EncodeToString(w.caPEM)}
	}
	b, _ := json.Marshal(mwc)
	c.kubectl(t, b, "replace", "-f", "-")

	on := map[string]string{processAnnotation: "true"}

	t.Run("annotated_pod_shares_its_process_namespace_and_escrow_gets_only_SYS_PTRACE", func(t *testing.T) {
		sent := agentPod("with-process", "agents", on)
		if err := c.createPod(t, sent); err != nil {
			t.Fatalf("refused: %v", err)
		}
		p := c.readPod(t, "agents", "with-process")
		if p.Spec.ShareProcessNamespace == nil || !*p.Spec.ShareProcessNamespace {
			t.Errorf("shareProcessNamespace = %v, want true", p.Spec.ShareProcessNamespace)
		}
		sc := escrowContainer(t, p).SecurityContext
		if sc == nil || sc.Capabilities == nil {
			t.Fatalf("escrow has no security context: %+v", sc)
		}
		if got := sc.Capabilities.Add; !reflect.DeepEqual(got, []corev1.Capability{"SYS_PTRACE"}) {
			t.Errorf("escrow adds %v, want exactly SYS_PTRACE", got)
		}
		if !reflect.DeepEqual(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || *sc.AllowPrivilegeEscalation ||
			!*sc.ReadOnlyRootFilesystem || (sc.Privileged != nil && *sc.Privileged) {
			t.Errorf("escrow's other restrictions were loosened: %+v", sc)
		}
		if sc.RunAsUser == nil || *sc.RunAsUser != 0 || sc.RunAsGroup == nil || *sc.RunAsGroup != 65532 {
			t.Errorf("escrow runs as %v:%v, want 0:65532", sc.RunAsUser, sc.RunAsGroup)
		}
		if cm := configVolume(p); cm != "escrow-config-process" {
			t.Errorf("escrow's config comes from %q, want escrow-config-process", cm)
		} else {
			data := c.kubectl(t, nil, "get", "configmap", "-n", "agents", cm, "-o", "jsonpath={.data.config\\.yaml}")
			if !strings.Contains(data, "process: true") {
				t.Errorf("ConfigMap %s does not turn identity.process on:\n%s", cm, data)
			}
		}
		if !reflect.DeepEqual(p.Spec.Containers[0].SecurityContext, sent.Spec.Containers[0].SecurityContext) {
			t.Errorf("the agent container's security context changed: %+v", p.Spec.Containers[0].SecurityContext)
		}
	})

	t.Run("the_example_pod_of_docs_kubernetes_md_is_accepted", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(repoRoot, "docs", "kubernetes.md"))
		if err != nil {
			t.Fatal(err)
		}
		doc := string(b)
		i := strings.Index(doc, "\n## Process identity\n")
		if i < 0 {
			t.Fatal(`docs/kubernetes.md has no "## Process identity" section`)
		}
		m := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindStringSubmatch(doc[i:])
		if m == nil {
			t.Fatal("the Process identity section has no yaml example")
		}
		c.kubectl(t, []byte(m[1]), "create", "-n", "agents", "-f", "-")
		var meta struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(m[1]), &meta); err != nil {
			t.Fatal(err)
		}
		p := c.readPod(t, "agents", meta.Metadata.Name)
		if p.Spec.ShareProcessNamespace == nil || !*p.Spec.ShareProcessNamespace || configVolume(p) != "escrow-config-process" {
			t.Errorf("the documented pod did not get process identity: shareProcessNamespace %v, config %q", p.Spec.ShareProcessNamespace, configVolume(p))
		}
	})

	t.Run("unannotated_pod_is_injected_as_before", func(t *testing.T) {
		if err := c.createPod(t, agentPod("without-process", "agents", nil)); err != nil {
			t.Fatalf("refused: %v", err)
		}
		p := c.readPod(t, "agents", "without-process")
		if p.Spec.ShareProcessNamespace != nil {
			t.Errorf("shareProcessNamespace = %v, want unset", *p.Spec.ShareProcessNamespace)
		}
		sc := escrowContainer(t, p).SecurityContext
		if len(sc.Capabilities.Add) > 0 || sc.RunAsUser == nil || *sc.RunAsUser != 65532 || !*sc.RunAsNonRoot {
			t.Errorf("escrow's security context is not the restricted default: %+v", sc)
		}
		if cm := configVolume(p); cm != "escrow-config" {
			t.Errorf("escrow's config comes from %q, want escrow-config", cm)
		}
	})

	t.Run("refusals_reach_the_author_with_the_webhooks_reason", func(t *testing.T) {
		shareFalse := agentPod("share-false", "agents", on)
		shareFalse.Spec.ShareProcessNamespace = ptrTo(false)
		badValue := agentPod("bad-value", "agents", map[string]string{processAnnotation: "yes"})
		rootHelper := agentPod("root-helper", "agents", on)
		rootHelper.Spec.Containers = append(rootHelper.Spec.Containers, corev1.Container{
			Name: "helper", Image: "helper:1", SecurityContext: &corev1.SecurityContext{RunAsUser: ptrTo(int64(0)), AllowPrivilegeEscalation: ptrTo(false)},
		})
		tracer := agentPod("tracer", "agents", on)
		tracer.Spec.Containers[0].SecurityContext.Capabilities.Add = []corev1.Capability{"SYS_PTRACE"}
		for _, tc := range []struct {
			pod  *corev1.Pod
			want string
		}{
			{shareFalse, "the pod sets shareProcessNamespace: false"},
			{badValue, `annotation escrow.dev/process-identity: want "true" or "false", got "yes"`},
			{rootHelper, `container "helper" runs as root`},
			{tracer, `container "agent" adds the capability SYS_PTRACE`},
		} {
			err := c.createPod(t, tc.pod)
			if err == nil {
				t.Errorf("%s: created, want refused", tc.pod.Name)
				continue
			}
			t.Logf("%s: %v", tc.pod.Name, err)
			if !strings.Contains(err.Error(), "escrow.dev") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: refused, but not with %q: %v", tc.pod.Name, tc.want, err)
			}
			if _, err := c.kubectlErr(nil, "get", "pod", "-n", "agents", tc.pod.Name); err == nil {
				t.Errorf("%s: stored although refused", tc.pod.Name)
			}
		}
	})

	t.Run("pod_security_levels", func(t *testing.T) {
		// Without process identity the injected pod passes restricted; with it, escrow's
		// SYS_PTRACE (and uid 0) need the privileged level.
		for _, ns := range []string{"agents-restricted", "agents-baseline"} {
			if err := c.createPod(t, agentPod("without-process", ns, nil)); err != nil {
				t.Errorf("%s: the injected pod without process identity is refused: %v", ns, err)
			}
			err := c.createPod(t, agentPod("with-process", ns, on))
			t.Logf("%s: %v", ns, err)
			if err == nil || !strings.Contains(err.Error(), "PodSecurity") || !strings.Contains(err.Error(), "SYS_PTRACE") {
				t.Errorf("%s: the pod with process identity was not refused by PodSecurity for SYS_PTRACE: %v", ns, err)
			}
		}
	})
}
