package credential

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"

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
	CAFile   string // optional private CA of the token endpoint
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
	return &oauthProvider{kind: "oauth2", url: o.TokenURL, auth: o.ClientAuth, scopes: o.Scopes,
		params: optional(map[string]string{"audience": o.Audience, "resource": o.Resource}), client: c, d: d}, nil
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
	return &oauthProvider{kind: "token_exchange", url: o.TokenURL, auth: o.ClientAuth, scopes: o.Scopes,
		params: params, subjectAud: o.SubjectTokenAudience, presented: o.SubjectTokenPresented,
		actorAud: o.ActorTokenAudience, client: c, d: d}, nil
}

func checkTokenURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("token_url %q is not an http(s) URL", s)
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
	cfg := clientcredentials.Config{ClientID: p.auth.ClientID, TokenURL: p.url, Scopes: p.scopes,
		AuthStyle: oauth2.AuthStyleInHeader}
	if p.auth.AuthStyle == "post" {
		cfg.AuthStyle = oauth2.AuthStyleInParams
	}
	switch {
	case p.auth.AssertionAudience != "":
		a, err := jwtSVID(ctx, p.d, p.auth.AssertionAudience, args.Subject)
		if err != nil {
			return Token{}, err
		}
		params.Set("client_assertion_type", AssertionTypeJWT)
		params.Set("client_assertion", a)
		cfg.AuthStyle = oauth2.AuthStyleInParams // client_id in the form, no secret
		secrets = append(secrets, a)
	case p.auth.ClientSecretFile != "":
		s, err := readSecretFile(p.d, p.auth.ClientSecretFile)
		if err != nil {
			return Token{}, err
		}
		cfg.ClientSecret = s
		secrets = append(secrets, s)
	default:
		cfg.AuthStyle = oauth2.AuthStyleInParams
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
