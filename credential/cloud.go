package credential

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google/externalaccount"
)

// GCPOptions configures Google Cloud workload identity federation: the pod's JWT-SVID is
// exchanged at Google's STS for a federated access token, which optionally impersonates a
// service account (IAM Credentials generateAccessToken).
type GCPOptions struct {
	// Audience is the workload identity pool provider's full resource name:
	// //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X.
	Audience             string
	SubjectTokenAudience string   // audience of the JWT-SVID (what the pool provider expects)
	ServiceAccount       string   // optional: agent@project.iam.gserviceaccount.com
	Scopes               []string // default cloud-platform
	STSURL               string   // default https://sts.googleapis.com/v1/token
	IAMURL               string   // default https://iamcredentials.googleapis.com
	CAFile               string
}

// NewGCP returns the GCP provider, built on golang.org/x/oauth2/google/externalaccount (Google's
// own implementation of the exchange and the impersonation), with the JWT-SVID as the subject
// token. https://cloud.google.com/iam/docs/workload-identity-federation-with-other-providers
func NewGCP(o GCPOptions, d Deps) (Provider, error) {
	c, err := endpointClient(d, o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("credential: gcp: %w", err)
	}
	if d.JWT == nil {
		return nil, errors.New("credential: gcp: the subject token is a JWT-SVID: needs a SPIFFE identity")
	}
	if !strings.HasPrefix(o.Audience, "//iam.googleapis.com/") || o.SubjectTokenAudience == "" {
		return nil, errors.New("credential: gcp: audience (//iam.googleapis.com/...) and subject_token.jwt_svid.audience are required")
	}
	if o.STSURL == "" {
		o.STSURL = "https://sts.googleapis.com/v1/token"
	}
	if o.IAMURL == "" {
		o.IAMURL = "https://iamcredentials.googleapis.com"
	}
	if len(o.Scopes) == 0 {
		o.Scopes = []string{"https://www.googleapis.com/auth/cloud-platform"}
	}
	for _, u := range []string{o.STSURL, o.IAMURL} {
		if err := checkTokenURL(u); err != nil {
			return nil, fmt.Errorf("credential: gcp: %w", err)
		}
	}
	return &gcpProvider{o: o, client: c, d: d}, nil
}

type gcpProvider struct {
	o      GCPOptions
	client *http.Client
	d      Deps
}

func (p *gcpProvider) Kind() string { return "gcp" }

// svidSupplier gives externalaccount the JWT-SVID fetched for this call.
type svidSupplier string

func (s svidSupplier) SubjectToken(context.Context, externalaccount.SupplierOptions) (string, error) {
	return string(s), nil
}

func (p *gcpProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	svid, err := jwtSVID(ctx, p.d, p.o.SubjectTokenAudience, args.Subject)
	if err != nil {
		return Token{}, err
	}
	cfg := externalaccount.Config{
		Audience:             p.o.Audience,
		SubjectTokenType:     TokenTypeJWT,
		TokenURL:             p.o.STSURL,
		Scopes:               p.o.Scopes,
		SubjectTokenSupplier: svidSupplier(svid),
	}
	if p.o.ServiceAccount != "" {
		cfg.ServiceAccountImpersonationURL = strings.TrimSuffix(p.o.IAMURL, "/") +
			"/v1/projects/-/serviceAccounts/" + url.PathEscape(p.o.ServiceAccount) + ":generateAccessToken"
	}
	// A new token source per fetch: the Manager caches, and the source's context carries the
	// egress-checked client.
	ts, err := externalaccount.NewTokenSource(withClient(ctx, p.client), cfg)
	if err != nil {
		return Token{}, fmt.Errorf("gcp: %w", err)
	}
	tok, err := ts.Token()
	if err != nil {
		return Token{}, gcpError(err, svid)
	}
	if tok.AccessToken == "" {
		return Token{}, errors.New("gcp: answered without an access token")
	}
	return NewToken(args.Name, tok.AccessToken, expiryOr(tok.Expiry, nowFunc(p.d)())), nil
}

// gcpError keeps what Google answered (status, error, description) without the request.
func gcpError(err error, secrets ...string) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		return oauthError(err, secrets...)
	}
	// The impersonation step wraps the STS error as text holding the raw JSON body: take the
	// RFC 6749 §5.2 fields out of it rather than echoing (and truncating) the body.
	msg := err.Error()
	if i := strings.Index(msg, `{"error"`); i >= 0 {
		var e struct {
			Error            any    `json:"error"`
			ErrorDescription string `json:"error_description"`
		}
		if json.NewDecoder(strings.NewReader(msg[i:])).Decode(&e) == nil {
			var code string
			switch v := e.Error.(type) {
			case string:
				code = v
			case map[string]any: // Google API errors: {"error": {"code", "message", "status"}}
				code = fmt.Sprintf("%v: %v", v["status"], v["message"])
			}
			out := "gcp: " + scrub(strings.TrimSpace(msg[:min(i, 80)]), secrets...) + " " + scrub(code, secrets...)
			if e.ErrorDescription != "" {
				out += ": " + scrub(e.ErrorDescription, secrets...)
			}
			return errors.New(out)
		}
	}
	return fmt.Errorf("gcp: %s", scrub(msg, secrets...))
}

// AzureOptions configures Microsoft Entra ID client credentials with the pod's JWT-SVID as the
// client assertion (workload identity federation: the app registration trusts SPIFFE's issuer).
type AzureOptions struct {
	TenantID     string
	ClientID     string
	Scope        string // e.g. https://management.azure.com/.default
	JWTAudience  string // default api://AzureADTokenExchange
	AuthorityURL string // default https://login.microsoftonline.com
	CAFile       string
}

// NewAzure returns the Azure provider: POST {authority}/{tenant}/oauth2/v2.0/token with
// grant_type=client_credentials and client_assertion, through golang.org/x/oauth2.
// https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-client-creds-grant-flow#third-case-access-token-request-with-a-federated-credential
func NewAzure(o AzureOptions, d Deps) (Provider, error) {
	if o.TenantID == "" || o.ClientID == "" || o.Scope == "" {
		return nil, errors.New("credential: azure: tenant_id, client_id and scope are required")
	}
	if o.JWTAudience == "" {
		o.JWTAudience = "api://AzureADTokenExchange"
	}
	if o.AuthorityURL == "" {
		o.AuthorityURL = "https://login.microsoftonline.com"
	}
	tokenURL := strings.TrimSuffix(o.AuthorityURL, "/") + "/" + url.PathEscape(o.TenantID) + "/oauth2/v2.0/token"
	p, err := NewOAuth2(OAuth2Options{
		TokenURL:   tokenURL,
		ClientAuth: ClientAuth{ClientID: o.ClientID, AssertionAudience: o.JWTAudience},
		Scopes:     []string{o.Scope},
		CAFile:     o.CAFile,
	}, d)
	if err != nil {
		return nil, errors.New("credential: azure: " + strings.TrimPrefix(err.Error(), "credential: oauth2: "))
	}
	p.(*oauthProvider).kind = "azure"
	return p, nil
}
