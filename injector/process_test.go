package injector

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// safePod is a pod whose containers cannot become root or trace processes: process identity
// may be given to it.
func safePod(ann map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "agent", Annotations: ann},
		Spec: corev1.PodSpec{
			SecurityContext: &corev1.PodSecurityContext{RunAsUser: ptr(int64(1000))},
			InitContainers:  []corev1.Container{{Name: "setup", Image: "setup", SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: ptr(false)}}},
			Containers:      []corev1.Container{{Name: "agent", Image: "agent", SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: ptr(false)}}},
		},
	}
}

func withProcess() map[string]string { return map[string]string{AnnotationProcess: "true"} }

func TestMutate_ProcessIdentitySharesPIDNamespaceAndAddsOnlyTheLookupsCapabilities(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	pod := safePod(withProcess())
	out := mustInject(t, in, pod, "agents")
	if pod.Spec.ShareProcessNamespace != nil {
		t.Fatal("Mutate modified its input")
	}
	if out.Spec.ShareProcessNamespace == nil || !*out.Spec.ShareProcessNamespace {
		t.Errorf("shareProcessNamespace = %v, want true", out.Spec.ShareProcessNamespace)
	}
	s := out.Spec.InitContainers[0].SecurityContext
	if got := s.Capabilities.Add; !reflect.DeepEqual(got, []corev1.Capability{"SYS_PTRACE"}) {
		t.Errorf("escrow adds %v, want exactly SYS_PTRACE", got)
	}
	if !reflect.DeepEqual(s.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("escrow drops %v, want ALL", s.Capabilities.Drop)
	}
	// uid 0: the only way Kubernetes gives a container a capability (see securityContext).
	if *s.RunAsUser != 0 || *s.RunAsNonRoot || *s.RunAsGroup != DefaultRunAsUser {
		t.Errorf("escrow runs as %d:%d (runAsNonRoot %v), want 0:%d", *s.RunAsUser, *s.RunAsGroup, *s.RunAsNonRoot, DefaultRunAsUser)
	}
	if *s.AllowPrivilegeEscalation || !*s.ReadOnlyRootFilesystem || s.Privileged != nil || s.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("escrow's other restrictions were loosened: %+v", s)
	}
	for _, v := range out.Spec.Volumes {
		if v.Name == VolumeConfig && v.ConfigMap.Name != DefaultProcessConfig {
			t.Errorf("config volume from %q, want the process config %q", v.ConfigMap.Name, DefaultProcessConfig)
		}
	}
	// The agent's containers are left as their author wrote them.
	for i, c := range out.Spec.Containers {
		if !reflect.DeepEqual(c.SecurityContext, pod.Spec.Containers[i].SecurityContext) {
			t.Errorf("%s's security context changed", c.Name)
		}
	}
}

func TestMutate_WithoutProcessIdentityNothingChanges(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	for _, ann := range []map[string]string{nil, {AnnotationProcess: "false"}} {
		out := mustInject(t, in, safePod(ann), "agents")
		if out.Spec.ShareProcessNamespace != nil {
			t.Errorf("%v: shareProcessNamespace set", ann)
		}
		s := out.Spec.InitContainers[0].SecurityContext
		if len(s.Capabilities.Add) > 0 || *s.RunAsUser != DefaultRunAsUser || !*s.RunAsNonRoot {
			t.Errorf("%v: escrow's security context is not the restricted default: %+v", ann, s)
		}
	}
	// A pod that process identity would refuse is injected as usual without it.
	pod := &corev1.Pod{Spec: corev1.PodSpec{ShareProcessNamespace: ptr(false), Containers: []corev1.Container{{Name: "root", Image: "x"}}}}
	if d := in.Mutate(pod, "agents"); d.Result != ResultInjected {
		t.Errorf("without process identity: %s (%s)", d.Result, d.Reason)
	}
}

func TestMutate_ProcessIdentityConfigDefaultAndOptOut(t *testing.T) {
	in := testInjector(t, "testdata/process-identity-default-on.config.yaml")
	out := mustInject(t, in, safePod(nil), "agents")
	if out.Spec.ShareProcessNamespace == nil || !*out.Spec.ShareProcessNamespace {
		t.Error("process_identity.enabled did not apply to a pod without the annotation")
	}
	out = mustInject(t, in, safePod(map[string]string{AnnotationProcess: "false"}), "agents")
	if out.Spec.ShareProcessNamespace != nil || len(out.Spec.InitContainers[0].SecurityContext.Capabilities.Add) > 0 {
		t.Error(`escrow.dev/process-identity: "false" did not opt the pod out`)
	}
}

// TestMutate_ProcessIdentityRefusesContainersThatCouldReadEscrow: each way another container
// could pass the kernel's ptrace access check on escrow (uid 0) is refused, naming the
// container and what to change.
func TestMutate_ProcessIdentityRefusesContainersThatCouldReadEscrow(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	for _, tc := range []struct {
		what   string
		change func(p *corev1.Pod)
		want   string
	}{
		{"shareProcessNamespace false", func(p *corev1.Pod) { p.Spec.ShareProcessNamespace = ptr(false) }, "shareProcessNamespace: false"},
		{"hostPID", func(p *corev1.Pod) { p.Spec.HostPID = true }, "hostPID: true"},
		{"root by runAsUser 0", func(p *corev1.Pod) { p.Spec.Containers[0].SecurityContext.RunAsUser = ptr(int64(0)) }, `container "agent" runs as root`},
		{"container uid 0 over the pod's", func(p *corev1.Pod) { p.Spec.InitContainers[0].SecurityContext.RunAsUser = ptr(int64(0)) }, `init container "setup" runs as root`},
		{"no uid and no runAsNonRoot", func(p *corev1.Pod) { p.Spec.SecurityContext = nil }, `container "agent" may run as root`},
		{"runAsNonRoot false overrides the pod's true", func(p *corev1.Pod) {
			p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsNonRoot: ptr(true)}
			p.Spec.Containers[0].SecurityContext.RunAsNonRoot = ptr(false)
		}, `container "agent" may run as root`},
		{"privilege escalation unset", func(p *corev1.Pod) { p.Spec.Containers[0].SecurityContext = nil }, `container "agent" allows privilege escalation`},
		{"privilege escalation true", func(p *corev1.Pod) { p.Spec.Containers[0].SecurityContext.AllowPrivilegeEscalation = ptr(true) }, `container "agent" allows privilege escalation`},
		{"privileged", func(p *corev1.Pod) { p.Spec.Containers[0].SecurityContext.Privileged = ptr(true) }, `container "agent" is privileged`},
		{"SYS_PTRACE", func(p *corev1.Pod) { addCap(p, "SYS_PTRACE") }, "adds the capability SYS_PTRACE"},
		{"cap_sys_ptrace spelled otherwise", func(p *corev1.Pod) { addCap(p, "cap_sys_ptrace") }, "adds the capability cap_sys_ptrace"},
		{"ALL", func(p *corev1.Pod) { addCap(p, "ALL") }, "adds the capability ALL"},
		{"SETUID", func(p *corev1.Pod) { addCap(p, "SETUID") }, "adds the capability SETUID"},
		{"CAP_SETGID", func(p *corev1.Pod) { addCap(p, "CAP_SETGID") }, "adds the capability CAP_SETGID"},
	} {
		pod := safePod(withProcess())
		tc.change(pod)
		d := in.Mutate(pod, "agents")
		if d.Result != ResultDenied || !strings.Contains(d.Reason, tc.want) || !strings.Contains(d.Reason, `escrow.dev/process-identity: "false"`) {
			t.Errorf("%s: %s %q, want denied naming %q and the opt-out", tc.what, d.Result, d.Reason, tc.want)
		}
	}
	// Accepted: each of the ways a container is provably non-root, and capabilities that do not
	// let it pass the check.
	for _, tc := range []struct {
		what   string
		change func(p *corev1.Pod)
	}{
		{"pod runAsUser", func(p *corev1.Pod) {}},
		{"pod runAsNonRoot", func(p *corev1.Pod) {
			p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsNonRoot: ptr(true)}
		}},
		{"container runAsUser", func(p *corev1.Pod) {
			p.Spec.SecurityContext = nil
			p.Spec.InitContainers[0].SecurityContext.RunAsUser = ptr(int64(7))
			p.Spec.Containers[0].SecurityContext.RunAsUser = ptr(int64(1000))
		}},
		{"shareProcessNamespace already true", func(p *corev1.Pod) { p.Spec.ShareProcessNamespace = ptr(true) }},
		{"NET_BIND_SERVICE", func(p *corev1.Pod) { addCap(p, "NET_BIND_SERVICE") }},
	} {
		pod := safePod(withProcess())
		tc.change(pod)
		if d := in.Mutate(pod, "agents"); d.Result != ResultInjected {
			t.Errorf("%s: %s %q, want injected", tc.what, d.Result, d.Reason)
		}
	}
}

func addCap(p *corev1.Pod, c corev1.Capability) {
	sc := p.Spec.Containers[0].SecurityContext
	if sc.Capabilities == nil {
		sc.Capabilities = &corev1.Capabilities{}
	}
	sc.Capabilities.Add = append(sc.Capabilities.Add, c)
}

func TestMutate_ProcessIdentityChangesTheStatusHash(t *testing.T) {
	in := testInjector(t, "testdata/config.yaml")
	h := func(ann map[string]string) string {
		return mustInject(t, in, safePod(ann), "agents").Annotations[AnnotationInjected]
	}
	if h(nil) == h(withProcess()) {
		t.Error("the hash ignores process identity")
	}
	if h(nil) != h(map[string]string{AnnotationProcess: "false"}) {
		t.Error(`"false" with the default config changed the hash`)
	}
}
