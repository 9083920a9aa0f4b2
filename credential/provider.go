package credential

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/config"
)

// Request is what a caller asks the Manager for. It is a struct so it can grow (the delegation
// chain, the calling process) without changing Get.
type Request struct {
	// Name is the configured credential name.
	Name string
	// Subject is the calling workload's SPIFFE ID; "" when unknown.
	Subject string
	// Scope holds provider-specific scope parameters (a down-scope, an audience) in canonical
	// form, so equal scopes are equal strings; "" for none.
	Scope string
	// Delegation is the delegation token the caller presented, already verified (the proxy's
	// delegation block); "" when it presented none. Only providers that trade it (Delegated)
	// see it, and for them the Manager keys tokens by it too. It prints as a fingerprint.
	Delegation Presented
}

// Provider fetches a fresh credential. Implementations must be safe for concurrent use, must
// honour ctx, and must never put the secret into an error.
//
// Unless it implements Shared, a provider is assumed to mint per caller: the Manager caches its
// tokens per (Name, Subject, Scope), so two workloads or two down-scopes never share one.
type Provider interface {
	Fetch(ctx context.Context, args FetchArgs) (Token, error)
}

// FetchArgs is what a Provider is asked to mint: exactly the cache key the result is stored
// under, so a token is never served to a caller it was not minted for.
type FetchArgs struct {
	// Name is the credential's name from the configuration; providers name their Token with it.
	Name string
	// Subject is the SPIFFE ID the token is for ("" for a Shared provider, or when unknown).
	Subject string
	// Scope is the canonical scope parameters the token is for ("" for a Shared provider, or
	// for none).
	Scope string
	// Delegation is the presented delegation token the token is for: set only for a Delegated
	// provider, and then never "".
	Delegation Presented
}

// Delegated is implemented by providers that trade the delegation token the caller presented
// (token_exchange with subject_token: {delegation: {}}). When Delegated reports true (asked
// once, when the Manager takes the provider), the Manager keys every token by the presented
// token too, so tokens minted for two presented tokens (two subjects) are never shared; passes
// it in FetchArgs.Delegation; and answers a Request without one with ErrUnavailable, never
// calling the provider.
type Delegated interface {
	Delegated() bool
}

// Presented is a token a caller presented to escrow (a delegation token). It is a credential of
// its holder: every way of printing or encoding it (String, GoString, Format for every verb,
// MarshalText and so JSON, slog's LogValue) shows only a fingerprint,
// "presented-token(sha256:<16 hex digits>)". Convert it to a string only to send it on.
type Presented string

// String returns the fingerprint, never the token.
func (t Presented) String() string {
	if t == "" {
		return "presented-token(none)"
	}
	sum := sha256.Sum256([]byte(t))
	return "presented-token(sha256:" + hex.EncodeToString(sum[:8]) + ")"
}

// GoString is String.
func (t Presented) GoString() string { return t.String() }

// Format writes String for every verb and flag.
func (t Presented) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(t.String())) }

// MarshalText returns String (encoding/json uses it too).
func (t Presented) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// LogValue makes log/slog log String.
func (t Presented) LogValue() slog.Value { return slog.StringValue(t.String()) }

// key is what the Manager keys tokens by: the token's full SHA-256, never the token itself.
func (t Presented) key() string {
	if t == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(t))
	return string(sum[:])
}

// Shared is implemented by providers whose token does not depend on the caller (a static
// secret). When Shared reports true (asked once, when the Manager takes the provider), the
// Manager keeps one entry per name whoever calls, fetches it with Subject and Scope empty, and
// its hit path takes no lock. A marker asked once rather than a per-request key function keeps
// that hit path free of an interface call.
type Shared interface {
	Shared() bool
}

// JWTSource is what credential needs from attestation: a JWT-SVID of the pod's workload for an
// audience, e.g. as an OAuth2 client assertion (RFC 7523), an RFC 8693 subject token or an STS
// web identity. attest's SPIFFE source implements it; credential does not import attest.
type JWTSource interface {
	JWTSVID(ctx context.Context, audience string) (token string, expiresAt time.Time, err error)
}

// Deps is what providers may use, given to NewProvider. Zero fields mean: no network, no JWT
// source, the process environment, time.Now, no logging; a provider that needs a missing one
// fails at construction.
type Deps struct {
	// HTTPClient is the only way a provider may reach the network (token endpoints, STS, Vault):
	// it dials through the same egress rules as upstream calls and ignores the process's
	// HTTP(S)_PROXY. Providers must not build their own client or transport, and must not fall
	// back to http.DefaultClient when it is nil (that one follows HTTP(S)_PROXY): they fail.
	HTTPClient *http.Client
	// JWT issues the pod's JWT-SVIDs.
	JWT JWTSource
	// LookupEnv reads the escrow process's environment; default os.LookupEnv.
	LookupEnv func(string) (string, bool)
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Logger receives what providers log (never a secret); default: nothing.
	Logger *zap.Logger
	// ReadFile reads the files a provider's configuration names (private keys, client
	// secrets, service account tokens, CA files); default: the file system. escrow controller
	// serves the Secret paths of a Credential from the API server this way, so a provider it
	// runs for brokering is built from the same config.Credential a sidecar would get and the
	// secret is never written to disk. Bounded to maxFileSize for secrets either way.
	ReadFile func(path string) ([]byte, error)
	// Broker mints the tokens of credentials whose config is broker: {} (escrow controller,
	// over the sidecar's control-plane connection). Nil: such a credential cannot be built.
	Broker Broker
}

// Broker is what credential needs from the control plane: the token of a brokered credential,
// minted by escrow controller for this sidecar's identity. controlplane/broker's Client
// implements it; credential does not import it.
type Broker interface {
	Mint(ctx context.Context, r BrokerRequest) (Token, error)
}

// BrokerRequest is what a sidecar asks the broker for. It is a struct so it can grow.
type BrokerRequest struct {
	// Name is the credential's name (the Credential object's).
	Name string
	// Scope is the canonical scope parameters ("" for none).
	Scope string
}

// NewProvider is the one switch from a credential's configuration to its Provider. c has been
// validated by config; a credential with no provider set is an error. Each new provider kind is
// a new case here.
func NewProvider(name string, c config.Credential, d Deps) (Provider, error) {
	switch {
	case c.Static != nil:
		switch {
		case c.Static.File != "":
			return StaticFile(c.Static.File), nil
		case c.Static.Env != "":
			lookup := d.LookupEnv
			if lookup == nil {
				lookup = os.LookupEnv
			}
			return StaticEnvFrom(c.Static.Env, lookup), nil
		}
		return nil, fmt.Errorf("credential: %s: static: neither file nor env set", name)
	case c.OAuth2 != nil:
		o := c.OAuth2
		return named(name)(NewOAuth2(OAuth2Options{
			TokenURL:   o.TokenURL,
			ClientAuth: clientAuth(o.ClientID, o.ClientSecretFile, o.ClientAssertion, o.AuthStyle),
			Scopes:     o.Scopes, Audience: o.Audience, Resource: o.Resource, CAFile: o.CAFile,
			RevocationURL: o.RevocationURL,
		}, d))
	case c.TokenExchange != nil:
		x := c.TokenExchange
		return named(name)(NewTokenExchange(TokenExchangeOptions{
			TokenURL:             x.TokenURL,
			ClientAuth:           clientAuth(x.ClientID, x.ClientSecretFile, x.ClientAssertion, x.AuthStyle),
			SubjectTokenAudience: audienceOf(x.SubjectToken), SubjectTokenPresented: x.SubjectToken.IsDelegation(),
			ActorTokenAudience: audienceOf(x.ActorToken), ActorTokenType: x.ActorTokenType,
			SubjectTokenType: x.SubjectTokenType, RequestedTokenType: x.RequestedTokenType,
			Audience: x.Audience, Resource: x.Resource, Scopes: x.Scopes, Extra: x.Extra, CAFile: x.CAFile,
			RevocationURL: x.RevocationURL,
		}, d))
	case c.AWS != nil:
		a := c.AWS
		return named(name)(NewAWS(AWSOptions{
			RoleARN: a.RoleARN, WebIdentityAudience: audienceOf(a.WebIdentity), Region: a.Region,
			STSEndpoint: a.STSEndpoint, Duration: a.Duration.D(), CAFile: a.CAFile,
		}, d))
	case c.GitHubApp != nil:
		g := c.GitHubApp
		return named(name)(NewGitHubApp(GitHubAppOptions{
			AppID: g.AppID, InstallationID: g.InstallationID, PrivateKeyFile: g.PrivateKeyFile,
			APIURL: g.APIURL, Repositories: g.Repositories, Permissions: g.Permissions, CAFile: g.CAFile,
		}, d))
	case c.Vault != nil:
		v := c.Vault
		o := VaultOptions{Address: v.Address, Namespace: v.Namespace, CAFile: v.CAFile}
		if j := v.Auth.JWT; j != nil {
			aud := ""
			if j.JWTSVID != nil {
				aud = j.JWTSVID.Audience
			}
			o.JWTAuth = &VaultJWTAuth{Mount: j.Mount, Role: j.Role, Audience: aud}
		}
		if k := v.Auth.Kubernetes; k != nil {
			o.KubernetesAuth = &VaultKubernetesAuth{Mount: k.Mount, Role: k.Role, TokenFile: k.TokenFile}
		}
		if kv := v.Secret.KV2; kv != nil {
			o.KV2 = &VaultKV2{Mount: kv.Mount, Path: kv.Path, Field: kv.Field}
		}
		if dy := v.Secret.Dynamic; dy != nil {
			o.Dynamic = &VaultDynamic{Path: dy.Path, Field: dy.Field, UsernameField: dy.UsernameField, PasswordField: dy.PasswordField}
		}
		return named(name)(NewVault(o, d))
	case c.GCP != nil:
		g := c.GCP
		return named(name)(NewGCP(GCPOptions{
			Audience: g.Audience, SubjectTokenAudience: audienceOf(g.SubjectToken), ServiceAccount: g.ServiceAccount,
			Scopes: g.Scopes, STSURL: g.STSURL, IAMURL: g.IAMURL, CAFile: g.CAFile,
		}, d))
	case c.Azure != nil:
		a := c.Azure
		aud := ""
		if a.JWTSVID != nil {
			aud = a.JWTSVID.Audience
		}
		return named(name)(NewAzure(AzureOptions{
			TenantID: a.TenantID, ClientID: a.ClientID, Scope: a.Scope, JWTAudience: aud,
			AuthorityURL: a.AuthorityURL, CAFile: a.CAFile,
		}, d))
	case c.Broker != nil:
		return named(name)(NewBrokered(d))
	}
	return nil, fmt.Errorf("credential: %s: no provider set", name)
}

// named prefixes a constructor's error with the credential's name.
func named(name string) func(Provider, error) (Provider, error) {
	return func(p Provider, err error) (Provider, error) {
		if err != nil {
			return nil, fmt.Errorf("credential: %s: %s", name, strings.TrimPrefix(err.Error(), "credential: "))
		}
		return p, nil
	}
}

func audienceOf(t *config.TokenSource) string {
	if t == nil || t.JWTSVID == nil {
		return ""
	}
	return t.JWTSVID.Audience
}

func clientAuth(id, secretFile string, assertion *config.TokenSource, style config.AuthStyle) ClientAuth {
	return ClientAuth{ClientID: id, ClientSecretFile: secretFile, AssertionAudience: audienceOf(assertion), AuthStyle: string(style)}
}

// Staler is implemented by providers whose source can change under a token that does not
// expire (a secret file rotated by a Kubernetes Secret volume update). Manager calls Stale at
// most once per Options.RecheckEvery per credential, on the request path, so it must be cheap
// (a stat, not a read) and safe for concurrent use. It reports whether the value the most recent
// Fetch returned may no longer be current; Manager then fetches again.
type Staler interface {
	Stale(now time.Time) bool
}

// maxFileSize bounds how much of a secret file is read; a larger file is an error (a mistaken
// path, not a secret).
const maxFileSize = 64 << 10

// StaticFile returns a Provider that reads a secret from the file at path on every Fetch,
// trimming surrounding whitespace (a trailing newline). A missing, unreadable, empty or oversized
// file, or one whose value contains control characters, is an error naming the path and the
// problem. It implements Staler: the file is re-stat'ed (size, modification time and inode,
// following symlinks) and reported stale when it differs from the file last read, so a rotated
// secret (e.g. a Kubernetes Secret volume's symlink swap) is picked up without a restart.
func StaticFile(path string) Provider {
	return &fileProvider{path: path}
}

type fileProvider struct {
	path string

	mu   sync.Mutex
	last os.FileInfo // of the file the last successful Fetch read; nil before
}

func (p *fileProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	if err := ctx.Err(); err != nil {
		return Token{}, err
	}
	f, err := os.Open(p.path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Token{}, fmt.Errorf("secret file %s does not exist", p.path)
		}
		return Token{}, fmt.Errorf("secret file: %w", err)
	}
	defer f.Close()
	// Stat the open file, not the path, so the fingerprint belongs to exactly the bytes read
	// even if the path is swapped between the two calls.
	fi, err := f.Stat()
	if err != nil {
		return Token{}, fmt.Errorf("secret file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return Token{}, fmt.Errorf("secret file %s is not a regular file", p.path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return Token{}, fmt.Errorf("secret file: %w", err)
	}
	if len(b) > maxFileSize {
		return Token{}, fmt.Errorf("secret file %s is larger than %d bytes", p.path, maxFileSize)
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return Token{}, fmt.Errorf("secret file %s is empty", p.path)
	}
	if err := checkValue(v); err != nil {
		return Token{}, fmt.Errorf("secret file %s: %w", p.path, err)
	}
	p.mu.Lock()
	p.last = fi
	p.mu.Unlock()
	return NewToken(args.Name, v, time.Time{}), nil
}

// Shared is true: the file's secret does not depend on the caller.
func (p *fileProvider) Shared() bool { return true }

// Kind is "static".
func (p *fileProvider) Kind() string { return "static" }

// Stale reports whether the file at path is no longer the file last read: it is gone, or its
// inode, size or modification time differ.
func (p *fileProvider) Stale(time.Time) bool {
	p.mu.Lock()
	last := p.last
	p.mu.Unlock()
	if last == nil {
		return true
	}
	fi, err := os.Stat(p.path)
	if err != nil {
		return true
	}
	return !os.SameFile(fi, last) || fi.Size() != last.Size() || !fi.ModTime().Equal(last.ModTime())
}

// StaticEnv returns a Provider serving the value of the escrow process's environment variable
// name, read once now (surrounding whitespace trimmed). An unset or empty variable, or a value
// with control characters, makes every Fetch fail with an error naming the variable.
func StaticEnv(name string) Provider {
	return StaticEnvFrom(name, os.LookupEnv)
}

// StaticEnvFrom is StaticEnv with the environment lookup injected (os.LookupEnv in production).
func StaticEnvFrom(name string, lookup func(string) (string, bool)) Provider {
	v, ok := lookup(name)
	v = strings.TrimSpace(v)
	switch {
	case !ok:
		return &envProvider{err: fmt.Errorf("environment variable %s is not set", name)}
	case v == "":
		return &envProvider{err: fmt.Errorf("environment variable %s is empty", name)}
	}
	if err := checkValue(v); err != nil {
		return &envProvider{err: fmt.Errorf("environment variable %s: %w", name, err)}
	}
	return &envProvider{value: v}
}

type envProvider struct {
	value string
	err   error
}

// Shared is true: the variable's value does not depend on the caller.
func (p *envProvider) Shared() bool { return true }

// Kind is "static".
func (p *envProvider) Kind() string { return "static" }

func (p *envProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	if p.err != nil {
		return Token{}, p.err
	}
	if err := ctx.Err(); err != nil {
		return Token{}, err
	}
	return NewToken(args.Name, p.value, time.Time{}), nil
}
