package injector

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/escrowproxy/escrow/config"
)

// SPIFFE socket sources.
const (
	SourceCSI      = "csi"
	SourceHostPath = "hostPath"
)

// Defaults of the injector's configuration (documented in docs/kubernetes.md).
const (
	DefaultImageRepo       = "escrowproxy/escrow"
	DefaultPullPolicy      = corev1.PullIfNotPresent
	DefaultConfigMap       = "escrow-config"
	DefaultProcessConfig   = "escrow-config-process"
	DefaultPolicyConfigMap = "escrow-policies"
	DefaultNamespace       = "escrow-system"
	DefaultCAKeyDir        = "/var/run/escrow-ca-key"
	DefaultRunAsUser       = 65532
	DefaultCSIDriver       = "csi.spiffe.io"
	DefaultSocketName      = "spire-agent.sock"
)

// DefaultProxyPort and DefaultAdminPort are the ports of config.DefaultListen and
// config.DefaultAdmin (a test keeps them equal).
const (
	DefaultProxyPort = 15480
	DefaultAdminPort = 15481
)

// Config is the injector's configuration file. Every key is optional; see docs/kubernetes.md.
type Config struct {
	// Image is escrow's image, by tag or digest.
	Image string `json:"image,omitempty"`
	// ImagePullPolicy is Always, IfNotPresent or Never.
	ImagePullPolicy string `json:"image_pull_policy,omitempty"`
	// Resources are escrow's requests and limits. A map given here replaces the default map.
	Resources Resources `json:"resources,omitempty"`
	// ProxyPort is the port of escrow's listen address (HTTP_PROXY); AdminPort that of its admin
	// address (/readyz, /metrics), which the probes use.
	ProxyPort int `json:"proxy_port,omitempty"`
	AdminPort int `json:"admin_port,omitempty"`
	// RunAsUser is escrow's uid (and gid); never 0. With process identity it is only the gid:
	// escrow then runs as uid 0 (see securityContext).
	RunAsUser int64 `json:"run_as_user,omitempty"`
	// ConfigMap and PolicyConfigMap are the default ConfigMaps (in the pod's namespace) of the
	// escrow config (key config.yaml) and of the policies.
	ConfigMap       string `json:"config_map,omitempty"`
	PolicyConfigMap string `json:"policy_config_map,omitempty"`
	// CADir is where escrow writes ca.crt and trust-bundle.pem; it must match the escrow
	// config's ca_dir. CAKeyDir is where it keeps the CA key (the escrow config's ca_key_dir).
	CADir    string `json:"ca_dir,omitempty"`
	CAKeyDir string `json:"ca_key_dir,omitempty"`
	// ServiceCIDRs are the cluster's service ranges, and NoProxy extra entries, for NO_PROXY.
	ServiceCIDRs []string `json:"service_cidrs,omitempty"`
	NoProxy      []string `json:"no_proxy,omitempty"`
	// Namespace is the webhook's own namespace, whose pods are never injected.
	Namespace string `json:"namespace,omitempty"`
	// SPIFFE says where the Workload API socket comes from.
	SPIFFE SPIFFE `json:"spiffe,omitempty"`
	// TrustEnv sets the CA trust variables on the agent's containers (default true).
	TrustEnv *bool `json:"trust_env,omitempty"`
	// ProcessIdentity lets escrow find the calling process (its identity.process).
	ProcessIdentity ProcessIdentity `json:"process_identity,omitempty"`
}

// ProcessIdentity is escrow's lookup of the calling process in injected pods: a shared process
// namespace, and escrow running with the one capability the lookup needs, SYS_PTRACE
// (docs/kubernetes.md, docs/security.md). Off by default.
type ProcessIdentity struct {
	// Enabled turns it on for every injected pod; the escrow.dev/process-identity annotation
	// overrides it for one pod, either way.
	Enabled bool `json:"enabled,omitempty"`
	// ConfigMap is the escrow config's ConfigMap mounted when process identity is on, in place
	// of config_map: its config must say identity.process: true (the chart renders one). A pod's
	// escrow.dev/config annotation wins over both.
	ConfigMap string `json:"config_map,omitempty"`
}

// Resources are quantities by resource name (cpu, memory, ephemeral-storage).
type Resources struct {
	Requests map[string]Quantity `json:"requests,omitempty"`
	Limits   map[string]Quantity `json:"limits,omitempty"`
}

// Quantity is a resource quantity written as a string ("100m", "64Mi") or a plain number.
type Quantity string

// UnmarshalJSON accepts a string or a number.
func (q *Quantity) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		*q = Quantity(s)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return errors.New("want a quantity such as \"100m\" or \"64Mi\"")
	}
	*q = Quantity(n.String())
	return nil
}

// CheckShape accepts a string or a number (config.Shaper).
func (q *Quantity) CheckShape(v any) string {
	switch v.(type) {
	case string, float64:
		return ""
	}
	return "want a quantity such as \"100m\" or \"64Mi\", got " + config.KindOf(v)
}

// SPIFFE is the Workload API socket's volume.
type SPIFFE struct {
	// Source is csi (the SPIFFE CSI driver) or hostPath.
	Source string `json:"source,omitempty"`
	// CSIDriver is the CSI driver's name (source csi).
	CSIDriver string `json:"csi_driver,omitempty"`
	// HostPath is the node directory holding the socket (source hostPath; required there).
	HostPath string `json:"host_path,omitempty"`
	// SocketName is the socket's file name in that directory.
	SocketName string `json:"socket_name,omitempty"`
}

// Defaults are the values that depend on where the webhook runs.
type Defaults struct {
	// Image is used when the file sets none; empty means DefaultImageRepo:latest.
	Image string
	// Namespace is used when the file sets none (e.g. the pod's own namespace from the downward
	// API); empty means DefaultNamespace.
	Namespace string
}

// LoadConfig reads and parses the file at path; an empty path means all defaults.
func LoadConfig(path string, d Defaults) (*Config, error) {
	if path == "" {
		return ParseConfig(nil, d)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("injector: %w", err)
	}
	return ParseConfig(data, d)
}

// ParseConfig parses YAML (or JSON), rejects unknown keys, fills defaults and validates, the way
// escrow's own config is read (config.Decode). The error, if any, is a config.Errors naming
// every bad key path at once.
func ParseConfig(data []byte, d Defaults) (*Config, error) {
	var c Config
	shape, err := config.Decode(data, &c)
	if err != nil {
		return nil, fmt.Errorf("injector: %w", err)
	}
	c.applyDefaults(d)
	if errs := config.Combine(shape, c.validate()); len(errs) > 0 {
		return nil, errs
	}
	return &c, nil
}

func (c *Config) applyDefaults(d Defaults) {
	if c.Image == "" {
		c.Image = d.Image
	}
	if c.Image == "" {
		c.Image = DefaultImageRepo + ":latest"
	}
	if c.ImagePullPolicy == "" {
		c.ImagePullPolicy = string(DefaultPullPolicy)
	}
	if c.Resources.Requests == nil {
		c.Resources.Requests = map[string]Quantity{"cpu": "50m", "memory": "64Mi"}
	}
	if c.Resources.Limits == nil {
		c.Resources.Limits = map[string]Quantity{"memory": "256Mi"}
	}
	if c.ProxyPort == 0 {
		c.ProxyPort = DefaultProxyPort
	}
	if c.AdminPort == 0 {
		c.AdminPort = DefaultAdminPort
	}
	if c.RunAsUser == 0 {
		c.RunAsUser = DefaultRunAsUser
	}
	if c.ConfigMap == "" {
		c.ConfigMap = DefaultConfigMap
	}
	if c.PolicyConfigMap == "" {
		c.PolicyConfigMap = DefaultPolicyConfigMap
	}
	if c.ProcessIdentity.ConfigMap == "" {
		c.ProcessIdentity.ConfigMap = DefaultProcessConfig
	}
	if c.CADir == "" {
		c.CADir = config.DefaultCADir
	}
	if c.CAKeyDir == "" {
		c.CAKeyDir = DefaultCAKeyDir
	}
	if c.Namespace == "" {
		c.Namespace = d.Namespace
	}
	if c.Namespace == "" {
		c.Namespace = DefaultNamespace
	}
	if c.SPIFFE.Source == "" {
		c.SPIFFE.Source = SourceCSI
	}
	if c.SPIFFE.CSIDriver == "" {
		c.SPIFFE.CSIDriver = DefaultCSIDriver
	}
	if c.SPIFFE.SocketName == "" {
		c.SPIFFE.SocketName = DefaultSocketName
	}
	if c.TrustEnv == nil {
		t := true
		c.TrustEnv = &t
	}
}

func (c *Config) validate() config.Errors {
	var errs config.Errors
	add := func(path, format string, a ...any) {
		errs = append(errs, config.FieldError{Path: path, Msg: fmt.Sprintf(format, a...)})
	}
	if msg := checkImage(c.Image); msg != "" {
		add("image", "%s", msg)
	}
	switch corev1.PullPolicy(c.ImagePullPolicy) {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		add("image_pull_policy", "want Always, IfNotPresent or Never, got %q", c.ImagePullPolicy)
	}
	for _, r := range []struct {
		key string
		m   map[string]Quantity
	}{{"resources.requests", c.Resources.Requests}, {"resources.limits", c.Resources.Limits}} {
		for name, q := range r.m {
			if msg := checkQuantity(name, string(q)); msg != "" {
				add(r.key+"."+name, "%s", msg)
			}
		}
	}
	if len(errs) == 0 { // the quantities parse: compare requests with limits
		if _, err := buildResources(c.Resources.Requests, c.Resources.Limits); err != nil {
			add("resources", "%v", err)
		}
	}
	for key, p := range map[string]int{"proxy_port": c.ProxyPort, "admin_port": c.AdminPort} {
		if p < 1 || p > 65535 {
			add(key, "want a port from 1 to 65535, got %d", p)
		}
	}
	if c.ProxyPort == c.AdminPort {
		add("admin_port", "must differ from proxy_port (%d)", c.ProxyPort)
	}
	if c.RunAsUser < 1 {
		add("run_as_user", "want a non-root uid (1 or more), got %d", c.RunAsUser)
	}
	for key, name := range map[string]string{"config_map": c.ConfigMap, "policy_config_map": c.PolicyConfigMap, "namespace": c.Namespace,
		"process_identity.config_map": c.ProcessIdentity.ConfigMap} {
		if msgs := validation.IsDNS1123Subdomain(name); len(msgs) > 0 {
			add(key, "%q is not a valid name: %s", name, strings.Join(msgs, "; "))
		}
	}
	for key, dir := range map[string]string{"ca_dir": c.CADir, "ca_key_dir": c.CAKeyDir} {
		if !path.IsAbs(dir) || path.Clean(dir) != dir || dir == "/" {
			add(key, "want a clean absolute directory path, got %q", dir)
		}
	}
	if nested(c.CAKeyDir, c.CADir) {
		add("ca_key_dir", "must not be ca_dir, below it or above it: the agent's containers mount ca_dir, and this holds the CA's private key")
	}
	// The Secrets of escrow.dev/secrets are mounted below SecretsDir in escrow's container.
	// Below ca_dir, their mount points would appear in the directory the agent's containers
	// share; above or below either directory, one mount would hide the other.
	for key, dir := range map[string]string{"ca_dir": c.CADir, "ca_key_dir": c.CAKeyDir} {
		if nested(dir, SecretsDir) {
			add(key, "must not be %s, below it or above it: escrow's container mounts the Secrets of %s there", SecretsDir, AnnotationSecrets)
		}
	}
	for i, s := range c.ServiceCIDRs {
		if _, err := netip.ParsePrefix(s); err != nil {
			add(fmt.Sprintf("service_cidrs[%d]", i), "want a CIDR such as 10.96.0.0/12, got %q", s)
		}
	}
	for i, s := range c.NoProxy {
		if msg := checkNoProxyEntry(s); msg != "" {
			add(fmt.Sprintf("no_proxy[%d]", i), "%s", msg)
		}
	}
	switch c.SPIFFE.Source {
	case SourceCSI:
		if c.SPIFFE.HostPath != "" {
			add("spiffe.host_path", "only with source: hostPath")
		}
		if msgs := validation.IsDNS1123Subdomain(c.SPIFFE.CSIDriver); len(msgs) > 0 {
			add("spiffe.csi_driver", "%q is not a valid driver name", c.SPIFFE.CSIDriver)
		}
	case SourceHostPath:
		if hp := c.SPIFFE.HostPath; hp == "" {
			add("spiffe.host_path", "required with source: hostPath (the node directory holding the socket)")
		} else if !path.IsAbs(hp) || path.Clean(hp) != hp || hp == "/" {
			add("spiffe.host_path", "want a clean absolute directory path, got %q", hp)
		}
	default:
		add("spiffe.source", "want csi or hostPath, got %q", c.SPIFFE.Source)
	}
	if n := c.SPIFFE.SocketName; n == "" || strings.ContainsAny(n, "/\x00") || n == "." || n == ".." {
		add("spiffe.socket_name", "want a file name, got %q", n)
	}
	return errs
}

// nested reports whether directories a and b (clean, absolute) are the same or one contains the
// other.
func nested(a, b string) bool {
	return a == b || strings.HasPrefix(a, b+"/") || strings.HasPrefix(b, a+"/")
}

func checkImage(s string) string {
	if s == "" {
		return "required"
	}
	if strings.IndexFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f }) >= 0 {
		return fmt.Sprintf("%q contains whitespace or control characters", s)
	}
	return ""
}

func checkQuantity(name, q string) string {
	switch corev1.ResourceName(name) {
	case corev1.ResourceCPU, corev1.ResourceMemory, corev1.ResourceEphemeralStorage:
	default:
		return "want cpu, memory or ephemeral-storage"
	}
	v, err := resource.ParseQuantity(q)
	if err != nil {
		return fmt.Sprintf("%q is not a quantity (e.g. 100m, 64Mi)", q)
	}
	if v.Sign() < 0 {
		return fmt.Sprintf("%q is negative", q)
	}
	return ""
}

// checkNoProxyEntry accepts what NO_PROXY readers understand: a host name, ".suffix", an IP, a
// CIDR, optionally with :port. It refuses what would corrupt the comma-separated list.
func checkNoProxyEntry(s string) string {
	if s == "" {
		return "empty entry"
	}
	if strings.IndexFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f || r == ',' || r == '=' }) >= 0 {
		return fmt.Sprintf("%q contains a space, comma, '=' or control character", s)
	}
	return ""
}

// buildResources turns quantity maps (already checked) into requirements, refusing a request
// above its limit (the API server would reject the pod).
func buildResources(req, lim map[string]Quantity) (corev1.ResourceRequirements, error) {
	var rr corev1.ResourceRequirements
	conv := func(m map[string]Quantity) (corev1.ResourceList, error) {
		if len(m) == 0 {
			return nil, nil
		}
		l := corev1.ResourceList{}
		for k, v := range m {
			q, err := resource.ParseQuantity(string(v))
			if err != nil {
				return nil, fmt.Errorf("%s: %q is not a quantity", k, v)
			}
			l[corev1.ResourceName(k)] = q
		}
		return l, nil
	}
	var err error
	if rr.Requests, err = conv(req); err != nil {
		return rr, err
	}
	if rr.Limits, err = conv(lim); err != nil {
		return rr, err
	}
	names := make([]string, 0, len(rr.Requests))
	for n := range rr.Requests {
		names = append(names, string(n))
	}
	sort.Strings(names)
	for _, n := range names {
		r := rr.Requests[corev1.ResourceName(n)]
		if l, ok := rr.Limits[corev1.ResourceName(n)]; ok && r.Cmp(l) > 0 {
			return rr, fmt.Errorf("the %s request %s is above its limit %s", n, r.String(), l.String())
		}
	}
	return rr, nil
}
