package credential

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// OAuth2 token-exchange and assertion constants (RFC 8693, RFC 7523).
const (
	GrantTokenExchange   = "urn:ietf:params:oauth:grant-type:token-exchange"
	TokenTypeJWT         = "urn:ietf:params:oauth:token-type:jwt"
	TokenTypeAccessToken = "urn:ietf:params:oauth:token-type:access_token"
	AssertionTypeJWT     = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
)

// ClientAuth is how a provider authenticates itself to a token endpoint (RFC 6749 §2.3): a
// client secret read from a file, sent in the Authorization header (AuthStyle "basic",
// client_secret_basic) or the form ("post", client_secret_post); or, when AssertionAudience is
// set, an RFC 7523 client_assertion that is the pod's JWT-SVID for that audience
// (private_key_jwt without a key in the pod). With neither, only client_id is sent (a public
// client).
type ClientAuth struct {
	ClientID          string
	ClientSecretFile  string
	AssertionAudience string
	AuthStyle         string // "basic" (default) or "post"
}

// OAuth2Options configures the OAuth2 client credentials provider (RFC 6749 §4.4).
type OAuth2Options struct {
	TokenURL string
	ClientAuth
	Scopes   []string
	Audience string // optional "audience" form field (Auth0, Okta, ...)
	Resource string // optional RFC 8707 "resource"
	CAFile   string // optional private CA of the token endpoint (and the revocation endpoint)
	// RevocationURL, when set, is the RFC 7009 revocation endpoint: the provider is then a
	// Revoker. Without it the provider is not one.
	RevocationURL string
}

// TokenExchangeOptions configures the RFC 8693 token exchange provider. The subject_token is
// the pod's JWT-SVID for SubjectTokenAudience or, with SubjectTokenPresented, the delegation
// token the caller presented (FetchArgs.Delegation). ActorTokenAudience, when set, sends the
// pod's JWT-SVID for it as the actor_token (RFC 8693 §2.1: the workload acts for the subject).
type TokenExchangeOptions struct {
	TokenURL string
	ClientAuth
	SubjectTokenAudience  string
	SubjectTokenPresented bool
	ActorTokenAudience    string
	ActorTokenType        string // default TokenTypeJWT, with ActorTokenAudience
	SubjectTokenType      string // default TokenTypeJWT
	RequestedTokenType    string // default TokenTypeAccessToken
	Audience              string
	Resource              string
	Scopes                []string
	Extra                 map[string]string // extra form fields (dex: connector_id)
	CAFile                string
	RevocationURL         string // as in OAuth2Options
}

// NewOAuth2 returns the OAuth2 client credentials provider. Tokens are cached per caller: with
// a client assertion each is minted with the caller's JWT-SVID.
func NewOAuth2(o OAuth2Options, d Deps) (Provider, error) {
	c, err := endpointClient(d, o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("credential: oauth2: %w", err)
	}
	if err := checkTokenURL(o.TokenURL); err != nil {
		return nil, fmt.Errorf("credential: oauth2: %w", err)
	}
	if o.AssertionAudience != "" && d.JWT == nil {
		return nil, errors.New("credential: oauth2: client_assertion needs a SPIFFE identity (no JWT-SVID source)")
	}
	p := &oauthProvider{kind: "oauth2", url: o.TokenURL, auth: o.ClientAuth, scopes: o.Scopes,
		params: optional(map[string]string{"audience": o.Audience, "resource": o.Resource}), client: c, d: d}
	r, err := withRevocation(p, o.RevocationURL)
	if err != nil {
		return nil, fmt.Errorf("credential: oauth2: %w", err)
	}
	return r, nil
}

// NewTokenExchange returns the RFC 8693 token exchange provider.
func NewTokenExchange(o TokenExchangeOptions, d Deps) (Provider, error) {
	c, err := endpointClient(d, o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("credential: token_exchange: %w", err)
	}
	if err := checkTokenURL(o.TokenURL); err != nil {
		return nil, fmt.Errorf("credential: token_exchange: %w", err)
	}
	switch {
	case o.SubjectTokenPresented && o.SubjectTokenAudience != "":
		return nil, errors.New("credential: token_exchange: the subject token is either the presented delegation token or a JWT-SVID, not both")
	case !o.SubjectTokenPresented && o.SubjectTokenAudience == "":
		return nil, errors.New("credential: token_exchange: subject_token.jwt_svid.audience is required")
	case !o.SubjectTokenPresented && o.ActorTokenAudience != "":
		return nil, errors.New("credential: token_exchange: actor_token applies with the presented delegation token as subject_token only")
	}
	if d.JWT == nil && (o.SubjectTokenAudience != "" || o.ActorTokenAudience != "" || o.AssertionAudience != "") {
		return nil, errors.New("credential: token_exchange: a JWT-SVID is sent: needs a SPIFFE identity")
	}
	stt, rtt := o.SubjectTokenType, o.RequestedTokenType
	if stt == "" {
		stt = TokenTypeJWT
	}
	if rtt == "" {
		rtt = TokenTypeAccessToken
	}
	params := url.Values{}
	for k, v := range o.Extra {
		params.Set(k, v)
	}
	for k, v := range optional(map[string]string{"audience": o.Audience, "resource": o.Resource}) {
		params[k] = v
	}
	params.Set("grant_type", GrantTokenExchange)
	params.Set("subject_token_type", stt)
	params.Set("requested_token_type", rtt)
	if o.ActorTokenAudience != "" {
		att := o.ActorTokenType
		if att == "" {
			att = TokenTypeJWT
		}
		params.Set("actor_token_type", att)
	}
	p := &oauthProvider{kind: "token_exchange", url: o.TokenURL, auth: o.ClientAuth, scopes: o.Scopes,
		params: params, subjectAud: o.SubjectTokenAudience, presented: o.SubjectTokenPresented,
		actorAud: o.ActorTokenAudience, client: c, d: d}
	r, err := withRevocation(p, o.RevocationURL)
	if err != nil {
		return nil, fmt.Errorf("credential: token_exchange: %w", err)
	}
	return r, nil
}

func checkTokenURL(s string) error { return checkURL("token_url", s) }

func checkURL(key, s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("%s %q is not an http(s) URL", key, s)
	}
	return nil
}

func optional(m map[string]string) url.Values {
	v := url.Values{}
	for k, s := range m {
		if s != "" {
			v.Set(k, s)
		}
	}
	return v
}

// oauthProvider implements both oauth2 and token_exchange with golang.org/x/oauth2's
// clientcredentials: it does the form encoding, client authentication and response parsing;
// token exchange overrides grant_type, which the library allows for exactly this purpose.
type oauthProvider struct {
	kind       string
	url        string
	auth       ClientAuth
	scopes     []string
	params     url.Values // fixed form fields
	subjectAud string     // token_exchange: audience of the JWT-SVID sent as subject_token
	presented  bool       // token_exchange: the presented delegation token is the subject_token
	actorAud   string     // token_exchange: audience of the JWT-SVID sent as actor_token
	client     *http.Client
	d          Deps
}

func (p *oauthProvider) Kind() string { return p.kind }

// Delegated reports whether the subject_token is the presented delegation token.
func (p *oauthProvider) Delegated() bool { return p.presented }

func (p *oauthProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	params := make(url.Values, len(p.params)+3)
	for k, v := range p.params {
		params[k] = v
	}
	var secrets []string
	if p.presented {
		if args.Delegation == "" {
			// Never an exchange without it: the subject would be nobody, or the workload.
			return Token{}, errors.New("no delegation token was presented, and this credential exchanges it")
		}
		secrets = append(secrets, string(args.Delegation))
	}
	cc, err := p.clientCreds(ctx, args.Subject)
	if err != nil {
		return Token{}, err
	}
	secrets = append(secrets, cc.secrets...)
	cfg := clientcredentials.Config{ClientID: cc.id, ClientSecret: cc.secret, TokenURL: p.url, Scopes: p.scopes,
		AuthStyle: cc.style}
	for k, v := range cc.form {
		params[k] = v
	}
	if p.subjectAud != "" {
		st, err := jwtSVID(ctx, p.d, p.subjectAud, args.Subject)
		if err != nil {
			return Token{}, err
		}
		params.Set("subject_token", st)
		secrets = append(secrets, st)
	}
	if p.presented {
		params.Set("subject_token", string(args.Delegation))
	}
	if p.actorAud != "" {
		at, err := jwtSVID(ctx, p.d, p.actorAud, args.Subject)
		if err != nil {
			return Token{}, err
		}
		params.Set("actor_token", at)
		secrets = append(secrets, at)
	}
	cfg.EndpointParams = params
	tok, err := cfg.Token(withClient(ctx, p.client))
	if err != nil {
		return Token{}, oauthError(err, secrets...)
	}
	if tok.AccessToken == "" {
		return Token{}, errors.New("token endpoint answered without an access_token")
	}
	return NewToken(args.Name, tok.AccessToken, expiryOr(tok.Expiry, nowFunc(p.d)())), nil
}

// clientCreds is how the client authenticates to its authorization server for one request
// (RFC 6749 §2.3), resolved from ClientAuth by clientCreds. The token endpoint (through
// golang.org/x/oauth2) and the revocation endpoint (RFC 7009 §2.1 requires the same client
// authentication) both take it from there, so the two never authenticate differently.
type clientCreds struct {
	// style: oauth2.AuthStyleInHeader puts id and secret in HTTP basic auth
	// (client_secret_basic); oauth2.AuthStyleInParams puts them in the form (client_secret_post,
	// or client_id alone for an assertion or a public client).
	style      oauth2.AuthStyle
	id, secret string
	form       url.Values // client_assertion_type and client_assertion (RFC 7523), or nil
	secrets    []string   // the secret or the assertion, scrubbed from every error
}

// clientCreds reads the client secret, or mints the client assertion (the pod's JWT-SVID for
// AssertionAudience; subject, when set, must be its subject).
func (p *oauthProvider) clientCreds(ctx context.Context, subject string) (clientCreds, error) {
	c := clientCreds{style: oauth2.AuthStyleInHeader, id: p.auth.ClientID}
	if p.auth.AuthStyle == "post" {
		c.style = oauth2.AuthStyleInParams
	}
	switch {
	case p.auth.AssertionAudience != "":
		a, err := jwtSVID(ctx, p.d, p.auth.AssertionAudience, subject)
		if err != nil {
			return clientCreds{}, err
		}
		c.form = url.Values{"client_assertion_type": {AssertionTypeJWT}, "client_assertion": {a}}
		c.style = oauth2.AuthStyleInParams // client_id in the form, no secret
		c.secrets = []string{a}
	case p.auth.ClientSecretFile != "":
		s, err := readSecretFile(p.d, p.auth.ClientSecretFile)
		if err != nil {
			return clientCreds{}, err
		}
		c.secret = s
		c.secrets = []string{s}
	default:
		c.style = oauth2.AuthStyleInParams
	}
	return c, nil
}

// newRequest returns the authenticated form POST of form to endpoint, encoded exactly as
// golang.org/x/oauth2 encodes a token request with the same credentials: in the form, or in
// basic auth with id and secret form-encoded first (RFC 6749 §2.3.1).
func (c clientCreds) newRequest(ctx context.Context, endpoint string, form url.Values) (*http.Request, error) {
	v := make(url.Values, len(form)+len(c.form)+2)
	for k, x := range form {
		v[k] = x
	}
	for k, x := range c.form {
		v[k] = x
	}
	if c.style == oauth2.AuthStyleInParams {
		if c.id != "" {
			v.Set("client_id", c.id)
		}
		if c.secret != "" {
			v.Set("client_secret", c.secret)
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(v.Encode()))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if c.style == oauth2.AuthStyleInHeader {
		req.SetBasicAuth(url.QueryEscape(c.id), url.QueryEscape(c.secret))
	}
	return req, nil
}
