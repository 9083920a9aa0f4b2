package attest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/sync/singleflight"

	"github.com/escrowproxy/escrow/config"
)

const (
	// maxKeysBytes bounds a JWKS or discovery document.
	maxKeysBytes = 1 << 20
	// keyFetchTimeout bounds one fetch of an issuer's keys. The fetch is shared by every
	// request waiting for it, so no one request's context bounds it.
	keyFetchTimeout = 10 * time.Second
)

// oidcKeys holds one OIDC issuer's signing keys: from jwks_file, else jwks_url, else the
// jwks_uri of the issuer's discovery document. Keys are fetched on first use, again after the
// TTL, and again when a token names a kid the set lacks, at most once per refresh interval
// (so tokens with made-up kids cannot make escrow hammer the issuer). A failed fetch is also
// remembered for the refresh interval.
type oidcKeys struct {
	cfg     config.OIDCIssuer
	client  *http.Client
	now     func() time.Time
	refresh time.Duration
	ttl     time.Duration

	group singleflight.Group

	mu          sync.Mutex
	set         *jose.JSONWebKeySet
	fetchedAt   time.Time
	attemptedAt time.Time
	lastErr     error
	jwksURI     string // from discovery, cached with the keys
}

// verify checks tok's signature against the issuer's keys and its iss, and returns its
// claims (std filled with the registered ones).
func (k *oidcKeys) verify(ctx context.Context, tok *jwt.JSONWebToken, std *jwt.Claims) (map[string]any, error) {
	h := tok.Headers[0]
	keys, err := k.keysFor(ctx, h.KeyID)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for _, key := range keys {
		if !key.IsPublic() || !key.Valid() {
			continue // a symmetric or private key never verifies a delegation token
		}
		if key.Algorithm != "" && key.Algorithm != h.Algorithm {
			continue
		}
		if key.Use != "" && key.Use != "sig" {
			continue
		}
		claims := map[string]any{}
		var got jwt.Claims
		if err := tok.Claims(key.Key, &got, &claims); err != nil {
			lastErr = err
			continue
		}
		if got.Issuer != k.cfg.Issuer {
			return nil, errors.New("iss does not match the issuer whose key signed the token")
		}
		*std = got
		return claims, nil
	}
	if lastErr != nil {
		return nil, fmt.Errorf("signature: %w", lastErr)
	}
	return nil, fmt.Errorf("issuer %q has no usable key for kid %q and alg %s", k.cfg.Issuer, truncate(h.KeyID, 64), h.Algorithm)
}

// keysFor returns the keys for kid (every key when kid is empty), refreshing the set when it
// is missing, stale, or lacks kid.
func (k *oidcKeys) keysFor(ctx context.Context, kid string) ([]jose.JSONWebKey, error) {
	k.mu.Lock()
	set, fetchedAt, attemptedAt, lastErr := k.set, k.fetchedAt, k.attemptedAt, k.lastErr
	k.mu.Unlock()
	now := k.now()
	match := func(s *jose.JSONWebKeySet) []jose.JSONWebKey {
		if s == nil {
			return nil
		}
		if kid == "" {
			return s.Keys
		}
		return s.Key(kid)
	}
	found := match(set)
	fresh := set != nil && now.Sub(fetchedAt) < k.ttl
	if len(found) > 0 && fresh {
		return found, nil
	}
	if !attemptedAt.IsZero() && now.Sub(attemptedAt) < k.refresh {
		// Fetched (or tried) too recently to try again.
		if len(found) > 0 {
			return found, nil
		}
		if set == nil && lastErr != nil {
			return nil, lastErr
		}
		return nil, fmt.Errorf("issuer %q has no key with kid %q", k.cfg.Issuer, truncate(kid, 64))
	}
	ch := k.group.DoChan("keys", func() (any, error) { return k.fetch() })
	select {
	case r := <-ch:
		if r.Err != nil {
			if len(found) > 0 {
				return found, nil // keep using the keys held while the issuer is unreachable
			}
			return nil, r.Err
		}
		if found = match(r.Val.(*jose.JSONWebKeySet)); len(found) > 0 {
			return found, nil
		}
		return nil, fmt.Errorf("issuer %q has no key with kid %q", k.cfg.Issuer, truncate(kid, 64))
	case <-ctx.Done():
		return nil, fmt.Errorf("keys of issuer %q: %w", k.cfg.Issuer, ctx.Err())
	}
}

func (k *oidcKeys) fetch() (*jose.JSONWebKeySet, error) {
	set, err := k.load()
	k.mu.Lock()
	defer k.mu.Unlock()
	k.attemptedAt = k.now()
	if err != nil {
		// The issuer's keys cannot be fetched: escrow cannot check the token (503), unless keys
		// are held, which the caller then keeps using.
		k.lastErr = fmt.Errorf("%w: keys of issuer %q: %w", ErrDelegationUnavailable, k.cfg.Issuer, err)
		return nil, k.lastErr
	}
	k.set, k.fetchedAt, k.lastErr = set, k.attemptedAt, nil
	return set, nil
}

func (k *oidcKeys) load() (*jose.JSONWebKeySet, error) {
	var body []byte
	switch {
	case k.cfg.JWKSFile != "":
		f, err := os.Open(k.cfg.JWKSFile)
		if err != nil {
			return nil, err
		}
		body, err = io.ReadAll(io.LimitReader(f, maxKeysBytes+1))
		f.Close()
		if err != nil {
			return nil, err
		}
	default:
		ctx, cancel := context.WithTimeout(context.Background(), keyFetchTimeout)
		defer cancel()
		uri := k.cfg.JWKSURL
		if uri == "" {
			var err error
			if uri, err = k.discover(ctx); err != nil {
				return nil, err
			}
		}
		var err error
		if body, err = k.get(ctx, uri); err != nil {
			return nil, err
		}
	}
	if len(body) > maxKeysBytes {
		return nil, fmt.Errorf("JWKS is larger than %d bytes", maxKeysBytes)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("JWKS: %w", err)
	}
	// Keep only public signing keys: a symmetric ("oct") key in a JWKS must never verify.
	keys := set.Keys[:0]
	for _, key := range set.Keys {
		if key.IsPublic() && key.Valid() && (key.Use == "" || key.Use == "sig") {
			keys = append(keys, key)
		}
	}
	if len(keys) == 0 {
		return nil, errors.New("JWKS has no public signing key")
	}
	set.Keys = keys
	return &set, nil
}

// discover returns the jwks_uri from the issuer's OpenID Connect discovery document, whose
// issuer must be the configured one exactly (OpenID Connect Discovery 1.0, section 4.3).
func (k *oidcKeys) discover(ctx context.Context) (string, error) {
	k.mu.Lock()
	uri := k.jwksURI
	k.mu.Unlock()
	if uri != "" {
		return uri, nil
	}
	body, err := k.get(ctx, strings.TrimSuffix(k.cfg.Issuer, "/")+"/.well-known/openid-configuration")
	if err != nil {
		return "", err
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return "", fmt.Errorf("discovery document: %w", err)
	}
	if doc.Issuer != k.cfg.Issuer {
		return "", fmt.Errorf("discovery document names issuer %q, not %q", truncate(doc.Issuer, 256), k.cfg.Issuer)
	}
	if !strings.HasPrefix(doc.JWKSURI, "https://") && !strings.HasPrefix(doc.JWKSURI, "http://") {
		return "", errors.New("discovery document has no http(s) jwks_uri")
	}
	k.mu.Lock()
	k.jwksURI = doc.JWKSURI
	k.mu.Unlock()
	return doc.JWKSURI, nil
}

func (k *oidcKeys) get(ctx context.Context, uri string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, uri, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", uri, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxKeysBytes+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", uri, err)
	}
	if len(body) > maxKeysBytes {
		return nil, fmt.Errorf("GET %s: larger than %d bytes", uri, maxKeysBytes)
	}
	return body, nil
}
