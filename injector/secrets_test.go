package injector

import (
	"encoding/json"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
)

// The sidecar reads a Credential's Secret reference from the path the controller computes; the
// injector must mount the Secret exactly there.
func TestSecretsDir_IsWhereTheControllerPointsCredentials(t *testing.T) {
	if SecretsDir != v1alpha1.SecretsDir {
		t.Fatalf("injector mounts Secrets at %s, the controller points Credentials at %s", SecretsDir, v1alpha1.SecretsDir)
	}
	ref := v1alpha1.SecretKeyRef{Name: "openai-key", Key: "token"}
	if got, want := v1alpha1.SecretFile(ref), SecretsDir+"/openai-key/token"; got != want {
		t.Fatalf("controller path %s, want %s (the mount of Secret openai-key, key token)", got, want)
	}
}

// secretVolumes returns the pod's volumes of kind secret, by name.
func secretVolumes(pod *corev1.Pod) map[string]corev1.Volume {
	m := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		if v.Secret != nil {
			m[v.Name] = v
		}
	}
	return m
}

func TestMutate_SecretsAreMountedIntoEscrowOnly(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		mode    int32
		escrowU int64
	}{
		{"default", map[string]string{AnnotationSecrets: "b-key, a.key ,b-key"}, 0o444, DefaultRunAsUser},
		{"process identity", map[string]string{AnnotationSecrets: "b-key, a.key ,b-key", AnnotationProcess: "true"}, 0o400, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := testInjector(t, "testdata/config.yaml")
			pod := safePod(tc.ann)
			pod.Spec.Volumes = []corev1.Volume{{Name: "own", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
			out := mustInject(t, in, pod, "agents")
			if len(pod.Spec.Volumes) != 1 {
				t.Fatal("Mutate modified its input")
			}
			esc := out.Spec.InitContainers[0]
			if esc.Name != ContainerName || *esc.SecurityContext.RunAsUser != tc.escrowU {
				t.Fatalf("first init container %s runs as %d, want escrow as %d", esc.Name, *esc.SecurityContext.RunAsUser, tc.escrowU)
			}
			vols := secretVolumes(out)
			if len(vols) != 2 {
				t.Fatalf("%d secret volumes, want 2 (duplicates collapse): %v", len(vols), vols)
			}
			names := map[string]string{} // volume → Secret
			for _, s := range []string{"a.key", "b-key"} {
				vn := secretVolumeName(s)
				v, ok := vols[vn]
				if !ok {
					t.Fatalf("no volume %s for Secret %s", vn, s)
				}
				if errs := validation.IsDNS1123Label(vn); len(errs) > 0 {
					t.Errorf("volume name %q: %v", vn, errs)
				}
				sv := v.Secret
				if sv.SecretName != s || sv.Optional == nil || *sv.Optional || sv.DefaultMode == nil || *sv.DefaultMode != tc.mode || len(sv.Items) != 0 {
					t.Errorf("volume %s = %+v, want Secret %s, optional false, mode %o, every key", vn, sv, s, tc.mode)
				}
				names[vn] = s
			}
			got := map[string]corev1.VolumeMount{}
			for _, m := range esc.VolumeMounts {
				if _, ok := names[m.Name]; ok {
					got[m.Name] = m
				}
			}
			for vn, s := range names {
				m, ok := got[vn]
				if !ok || !m.ReadOnly || m.MountPath != "/var/run/escrow-secrets/"+s || m.SubPath != "" {
					t.Errorf("escrow's mount of %s = %+v, want read-only at /var/run/escrow-secrets/%s", s, m, s)
				}
				if strings.HasPrefix(m.MountPath+"/", config.DefaultCADir+"/") {
					t.Errorf("Secret %s is mounted below ca_dir %s, which the agent's containers mount", s, config.DefaultCADir)
				}
			}
			others := append(append([]corev1.Container{}, out.Spec.InitContainers[1:]...), out.Spec.Containers...)
			if len(others) != 2 {
				t.Fatalf("%d other containers, want the init container and the agent", len(others))
			}
			for _, c := range others {
				for _, m := range c.VolumeMounts {
					if _, ok := names[m.Name]; ok || strings.HasPrefix(m.MountPath, SecretsDir) {
						t.Errorf("%s mounts %s at %s: a Secret reached an agent container", c.Name, m.Name, m.MountPath)
					}
				}
			}
		})
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestMutate_WithoutTheSecretsAnnotationMountsNoSecret(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	out := mustInject(t, in, safePod(nil), "agents")
	if v := secretVolumes(out); len(v) != 0 {
		t.Fatalf("secret volumes %v without %s", v, AnnotationSecrets)
	}
}

func TestMutate_RefusesABadSecretsAnnotation(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	long := strings.Repeat("a", 254)
	for _, tc := range []struct {
		value string
		want  string
	}{
		{"", `injector: annotation escrow.dev/secrets: empty element in "" (want Secret names separated by commas)`},
		{"a,,b", `injector: annotation escrow.dev/secrets: empty element in "a,,b"`},
		{"a, ", `injector: annotation escrow.dev/secrets: empty element in "a, "`},
		{",a", `empty element in ",a"`},
		{"openai-key,Not_A_Secret", `injector: annotation escrow.dev/secrets: "Not_A_Secret" is not a Secret name (a DNS-1123 subdomain`},
		{"a b", `annotation escrow.dev/secrets: "a b" is not a Secret name`},
		{"a;b", `annotation escrow.dev/secrets: "a;b" is not a Secret name`},
		{"../x", `annotation escrow.dev/secrets: "../x" is not a Secret name`},
		{"a/b", `annotation escrow.dev/secrets: "a/b" is not a Secret name`},
		{"-a", `annotation escrow.dev/secrets: "-a" is not a Secret name`},
		{long, `annotation escrow.dev/secrets: "` + long + `" is not a Secret name`},
	} {
		pod := safePod(map[string]string{AnnotationSecrets: tc.value})
		d := in.Mutate(pod, "agents")
		if d.Result != ResultDenied || !strings.Contains(d.Reason, tc.want) || d.Pod != nil {
			t.Errorf("%q: %s %q, want denied with %q", tc.value, d.Result, d.Reason, tc.want)
		}
		if strings.Count(d.Reason, "injector: ") != 1 {
			t.Errorf("%q: reason %q, want one injector: prefix", tc.value, d.Reason)
		}
		if _, ok := pod.Annotations[AnnotationInjected]; ok || len(pod.Spec.Volumes) != 0 {
			t.Errorf("%q: the refused pod was modified", tc.value)
		}
		patch, d, err := in.Patch(mustJSON(t, pod), "agents")
		if err != nil || patch != nil || d.Result != ResultDenied {
			t.Errorf("%q: Patch gave %s, %s, %v; want no patch, denied", tc.value, patch, d.Result, err)
		}
	}
	// The longest valid name is accepted.
	if d := in.Mutate(safePod(map[string]string{AnnotationSecrets: long[:253]}), "agents"); d.Result != ResultInjected {
		t.Errorf("a 253-character name: %s %q", d.Result, d.Reason)
	}
}

func TestMutate_RefusesAContainerThatMountsASecretVolume(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	vn := secretVolumeName("openai-key")
	for _, tc := range []struct {
		name string
		edit func(*corev1.Pod)
		want string
	}{
		{"init container mount", func(p *corev1.Pod) {
			p.Spec.InitContainers[0].VolumeMounts = []corev1.VolumeMount{{Name: vn, MountPath: "/x"}}
		}, `init container "setup" mounts "` + vn + `"`},
		{"container mount", func(p *corev1.Pod) {
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: vn, MountPath: "/x"}}
		}, `container "agent" mounts "` + vn + `"`},
		{"own volume of that name", func(p *corev1.Pod) {
			p.Spec.Volumes = []corev1.Volume{{Name: vn, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
		}, `already has a volume named "` + vn + `"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := safePod(map[string]string{AnnotationSecrets: "openai-key"})
			tc.edit(pod)
			if d := in.Mutate(pod, "agents"); d.Result != ResultDenied || !strings.Contains(d.Reason, tc.want) {
				t.Fatalf("%s %q, want denied with %q", d.Result, d.Reason, tc.want)
			}
			// Without the annotation the name is nobody's: the pod's own business.
			delete(pod.Annotations, AnnotationSecrets)
			if d := in.Mutate(pod, "agents"); d.Result != ResultInjected {
				t.Fatalf("without %s: %s %q, want injected", AnnotationSecrets, d.Result, d.Reason)
			}
		})
	}
}

func TestMutate_SecretsAreInTheInputsHash(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	h := func(v *string) string {
		ann := map[string]string{}
		if v != nil {
			ann[AnnotationSecrets] = *v
		}
		return mustInject(t, in, safePod(ann), "agents").Annotations[AnnotationInjected]
	}
	if h(nil) == h(ptr("a")) || h(ptr("a")) == h(ptr("b")) || h(ptr("a")) == h(ptr("a,b")) {
		t.Error("the inputs hash ignores escrow.dev/secrets")
	}
	if h(ptr("a, b")) != h(ptr("b,a,a")) {
		t.Error("the inputs hash depends on the order or repetition of the same Secrets")
	}
}

func TestConfig_RefusesCADirsOverlappingTheSecretsDir(t *testing.T) {
	for _, tc := range []struct{ yaml, key string }{
		{"ca_dir: /var/run/escrow-secrets", "ca_dir"},
		{"ca_dir: /var/run/escrow-secrets/ca", "ca_dir"},
		{"ca_dir: /var/run", "ca_dir"},
		{"ca_key_dir: /var/run/escrow-secrets/key", "ca_key_dir"},
		{"ca_key_dir: /var", "ca_key_dir"},
	} {
		_, err := ParseConfig([]byte(tc.yaml), Defaults{})
		if err == nil || !strings.Contains(err.Error(), tc.key+": must not be /var/run/escrow-secrets") {
			t.Errorf("%s: err %v, want %s refused", tc.yaml, err, tc.key)
		}
	}
	if _, err := ParseConfig([]byte("ca_dir: /var/run/escrow-secrets-not\nca_key_dir: /run/escrow-secretsx"), Defaults{}); err != nil {
		t.Errorf("sibling directories refused: %v", err)
	}
}
