package k8s_test

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

const (
	// sidecarAdminPortName is the name of the injected escrow container's admin port.
	sidecarAdminPortName = "escrow-admin"
	releaseName          = "escrow"
	releaseNS            = "escrow-system"
)

// object is one rendered manifest.
type object struct {
	APIVersion string         `json:"apiVersion"`
	Kind       string         `json:"kind"`
	Metadata   objectMeta     `json:"metadata"`
	Raw        map[string]any `json:"-"`
	YAML       string         `json:"-"`
}

type objectMeta struct {
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// into decodes the object into a typed view.
func (o object) into(t testing.TB, v any) {
	t.Helper()
	b, err := json.Marshal(o.Raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s/%s: %v", o.Kind, o.Metadata.Name, err)
	}
}

// Typed views of the fields the tests check (a subset of the Kubernetes API types).
type (
	deployment struct {
		Spec struct {
			Replicas *int            `json:"replicas"`
			Selector labelSelector   `json:"selector"`
			Template podTemplateSpec `json:"template"`
		} `json:"spec"`
	}
	podTemplateSpec struct {
		Metadata objectMeta `json:"metadata"`
		Spec     podSpec    `json:"spec"`
	}
	pod struct {
		Metadata objectMeta `json:"metadata"`
		Spec     podSpec    `json:"spec"`
	}
	podSpec struct {
		ServiceAccountName           string           `json:"serviceAccountName"`
		AutomountServiceAccountToken *bool            `json:"automountServiceAccountToken"`
		SecurityContext              *podSecurity     `json:"securityContext"`
		Containers                   []container      `json:"containers"`
		InitContainers               []container      `json:"initContainers"`
		Volumes                      []map[string]any `json:"volumes"`
		Affinity                     *struct {
			PodAntiAffinity map[string]any `json:"podAntiAffinity"`
		} `json:"affinity"`
		HostNetwork bool `json:"hostNetwork"`
	}
	podSecurity struct {
		RunAsNonRoot   *bool           `json:"runAsNonRoot"`
		RunAsUser      *int64          `json:"runAsUser"`
		SeccompProfile *seccompProfile `json:"seccompProfile"`
	}
	seccompProfile struct {
		Type string `json:"type"`
	}
	container struct {
		Name  string   `json:"name"`
		Image string   `json:"image"`
		Args  []string `json:"args"`
		Ports []struct {
			Name          string `json:"name"`
			ContainerPort int    `json:"containerPort"`
		} `json:"ports"`
		RestartPolicy   string           `json:"restartPolicy"`
		Env             []envVar         `json:"env"`
		StartupProbe    map[string]any   `json:"startupProbe"`
		Resources       map[string]any   `json:"resources"`
		VolumeMounts    []map[string]any `json:"volumeMounts"`
		SecurityContext *struct {
			AllowPrivilegeEscalation *bool           `json:"allowPrivilegeEscalation"`
			ReadOnlyRootFilesystem   *bool           `json:"readOnlyRootFilesystem"`
			RunAsNonRoot             *bool           `json:"runAsNonRoot"`
			Privileged               *bool           `json:"privileged"`
			SeccompProfile           *seccompProfile `json:"seccompProfile"`
			Capabilities             *struct {
				Add  []string `json:"add"`
				Drop []string `json:"drop"`
			} `json:"capabilities"`
		} `json:"securityContext"`
	}
	envVar struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	}
	labelSelector struct {
		MatchLabels      map[string]string `json:"matchLabels"`
		MatchExpressions []struct {
			Key      string   `json:"key"`
			Operator string   `json:"operator"`
			Values   []string `json:"values"`
		} `json:"matchExpressions"`
	}
	mutatingWebhookConfiguration struct {
		Webhooks []mutatingWebhook `json:"webhooks"`
	}
	mutatingWebhook struct {
		Name                    string         `json:"name"`
		AdmissionReviewVersions []string       `json:"admissionReviewVersions"`
		SideEffects             string         `json:"sideEffects"`
		FailurePolicy           string         `json:"failurePolicy"`
		ReinvocationPolicy      string         `json:"reinvocationPolicy"`
		TimeoutSeconds          int            `json:"timeoutSeconds"`
		NamespaceSelector       labelSelector  `json:"namespaceSelector"`
		ObjectSelector          labelSelector  `json:"objectSelector"`
		ClientConfig            map[string]any `json:"clientConfig"`
		Rules                   []struct {
			APIGroups   []string `json:"apiGroups"`
			APIVersions []string `json:"apiVersions"`
			Operations  []string `json:"operations"`
			Resources   []string `json:"resources"`
		} `json:"rules"`
	}
)

// matches evaluates a label selector the way the API server does.
func (s labelSelector) matches(labels map[string]string) bool {
	for k, v := range s.MatchLabels {
		if labels[k] != v {
			return false
		}
	}
	for _, e := range s.MatchExpressions {
		v, ok := labels[e.Key]
		in := false
		for _, x := range e.Values {
			if ok && v == x {
				in = true
			}
		}
		switch e.Operator {
		case "In":
			if !in {
				return false
			}
		case "NotIn":
			if in {
				return false
			}
		case "Exists":
			if !ok {
				return false
			}
		case "DoesNotExist":
			if ok {
				return false
			}
		default:
			panic("unknown selector operator " + e.Operator)
		}
	}
	return true
}

// helmTemplate renders the chart as release escrow in escrow-system with extra helm args.
func helmTemplate(t testing.TB, args ...string) (string, error) {
	t.Helper()
	base := []string{"template", releaseName, chartDir, "--namespace", releaseNS}
	return run(t, nil, tool(t, "helm"), append(base, args...)...)
}

// render renders the chart and parses every manifest.
func render(t testing.TB, args ...string) []object {
	t.Helper()
	out, err := helmTemplate(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return parseManifests(t, out)
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

func parseManifests(t testing.TB, s string) []object {
	t.Helper()
	var objs []object
	for _, doc := range docSep.Split(s, -1) {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var raw map[string]any
		if err := yaml.Unmarshal([]byte(doc), &raw); err != nil {
			t.Fatalf("rendered YAML does not parse: %v\n%s", err, doc)
		}
		if raw == nil {
			continue
		}
		var o object
		b, _ := json.Marshal(raw)
		if err := json.Unmarshal(b, &o); err != nil {
			t.Fatal(err)
		}
		o.Raw, o.YAML = raw, doc
		objs = append(objs, o)
	}
	return objs
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func find(objs []object, kind string) []object {
	var r []object
	for _, o := range objs {
		if o.Kind == kind {
			r = append(r, o)
		}
	}
	return r
}

func one(t testing.TB, objs []object, kind string) object {
	t.Helper()
	f := find(objs, kind)
	if len(f) != 1 {
		t.Fatalf("want exactly one %s, got %d", kind, len(f))
	}
	return f[0]
}

func kinds(objs []object) string {
	var k []string
	for _, o := range objs {
		k = append(k, fmt.Sprintf("%s/%s", o.Kind, o.Metadata.Name))
	}
	return strings.Join(k, ", ")
}

// podTemplates returns every pod template the chart renders (Deployments, and any other
// workload kind with spec.template).
func podTemplates(t testing.TB, objs []object) map[string]podTemplateSpec {
	t.Helper()
	r := map[string]podTemplateSpec{}
	for _, o := range objs {
		spec, _ := o.Raw["spec"].(map[string]any)
		if spec == nil || spec["template"] == nil {
			continue
		}
		var d deployment
		o.into(t, &d)
		r[o.Kind+"/"+o.Metadata.Name] = d.Spec.Template
	}
	return r
}
