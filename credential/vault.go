package credential

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// Parts of a Vault dynamic secret Token (NewTokenParts): applied as HTTP basic auth.
const (
	PartUsername = "username"
	PartPassword = "password"
)

// VaultOptions configures the Vault provider: log in (JWT auth with the pod's JWT-SVID, or
// Kubernetes auth with a service account token), then read one secret. Exactly one of JWTAuth
// and KubernetesAuth, and one of KV2 and Dynamic, is set.
type VaultOptions struct {
	Address        string
	JWTAuth        *VaultJWTAuth
	KubernetesAuth *VaultKubernetesAuth
	KV2            *VaultKV2
	Dynamic        *VaultDynamic
	Namespace      string // Vault Enterprise namespace, if any
	CAFile         string
}

// VaultJWTAuth logs in at auth/<Mount>/login with role Role and the JWT-SVID for Audience.
type VaultJWTAuth struct{ Mount, Role, Audience string }

// VaultKubernetesAuth logs in at auth/<Mount>/login with role Role and the service account
// token read from TokenFile.
type VaultKubernetesAuth struct{ Mount, Role, TokenFile string }

// VaultKV2 reads Field of the KV version 2 secret at Path in the engine mounted at Mount.
type VaultKV2 struct{ Mount, Path, Field string }

// VaultDynamic reads a dynamic secret (database/creds/ro, ...): either Field is the token, or
// the username and password are taken from one lease (parts PartUsername and PartPassword), so
// both always belong together.
type VaultDynamic struct{ Path, Field, UsernameField, PasswordField string }

// NewVault returns the Vault provider, built on Vault's Go client (github.com/hashicorp/vault/api)
// over the egress-checked HTTP client. A token's lifetime is the shorter of the login token's
// and the secret's lease; dropping it revokes the login token (auth/token/revoke-self), which
// revokes the dynamic secret's lease with it.
func NewVault(o VaultOptions, d Deps) (Provider, error) {
	c, err := endpointClient(d, o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("credential: vault: %w", err)
	}
	if (o.JWTAuth == nil) == (o.KubernetesAuth == nil) {
		return nil, errors.New("credential: vault: exactly one of auth.jwt and auth.kubernetes is required")
	}
	if (o.KV2 == nil) == (o.Dynamic == nil) {
		return nil, errors.New("credential: vault: exactly one of secret.kv2 and secret.dynamic is required")
	}
	if o.JWTAuth != nil && d.JWT == nil {
		return nil, errors.New("credential: vault: jwt auth needs a SPIFFE identity (no JWT-SVID source)")
	}
	hc := *c // a copy: Vault's client may set fields of the one it is given
	cfg := &vault.Config{Address: o.Address, HttpClient: &hc, MaxRetries: 0, Timeout: c.Timeout}
	client, err := vault.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("credential: vault: %w", err)
	}
	// NewClient picks up VAULT_TOKEN, VAULT_NAMESPACE and VAULT_HEADERS from escrow's own
	// environment; the provider uses only its configuration.
	client.ClearToken()
	client.ClearNamespace()
	if o.Namespace != "" {
		client.SetNamespace(o.Namespace)
	}
	client.SetHeaders(http.Header{vault.RequestHeaderName: {"true"}})
	return &vaultProvider{o: o, client: client, d: d}, nil
}

type vaultProvider struct {
	o      VaultOptions
	client *vault.Client // without a token; cloned per fetch with the login token
	d      Deps
}

func (p *vaultProvider) Kind() string { return "vault" }

func (p *vaultProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	now := nowFunc(p.d)()
	var mount, role, jwt string
	switch {
	case p.o.JWTAuth != nil:
		a := p.o.JWTAuth
		s, err := jwtSVID(ctx, p.d, a.Audience, args.Subject)
		if err != nil {
			return Token{}, err
		}
		mount, role, jwt = a.Mount, a.Role, s
	default:
		a := p.o.KubernetesAuth
		s, err := readSecretFile(p.d, a.TokenFile)
		if err != nil {
			return Token{}, err
		}
		mount, role, jwt = a.Mount, a.Role, s
	}
	login, err := p.client.Logical().WriteWithContext(ctx, "auth/"+strings.Trim(mount, "/")+"/login",
		map[string]any{"role": role, "jwt": jwt})
	if err != nil {
		return Token{}, vaultError("login", err, jwt)
	}
	if login == nil || login.Auth == nil || login.Auth.ClientToken == "" {
		return Token{}, errors.New("vault: login answered without a client token")
	}
	vt := login.Auth.ClientToken
	exp := vaultExpiry(now, login.Auth.LeaseDuration)
	c, err := p.client.Clone()
	if err != nil {
		return Token{}, fmt.Errorf("vault: %w", err)
	}
	c.SetToken(vt)
	var tok Token
	switch {
	case p.o.KV2 != nil:
		k := p.o.KV2
		s, err := c.KVv2(strings.Trim(k.Mount, "/")).Get(ctx, k.Path)
		if err != nil {
			p.revokeToken(c)
			return Token{}, vaultError("kv2 read", err, jwt, vt)
		}
		v, ok := s.Data[k.Field].(string)
		if !ok || v == "" {
			p.revokeToken(c)
			return Token{}, fmt.Errorf("vault: kv2 %s/%s has no string field %q", k.Mount, k.Path, k.Field)
		}
		tok = NewToken(args.Name, v, exp)
	default:
		dy := p.o.Dynamic
		s, err := c.Logical().ReadWithContext(ctx, dy.Path)
		if err != nil {
			p.revokeToken(c)
			return Token{}, vaultError("read", err, jwt, vt)
		}
		if s == nil {
			p.revokeToken(c)
			return Token{}, fmt.Errorf("vault: nothing at %s", dy.Path)
		}
		if s.LeaseDuration > 0 {
			exp = minTime(exp, now.Add(time.Duration(s.LeaseDuration)*time.Second))
		}
		if dy.Field != "" {
			v, _ := s.Data[dy.Field].(string)
			if v == "" {
				p.revokeToken(c)
				return Token{}, fmt.Errorf("vault: %s has no string field %q", dy.Path, dy.Field)
			}
			tok = NewToken(args.Name, v, exp)
			break
		}
		u, _ := s.Data[dy.UsernameField].(string)
		pw, _ := s.Data[dy.PasswordField].(string)
		if u == "" || pw == "" {
			p.revokeToken(c)
			return Token{}, fmt.Errorf("vault: %s has no string fields %q and %q", dy.Path, dy.UsernameField, dy.PasswordField)
		}
		tok = NewTokenParts(args.Name, map[string]string{PartUsername: u, PartPassword: pw}, exp)
	}
	tok.revoke = newSecret(vt)
	return tok, nil
}

// Revoke revokes the login token the secret was read with (and so every lease it holds):
// https://developer.hashicorp.com/vault/api-docs/auth/token#revoke-a-token-self
func (p *vaultProvider) Revoke(ctx context.Context, tok Token) error {
	if tok.revoke == nil {
		return nil
	}
	c, err := p.client.Clone()
	if err != nil {
		return err
	}
	c.SetToken(string(*tok.revoke))
	if err := c.Auth().Token().RevokeSelfWithContext(ctx, ""); err != nil {
		return vaultError("revoke-self", err, string(*tok.revoke))
	}
	return nil
}

// revokeToken revokes a login token whose secret read failed, best effort.
func (p *vaultProvider) revokeToken(c *vault.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = c.Auth().Token().RevokeSelfWithContext(ctx, "")
}

func vaultExpiry(now time.Time, leaseSeconds int) time.Time {
	if leaseSeconds <= 0 {
		return now.Add(DefaultTokenLifetime)
	}
	return now.Add(time.Duration(leaseSeconds) * time.Second)
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// vaultError names the operation, the status and Vault's "errors" list.
func vaultError(op string, err error, secrets ...string) error {
	var re *vault.ResponseError
	if errors.As(err, &re) {
		msg := fmt.Sprintf("vault: %s answered %d", op, re.StatusCode)
		if len(re.Errors) > 0 {
			msg += ": " + scrub(strings.Join(re.Errors, "; "), secrets...)
		}
		return &EndpointError{Status: re.StatusCode, msg: msg}
	}
	return fmt.Errorf("vault: %s: %s", op, scrub(err.Error(), secrets...))
}
