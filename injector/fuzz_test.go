package injector

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// FuzzMutate feeds arbitrary JSON as a pod. Patch never panics; for anything that decodes as a
// pod, the patch applies to the pod as the API server would send it, the result is exactly the
// injected pod, no container but escrow mounts a volume the injector added (the CA directory
// excepted, read-only), every Secret volume is a valid name mounted read-only below SecretsDir,
// and a second pass changes nothing.
func FuzzMutate(f *testing.F) {
	ins, _ := filepath.Glob("testdata/*.in.yaml")
	for _, p := range ins {
		src, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		js, err := yaml.YAMLToJSON(src)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(js, "agents")
	}
	f.Add([]byte(`{"spec":{"containers":[{"name":"a","env":[{"name":"HTTP_PROXY"}],"volumeMounts":[{"name":"x","mountPath":"/var/run/escrow"}]}]}}`), "agents")
	f.Add([]byte(`{"metadata":{"annotations":{"escrow.dev/no-proxy":",,a,,"}},"spec":{"initContainers":[{"name":"i"}]}}`), "ns")
	f.Add([]byte(`{"spec":{"hostNetwork":true}}`), "ns")
	f.Add([]byte(`{"metadata":{"annotations":{"escrow.dev/process-identity":"true"}},"spec":{"shareProcessNamespace":true,"securityContext":{"runAsUser":1},"containers":[{"name":"a","securityContext":{"allowPrivilegeEscalation":false,"capabilities":{"add":["cap_sys_ptrace"]}}}]}}`), "ns")
	f.Add([]byte(`{"metadata":{"annotations":{"escrow.dev/secrets":" a , b.c,a"}},"spec":{"containers":[{"name":"a","volumeMounts":[{"name":"escrow-secret-0","mountPath":"/x"}]}],"volumes":[{"name":"escrow-secret-0"}]}}`), "ns")
	f.Add([]byte(`{"metadata":{"annotations":{"escrow.dev/secrets":"a,,B_c,`+"\\t"+`"}}}`), "ns")
	f.Add([]byte(`null`), "")
	in := testInjector(f, "testdata/config.yaml")

	f.Fuzz(func(t *testing.T, raw []byte, namespace string) {
		patch, d, err := in.Patch(raw, namespace)
		var pod corev1.Pod
		if json.Unmarshal(raw, &pod) != nil {
			if err == nil {
				t.Fatalf("no error for a body that is not a pod")
			}
			return
		}
		if err != nil {
			t.Fatalf("a decodable pod failed: %v", err)
		}
		switch d.Result {
		case ResultInjected, ResultSkipped, ResultDenied:
		default:
			t.Fatalf("result %q", d.Result)
		}
		if (patch != nil) != (d.Result == ResultInjected) {
			t.Fatalf("result %s with patch %s", d.Result, patch)
		}
		if patch == nil {
			return
		}
		orig, err := json.Marshal(&pod)
		if err != nil {
			t.Fatal(err)
		}
		out := applyPatch(t, orig, patch)
		want, err := json.Marshal(d.Pod)
		if err != nil {
			t.Fatal(err)
		}
		var got corev1.Pod
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("patched pod does not decode: %v", err)
		}
		gotJSON, err := json.Marshal(&got)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(gotJSON, want) {
			t.Fatalf("patched pod differs from the injected pod\npatched:  %s\ninjected: %s", gotJSON, want)
		}
		checkOnlyEscrowMountsWhatWasAdded(t, &pod, d.Pod)
		again, d2, err := in.Patch(out, namespace)
		if err != nil || again != nil {
			t.Fatalf("second pass: patch %s, result %s, err %v", again, d2.Result, err)
		}
	})
}

// FuzzReview feeds arbitrary bytes as an AdmissionReview body. review never panics; it either
// refuses the body as malformed, or answers an AdmissionReview v1 whose response carries the
// request's uid and, when it patches, a JSON patch.
func FuzzReview(f *testing.F) {
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u1","kind":{"version":"v1","kind":"Pod"},"resource":{"version":"v1","resource":"pods"},"operation":"CREATE","namespace":"agents","object":{"metadata":{"name":"a"},"spec":{"containers":[{"name":"a","image":"x"}]}}}}`))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u2","resource":{"version":"v1","resource":"configmaps"},"operation":"CREATE"}}`))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u3","resource":{"version":"v1","resource":"pods"},"operation":"CREATE","object":"not a pod"}}`))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}`))
	f.Add([]byte(`{} {}`))
	f.Add([]byte(`[`))
	in := testInjector(f, "testdata/config.yaml")
	f.Fuzz(func(t *testing.T, body []byte) {
		out, _, err := in.review(body)
		if err != nil {
			if out != nil {
				t.Fatalf("an error with a body: %s", out)
			}
			return
		}
		var ar struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Response   *struct {
				UID       string `json:"uid"`
				PatchType string `json:"patchType"`
				Patch     []byte `json:"patch"`
			} `json:"response"`
		}
		if err := json.Unmarshal(out, &ar); err != nil || ar.Response == nil {
			t.Fatalf("answer is not an AdmissionReview with a response: %s", out)
		}
		if ar.APIVersion != "admission.k8s.io/v1" || ar.Kind != "AdmissionReview" || ar.Response.UID == "" {
			t.Fatalf("answer %s", out)
		}
		var req struct {
			Request struct {
				UID string `json:"uid"`
			} `json:"request"`
		}
		_ = json.Unmarshal(body, &req)
		if req.Request.UID != "" && req.Request.UID != ar.Response.UID {
			t.Fatalf("uid %q answered as %q", req.Request.UID, ar.Response.UID)
		}
		if len(ar.Response.Patch) > 0 {
			var ops []map[string]any
			if ar.Response.PatchType != "JSONPatch" || json.Unmarshal(ar.Response.Patch, &ops) != nil {
				t.Fatalf("patch %q of type %q is not a JSON patch", ar.Response.Patch, ar.Response.PatchType)
			}
		}
	})
}

// checkOnlyEscrowMountsWhatWasAdded fails unless every volume the injection added is mounted by
// escrow's container alone (the CA directory: read-only by the others too), and every Secret
// volume it added is a DNS-1123 label mounted read-only by escrow below SecretsDir.
func checkOnlyEscrowMountsWhatWasAdded(t *testing.T, before, after *corev1.Pod) {
	t.Helper()
	had := map[string]bool{}
	for _, v := range before.Spec.Volumes {
		had[v.Name] = true
	}
	added := map[string]corev1.Volume{}
	for _, v := range after.Spec.Volumes {
		if !had[v.Name] {
			added[v.Name] = v
		}
	}
	containers := append(append([]corev1.Container{}, after.Spec.InitContainers...), after.Spec.Containers...)
	for _, ec := range after.Spec.EphemeralContainers {
		containers = append(containers, corev1.Container(ec.EphemeralContainerCommon))
	}
	for i, c := range containers {
		escrow := i == 0 && c.Name == ContainerName
		for _, m := range c.VolumeMounts {
			v, ok := added[m.Name]
			if !ok {
				continue
			}
			switch {
			case escrow && v.Secret != nil:
				if !m.ReadOnly || m.MountPath != SecretsDir+"/"+v.Secret.SecretName || len(validation.IsDNS1123Label(v.Name)) > 0 {
					t.Fatalf("Secret volume %q mounted as %+v", v.Name, m)
				}
			case escrow:
			case m.Name == VolumeCA && m.ReadOnly:
			default:
				t.Fatalf("container %q mounts %q, which the injection added", c.Name, m.Name)
			}
		}
	}
}
