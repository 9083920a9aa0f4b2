// Package config holds the escrow configuration file's types, loads it, fills defaults and
// validates it once, reporting every error with its key path. After Load returns, the value is
// treated as immutable by the rest of the program.
package config

import (
	"net/netip"
	"strconv"
	"time"
)

// Defaults.
const (
	DefaultListen      = "127.0.0.1:15480"
	DefaultAdmin       = "127.0.0.1:15481"
	DefaultCADir       = "/var/run/escrow"
	DefaultPolicyMode  = PolicyModeEnforce
	DefaultLeafTTL     = 24 * time.Hour
	DefaultDialTimeout = 10 * time.Second
	DefaultReloadEvery = 2 * time.Second
	// DefaultAuditFlush bounds how long an audit record may wait in escrow's buffer.
	DefaultAuditFlush = 100 * time.Millisecond
	// MaxAuditFlush bounds audit.flush_interval: it is also the window of records a crash loses.
	MaxAuditFlush = time.Second
)

// PolicyMode says whether policy decisions are enforced. It is the one mode type of the program:
// config validates it once, the proxy applies it, audit records and metrics print it.
type PolicyMode string

// Policy modes.
const (
	// PolicyModeEnforce denies what the policy denies.
	PolicyModeEnforce PolicyMode = "enforce"
	// PolicyModeReport lets through what the policy would deny (not what fails for want of a
	// policy set or an identity) and records it as would_deny.
	PolicyModeReport PolicyMode = "report"
)

// Valid reports whether m is a known mode.
func (m PolicyMode) Valid() bool { return m == PolicyModeEnforce || m == PolicyModeReport }

// Config is the whole configuration file.
type Config struct {
	// Listen is the proxy listener the agent's HTTP_PROXY/HTTPS_PROXY point at. Loopback only
	// unless UnsafeAllowNonLoopbackListen is set.
	Listen string `json:"listen,omitempty"`
	// Admin serves /healthz, /readyz and /metrics. Never secrets.
	Admin string `json:"admin,omitempty"`
	// UnsafeAllowNonLoopbackListen lets Listen bind a non-loopback address. The proxy holds
	// credentials: anything that can reach the listener can use them (subject to policy).
	UnsafeAllowNonLoopbackListen bool `json:"unsafe_allow_non_loopback_listen,omitempty"`

	Identity Identity `json:"identity"`
	// CADir receives ca.crt and trust-bundle.pem (system roots + the pod CA).
	CADir string `json:"ca_dir,omitempty"`
	// CAKeyDir, when set, keeps the pod CA's key and certificate so that a restarted escrow
	// reuses a still-valid CA and agents that loaded the trust bundle keep trusting it. It must
	// be a directory only escrow can read (in Kubernetes a memory-backed emptyDir mounted into
	// escrow alone), never ca_dir or a directory below it. Empty: a new CA at every start.
	CAKeyDir string `json:"ca_key_dir,omitempty"`
	// LeafTTL is the lifetime of the leaf certificates minted for intercepted hosts.
	LeafTTL Duration `json:"leaf_ttl,omitempty"`

	Policy      Policy                `json:"policy"`
	Upstreams   []Upstream            `json:"upstreams,omitempty"`
	Credentials map[string]Credential `json:"credentials,omitempty"`
	Egress      Egress                `json:"egress,omitempty"`
	Audit       Audit                 `json:"audit,omitempty"`

	// validated is set by Validate: the compiled values below exist only then.
	validated bool
}

// Validated reports whether c passed Validate (Parse and Load call it), so its compiled values
// (Egress.Allow, Upstream.Injection) are filled in. A Config assembled by hand is not.
func (c *Config) Validated() bool { return c != nil && c.validated }

// Audit configures how audit records (stdout) are written.
type Audit struct {
	// FlushInterval is how long a record may wait in a buffer before it is written, so that a
	// busy proxy makes one write per many records instead of one per request. 0s writes every
	// record as it is made. Records still buffered are lost if the process is killed (SIGKILL,
	// OOM) or crashes; a graceful stop (SIGTERM, SIGINT) writes them all. Nil until defaults
	// are applied; use FlushEvery.
	FlushInterval *Duration `json:"flush_interval,omitempty"`
}

// FlushEvery is FlushInterval after defaults: DefaultAuditFlush when it was not set.
func (a Audit) FlushEvery() time.Duration {
	if a.FlushInterval == nil {
		return DefaultAuditFlush
	}
	return a.FlushInterval.D()
}

// Identity says where the workload identity comes from. Exactly one of SPIFFE or Static.
type Identity struct {
	SPIFFE *SPIFFE `json:"spiffe,omitempty"`
	// Static is a SPIFFE ID used as is, for local use. Every record marks it attested: false.
	Static string `json:"static,omitempty"`
}

// SPIFFE configures the Workload API client.
type SPIFFE struct {
	// Socket is the Workload API address (unix:///path or tcp://ip:port). Empty means the
	// SPIFFE_ENDPOINT_SOCKET environment variable.
	Socket string `json:"socket,omitempty"`
}

// Policy configures the Cedar policy set.
type Policy struct {
	// Dir holds *.cedar files and optionally schema.cedarschema.
	Dir string `json:"dir"`
	// Mode is enforce (default) or report (log the would-be deny, allow).
	Mode PolicyMode `json:"mode,omitempty"`
	// ReloadInterval is how often Dir is checked for changes.
	ReloadInterval Duration `json:"reload_interval,omitempty"`
}

// Upstream is one destination the agent may reach.
type Upstream struct {
	// Host is an exact host name or "*.suffix" (matches any name below suffix, not suffix itself).
	Host string `json:"host"`
	// Port restricts the entry to one port. Zero matches the scheme's default port (80 for
	// http, 443 for https and CONNECT).
	Port int `json:"port,omitempty"`
	// Tunnel copies bytes without interception: no credential, host-level policy (action connect).
	Tunnel bool `json:"tunnel,omitempty"`
	// Credential names an entry of Credentials applied to every request to this upstream.
	Credential string `json:"credential,omitempty"`
	// At most one of Inject, Basic, Query says how the credential is applied; the default is
	// Authorization: Bearer <token>.
	Inject *Inject `json:"inject,omitempty"`
	Basic  *Basic  `json:"basic,omitempty"`
	Query  *Query  `json:"query,omitempty"`
	// Address is dialled instead of resolving Host (host:port).
	Address string `json:"address,omitempty"`
	// CAFile adds roots (PEM) for verifying this upstream, for private CAs.
	CAFile string `json:"ca_file,omitempty"`
	// UnsafePlaintextCredential lets the credential be applied to plain http:// requests, where
	// it crosses the network in clear text. Off by default: such requests are refused.
	UnsafePlaintextCredential bool `json:"unsafe_plaintext_credential,omitempty"`

	injection Injection // compiled by Validate from Inject, Basic, Query
}

// Injection returns how the upstream's credential is applied, compiled once by Validate: the
// header and the template already checked and split. The zero value for an upstream without a
// credential, or before Validate.
func (u Upstream) Injection() Injection { return u.injection }

// InjectKind is how a credential is put on a request.
type InjectKind int

const (
	// InjectHeader sets Header to Prefix + token + Suffix.
	InjectHeader InjectKind = iota
	// InjectBasic sets "Authorization: Basic base64(Username:token)".
	InjectBasic
	// InjectQuery sets the query parameter Param to the token.
	InjectQuery
)

func (k InjectKind) String() string {
	switch k {
	case InjectHeader:
		return "header"
	case InjectBasic:
		return "basic"
	case InjectQuery:
		return "query"
	}
	return "InjectKind(" + strconv.Itoa(int(k)) + ")"
}

// Injection is a validated, compiled way of applying a credential.
type Injection struct {
	Kind InjectKind
	// Header is the canonical header name (InjectHeader; "Authorization" for InjectBasic).
	Header string
	// Prefix and Suffix surround the token in the header value (InjectHeader), split once
	// around {{.Token}}; free of control characters, "{{" and "}}".
	Prefix, Suffix string
	// Username is the basic-auth user (InjectBasic): non-empty, no ':' and no control characters.
	Username string
	// Param is the query parameter's name (InjectQuery), non-empty.
	Param string
}

// Inject sets a header from a template; {{.Token}} is replaced by the credential.
type Inject struct {
	Header string `json:"header"`
	Value  string `json:"value,omitempty"`
}

// Basic applies the credential as the password of HTTP basic auth.
type Basic struct {
	Username string `json:"username"`
}

// Query applies the credential as a query parameter.
type Query struct {
	Param string `json:"param"`
}

// Credential is one named credential. Exactly one provider is set.
type Credential struct {
	Static *Static `json:"static,omitempty"`
}

// Static is a long-lived secret kept outside the agent's reach: in a file (re-read when it
// changes) or an environment variable of the escrow process. Never inline.
type Static struct {
	File string `json:"file,omitempty"`
	Env  string `json:"env,omitempty"`
}

// Egress governs which IP addresses may be dialled.
type Egress struct {
	// AllowCIDRs opens ranges that are denied by default (private, loopback, ...).
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
	// DialTimeout bounds DNS resolution plus the TCP connect.
	DialTimeout Duration `json:"dial_timeout,omitempty"`

	allow []netip.Prefix // AllowCIDRs, parsed by Validate
}

// Allow returns AllowCIDRs parsed (by Validate; empty before it, which allows nothing extra).
func (e Egress) Allow() []netip.Prefix { return e.allow }
