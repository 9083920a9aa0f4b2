package config

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Credential is one named credential (credentials.<name>). Exactly one provider is set.
type Credential struct {
	Static        *Static        `json:"static,omitempty"`
	OAuth2        *OAuth2        `json:"oauth2,omitempty"`
	TokenExchange *TokenExchange `json:"token_exchange,omitempty"`
	AWS           *AWS           `json:"aws,omitempty"`
	GitHubApp     *GitHubApp     `json:"github_app,omitempty"`
	Vault         *Vault         `json:"vault,omitempty"`
	GCP           *GCP           `json:"gcp,omitempty"`
	Azure         *Azure         `json:"azure,omitempty"`
	Broker        *Broker        `json:"broker,omitempty"`
}

// Provider names.
const (
	ProviderStatic        = "static"
	ProviderOAuth2        = "oauth2"
	ProviderTokenExchange = "token_exchange"
	ProviderAWS           = "aws"
	ProviderGitHubApp     = "github_app"
	ProviderVault         = "vault"
	ProviderGCP           = "gcp"
	ProviderAzure         = "azure"
	ProviderBroker        = "broker"
)

// providerKeys lists every provider key, in the order the docs present them.
var providerKeys = []string{ProviderStatic, ProviderOAuth2, ProviderTokenExchange, ProviderAWS, ProviderGitHubApp, ProviderVault, ProviderGCP, ProviderAzure, ProviderBroker}

// Provider is the key of the provider that is set ("static", "oauth2", ...), as audit records
// (credential_provider) and metrics name it; "" when none is set, the first one when several
// are (Validate rejects both).
func (c Credential) Provider() string {
	if s := c.providersSet(); len(s) > 0 {
		return s[0]
	}
	return ""
}

func (c Credential) providersSet() []string {
	var out []string
	for i, set := range []bool{c.Static != nil, c.OAuth2 != nil, c.TokenExchange != nil, c.AWS != nil,
		c.GitHubApp != nil, c.Vault != nil, c.GCP != nil, c.Azure != nil, c.Broker != nil} {
		if set {
			out = append(out, providerKeys[i])
		}
	}
	return out
}

// Static is a long-lived secret kept outside the agent's reach: in a file (re-read when it
// changes) or an environment variable of the escrow process. Never inline.
type Static struct {
	File string `json:"file,omitempty"`
	Env  string `json:"env,omitempty"`
}

// Broker says the token is minted by escrow controller (over the xds connection's mTLS) rather
// than in the sidecar: the provider's root secret (a GitHub App private key, an OAuth client
// secret) stays in the controller, which checks the sidecar's SPIFFE ID against the
// Credential's allowed workloads. The controller serves brokered Credentials in this form; it
// is valid only with xds.
type Broker struct {
	// Revision is set by the controller and changes when the brokered Credential does (the
	// controller then drops, and revokes, the tokens it minted under the old one): a changed
	// credential config makes the sidecar drop its cached token and ask again. Not secret.
	Revision string `json:"revision,omitempty"`
}

// JWTSVID asks for the calling workload's JWT-SVID for Audience, from the Workload API (so it
// needs identity.spiffe). Written {audience: ...} under a jwt_svid key.
type JWTSVID struct {
	Audience string `json:"audience"`
}

// TokenSource is a token escrow presents to an endpoint on the workload's behalf (a client
// assertion, a subject token, a web identity token). Exactly one source is set: JWTSVID
// ({jwt_svid: {audience: ...}}, the pod's JWT-SVID), or, for token_exchange.subject_token only,
// Delegation ({delegation: {}}, the verified delegation token the agent presented).
type TokenSource struct {
	JWTSVID    *JWTSVID          `json:"jwt_svid,omitempty"`
	Delegation *PresentedSubject `json:"delegation,omitempty"`
}

// PresentedSubject has no settings; its presence selects the delegation token the agent
// presented in Proxy-Authorization, after the delegation block has verified it.
type PresentedSubject struct{}

// IsDelegation reports whether s is the presented delegation token.
func (s *TokenSource) IsDelegation() bool { return s != nil && s.Delegation != nil }

// AuthStyle says where an OAuth2 client secret goes (RFC 6749 §2.3.1).
type AuthStyle string

// Auth styles.
const (
	// AuthStyleBasic sends client_id and the secret as HTTP basic auth (client_secret_basic).
	AuthStyleBasic AuthStyle = "basic"
	// AuthStylePost sends them as form fields (client_secret_post).
	AuthStylePost AuthStyle = "post"
)

// Token types of RFC 8693 §3, and the defaults of token_exchange.
const (
	TokenTypeJWT         = "urn:ietf:params:oauth:token-type:jwt"
	TokenTypeAccessToken = "urn:ietf:params:oauth:token-type:access_token"
	TokenTypeIDToken     = "urn:ietf:params:oauth:token-type:id_token"

	DefaultSubjectTokenType   = TokenTypeJWT
	DefaultActorTokenType     = TokenTypeJWT
	DefaultRequestedTokenType = TokenTypeAccessToken
)

// OAuth2 is the client credentials grant (RFC 6749 §4.4). The client authenticates with
// exactly one of ClientSecretFile (client_secret_basic or _post, per AuthStyle) or
// ClientAssertion (RFC 7523 private_key_jwt with the pod's JWT-SVID: no client secret exists).
type OAuth2 struct {
	TokenURL         string       `json:"token_url"`
	ClientID         string       `json:"client_id"`
	ClientSecretFile string       `json:"client_secret_file,omitempty"`
	ClientAssertion  *TokenSource `json:"client_assertion,omitempty"`
	// AuthStyle applies to ClientSecretFile; Validate sets AuthStyleBasic when it is empty.
	AuthStyle AuthStyle `json:"auth_style,omitempty"`
	Scopes    []string  `json:"scopes,omitempty"`
	// Audience and Resource (RFC 8707) are sent when set.
	Audience string `json:"audience,omitempty"`
	Resource string `json:"resource,omitempty"`
	// CAFile adds PEM roots for the token endpoint (a private CA).
	CAFile string `json:"ca_file,omitempty"`
	// RevocationURL, when set, is the RFC 7009 revocation endpoint: a token escrow drops (a
	// Revocation, a changed or removed credential, shutdown) is revoked there, the client
	// authenticating as it does at TokenURL.
	RevocationURL string `json:"revocation_url,omitempty"`
}

// TokenExchange is OAuth 2.0 token exchange (RFC 8693): SubjectToken (the pod's JWT-SVID, or the
// delegation token the agent presented) is traded for a token. With ActorToken (the pod's
// JWT-SVID) the exchange says the workload acts for the presented subject (RFC 8693 §2.1,
// delegation semantics). Client authentication is at most one of ClientSecretFile or
// ClientAssertion (RFC 8693 makes it optional: some endpoints take public clients).
type TokenExchange struct {
	TokenURL         string       `json:"token_url"`
	ClientID         string       `json:"client_id,omitempty"`
	ClientSecretFile string       `json:"client_secret_file,omitempty"`
	ClientAssertion  *TokenSource `json:"client_assertion,omitempty"`
	// AuthStyle applies to ClientSecretFile; Validate sets AuthStyleBasic when one is set.
	AuthStyle    AuthStyle    `json:"auth_style,omitempty"`
	SubjectToken *TokenSource `json:"subject_token"`
	// ActorToken, only with subject_token: {delegation: {}}, is {jwt_svid: {audience: ...}}.
	ActorToken *TokenSource `json:"actor_token,omitempty"`
	// SubjectTokenType, RequestedTokenType and (with ActorToken) ActorTokenType are filled by
	// Validate with DefaultSubjectTokenType, DefaultRequestedTokenType and
	// DefaultActorTokenType when empty.
	SubjectTokenType   string   `json:"subject_token_type,omitempty"`
	ActorTokenType     string   `json:"actor_token_type,omitempty"`
	RequestedTokenType string   `json:"requested_token_type,omitempty"`
	Audience           string   `json:"audience,omitempty"`
	Resource           string   `json:"resource,omitempty"`
	Scopes             []string `json:"scopes,omitempty"`
	// Extra form fields some endpoints need (dex: connector_id). They cannot replace a field
	// escrow sets (grant_type, subject_token, client_id, ...).
	Extra  map[string]string `json:"extra,omitempty"`
	CAFile string            `json:"ca_file,omitempty"`
	// RevocationURL is as in OAuth2: the RFC 7009 endpoint the issued tokens are revoked at.
	RevocationURL string `json:"revocation_url,omitempty"`
}

// AWS obtains temporary keys with STS AssumeRoleWithWebIdentity (the pod's JWT-SVID as the
// web identity token), then signs every request with SigV4 (InjectSigV4).
type AWS struct {
	// RoleARN is the role to assume; required unless STSEndpoint is set (MinIO takes none).
	RoleARN     string       `json:"role_arn,omitempty"`
	WebIdentity *TokenSource `json:"web_identity"`
	Region      string       `json:"region"`
	// Service is the SigV4 service name; empty derives it from each upstream's host
	// (Injection.Service), which Validate requires to be an amazonaws.com name then.
	Service string `json:"service,omitempty"`
	// STSEndpoint overrides https://sts.<region>.amazonaws.com (MinIO, GovCloud, VPC endpoints).
	STSEndpoint string `json:"sts_endpoint,omitempty"`
	// Duration is the session's lifetime, MinAWSDuration to MaxAWSDuration; Validate sets
	// DefaultAWSDuration when it is zero.
	Duration Duration `json:"duration,omitempty"`
	CAFile   string   `json:"ca_file,omitempty"`
}

// AWS session bounds (STS DurationSeconds).
const (
	DefaultAWSDuration = time.Hour
	MinAWSDuration     = 15 * time.Minute
	MaxAWSDuration     = 12 * time.Hour
)

// GitHubApp mints installation tokens with the App's private key (an RS256 JWT), optionally
// down-scoped to Repositories and Permissions.
type GitHubApp struct {
	AppID          int64  `json:"app_id"`
	InstallationID int64  `json:"installation_id"`
	PrivateKeyFile string `json:"private_key_file"`
	// APIURL is the REST API root; Validate sets DefaultGitHubAPI when it is empty. GitHub
	// Enterprise Server: https://HOST/api/v3.
	APIURL string `json:"api_url,omitempty"`
	// Repositories are "owner/name" or "name"; Permissions map a permission to read, write or
	// admin (e.g. contents: read).
	Repositories []string          `json:"repositories,omitempty"`
	Permissions  map[string]string `json:"permissions,omitempty"`
	CAFile       string            `json:"ca_file,omitempty"`
}

// DefaultGitHubAPI is github.com's REST API root.
const DefaultGitHubAPI = "https://api.github.com"

// Vault logs in (Auth) and reads one secret (Secret).
type Vault struct {
	Address string      `json:"address"`
	Auth    VaultAuth   `json:"auth"`
	Secret  VaultSecret `json:"secret"`
	// Namespace is the Vault Enterprise namespace (X-Vault-Namespace), if any.
	Namespace string `json:"namespace,omitempty"`
	CAFile    string `json:"ca_file,omitempty"`
}

// VaultAuth is exactly one login method.
type VaultAuth struct {
	JWT        *VaultJWT        `json:"jwt,omitempty"`
	Kubernetes *VaultKubernetes `json:"kubernetes,omitempty"`
}

// VaultJWT logs in at auth/<Mount>/login with the pod's JWT-SVID.
type VaultJWT struct {
	// Mount defaults to "jwt".
	Mount   string   `json:"mount,omitempty"`
	Role    string   `json:"role"`
	JWTSVID *JWTSVID `json:"jwt_svid"`
}

// VaultKubernetes logs in at auth/<Mount>/login with a Kubernetes service account token.
type VaultKubernetes struct {
	// Mount defaults to "kubernetes".
	Mount string `json:"mount,omitempty"`
	Role  string `json:"role"`
	// TokenFile defaults to DefaultKubernetesTokenFile.
	TokenFile string `json:"token_file,omitempty"`
}

// DefaultKubernetesTokenFile is where a pod's service account token is mounted.
const DefaultKubernetesTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// VaultSecret is exactly one secret to read.
type VaultSecret struct {
	KV2     *VaultKV2     `json:"kv2,omitempty"`
	Dynamic *VaultDynamic `json:"dynamic,omitempty"`
}

// VaultKV2 reads Field of the KV v2 secret at <Mount>/data/<Path>.
type VaultKV2 struct {
	// Mount defaults to "secret".
	Mount string `json:"mount,omitempty"`
	Path  string `json:"path"`
	Field string `json:"field"`
}

// VaultDynamic reads a dynamic secret (a lease) at Path. Either Field is the token, or
// UsernameField and PasswordField are applied together as basic auth (InjectBasicPair), both
// from the same read.
type VaultDynamic struct {
	Path          string `json:"path"`
	Field         string `json:"field,omitempty"`
	UsernameField string `json:"username_field,omitempty"`
	PasswordField string `json:"password_field,omitempty"`
}

// UserPass reports whether the secret is a username and password pair.
func (d VaultDynamic) UserPass() bool { return d.UsernameField != "" || d.PasswordField != "" }

// GCP is workload identity federation: the pod's JWT-SVID is exchanged at Google's STS for a
// federated token, optionally then for a service account's access token.
type GCP struct {
	// Audience is the workload identity provider's resource name,
	// //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X.
	Audience     string       `json:"audience"`
	SubjectToken *TokenSource `json:"subject_token"`
	// ServiceAccount, when set, is impersonated (an e-mail address).
	ServiceAccount string `json:"service_account,omitempty"`
	// Scopes default to DefaultGCPScope.
	Scopes []string `json:"scopes,omitempty"`
	// STSURL and IAMURL override Google's endpoints (DefaultGCPSTS, DefaultGCPIAM).
	STSURL string `json:"sts_url,omitempty"`
	IAMURL string `json:"iam_url,omitempty"`
	CAFile string `json:"ca_file,omitempty"`
}

// Google's defaults.
const (
	DefaultGCPScope = "https://www.googleapis.com/auth/cloud-platform"
	DefaultGCPSTS   = "https://sts.googleapis.com/v1/token"
	DefaultGCPIAM   = "https://iamcredentials.googleapis.com"
)

// Azure is Entra ID client credentials with the pod's JWT-SVID as the client assertion
// (workload identity federation).
type Azure struct {
	TenantID string `json:"tenant_id"`
	ClientID string `json:"client_id"`
	// Scope is one resource's scope, e.g. https://management.azure.com/.default.
	Scope string `json:"scope"`
	// JWTSVID is the assertion; its audience defaults to DefaultAzureAudience.
	JWTSVID *JWTSVID `json:"jwt_svid,omitempty"`
	// AuthorityURL overrides DefaultAzureAuthority (sovereign clouds, tests).
	AuthorityURL string `json:"authority_url,omitempty"`
	CAFile       string `json:"ca_file,omitempty"`
}

// Azure's defaults.
const (
	DefaultAzureAudience  = "api://AzureADTokenExchange"
	DefaultAzureAuthority = "https://login.microsoftonline.com"
)

// applyDefaults fills what a provider leaves out.
func (c *Credential) applyDefaults() {
	if o := c.OAuth2; o != nil && o.AuthStyle == "" && o.ClientSecretFile != "" {
		o.AuthStyle = AuthStyleBasic
	}
	if x := c.TokenExchange; x != nil {
		if x.AuthStyle == "" && x.ClientSecretFile != "" {
			x.AuthStyle = AuthStyleBasic
		}
		if x.SubjectTokenType == "" {
			x.SubjectTokenType = DefaultSubjectTokenType
		}
		if x.ActorTokenType == "" && x.ActorToken != nil {
			x.ActorTokenType = DefaultActorTokenType
		}
		if x.RequestedTokenType == "" {
			x.RequestedTokenType = DefaultRequestedTokenType
		}
	}
	if a := c.AWS; a != nil && a.Duration == 0 {
		a.Duration = Duration(DefaultAWSDuration)
	}
	if g := c.GitHubApp; g != nil && g.APIURL == "" {
		g.APIURL = DefaultGitHubAPI
	}
	if v := c.Vault; v != nil {
		if j := v.Auth.JWT; j != nil && j.Mount == "" {
			j.Mount = "jwt"
		}
		if k := v.Auth.Kubernetes; k != nil {
			if k.Mount == "" {
				k.Mount = "kubernetes"
			}
			if k.TokenFile == "" {
				k.TokenFile = DefaultKubernetesTokenFile
			}
		}
		if kv := v.Secret.KV2; kv != nil && kv.Mount == "" {
			kv.Mount = "secret"
		}
	}
	if g := c.GCP; g != nil {
		if len(g.Scopes) == 0 {
			g.Scopes = []string{DefaultGCPScope}
		}
		if g.STSURL == "" {
			g.STSURL = DefaultGCPSTS
		}
		if g.IAMURL == "" {
			g.IAMURL = DefaultGCPIAM
		}
	}
	if a := c.Azure; a != nil {
		if a.JWTSVID == nil {
			a.JWTSVID = &JWTSVID{}
		}
		if a.JWTSVID.Audience == "" {
			a.JWTSVID.Audience = DefaultAzureAudience
		}
		if a.AuthorityURL == "" {
			a.AuthorityURL = DefaultAzureAuthority
		}
	}
}

var (
	awsRegion   = regexp.MustCompile(`^[a-z0-9]+(-[a-z0-9]+)*$`)
	awsService  = regexp.MustCompile(`^[a-z0-9-]+$`)
	ghRepo      = regexp.MustCompile(`^([A-Za-z0-9-]+/)?[A-Za-z0-9._-]+$`)
	ghPermName  = regexp.MustCompile(`^[a-z][a-z_]*$`)
	azureTenant = regexp.MustCompile(`^[A-Za-z0-9.-]+$`)
	vaultPath   = regexp.MustCompile(`^[A-Za-z0-9._/+=@-]+$`)
	emailish    = regexp.MustCompile(`^[^@\s]+@[^@\s]+$`)
)

// reservedExchangeFields are the form fields escrow sets on a token exchange.
var reservedExchangeFields = map[string]bool{
	"grant_type": true, "subject_token": true, "subject_token_type": true, "actor_token": true,
	"actor_token_type": true, "requested_token_type": true, "client_id": true, "client_secret": true,
	"client_assertion": true, "client_assertion_type": true, "audience": true, "resource": true, "scope": true,
}

// validateCredential checks credentials.<name> (p is its path).
func (c *Config) validateCredential(p string, cr Credential, add func(path, format string, a ...any)) {
	set := cr.providersSet()
	switch len(set) {
	case 0:
		add(p, "set a provider: one of %s", strings.Join(providerKeys, ", "))
		return
	case 1:
	default:
		add(p, "set exactly one provider, not %s", strings.Join(set, " and "))
		return
	}
	if b := cr.Broker; b != nil {
		if c.XDS == nil {
			add(p+".broker", "needs xds: a brokered token is minted by escrow controller, over the xds connection")
		}
		if len(b.Revision) > 64 || strings.ContainsFunc(b.Revision, isCTL) {
			add(p+".broker.revision", "want at most 64 characters without control characters")
		}
	}
	spiffe := c.Identity.SPIFFE != nil
	svid := func(at string, j *JWTSVID) {
		if j == nil {
			add(at, "required: {audience: ...}")
			return
		}
		if j.Audience == "" {
			add(at+".audience", "required")
		} else if strings.ContainsFunc(j.Audience, isCTL) {
			add(at+".audience", "may not contain control characters")
		}
		if !spiffe {
			add(at, "needs identity.spiffe: a JWT-SVID comes from the Workload API")
		}
	}
	// source checks a TokenSource; presented says it may be the presented delegation token.
	source := func(at string, s *TokenSource, required, presented bool) {
		if s == nil {
			if required {
				add(at, "required: {jwt_svid: {audience: ...}}")
			}
			return
		}
		switch {
		case s.JWTSVID != nil && s.Delegation != nil:
			add(at, "set exactly one of jwt_svid or delegation, not both")
		case s.Delegation != nil && !presented:
			add(at+".delegation", "the presented delegation token can only be token_exchange.subject_token")
		case s.Delegation != nil && c.Delegation == nil:
			add(at+".delegation", "needs the top-level delegation block: the presented token is verified there before it is passed on")
		case s.Delegation != nil:
		case presented:
			if s.JWTSVID == nil {
				add(at, "set one of jwt_svid: {audience: ...} or delegation: {}")
				return
			}
			svid(at+".jwt_svid", s.JWTSVID)
		default:
			if s.JWTSVID == nil {
				add(at, "set jwt_svid: {audience: ...}")
				return
			}
			svid(at+".jwt_svid", s.JWTSVID)
		}
	}
	endpoint := func(at, u string, required bool) {
		if u == "" {
			if required {
				add(at, "required")
			}
			return
		}
		if msg := checkEndpointURL(u); msg != "" {
			add(at, "%s", msg)
		}
	}
	required := func(at, v string) {
		if v == "" {
			add(at, "required")
		} else if strings.ContainsFunc(v, isCTL) {
			add(at, "may not contain control characters")
		}
	}
	clientAuth := func(at, secretFile string, assertion *TokenSource, style AuthStyle, exactlyOne bool) {
		switch {
		case secretFile != "" && assertion != nil:
			add(at, "set exactly one of client_secret_file or client_assertion, not both")
		case secretFile == "" && assertion == nil && exactlyOne:
			add(at, "set one of client_secret_file or client_assertion (the pod's JWT-SVID: no secret needed)")
		}
		source(at+".client_assertion", assertion, false, false)
		switch {
		case style != "" && secretFile == "":
			add(at+".auth_style", "applies to client_secret_file only")
		case style != "" && style != AuthStyleBasic && style != AuthStylePost:
			add(at+".auth_style", "want basic or post, got %q", style)
		}
	}
	scopes := func(at string, ss []string) {
		for i, s := range ss {
			if s == "" || strings.ContainsAny(s, " \t\r\n\"\\") {
				add(fmt.Sprintf("%s[%d]", at, i), "want a scope token (no spaces or quotes), got %q", s)
			}
		}
	}

	switch {
	case cr.Static != nil:
		s := cr.Static
		switch {
		case s.File != "" && s.Env != "":
			add(p+".static", "set exactly one of file or env")
		case s.File == "" && s.Env == "":
			add(p+".static", "set one of file or env (inline secrets are not accepted)")
		}

	case cr.OAuth2 != nil:
		o, at := cr.OAuth2, p+".oauth2"
		endpoint(at+".token_url", o.TokenURL, true)
		endpoint(at+".revocation_url", o.RevocationURL, false)
		required(at+".client_id", o.ClientID)
		clientAuth(at, o.ClientSecretFile, o.ClientAssertion, o.AuthStyle, true)
		scopes(at+".scopes", o.Scopes)
		if o.Resource != "" {
			endpointLike(add, at+".resource", o.Resource)
		}

	case cr.TokenExchange != nil:
		x, at := cr.TokenExchange, p+".token_exchange"
		endpoint(at+".token_url", x.TokenURL, true)
		endpoint(at+".revocation_url", x.RevocationURL, false)
		if (x.ClientSecretFile != "" || x.ClientAssertion != nil) && x.ClientID == "" {
			add(at+".client_id", "required with client_secret_file or client_assertion")
		}
		clientAuth(at, x.ClientSecretFile, x.ClientAssertion, x.AuthStyle, false)
		source(at+".subject_token", x.SubjectToken, true, true)
		if x.ActorToken != nil {
			if !x.SubjectToken.IsDelegation() {
				add(at+".actor_token", "applies with subject_token: {delegation: {}} only (the workload acts for the presented subject)")
			}
			source(at+".actor_token", x.ActorToken, false, false)
		} else if x.ActorTokenType != "" {
			add(at+".actor_token_type", "applies to actor_token only")
		}
		types := map[string]string{"subject_token_type": x.SubjectTokenType, "requested_token_type": x.RequestedTokenType}
		if x.ActorToken != nil {
			types["actor_token_type"] = x.ActorTokenType
		}
		for _, k := range sortedKeys(types) {
			if v := types[k]; !strings.HasPrefix(v, "urn:") || strings.ContainsFunc(v, isCTL) {
				add(at+"."+k, "want a token type URN such as %s, got %q", TokenTypeJWT, v)
			}
		}
		scopes(at+".scopes", x.Scopes)
		if x.Resource != "" {
			endpointLike(add, at+".resource", x.Resource)
		}
		for _, k := range sortedKeys(x.Extra) {
			switch {
			case reservedExchangeFields[k]:
				add(at+".extra."+k, "escrow sets this field itself; set it with its own key")
			case k == "" || strings.ContainsFunc(k+x.Extra[k], isCTL):
				add(at+".extra."+k, "may not be empty or contain control characters")
			}
		}

	case cr.AWS != nil:
		a, at := cr.AWS, p+".aws"
		if a.RoleARN == "" {
			if a.STSEndpoint == "" {
				add(at+".role_arn", "required (arn:aws:iam::ACCOUNT:role/NAME)")
			}
		} else if parts := strings.SplitN(a.RoleARN, ":", 6); len(parts) != 6 || parts[0] != "arn" || !strings.HasPrefix(parts[5], "role/") {
			add(at+".role_arn", "want arn:PARTITION:iam::ACCOUNT:role/NAME, got %q", a.RoleARN)
		}
		source(at+".web_identity", a.WebIdentity, true, false)
		if a.Region == "" {
			add(at+".region", "required (SigV4 signs for a region), e.g. us-east-1")
		} else if !awsRegion.MatchString(a.Region) {
			add(at+".region", "want a region name such as us-east-1, got %q", a.Region)
		}
		if a.Service != "" && !awsService.MatchString(a.Service) {
			add(at+".service", "want a service name such as s3, got %q", a.Service)
		}
		endpoint(at+".sts_endpoint", a.STSEndpoint, false)
		if d := a.Duration.D(); d < MinAWSDuration || d > MaxAWSDuration {
			add(at+".duration", "must be between %s and %s (STS limits)", fmtDuration(MinAWSDuration), fmtDuration(MaxAWSDuration))
		}

	case cr.GitHubApp != nil:
		g, at := cr.GitHubApp, p+".github_app"
		if g.AppID <= 0 {
			add(at+".app_id", "required: the App's numeric id (> 0)")
		}
		if g.InstallationID <= 0 {
			add(at+".installation_id", "required: the installation's numeric id (> 0)")
		}
		required(at+".private_key_file", g.PrivateKeyFile)
		endpoint(at+".api_url", g.APIURL, true)
		for i, r := range g.Repositories {
			if !ghRepo.MatchString(r) {
				add(fmt.Sprintf("%s.repositories[%d]", at, i), "want owner/name or name, got %q", r)
			}
		}
		for _, k := range sortedKeys(g.Permissions) {
			if !ghPermName.MatchString(k) {
				add(at+".permissions."+k, "want a permission name such as contents")
			}
			if v := g.Permissions[k]; v != "read" && v != "write" && v != "admin" {
				add(at+".permissions."+k, "want read, write or admin, got %q", v)
			}
		}

	case cr.Vault != nil:
		v, at := cr.Vault, p+".vault"
		endpoint(at+".address", v.Address, true)
		switch au := v.Auth; {
		case au.JWT != nil && au.Kubernetes != nil:
			add(at+".auth", "set exactly one of jwt or kubernetes, not both")
		case au.JWT == nil && au.Kubernetes == nil:
			add(at+".auth", "set one of jwt: {role, jwt_svid: {audience}} or kubernetes: {role}")
		case au.JWT != nil:
			checkVaultPath(add, at+".auth.jwt.mount", au.JWT.Mount)
			required(at+".auth.jwt.role", au.JWT.Role)
			svid(at+".auth.jwt.jwt_svid", au.JWT.JWTSVID)
		case au.Kubernetes != nil:
			checkVaultPath(add, at+".auth.kubernetes.mount", au.Kubernetes.Mount)
			required(at+".auth.kubernetes.role", au.Kubernetes.Role)
		}
		switch se := v.Secret; {
		case se.KV2 != nil && se.Dynamic != nil:
			add(at+".secret", "set exactly one of kv2 or dynamic, not both")
		case se.KV2 == nil && se.Dynamic == nil:
			add(at+".secret", "set one of kv2: {path, field} or dynamic: {path, ...}")
		case se.KV2 != nil:
			checkVaultPath(add, at+".secret.kv2.mount", se.KV2.Mount)
			if se.KV2.Path == "" {
				add(at+".secret.kv2.path", "required")
			} else {
				checkVaultPath(add, at+".secret.kv2.path", se.KV2.Path)
			}
			required(at+".secret.kv2.field", se.KV2.Field)
		case se.Dynamic != nil:
			d := se.Dynamic
			if d.Path == "" {
				add(at+".secret.dynamic.path", "required")
			} else {
				checkVaultPath(add, at+".secret.dynamic.path", d.Path)
			}
			switch {
			case d.Field != "" && d.UserPass():
				add(at+".secret.dynamic", "set field, or username_field and password_field, not both")
			case d.UserPass() && (d.UsernameField == "" || d.PasswordField == ""):
				add(at+".secret.dynamic", "set both username_field and password_field")
			case d.Field == "" && !d.UserPass():
				add(at+".secret.dynamic", "set field (the token), or username_field and password_field (basic auth)")
			}
		}

	case cr.GCP != nil:
		g, at := cr.GCP, p+".gcp"
		if g.Audience == "" {
			add(at+".audience", "required: //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X")
		} else if !strings.HasPrefix(g.Audience, "//iam.googleapis.com/") {
			add(at+".audience", "want //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X, got %q", g.Audience)
		}
		source(at+".subject_token", g.SubjectToken, true, false)
		if g.ServiceAccount != "" && !emailish.MatchString(g.ServiceAccount) {
			add(at+".service_account", "want a service account e-mail address, got %q", g.ServiceAccount)
		}
		scopes(at+".scopes", g.Scopes)
		endpoint(at+".sts_url", g.STSURL, true)
		endpoint(at+".iam_url", g.IAMURL, true)

	case cr.Azure != nil:
		a, at := cr.Azure, p+".azure"
		if a.TenantID == "" {
			add(at+".tenant_id", "required")
		} else if !azureTenant.MatchString(a.TenantID) {
			add(at+".tenant_id", "want a tenant id or domain, got %q", a.TenantID)
		}
		required(at+".client_id", a.ClientID)
		required(at+".scope", a.Scope)
		if a.Scope != "" && strings.ContainsAny(a.Scope, " \t") {
			add(at+".scope", "want one scope (Entra's client credentials take one resource's .default), got %q", a.Scope)
		}
		svid(at+".jwt_svid", a.JWTSVID)
		endpoint(at+".authority_url", a.AuthorityURL, true)
	}
}

// endpointLike accepts an absolute URI (an RFC 8707 resource indicator).
func endpointLike(add func(path, format string, a ...any), at, v string) {
	if i := strings.Index(v, "://"); i <= 0 || strings.ContainsAny(v, " #") || strings.ContainsFunc(v, isCTL) {
		add(at, "want an absolute URI without fragment, got %q", v)
	}
}

func checkVaultPath(add func(path, format string, a ...any), at, v string) {
	if !vaultPath.MatchString(v) || strings.HasPrefix(v, "/") || strings.Contains(v, "..") || strings.Contains(v, "//") {
		add(at, "want a Vault path such as secret or agents/openai (no leading /, no ..), got %q", v)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// CredentialFile is a file a credential names, for CheckLocal and for watchers.
type CredentialFile struct {
	Path string // its key path, e.g. credentials.idp.oauth2.client_secret_file
	File string
	// CA says the file is a ca_file: it must hold at least one PEM certificate.
	CA bool
}

// Files lists every file cr names (secrets, keys, tokens, CA files), each with its key path
// below p ("credentials.<name>").
func (cr Credential) Files(p string) []CredentialFile {
	var out []CredentialFile
	f := func(key, file string, ca bool) {
		if file != "" {
			out = append(out, CredentialFile{Path: p + "." + key, File: file, CA: ca})
		}
	}
	if s := cr.Static; s != nil {
		f("static.file", s.File, false)
	}
	if o := cr.OAuth2; o != nil {
		f("oauth2.client_secret_file", o.ClientSecretFile, false)
		f("oauth2.ca_file", o.CAFile, true)
	}
	if x := cr.TokenExchange; x != nil {
		f("token_exchange.client_secret_file", x.ClientSecretFile, false)
		f("token_exchange.ca_file", x.CAFile, true)
	}
	if a := cr.AWS; a != nil {
		f("aws.ca_file", a.CAFile, true)
	}
	if g := cr.GitHubApp; g != nil {
		f("github_app.private_key_file", g.PrivateKeyFile, false)
		f("github_app.ca_file", g.CAFile, true)
	}
	if v := cr.Vault; v != nil {
		if k := v.Auth.Kubernetes; k != nil {
			f("vault.auth.kubernetes.token_file", k.TokenFile, false)
		}
		f("vault.ca_file", v.CAFile, true)
	}
	if g := cr.GCP; g != nil {
		f("gcp.ca_file", g.CAFile, true)
	}
	if a := cr.Azure; a != nil {
		f("azure.ca_file", a.CAFile, true)
	}
	return out
}

// deriveAWSService names the SigV4 service of an amazonaws.com host: "s3" for any S3 name
// (bucket.s3.region.amazonaws.com, s3-region.amazonaws.com), else the first label
// (sts.us-east-1.amazonaws.com → sts). "" when host is not an AWS name.
func deriveAWSService(host string) string {
	h := strings.TrimPrefix(host, "*.")
	var rest string
	switch {
	case strings.HasSuffix(h, ".amazonaws.com"):
		rest = strings.TrimSuffix(h, ".amazonaws.com")
	case strings.HasSuffix(h, ".amazonaws.com.cn"):
		rest = strings.TrimSuffix(h, ".amazonaws.com.cn")
	default:
		return ""
	}
	labels := strings.Split(rest, ".")
	for _, l := range labels {
		if l == "s3" || strings.HasPrefix(l, "s3-") {
			return "s3"
		}
	}
	return labels[0]
}
