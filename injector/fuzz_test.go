package injector

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// FuzzMutate feeds arbitrary JSON as a pod. Patch never panics; for anything that decodes as a
// pod, the patch applies to the pod as the API server would send it, the result is exactly the
// injected pod, and a second pass changes nothing.
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
		again, d2, err := in.Patch(out, namespace)
		if err != nil || again != nil {
			t.Fatalf("second pass: patch %s, result %s, err %v", again, d2.Result, err)
		}
	})
}
