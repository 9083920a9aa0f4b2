package config

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

const spiffeIdentity = `
identity: {spiffe: {socket: "unix:///run/spire/agent.sock"}}
policy: {dir: p}
`

// issue10Credentials is the credentials block exactly as the provider documentation shows it.
const issue10Credentials = `
credentials:
  idp:
    oauth2:
      token_url: https://idp.example.com/token
      client_id: agents
      client_assertion: {jwt_svid: {audience: https://idp.example.com/token}}
      scopes: [read]
      audience: https://api.example.com
      resource: https://api.example.com
      ca_file: /etc/escrow/idp-ca.pem
  idp-secret:
    oauth2:
      token_url: https://idp.example.com/token
      client_id: agents
      client_secret_file: /var/run/secrets/idp/secret
      auth_style: post
  exchange:
    token_exchange:
      token_url: https://idp.example.com/token
      client_id: agents
      client_secret_file: /var/run/secrets/idp/secret
      subject_token: {jwt_svid: {audience: https://idp.example.com}}
      audience: https://api.example.com
      scopes: [read, write]
      extra: {connector_id: spiffe}
  s3:
    aws:
      role_arn: arn:aws:iam::123456789012:role/agent
      web_identity: {jwt_svid: {audience: sts.amazonaws.com}}
      region: us-east-1
      sts_endpoint: https://sts.us-east-1.amazonaws.com
      duration: 1h
  github:
    github_app:
      app_id: 123
      installation_id: 456
      private_key_file: /var/run/secrets/github-app/key.pem
      repositories: [org/repo]
      permissions: {contents: read}
  vault:
    vault:
      address: https://vault.example.com:8200
      auth: {jwt: {mount: jwt, role: agent, jwt_svid: {audience: vault}}}
      secret: {kv2: {mount: secret, path: agents/openai, field: api_key}}
      ca_file: /etc/escrow/vault-ca.pem
  db:
    vault:
      address: https://vault.example.com:8200
      auth: {kubernetes: {role: agent}}
      secret: {dynamic: {path: database/creds/ro, username_field: username, password_field: password}}
  gcp:
    gcp:
      audience: //iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x
      subject_token: {jwt_svid: {audience: "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x"}}
      service_account: agent@project.iam.gserviceaccount.com
  azure:
    azure:
      tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47
      client_id: 11111111-2222-3333-4444-555555555555
      scope: https://management.azure.com/.default
      jwt_svid: {audience: api://AzureADTokenExchange}
  openai: {static: {env: OPENAI_API_KEY}}
`

func TestParse_DecodesEveryProviderAsDocumented(t *testing.T) {
	c, err := Parse([]byte(spiffeIdentity + issue10Credentials))
	if err != nil {
		t.Fatal(err)
	}
	cr := c.Credentials
	wantProvider := map[string]string{"idp": "oauth2", "idp-secret": "oauth2", "exchange": "token_exchange", "s3": "aws",
		"github": "github_app", "vault": "vault", "db": "vault", "gcp": "gcp", "azure": "azure", "openai": "static"}
	for n, want := range wantProvider {
		if got := cr[n].Provider(); got != want {
			t.Errorf("credentials.%s.Provider() = %q, want %q", n, got, want)
		}
	}
	o := cr["idp"].OAuth2
	if o.TokenURL != "https://idp.example.com/token" || o.ClientID != "agents" || o.ClientAssertion.JWTSVID.Audience != "https://idp.example.com/token" ||
		!reflect.DeepEqual(o.Scopes, []string{"read"}) || o.Audience != "https://api.example.com" || o.Resource != "https://api.example.com" || o.CAFile != "/etc/escrow/idp-ca.pem" {
		t.Errorf("oauth2: %+v", o)
	}
	if o.AuthStyle != "" {
		t.Errorf("auth_style set for a client assertion: %q", o.AuthStyle)
	}
	if s := cr["idp-secret"].OAuth2; s.AuthStyle != AuthStylePost || s.ClientSecretFile != "/var/run/secrets/idp/secret" {
		t.Errorf("oauth2 with a secret: %+v", s)
	}
	x := cr["exchange"].TokenExchange
	if x.SubjectToken.JWTSVID.Audience != "https://idp.example.com" || x.SubjectTokenType != DefaultSubjectTokenType ||
		x.RequestedTokenType != DefaultRequestedTokenType || x.AuthStyle != AuthStyleBasic || x.Extra["connector_id"] != "spiffe" {
		t.Errorf("token_exchange defaults: %+v", x)
	}
	a := cr["s3"].AWS
	if a.RoleARN != "arn:aws:iam::123456789012:role/agent" || a.WebIdentity.JWTSVID.Audience != "sts.amazonaws.com" ||
		a.Region != "us-east-1" || a.Duration.D() != time.Hour || a.STSEndpoint != "https://sts.us-east-1.amazonaws.com" {
		t.Errorf("aws: %+v", a)
	}
	g := cr["github"].GitHubApp
	if g.AppID != 123 || g.InstallationID != 456 || g.APIURL != DefaultGitHubAPI || g.Permissions["contents"] != "read" || g.Repositories[0] != "org/repo" {
		t.Errorf("github_app: %+v", g)
	}
	v := cr["vault"].Vault
	if v.Auth.JWT.Role != "agent" || v.Auth.JWT.JWTSVID.Audience != "vault" || v.Secret.KV2.Path != "agents/openai" || v.Secret.KV2.Field != "api_key" {
		t.Errorf("vault: %+v", v)
	}
	d := cr["db"].Vault
	if d.Auth.Kubernetes.Mount != "kubernetes" || d.Auth.Kubernetes.TokenFile != DefaultKubernetesTokenFile || !d.Secret.Dynamic.UserPass() {
		t.Errorf("vault kubernetes/dynamic defaults: %+v %+v", d.Auth.Kubernetes, d.Secret.Dynamic)
	}
	gc := cr["gcp"].GCP
	if gc.STSURL != DefaultGCPSTS || gc.IAMURL != DefaultGCPIAM || !reflect.DeepEqual(gc.Scopes, []string{DefaultGCPScope}) {
		t.Errorf("gcp defaults: %+v", gc)
	}
	az := cr["azure"].Azure
	if az.AuthorityURL != DefaultAzureAuthority || az.JWTSVID.Audience != "api://AzureADTokenExchange" {
		t.Errorf("azure: %+v", az)
	}
	c, err = Parse([]byte(spiffeIdentity + "credentials: {az: {azure: {tenant_id: t, client_id: c, scope: s/.default}}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Credentials["az"].Azure.JWTSVID.Audience; got != DefaultAzureAudience {
		t.Errorf("azure jwt_svid audience default = %q", got)
	}
}

func TestParse_CredentialsReportEveryMistakeWithKeyPath(t *testing.T) {
	got := parseErr(t, spiffeIdentity+`
credentials:
  none: {}
  two: {static: {env: A}, oauth2: {token_url: "https://a.example", client_id: c, client_secret_file: /s}}
  o1:
    oauth2: {token_url: "http://idp.example.com/token", auth_style: form, client_secret_file: /s}
  o2:
    oauth2: {token_url: "https://idp.example.com/token", client_id: c}
  o3:
    oauth2: {token_url: "https://i.example/t", client_id: c, client_secret_file: /s, client_assertion: {jwt_svid: {audience: a}}, scopes: ["a b"]}
  o4:
    oauth2: {token_url: "https://i.example/t", client_id: c, client_assertion: {jwt_svid: {}}, auth_style: basic}
  x1:
    token_exchange: {token_url: "not a url", extra: {grant_type: x}, subject_token_type: jwt}
  a1:
    aws: {role_arn: "role/agent", region: "US East", duration: 10m, sts_endpoint: "ftp://sts.example"}
  a2:
    aws: {web_identity: {jwt_svid: {audience: sts.amazonaws.com}}, region: us-east-1, duration: 13h}
  g1:
    github_app: {app_id: 0, installation_id: -1, api_url: "http://github.example.com", repositories: ["a/b/c"], permissions: {contents: readonly}}
  v1:
    vault: {address: "https://v.example:8200", auth: {jwt: {role: r, jwt_svid: {audience: v}}, kubernetes: {role: r}}, secret: {}}
  v2:
    vault: {address: "https://v.example:8200", auth: {}, secret: {kv2: {path: /abs/../x}, dynamic: {path: p}}}
  v3:
    vault: {address: "https://v.example:8200", auth: {kubernetes: {}}, secret: {dynamic: {path: db/creds/ro, username_field: u}}}
  gc:
    gcp: {audience: "projects/1", subject_token: {}, service_account: "not-an-email", iam_url: "http://iam.example.com"}
  az:
    azure: {tenant_id: "a b", scope: "x y"}
`)
	wantAll(t, got,
		"credentials.none: set a provider: one of static, oauth2, token_exchange, aws, github_app, vault, gcp, azure",
		"credentials.two: set exactly one provider, not static and oauth2",
		"credentials.o1.oauth2.token_url: want https (http only on a loopback host)",
		"credentials.o1.oauth2.client_id: required",
		`credentials.o1.oauth2.auth_style: want basic or post, got "form"`,
		"credentials.o2.oauth2: set one of client_secret_file or client_assertion",
		"credentials.o3.oauth2: set exactly one of client_secret_file or client_assertion, not both",
		"credentials.o3.oauth2.scopes[0]: want a scope token",
		"credentials.o4.oauth2.client_assertion.jwt_svid.audience: required",
		"credentials.o4.oauth2.auth_style: applies to client_secret_file only",
		`credentials.x1.token_exchange.token_url: want an https URL, got "not a url"`,
		"credentials.x1.token_exchange.subject_token: required: {jwt_svid: {audience: ...}}",
		"credentials.x1.token_exchange.subject_token_type: want a token type URN",
		"credentials.x1.token_exchange.extra.grant_type: escrow sets this field itself",
		"credentials.a1.aws.role_arn: want arn:PARTITION:iam::ACCOUNT:role/NAME",
		"credentials.a1.aws.web_identity: required",
		"credentials.a1.aws.region: want a region name",
		"credentials.a1.aws.duration: must be between 15m and 12h",
		"credentials.a1.aws.sts_endpoint: want an https URL",
		"credentials.a2.aws.role_arn: required",
		"credentials.a2.aws.duration: must be between 15m and 12h",
		"credentials.g1.github_app.app_id: required",
		"credentials.g1.github_app.installation_id: required",
		"credentials.g1.github_app.private_key_file: required",
		"credentials.g1.github_app.api_url: want https",
		"credentials.g1.github_app.repositories[0]: want owner/name or name",
		`credentials.g1.github_app.permissions.contents: want read, write or admin, got "readonly"`,
		"credentials.v1.vault.auth: set exactly one of jwt or kubernetes, not both",
		"credentials.v1.vault.secret: set one of kv2",
		"credentials.v2.vault.auth: set one of jwt",
		"credentials.v2.vault.secret: set exactly one of kv2 or dynamic, not both",
		"credentials.v3.vault.auth.kubernetes.role: required",
		"credentials.v3.vault.secret.dynamic: set both username_field and password_field",
		"credentials.gc.gcp.audience: want //iam.googleapis.com/",
		"credentials.gc.gcp.subject_token: set jwt_svid",
		"credentials.gc.gcp.service_account: want a service account e-mail address",
		"credentials.gc.gcp.iam_url: want https",
		"credentials.az.azure.tenant_id: want a tenant id",
		"credentials.az.azure.client_id: required",
		"credentials.az.azure.scope: want one scope",
	)
	// An aws credential against a custom STS endpoint (MinIO) needs no role.
	if got := parseErr(t, spiffeIdentity+`credentials: {m: {aws: {web_identity: {jwt_svid: {audience: minio}}, region: us-east-1, service: s3, sts_endpoint: "http://127.0.0.1:9000"}}}`+"\n"); got != "" {
		t.Errorf("aws with a loopback STS endpoint and no role: %s", got)
	}
}

func TestParse_JWTSVIDProvidersNeedSPIFFEIdentity(t *testing.T) {
	got := parseErr(t, minimal+`
credentials:
  idp: {oauth2: {token_url: "https://i.example/t", client_id: c, client_assertion: {jwt_svid: {audience: a}}}}
  s3: {aws: {role_arn: "arn:aws:iam::1:role/a", web_identity: {jwt_svid: {audience: sts.amazonaws.com}}, region: us-east-1}}
  v: {vault: {address: "https://v.example", auth: {jwt: {role: r, jwt_svid: {audience: vault}}}, secret: {kv2: {path: a, field: f}}}}
  az: {azure: {tenant_id: t, client_id: c, scope: s/.default}}
  gh: {github_app: {app_id: 1, installation_id: 2, private_key_file: /k}}
`)
	wantAll(t, got,
		"credentials.idp.oauth2.client_assertion.jwt_svid: needs identity.spiffe",
		"credentials.s3.aws.web_identity.jwt_svid: needs identity.spiffe",
		"credentials.v.vault.auth.jwt.jwt_svid: needs identity.spiffe",
		"credentials.az.azure.jwt_svid: needs identity.spiffe",
	)
	if strings.Contains(got, "credentials.gh") {
		t.Errorf("github_app needs no JWT-SVID, yet: %s", got)
	}
}

func TestParse_AWSCredentialIsAppliedBySigV4Only(t *testing.T) {
	doc := spiffeIdentity + `
credentials:
  s3: {aws: {role_arn: "arn:aws:iam::1:role/a", web_identity: {jwt_svid: {audience: sts.amazonaws.com}}, region: eu-west-1}}
  minio: {aws: {web_identity: {jwt_svid: {audience: minio}}, region: us-east-1, service: s3, sts_endpoint: "https://minio.internal:9000"}}
  db: {vault: {address: "https://v.example", auth: {jwt: {role: r, jwt_svid: {audience: vault}}}, secret: {dynamic: {path: db/creds/ro, username_field: username, password_field: password}}}}
`
	c, err := Parse([]byte(doc + `
upstreams:
  - {host: my-bucket.s3.eu-west-1.amazonaws.com, credential: s3}
  - {host: "*.execute-api.eu-west-1.amazonaws.com", credential: s3}
  - {host: minio.internal, port: 9000, credential: minio}
  - {host: db-api.example, credential: db}
`))
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []Injection{
		{Kind: InjectSigV4, Region: "eu-west-1", Service: "s3"},
		{Kind: InjectSigV4, Region: "eu-west-1", Service: "execute-api"},
		{Kind: InjectSigV4, Region: "us-east-1", Service: "s3"},
		{Kind: InjectBasicPair, Header: "Authorization"},
	} {
		if got := c.Upstreams[i].Injection(); got != want {
			t.Errorf("upstreams[%d].Injection() = %+v, want %+v", i, got, want)
		}
	}
	got := parseErr(t, doc+`
upstreams:
  - {host: s3.amazonaws.com, credential: s3, inject: {header: X-Key}}
  - {host: sts.amazonaws.com, credential: s3, basic: {username: u}}
  - {host: b.s3.amazonaws.com, credential: s3, query: {param: k}}
  - {host: storage.example, credential: s3}
  - {host: db-api.example, credential: db, basic: {username: u}}
`)
	wantAll(t, got,
		`upstreams[0]: credential "s3" is aws: it is applied by SigV4 signing only`,
		`upstreams[1]: credential "s3" is aws`,
		`upstreams[2]: credential "s3" is aws`,
		`upstreams[3].credential: "storage.example" is not an amazonaws.com name`,
		`upstreams[4]: credential "db" is a username and password`,
	)
	if InjectSigV4.String() != "sigv4" || InjectBasicPair.String() != "basic_pair" {
		t.Errorf("kind names: %v %v", InjectSigV4, InjectBasicPair)
	}
}

func TestParse_TokenExchangeCanTradeThePresentedDelegationToken(t *testing.T) {
	c, err := Parse([]byte(spiffeIdentity + `
delegation: {audience: spiffe://example.org/escrow, issuers: [{spiffe: {}}]}
credentials:
  onbehalf:
    token_exchange:
      token_url: https://sts.example.com/token
      subject_token: {delegation: {}}
      actor_token: {jwt_svid: {audience: https://sts.example.com}}
  plain:
    token_exchange:
      token_url: https://sts.example.com/token
      subject_token: {delegation: {}}
      subject_token_type: urn:ietf:params:oauth:token-type:access_token
`))
	if err != nil {
		t.Fatal(err)
	}
	x := c.Credentials["onbehalf"].TokenExchange
	if !x.SubjectToken.IsDelegation() || x.ActorToken == nil || x.ActorToken.JWTSVID.Audience != "https://sts.example.com" {
		t.Fatalf("decoded %+v", x)
	}
	if x.SubjectTokenType != TokenTypeJWT || x.ActorTokenType != DefaultActorTokenType {
		t.Errorf("defaults: subject %q actor %q", x.SubjectTokenType, x.ActorTokenType)
	}
	if p := c.Credentials["plain"].TokenExchange; p.ActorTokenType != "" || p.SubjectTokenType != TokenTypeAccessToken {
		t.Errorf("without actor_token: %+v", p)
	}
}

func TestParse_PresentedDelegationTokenMistakesNameTheirKeyPath(t *testing.T) {
	// No top-level delegation block: nothing would have verified the token.
	wantAll(t, parseErr(t, minimal+`
credentials:
  x: {token_exchange: {token_url: "https://sts.example.com/t", subject_token: {delegation: {}}}}
`), "credentials.x.token_exchange.subject_token.delegation: needs the top-level delegation block")

	got := parseErr(t, spiffeIdentity+`
delegation: {audience: escrow, issuers: [{spiffe: {}}]}
credentials:
  both: {token_exchange: {token_url: "https://s.example/t", subject_token: {delegation: {}, jwt_svid: {audience: a}}}}
  empty: {token_exchange: {token_url: "https://s.example/t", subject_token: {}}}
  actor1: {token_exchange: {token_url: "https://s.example/t", subject_token: {jwt_svid: {audience: a}}, actor_token: {jwt_svid: {audience: a}}}}
  actor2: {token_exchange: {token_url: "https://s.example/t", subject_token: {delegation: {}}, actor_token: {delegation: {}}, actor_token_type: jwt}}
  actor3: {token_exchange: {token_url: "https://s.example/t", subject_token: {delegation: {}}, actor_token: {jwt_svid: {}}}}
  ttype: {token_exchange: {token_url: "https://s.example/t", subject_token: {delegation: {}}, actor_token_type: "urn:x"}}
  aws: {aws: {web_identity: {delegation: {}}, region: us-east-1, sts_endpoint: "https://sts.example"}}
  gcp: {gcp: {audience: "//iam.googleapis.com/p", subject_token: {delegation: {}}}}
  o: {oauth2: {token_url: "https://s.example/t", client_id: c, client_assertion: {delegation: {}}}}
`)
	wantAll(t, got,
		"credentials.both.token_exchange.subject_token: set exactly one of jwt_svid or delegation, not both",
		"credentials.empty.token_exchange.subject_token: set one of jwt_svid: {audience: ...} or delegation: {}",
		"credentials.actor1.token_exchange.actor_token: applies with subject_token: {delegation: {}} only",
		"credentials.actor2.token_exchange.actor_token.delegation: the presented delegation token can only be token_exchange.subject_token",
		`credentials.actor2.token_exchange.actor_token_type: want a token type URN such as urn:ietf:params:oauth:token-type:jwt, got "jwt"`,
		"credentials.actor3.token_exchange.actor_token.jwt_svid.audience: required",
		"credentials.ttype.token_exchange.actor_token_type: applies to actor_token only",
		"credentials.aws.aws.web_identity.delegation: the presented delegation token can only be token_exchange.subject_token",
		"credentials.gcp.gcp.subject_token.delegation: the presented delegation token can only be token_exchange.subject_token",
		"credentials.o.oauth2.client_assertion.delegation: the presented delegation token can only be token_exchange.subject_token",
	)
}

func TestParse_RevocationURLIsAnOptionalHTTPSEndpoint(t *testing.T) {
	c, err := Parse([]byte(spiffeIdentity + `
credentials:
  idp:
    oauth2: {token_url: "https://i.example/token", revocation_url: "https://i.example/revoke", client_id: c, client_secret_file: /s}
  x:
    token_exchange: {token_url: "https://i.example/token", revocation_url: "http://127.0.0.1:8443/revoke", subject_token: {jwt_svid: {audience: a}}}
  plain:
    oauth2: {token_url: "https://i.example/token", client_id: c, client_secret_file: /s}
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Credentials["idp"].OAuth2.RevocationURL; got != "https://i.example/revoke" {
		t.Errorf("oauth2.revocation_url = %q", got)
	}
	if got := c.Credentials["x"].TokenExchange.RevocationURL; got != "http://127.0.0.1:8443/revoke" {
		t.Errorf("token_exchange.revocation_url = %q", got)
	}
	if got := c.Credentials["plain"].OAuth2.RevocationURL; got != "" {
		t.Errorf("revocation_url defaulted to %q; it is optional and stays unset", got)
	}

	got := parseErr(t, spiffeIdentity+`
credentials:
  o1: {oauth2: {token_url: "https://i.example/t", revocation_url: "http://idp.example.com/revoke", client_id: c, client_secret_file: /s}}
  o2: {oauth2: {token_url: "https://i.example/t", revocation_url: "https://u:p@idp.example.com/revoke", client_id: c, client_secret_file: /s}}
  x1: {token_exchange: {token_url: "https://i.example/t", revocation_url: "revoke", subject_token: {jwt_svid: {audience: a}}}}
  x2: {token_exchange: {token_url: "https://i.example/t", revocation_url: "https://i.example/r#frag", subject_token: {jwt_svid: {audience: a}}}}
`)
	wantAll(t, got,
		`credentials.o1.oauth2.revocation_url: want https (http only on a loopback host), got "http://idp.example.com/revoke"`,
		"credentials.o2.oauth2.revocation_url: must not contain user information",
		`credentials.x1.token_exchange.revocation_url: want an https URL, got "revoke"`,
		"credentials.x2.token_exchange.revocation_url: must not contain a fragment",
	)
}
