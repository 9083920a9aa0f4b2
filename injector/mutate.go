// Package injector is escrow's Kubernetes mutating admission webhook: it adds escrow to a pod as
// a native sidecar, points the pod's other containers at it (proxy and CA trust variables, the
// shared CA volume), and serves that over TLS as AdmissionReview v1. docs/kubernetes.md
// describes what a pod gets.
package injector

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"gomodules.xyz/jsonpatch/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/escrowproxy/escrow/config"
)

// The opt-in label. The webhook configuration's selectors send only opted-in pods; the webhook
// itself honours the pod label "false".
const (
	LabelInject = "escrow.dev/inject"
)

// Annotations a pod may set (all optional), and the one the injector sets.
const (
	AnnotationConfig        = "escrow.dev/config"           // ConfigMap of the escrow config
	AnnotationPolicy        = "escrow.dev/policy"           // ConfigMap of the policies
	AnnotationImage         = "escrow.dev/image"            // escrow's image
	AnnotationCPURequest    = "escrow.dev/cpu-request"      // escrow's CPU request
	AnnotationMemoryRequest = "escrow.dev/memory-request"   // escrow's memory request
	AnnotationCPULimit      = "escrow.dev/cpu-limit"        // escrow's CPU limit
	AnnotationMemoryLimit   = "escrow.dev/memory-limit"     // escrow's memory limit
	AnnotationTrustEnv      = "escrow.dev/trust-env"        // "false": no CA trust variables
	AnnotationNoProxy       = "escrow.dev/no-proxy"         // extra NO_PROXY entries, comma-separated
	AnnotationProcess       = "escrow.dev/process-identity" // "true": escrow finds the calling process
	AnnotationSecrets       = "escrow.dev/secrets"          // Secrets mounted into escrow only, comma-separated
	AnnotationInjected      = "escrow.dev/injected"         // set by the injector: version and inputs hash
)

// Names and paths of what the injector adds.
const (
	ContainerName  = "escrow"
	VolumeConfig   = "escrow-config"
	VolumePolicies = "escrow-policies"
	VolumeCA       = "escrow-ca"
	VolumeCAKey    = "escrow-ca-key"
	VolumeSPIFFE   = "escrow-spiffe"
	AdminPortName  = "escrow-admin"

	// ConfigDir and PoliciesDir are siblings, not nested: a mount point inside a read-only
	// ConfigMap volume cannot be created by the container runtime.
	ConfigDir   = "/etc/escrow/config"
	ConfigKey   = "config.yaml"
	ConfigFile  = ConfigDir + "/" + ConfigKey
	PoliciesDir = "/etc/escrow/policies"
	SPIFFEDir   = "/spiffe-workload-api"

	// SecretsDir is where escrow's container finds the Secrets of escrow.dev/secrets: key K of
	// Secret S is the file SecretsDir/S/K. It is the path the control plane's Credentials
	// resolve to (a test keeps the two equal), deliberately not below ca_dir, which the agent's
	// containers mount (config validation keeps ca_dir and ca_key_dir away from it).
	SecretsDir = "/var/run/escrow-secrets"
	// VolumeSecretPrefix starts the name of each Secret's volume: the prefix and 16 hex digits
	// of the SHA-256 of the Secret's name (a DNS-1123 label of 30 characters, whatever the
	// Secret's name, the same in every pod).
	VolumeSecretPrefix = "escrow-secret-"
)

// Result is the outcome of one admission request, also the metric label (a closed set).
type Result string

// Results.
const (
	ResultInjected Result = "injected"
	ResultSkipped  Result = "skipped"
	ResultDenied   Result = "denied"
	ResultError    Result = "error"
)

// Injector decides and computes what a pod gets. It holds no mutable state.
type Injector struct {
	cfg     Config
	version string
}

// Options configures New.
type Options struct {
	// Config is a parsed, validated configuration (ParseConfig or LoadConfig).
	Config *Config
	// Version is escrow's version, recorded in the status annotation.
	Version string
}

// New returns an Injector for a validated config.
func New(o Options) (*Injector, error) {
	if o.Config == nil {
		return nil, fmt.Errorf("injector: no config")
	}
	if o.Version == "" {
		o.Version = "dev"
	}
	return &Injector{cfg: *o.Config, version: o.Version}, nil
}

// Decision is what Mutate decided.
type Decision struct {
	Result Result
	// Reason says why a pod was skipped or denied (for logs, warnings and the denial message).
	Reason string
	// Pod is the injected pod (Result injected only).
	Pod *corev1.Pod
	// Namespace and Name identify the pod in logs (Name is generateName + "*" when the pod has
	// no name yet); set by the AdmissionReview handling.
	Namespace, Name string
}

// Mutate decides whether pod, created in namespace, gets escrow, and returns the injected copy
// if so. pod is not modified. Annotations with bad values and names that collide with what the
// injector adds are denials (Result denied): injecting anyway would give a pod that is broken or
// not what its author asked for.
func (in *Injector) Mutate(pod *corev1.Pod, namespace string) Decision {
	if r := in.skipReason(pod, namespace); r != "" {
		return Decision{Result: ResultSkipped, Reason: r}
	}
	p, err := in.params(pod.Annotations)
	if err != nil {
		return Decision{Result: ResultDenied, Reason: err.Error()}
	}
	if err := conflicts(pod, p); err != nil {
		return Decision{Result: ResultDenied, Reason: err.Error()}
	}
	if p.ProcessIdentity {
		if err := processConflicts(pod); err != nil {
			return Decision{Result: ResultDenied, Reason: err.Error()}
		}
	}
	out := pod.DeepCopy()
	inject(out, p)
	if out.Annotations == nil {
		out.Annotations = map[string]string{}
	}
	out.Annotations[AnnotationInjected] = fmt.Sprintf("version=%s; inputs=%s", in.version, p.hash())
	return Decision{Result: ResultInjected, Pod: out}
}

// Patch decodes a pod's JSON, decides, and returns the JSON patch (RFC 6902) that turns the pod
// into the injected one; nil when nothing changes. The patch is the diff of the pod as the
// API types encode it before and after the mutation, so fields this build does not know are
// never touched (the API server encodes the object it sends with the same types' fields).
func (in *Injector) Patch(raw []byte, namespace string) ([]byte, Decision, error) {
	var pod corev1.Pod
	if err := json.Unmarshal(raw, &pod); err != nil {
		return nil, Decision{Result: ResultError, Reason: "the object is not a pod"}, fmt.Errorf("injector: decode pod: %w", err)
	}
	d := in.Mutate(&pod, namespace)
	d.Namespace, d.Name = namespace, pod.Name
	if d.Name == "" && pod.GenerateName != "" {
		d.Name = pod.GenerateName + "*"
	}
	if d.Result != ResultInjected {
		return nil, d, nil
	}
	before, err := json.Marshal(&pod)
	if err != nil {
		return nil, Decision{Result: ResultError}, fmt.Errorf("injector: encode pod: %w", err)
	}
	after, err := json.Marshal(d.Pod)
	if err != nil {
		return nil, Decision{Result: ResultError}, fmt.Errorf("injector: encode injected pod: %w", err)
	}
	ops, err := jsonpatch.CreatePatch(before, after)
	if err != nil {
		return nil, Decision{Result: ResultError}, fmt.Errorf("injector: diff: %w", err)
	}
	if len(ops) == 0 {
		return nil, d, nil
	}
	patch, err := json.Marshal(ops)
	if err != nil {
		return nil, Decision{Result: ResultError}, fmt.Errorf("injector: encode patch: %w", err)
	}
	return patch, d, nil
}

func (in *Injector) skipReason(pod *corev1.Pod, namespace string) string {
	switch {
	case namespace == in.cfg.Namespace:
		return "pod in the webhook's own namespace " + namespace
	case pod.Labels[LabelInject] == "false":
		return "pod label " + LabelInject + "=false"
	case pod.Spec.HostNetwork:
		return "hostNetwork pod: escrow's loopback listener would be the node's"
	case pod.Annotations[AnnotationInjected] != "":
		return "already injected (" + AnnotationInjected + " is set)"
	}
	for _, c := range pod.Spec.InitContainers {
		if c.Name == ContainerName {
			return "already has a container named " + ContainerName
		}
	}
	for _, c := range pod.Spec.Containers {
		if c.Name == ContainerName {
			return "already has a container named " + ContainerName
		}
	}
	return ""
}

// conflicts refuses a pod that already uses a volume name the injector adds, or whose containers
// mount one. Such a mount names no volume before injection, but would be valid after it: an
// agent container could then read the CA key, the Workload API socket and with it the pod's
// SVIDs, or a Secret of escrow.dev/secrets, which only escrow may hold.
func conflicts(pod *corev1.Pod, p *params) error {
	ours := map[string]bool{VolumeConfig: true, VolumePolicies: true, VolumeCA: true, VolumeCAKey: true, VolumeSPIFFE: true}
	for _, s := range p.Secrets {
		ours[secretVolumeName(s)] = true
	}
	for _, v := range pod.Spec.Volumes {
		if ours[v.Name] {
			return fmt.Errorf("injector: the pod already has a volume named %q, which escrow's injection uses", v.Name)
		}
	}
	check := func(kind string, c *corev1.Container) error {
		for _, m := range c.VolumeMounts {
			if ours[m.Name] {
				return fmt.Errorf("injector: %s %q mounts %q, a volume only escrow's injection may mount", kind, c.Name, m.Name)
			}
		}
		for _, d := range c.VolumeDevices {
			if ours[d.Name] {
				return fmt.Errorf("injector: %s %q uses %q, a volume only escrow's injection may mount", kind, c.Name, d.Name)
			}
		}
		return nil
	}
	for i := range pod.Spec.InitContainers {
		if err := check("init container", &pod.Spec.InitContainers[i]); err != nil {
			return err
		}
	}
	for i := range pod.Spec.Containers {
		if err := check("container", &pod.Spec.Containers[i]); err != nil {
			return err
		}
	}
	for i := range pod.Spec.EphemeralContainers {
		ec := corev1.Container(pod.Spec.EphemeralContainers[i].EphemeralContainerCommon)
		if err := check("ephemeral container", &ec); err != nil {
			return err
		}
	}
	return nil
}

// params is everything the injection depends on besides the pod itself: the config with the
// pod's annotations applied. Its hash goes into the status annotation.
type params struct {
	Image           string            `json:"image"`
	PullPolicy      string            `json:"pull_policy"`
	Requests        map[string]string `json:"requests"`
	Limits          map[string]string `json:"limits"`
	ConfigMap       string            `json:"config_map"`
	PolicyConfigMap string            `json:"policy_config_map"`
	TrustEnv        bool              `json:"trust_env"`
	NoProxy         []string          `json:"no_proxy"`
	ProxyPort       int               `json:"proxy_port"`
	AdminPort       int               `json:"admin_port"`
	RunAsUser       int64             `json:"run_as_user"`
	CADir           string            `json:"ca_dir"`
	CAKeyDir        string            `json:"ca_key_dir"`
	SPIFFE          SPIFFE            `json:"spiffe"`
	// omitempty: pods without them keep the inputs hash they had before the features existed.
	ProcessIdentity bool     `json:"process_identity,omitempty"`
	Secrets         []string `json:"secrets,omitempty"` // sorted, no duplicates

	resources corev1.ResourceRequirements
}

func (p *params) hash() string {
	b, _ := json.Marshal(p) // maps are encoded with sorted keys: stable
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:8])
}

func (in *Injector) params(ann map[string]string) (*params, error) {
	c := in.cfg
	p := &params{
		Image:           c.Image,
		PullPolicy:      c.ImagePullPolicy,
		Requests:        map[string]string{},
		Limits:          map[string]string{},
		ConfigMap:       c.ConfigMap,
		PolicyConfigMap: c.PolicyConfigMap,
		TrustEnv:        c.TrustEnv == nil || *c.TrustEnv,
		ProxyPort:       c.ProxyPort,
		AdminPort:       c.AdminPort,
		RunAsUser:       c.RunAsUser,
		CADir:           c.CADir,
		CAKeyDir:        c.CAKeyDir,
		SPIFFE:          c.SPIFFE,
		ProcessIdentity: c.ProcessIdentity.Enabled,
	}
	for k, v := range c.Resources.Requests {
		p.Requests[k] = string(v)
	}
	for k, v := range c.Resources.Limits {
		p.Limits[k] = string(v)
	}
	var errs []string
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Sprintf("annotation %s: ", key)+fmt.Sprintf(format, a...))
	}
	if v, ok := ann[AnnotationProcess]; ok {
		switch v {
		case "true":
			p.ProcessIdentity = true
		case "false":
			p.ProcessIdentity = false
		default:
			bad(AnnotationProcess, "want \"true\" or \"false\", got %q", v)
		}
	}
	if p.ProcessIdentity {
		// The default config with identity.process: true; a pod's own config (below) wins.
		p.ConfigMap = c.ProcessIdentity.ConfigMap
	}
	if v, ok := ann[AnnotationConfig]; ok {
		if msgs := validation.IsDNS1123Subdomain(v); len(msgs) > 0 {
			bad(AnnotationConfig, "%q is not a ConfigMap name", v)
		}
		p.ConfigMap = v
	}
	if v, ok := ann[AnnotationPolicy]; ok {
		if msgs := validation.IsDNS1123Subdomain(v); len(msgs) > 0 {
			bad(AnnotationPolicy, "%q is not a ConfigMap name", v)
		}
		p.PolicyConfigMap = v
	}
	if v, ok := ann[AnnotationImage]; ok {
		if msg := checkImage(v); msg != "" {
			bad(AnnotationImage, "%s", msg)
		}
		p.Image = v
	}
	for _, r := range []struct {
		key  string
		m    map[string]string
		name corev1.ResourceName
	}{
		{AnnotationCPURequest, p.Requests, corev1.ResourceCPU},
		{AnnotationMemoryRequest, p.Requests, corev1.ResourceMemory},
		{AnnotationCPULimit, p.Limits, corev1.ResourceCPU},
		{AnnotationMemoryLimit, p.Limits, corev1.ResourceMemory},
	} {
		v, ok := ann[r.key]
		if !ok {
			continue
		}
		if q, err := resource.ParseQuantity(v); err != nil || q.Sign() < 0 {
			bad(r.key, "%q is not a quantity (e.g. 100m, 64Mi)", v)
			continue
		}
		r.m[string(r.name)] = v
	}
	if v, ok := ann[AnnotationTrustEnv]; ok {
		switch v {
		case "true":
			p.TrustEnv = true
		case "false":
			p.TrustEnv = false
		default:
			bad(AnnotationTrustEnv, "want \"true\" or \"false\", got %q", v)
		}
	}
	if v, ok := ann[AnnotationSecrets]; ok {
		names, msgs := parseSecrets(v)
		for _, m := range msgs {
			bad(AnnotationSecrets, "%s", m)
		}
		p.Secrets = names
	}
	p.NoProxy = noProxyBase()
	for _, cidr := range c.ServiceCIDRs {
		p.NoProxy = appendNew(p.NoProxy, cidr)
	}
	for _, e := range c.NoProxy {
		p.NoProxy = appendNew(p.NoProxy, e)
	}
	if v, ok := ann[AnnotationNoProxy]; ok {
		for e := range strings.SplitSeq(v, ",") {
			e = strings.TrimSpace(e)
			if e == "" {
				continue
			}
			if msg := checkNoProxyEntry(e); msg != "" {
				bad(AnnotationNoProxy, "%s", msg)
				continue
			}
			p.NoProxy = appendNew(p.NoProxy, e)
		}
	}
	if len(errs) == 0 {
		rr, err := buildResources(toQuantities(p.Requests), toQuantities(p.Limits))
		if err != nil {
			errs = append(errs, "escrow's resources: "+err.Error())
		}
		p.resources = rr
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("injector: %s", strings.Join(errs, "; "))
	}
	return p, nil
}

// parseSecrets reads escrow.dev/secrets: Secret names separated by commas, with spaces around
// the commas allowed. It returns the names sorted with duplicates collapsed (so the inputs hash
// and the pod do not depend on their order), and a message for each bad element.
func parseSecrets(v string) ([]string, []string) {
	var names, msgs []string
	seen := map[string]bool{}
	for e := range strings.SplitSeq(v, ",") {
		e = strings.TrimSpace(e)
		switch {
		case e == "":
			msgs = append(msgs, fmt.Sprintf("empty element in %q (want Secret names separated by commas)", v))
		case len(validation.IsDNS1123Subdomain(e)) > 0:
			msgs = append(msgs, fmt.Sprintf("%q is not a Secret name (a DNS-1123 subdomain: at most 253 lower-case letters, digits, '-' and '.')", e))
		case !seen[e]:
			seen[e] = true
			names = append(names, e)
		}
	}
	slices.Sort(names)
	return names, msgs
}

// secretVolumeName is the name of Secret s's volume: VolumeSecretPrefix and a hash of s. A
// hash rather than s itself because a Secret name may be 253 characters and contain dots,
// which a volume name (a DNS-1123 label) may not; rather than an index because the name then
// does not depend on the other Secrets listed. Two Secrets whose 64-bit hashes collide would
// give two volumes of one name, which the API server refuses: the pod fails closed.
func secretVolumeName(s string) string {
	sum := sha256.Sum256([]byte(s))
	return VolumeSecretPrefix + hex.EncodeToString(sum[:8])
}

// secretMode is the mode of the Secrets' files. The kubelet writes a secret volume's files
// owned by uid 0 and gid 0, or the pod's fsGroup, in which case it also adds group read
// (0440) whatever the mode. With process identity escrow runs as uid 0, the files' owner:
// 0400. Otherwise escrow runs as run_as_user, neither the owner nor (without an fsGroup) in
// the group, so only the others bit lets it read: 0444. That reaches no one else: the volume
// is mounted in escrow's container alone, whose only process is escrow, and no other
// container has a path to it.
func secretMode(p *params) int32 {
	if p.ProcessIdentity {
		return 0o400
	}
	return 0o444
}

func toQuantities(m map[string]string) map[string]Quantity {
	out := make(map[string]Quantity, len(m))
	for k, v := range m {
		out[k] = Quantity(v)
	}
	return out
}

// noProxyBase is what never goes through escrow: loopback (escrow itself) and in-cluster names.
func noProxyBase() []string {
	return []string{"127.0.0.1", "localhost", "::1", ".svc", ".cluster.local"}
}

func appendNew(l []string, s string) []string {
	for _, e := range l {
		if e == s {
			return l
		}
	}
	return append(l, s)
}

// inject adds escrow and its volumes to pod and points every other container at it.
func inject(pod *corev1.Pod, p *params) {
	spec := &pod.Spec
	// Every existing init container runs after escrow (it is first), so each gets the same
	// environment as the app containers.
	for i := range spec.InitContainers {
		wire(&spec.InitContainers[i], p)
	}
	for i := range spec.Containers {
		wire(&spec.Containers[i], p)
	}
	spec.InitContainers = append([]corev1.Container{sidecar(p)}, spec.InitContainers...)
	spec.Volumes = append(spec.Volumes, volumes(p)...)
	if p.ProcessIdentity {
		spec.ShareProcessNamespace = ptr(true)
	}
}

func sidecar(p *params) corev1.Container {
	always := corev1.ContainerRestartPolicyAlways
	admin := intstr.FromInt32(int32(p.AdminPort))
	probe := func(path string, period, failures int32) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: admin, Scheme: corev1.URISchemeHTTP}},
			PeriodSeconds:    period,
			TimeoutSeconds:   1,
			SuccessThreshold: 1,
			FailureThreshold: failures,
		}
	}
	return corev1.Container{
		Name:            ContainerName,
		Image:           p.Image,
		ImagePullPolicy: corev1.PullPolicy(p.PullPolicy),
		Args:            []string{"proxy", "--config", ConfigFile},
		Env: []corev1.EnvVar{
			{Name: "SPIFFE_ENDPOINT_SOCKET", Value: "unix://" + SPIFFEDir + "/" + p.SPIFFE.SocketName},
		},
		Ports:     []corev1.ContainerPort{{Name: AdminPortName, ContainerPort: int32(p.AdminPort), Protocol: corev1.ProtocolTCP}},
		Resources: p.resources,
		// A native sidecar: started before, and kept running beside, the app containers.
		RestartPolicy: &always,
		// No later init container and no app container starts before escrow serves; up to
		// two minutes (policy load, first SVID).
		StartupProbe:             probe("/readyz", 1, 120),
		ReadinessProbe:           probe("/readyz", 5, 3),
		LivenessProbe:            probe("/healthz", 10, 3),
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
		SecurityContext:          securityContext(p),
		VolumeMounts:             sidecarMounts(p),
	}
}

func sidecarMounts(p *params) []corev1.VolumeMount {
	m := []corev1.VolumeMount{
		{Name: VolumeConfig, MountPath: ConfigDir, ReadOnly: true},
		{Name: VolumePolicies, MountPath: PoliciesDir, ReadOnly: true},
		{Name: VolumeCA, MountPath: p.CADir},
		{Name: VolumeCAKey, MountPath: p.CAKeyDir},
		{Name: VolumeSPIFFE, MountPath: SPIFFEDir, ReadOnly: true},
	}
	// The Secrets of escrow.dev/secrets: here, in escrow's container, and nowhere else.
	for _, s := range p.Secrets {
		m = append(m, corev1.VolumeMount{Name: secretVolumeName(s), MountPath: SecretsDir + "/" + s, ReadOnly: true})
	}
	return m
}

// processCapabilities returns the capabilities escrow's lookup of the calling process needs,
// and all it gets besides the default of none (docs/kubernetes.md, "Process identity"):
// CAP_SYS_PTRACE passes the kernel's ptrace access check (PTRACE_MODE_READ_FSCREDS) that
// guards /proc/<pid>/fdinfo and /proc/<pid>/exe of another uid's process. That is all the
// lookup reads on Linux 5.14 and later: it finds the socket's inode in fdinfo, so it does not
// need to list /proc/<pid>/fd (mode 0500, owned by the process's uid), which would take
// CAP_DAC_OVERRIDE as well.
func processCapabilities() []corev1.Capability {
	return []corev1.Capability{"SYS_PTRACE"}
}

// securityContext is escrow's container security context. By default: its own non-root uid,
// no capability, no privilege escalation, a read-only root filesystem, RuntimeDefault seccomp
// (the restricted Pod Security profile). With process identity: uid 0 with only
// processCapabilities, because Kubernetes cannot give a capability to a non-root container
// (the runtimes put added capabilities in the bounding set, not the ambient one, and the
// kernel clears them when a non-root uid executes escrow: kubernetes/kubernetes#56374; file
// capabilities on escrow's binary would need allowPrivilegeEscalation, as no_new_privs ignores
// them); its group stays run_as_user.
func securityContext(p *params) *corev1.SecurityContext {
	sc := &corev1.SecurityContext{
		RunAsNonRoot:             ptr(true),
		RunAsUser:                ptr(p.RunAsUser),
		RunAsGroup:               ptr(p.RunAsUser),
		ReadOnlyRootFilesystem:   ptr(true),
		AllowPrivilegeEscalation: ptr(false),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
	if p.ProcessIdentity {
		sc.RunAsNonRoot = ptr(false)
		sc.RunAsUser = ptr(int64(0))
		sc.Capabilities.Add = processCapabilities()
	}
	return sc
}

// processConflicts refuses a pod in which process identity would not work, or in which another
// container could read escrow's memory once they share a process namespace. The kernel lets a
// process read another's memory, environment, file descriptors and root directory
// (/proc/<pid>/mem, environ, fd, root: PTRACE_MODE_READ or ATTACH) if it has CAP_SYS_PTRACE or
// the same uids and gids. Escrow runs as uid 0 here, so every other container must be unable
// to become root or to gain CAP_SYS_PTRACE: not privileged, no added SYS_PTRACE, SETUID,
// SETGID or ALL, provably non-root (the webhook cannot see an image's USER), and no privilege
// escalation (a set-user-ID-root binary would give it uid 0).
func processConflicts(pod *corev1.Pod) error {
	var errs []string
	spec := &pod.Spec
	if spec.ShareProcessNamespace != nil && !*spec.ShareProcessNamespace {
		errs = append(errs, "the pod sets shareProcessNamespace: false, and escrow can find the calling process only in a shared process namespace: remove the field")
	}
	if spec.HostPID {
		errs = append(errs, "the pod sets hostPID: true: escrow would run with its capabilities among the node's processes")
	}
	var psc corev1.PodSecurityContext
	if spec.SecurityContext != nil {
		psc = *spec.SecurityContext
	}
	check := func(kind string, c *corev1.Container) {
		var why []string
		sc := c.SecurityContext
		if sc == nil {
			sc = &corev1.SecurityContext{}
		}
		if sc.Privileged != nil && *sc.Privileged {
			why = append(why, "is privileged")
		}
		if sc.Capabilities != nil {
			for _, cp := range sc.Capabilities.Add {
				switch strings.TrimPrefix(strings.ToUpper(string(cp)), "CAP_") {
				case "ALL", "SYS_PTRACE", "SETUID", "SETGID":
					why = append(why, fmt.Sprintf("adds the capability %s", cp))
				}
			}
		}
		uid, nonRoot := psc.RunAsUser, psc.RunAsNonRoot
		if sc.RunAsUser != nil {
			uid = sc.RunAsUser
		}
		if sc.RunAsNonRoot != nil {
			nonRoot = sc.RunAsNonRoot
		}
		switch {
		case uid != nil && *uid == 0:
			why = append(why, "runs as root (runAsUser: 0)")
		case uid == nil && (nonRoot == nil || !*nonRoot):
			why = append(why, "may run as root (set runAsNonRoot: true or a runAsUser other than 0; the webhook cannot see the image's user)")
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			why = append(why, "allows privilege escalation (set allowPrivilegeEscalation: false)")
		}
		if len(why) > 0 {
			errs = append(errs, fmt.Sprintf("%s %q %s", kind, c.Name, strings.Join(why, ", ")))
		}
	}
	for i := range spec.InitContainers {
		check("init container", &spec.InitContainers[i])
	}
	for i := range spec.Containers {
		check("container", &spec.Containers[i])
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("injector: process identity (%s) refused: %s. Escrow would share the pod's process namespace "+
		"and run as uid 0 with CAP_SYS_PTRACE, so no other container may be able to become root or trace processes "+
		"(docs/kubernetes.md). Fix the pod, or set %s: \"false\"", AnnotationProcess, strings.Join(errs, "; "), AnnotationProcess)
}

func volumes(p *params) []corev1.Volume {
	keySize := resource.MustParse("1Mi")
	spiffe := corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: p.SPIFFE.CSIDriver, ReadOnly: ptr(true)}}
	if p.SPIFFE.Source == SourceHostPath {
		dir := corev1.HostPathDirectory
		spiffe = corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: p.SPIFFE.HostPath, Type: &dir}}
	}
	vols := []corev1.Volume{
		{Name: VolumeConfig, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: p.ConfigMap}}}},
		{Name: VolumePolicies, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: p.PolicyConfigMap}}}},
		{Name: VolumeCA, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		// The CA key: in RAM, mounted into escrow's container only.
		{Name: VolumeCAKey, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{
			Medium: corev1.StorageMediumMemory, SizeLimit: &keySize}}},
		{Name: VolumeSPIFFE, VolumeSource: spiffe},
	}
	mode := secretMode(p)
	for _, s := range p.Secrets {
		// Not optional: a missing Secret keeps the pod from starting, with an event naming it,
		// rather than escrow starting without a credential it was given.
		vols = append(vols, corev1.Volume{Name: secretVolumeName(s), VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: s, DefaultMode: ptr(mode), Optional: ptr(false)}}})
	}
	return vols
}

// wire gives a container (not escrow) the proxy and trust variables and the CA volume,
// read-only. A variable the container already sets is left as it is; for the proxy variables,
// setting either spelling (HTTP_PROXY or http_proxy) counts, so that the two never disagree.
func wire(c *corev1.Container, p *params) {
	proxyURL := "http://127.0.0.1:" + strconv.Itoa(p.ProxyPort)
	noProxy := strings.Join(p.NoProxy, ",")
	set := map[string]bool{}
	for _, e := range c.Env {
		set[e.Name] = true
	}
	add := func(names []string, value string) {
		for _, n := range names {
			if set[n] {
				return
			}
		}
		for _, n := range names {
			c.Env = append(c.Env, corev1.EnvVar{Name: n, Value: value})
		}
	}
	add([]string{"HTTP_PROXY", "http_proxy"}, proxyURL)
	add([]string{"HTTPS_PROXY", "https_proxy"}, proxyURL)
	add([]string{"NO_PROXY", "no_proxy"}, noProxy)
	add([]string{"NODE_USE_ENV_PROXY"}, "1")
	if p.TrustEnv {
		bundle := p.CADir + "/" + config.TrustBundleFile
		for _, n := range []string{"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "AWS_CA_BUNDLE"} {
			add([]string{n}, bundle)
		}
		// Node adds NODE_EXTRA_CA_CERTS to its own roots, so the pod CA alone is enough there.
		add([]string{"NODE_EXTRA_CA_CERTS"}, p.CADir+"/"+config.CACertFile)
	}
	for _, m := range c.VolumeMounts {
		if m.MountPath == p.CADir || m.Name == VolumeCA {
			return // the container's own mount wins; two mounts on one path would be invalid
		}
	}
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: VolumeCA, MountPath: p.CADir, ReadOnly: true})
}

func ptr[T any](v T) *T { return &v }
