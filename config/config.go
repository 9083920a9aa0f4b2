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
	// DefaultResponseTimeout bounds the wait for an upstream's response headers: long enough for
	// a slow LLM call that answers only when it is done.
	DefaultResponseTimeout = 10 * time.Minute
	// MinResponseTimeout is the least response_timeout accepted.
	MinResponseTimeout = time.Second
	// MinLeafTTL and MinReloadInterval are the least leaf_ttl and policy.reload_interval.
	MinLeafTTL        = time.Minute
	MinReloadInterval = 100 * time.Millisecond
	// DefaultMCPPath is where an MCP server's Streamable HTTP endpoint lives unless mcp.path says.
	DefaultMCPPath = "/mcp"
	// DefaultMCPMaxMessage bounds one JSON-RPC message escrow parses; Min/MaxMCPMessage bound
	// mcp.max_message_bytes.
	DefaultMCPMaxMessage = 1 << 20
	MinMCPMessage        = 1 << 10
	MaxMCPMessage        = 64 << 20
	// DefaultDelegationDepth is how many actors a delegation chain may have unless
	// delegation.max_depth says; MaxDelegationDepth bounds max_depth.
	DefaultDelegationDepth = 3
	MaxDelegationDepth     = 16
	// DefaultAuditFlush bounds how long an audit record may wait in escrow's buffer.
	DefaultAuditFlush = 100 * time.Millisecond
	// MaxAuditFlush bounds audit.flush_interval: it is also the window of records a crash loses.
	MaxAuditFlush = time.Second
	// DefaultXDSMaxBackoff caps the wait between reconnections to the control plane;
	// MinXDSMaxBackoff and MaxXDSMaxBackoff bound xds.max_backoff.
	DefaultXDSMaxBackoff = 30 * time.Second
	MinXDSMaxBackoff     = time.Second
	MaxXDSMaxBackoff     = 10 * time.Minute
)

// XDSNodeIDFromSVID: the sidecar's node identity is its X509-SVID's SPIFFE ID, which the control
// plane reads from the mTLS connection (the one accepted value of xds.node_id_from).
const XDSNodeIDFromSVID = "svid"

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
	// UnsafeAllowNonLoopbackAdmin lets Admin bind a non-loopback address (a pod's kubelet probes
	// and Prometheus scrape need it). /metrics and /readyz hold no secret, but they tell whoever
	// reaches them what the agent is doing; the switch makes exposing them a decision.
	UnsafeAllowNonLoopbackAdmin bool `json:"unsafe_allow_non_loopback_admin,omitempty"`
	// ListenUnix, when set, is the path of a second proxy listener on a Unix socket, where the
	// calling process comes from SO_PEERCRED. Absolute; its directory must exist.
	ListenUnix string `json:"listen_unix,omitempty"`

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
	// Delegation, when set, verifies the delegation token an agent presents
	// (Proxy-Authorization: Bearer <JWT>) and gives policy its chain.
	Delegation *Delegation `json:"delegation,omitempty"`
	// XDS, when set, subscribes to escrow controller for upstreams, credentials, policies and
	// revocations, added to those of this file.
	XDS *XDS `json:"xds,omitempty"`

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
	// MCPArguments puts an MCP call's arguments on its audit record. Off by default: arguments
	// may hold data; the record carries their sha256 either way.
	MCPArguments bool `json:"mcp_arguments,omitempty"`
}

// FlushEvery is FlushInterval after defaults: DefaultAuditFlush when it was not set.
func (a Audit) FlushEvery() time.Duration {
	if a.FlushInterval == nil {
		return DefaultAuditFlush
	}
	return a.FlushInterval.D()
}

// XDS configures the subscription to the control plane (escrow controller) over ADS, on an
// mTLS connection made with the sidecar's own X509-SVID (so it needs identity.spiffe).
type XDS struct {
	// Address is the controller's host:port (in Kubernetes, its Service).
	Address string `json:"address"`
	// NodeIDFrom is where the node identity comes from: XDSNodeIDFromSVID (the default and
	// the only value): the controller derives it from the SVID, never from what the sidecar
	// claims.
	NodeIDFrom string `json:"node_id_from,omitempty"`
	// ServerID is the SPIFFE ID the controller's certificate must carry. Empty: any workload
	// of the sidecar's own trust domain.
	ServerID string `json:"server_id,omitempty"`
	// MaxBackoff caps the wait between reconnections (DefaultXDSMaxBackoff), which starts
	// small and doubles, with jitter, while the controller is unreachable.
	MaxBackoff Duration `json:"max_backoff,omitempty"`
}

// Identity says where the workload identity comes from. Exactly one of SPIFFE or Static.
type Identity struct {
	SPIFFE *SPIFFE `json:"spiffe,omitempty"`
	// Static is a SPIFFE ID used as is, for local use. Every record marks it attested: false.
	Static string `json:"static,omitempty"`
	// Process finds the calling process of each connection from the kernel (uid, gid, pid,
	// executable and its sha256), once per connection, for policy and the audit record.
	Process bool `json:"process,omitempty"`
}

// SPIFFE configures the Workload API client.
type SPIFFE struct {
	// Socket is the Workload API address (unix:///path or tcp://ip:port). Empty means the
	// SPIFFE_ENDPOINT_SOCKET environment variable.
	Socket string `json:"socket,omitempty"`
}

// Policy configures the Cedar policy set.
type Policy struct {
	// Dir holds *.cedar files and optionally schema.cedarschema. Required unless xds is set
	// (then every policy may come from the control plane).
	Dir string `json:"dir,omitempty"`
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
	// Timeout is response_timeout as written: how long escrow waits for the upstream's response
	// headers after sending the request (504 upstream_timeout after it). Zero means
	// egress.response_timeout. Read the effective value with ResponseTimeout.
	Timeout Duration `json:"response_timeout,omitempty"`
	// Scrub is scrub_responses as written: nil means true. Read it with ScrubResponses.
	Scrub *bool `json:"scrub_responses,omitempty"`
	// MCP marks the upstream as an MCP server (Streamable HTTP): POSTs to MCP.Path are parsed as
	// JSON-RPC and each call is decided on its own. Never on a tunnel.
	MCP *MCP `json:"mcp,omitempty"`

	injection       Injection     // compiled by Validate from Inject, Basic, Query
	responseTimeout time.Duration // compiled by Validate from Timeout and egress.response_timeout
}

// ResponseTimeout is how long escrow waits for this upstream's response headers: Timeout, or
// egress.response_timeout when Timeout is zero, compiled by Validate. Before Validate it falls
// back to Timeout, then DefaultResponseTimeout.
func (u Upstream) ResponseTimeout() time.Duration {
	switch {
	case u.responseTimeout > 0:
		return u.responseTimeout
	case u.Timeout > 0:
		return u.Timeout.D()
	}
	return DefaultResponseTimeout
}

// ScrubResponses reports whether the injected credential's value is scrubbed from this
// upstream's responses (headers, and text-like bodies up to a bound) so the agent never sees it.
// True unless scrub_responses: false.
func (u Upstream) ScrubResponses() bool { return u.Scrub == nil || *u.Scrub }

// MCP configures an upstream that is an MCP server. Validate fills the defaults.
type MCP struct {
	// Path is the Streamable HTTP endpoint (DefaultMCPPath); it starts with "/".
	Path string `json:"path,omitempty"`
	// MaxMessageBytes bounds a POSTed JSON-RPC message (DefaultMCPMaxMessage, between
	// MinMCPMessage and MaxMCPMessage); a larger one is denied, never forwarded unparsed.
	MaxMessageBytes int64 `json:"max_message_bytes,omitempty"`
}

// Delegation configures how a presented delegation token is verified.
type Delegation struct {
	// Audience is the aud the token must carry (required).
	Audience string `json:"audience"`
	// Issuers whose tokens are accepted; at least one.
	Issuers []DelegationIssuer `json:"issuers,omitempty"`
	// MaxDepth is the most actors a chain may have (0 to MaxDelegationDepth; nil until defaults
	// are applied, then DefaultDelegationDepth). Read it with MaxActors.
	MaxDepth *int `json:"max_depth,omitempty"`
	// Required denies a request that presents no token.
	Required bool `json:"required,omitempty"`
}

// MaxActors is MaxDepth after defaults.
func (d Delegation) MaxActors() int {
	if d.MaxDepth == nil {
		return DefaultDelegationDepth
	}
	return *d.MaxDepth
}

// DelegationIssuer is one accepted issuer of delegation tokens: exactly one of SPIFFE or OIDC.
type DelegationIssuer struct {
	// SPIFFE accepts JWT-SVIDs of other workloads, verified against the Workload API's JWT
	// bundles (needs identity.spiffe).
	SPIFFE *DelegationSPIFFE `json:"spiffe,omitempty"`
	OIDC   *OIDCIssuer       `json:"oidc,omitempty"`
}

// DelegationSPIFFE has no settings yet; its presence selects the SPIFFE issuer.
type DelegationSPIFFE struct{}

// OIDCIssuer is an OpenID Connect issuer whose tokens are verified against its keys: JWKSFile,
// else JWKSURL, else the jwks_uri of its discovery document.
type OIDCIssuer struct {
	// Issuer is the iss value, an https URL (http only on a loopback host).
	Issuer string `json:"issuer"`
	// JWKSURL is where the keys are (https, or http on loopback); at most one of JWKSURL, JWKSFile.
	JWKSURL string `json:"jwks_url,omitempty"`
	// JWKSFile holds the keys (a JWK set), re-read when it changes.
	JWKSFile string `json:"jwks_file,omitempty"`
	// CAFile adds PEM roots for the issuer's discovery and JWKS endpoints (a private CA).
	CAFile string `json:"ca_file,omitempty"`
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
	// InjectSigV4 signs the request with AWS Signature Version 4 (Region, Service) using the
	// temporary keys of an aws credential, after removing what the agent sent of
	// Authorization, X-Amz-Date, X-Amz-Security-Token and X-Amz-Content-Sha256. The only way an
	// aws credential is applied.
	InjectSigV4
	// InjectBasicPair sets "Authorization: Basic base64(user:password)" with both halves from
	// the credential (a Vault dynamic secret's username and password, read from one lease).
	InjectBasicPair
)

func (k InjectKind) String() string {
	switch k {
	case InjectHeader:
		return "header"
	case InjectBasic:
		return "basic"
	case InjectQuery:
		return "query"
	case InjectSigV4:
		return "sigv4"
	case InjectBasicPair:
		return "basic_pair"
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
	// Region and Service are what InjectSigV4 signs for: the credential's region, and its
	// service or the one derived from the upstream's host (s3 for *.s3.amazonaws.com).
	Region, Service string
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

// Egress governs which IP addresses may be dialled.
type Egress struct {
	// AllowCIDRs opens ranges that are denied by default (private, loopback, ...).
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
	// DialTimeout bounds DNS resolution plus the TCP connect.
	DialTimeout Duration `json:"dial_timeout,omitempty"`
	// ResponseTimeout is the default of upstreams[].response_timeout (DefaultResponseTimeout).
	ResponseTimeout Duration `json:"response_timeout,omitempty"`

	allow []netip.Prefix // AllowCIDRs, parsed by Validate
}

// Allow returns AllowCIDRs parsed (by Validate; empty before it, which allows nothing extra).
func (e Egress) Allow() []netip.Prefix { return e.allow }
