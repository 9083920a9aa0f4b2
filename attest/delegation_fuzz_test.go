package attest_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/internal/fakeclock"
)

// FuzzDelegation feeds arbitrary Proxy-Authorization values, and arbitrary claim sets signed
// with a trusted key, to the verifier. It must never panic, every failure must wrap
// ErrDelegationInvalid without repeating the token, and every success must be a chain within
// max_depth with a subject.
func FuzzDelegation(f *testing.F) {
	const iss = "https://idp.example.com"
	const maxDepth = 3
	clk := fakeclock.New(time.Unix(1_900_000_000, 0))
	k := ecKey(f, "ec")
	path := filepath.Join(f.TempDir(), "jwks.json")
	b, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{k.public()}})
	if err := os.WriteFile(path, b, 0o600); err != nil {
		f.Fatal(err)
	}
	v, err := attest.NewDelegationVerifier(config.Delegation{
		Audience: delegAud,
		Issuers:  []config.DelegationIssuer{{OIDC: &config.OIDCIssuer{Issuer: iss, JWKSFile: path}}},
		MaxDepth: depth(maxDepth),
	}, attest.DelegationOptions{Now: clk.Now})
	if err != nil {
		f.Fatal(err)
	}
	good := claims(iss, clk.Now())
	seed := func(c map[string]any) []byte { b, _ := json.Marshal(c); return b }
	valid := mint(f, k, good)
	f.Add("Bearer "+valid, []byte(nil))
	f.Add("Basic ZGVsZWdhdGlvbjp4Lnkueg==", []byte(nil))
	f.Add("", seed(good))
	f.Add("", seed(with(good, "act", chain("a", "b", "c", "d"))))
	f.Add("", seed(with(good, "may_act", map[string]any{"sub": agentA}, "act", nil)))
	f.Add("", seed(with(good, "act", map[string]any{"sub": 1, "act": []any{}})))
	f.Add("", []byte(`{"iss":"https://idp.example.com","sub":"x","aud":"spiffe://example.org/escrow","exp":1900000100,"act":{"sub":"a","act":{"sub":"b","act":{"sub":"c","act":{"sub":"d","act":{"sub":"e"}}}}}}`))
	f.Add("", []byte(`{"iss":"https://idp.example.com","sub":"x","aud":["spiffe://example.org/escrow"],"exp":1e99}`))

	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", k.kid))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, header string, payload []byte) {
		var token string
		if len(payload) > 0 {
			jws, err := signer.Sign(payload)
			if err != nil {
				return
			}
			if token, err = jws.CompactSerialize(); err != nil {
				return
			}
			header = "Bearer " + token
		} else if tok, err := attest.ParseProxyAuthorization(header); err == nil {
			token = tok
		}
		d, err := v.VerifyHeader(context.Background(), header, agentA)
		if err != nil {
			if !errors.Is(err, attest.ErrDelegationInvalid) {
				t.Fatalf("error does not wrap ErrDelegationInvalid: %v", err)
			}
			if sig := token[strings.LastIndexByte(token, '.')+1:]; len(sig) > 8 && strings.Contains(err.Error(), sig) {
				t.Fatalf("error repeats the token: %v", err)
			}
			return
		}
		if d == nil {
			if strings.TrimSpace(header) != "" {
				t.Fatal("a non-empty header gave neither a delegation nor an error")
			}
			return
		}
		if d.Subject == "" || len(d.Actors) > maxDepth || d.Issuer != iss || d.TokenID == "" {
			t.Fatalf("bad delegation %+v", d)
		}
		for _, a := range d.Actors {
			if a == "" {
				t.Fatalf("empty actor in %+v", d)
			}
		}
		if token != "" && strings.Contains(d.TokenID, token) {
			t.Fatal("TokenID carries the token")
		}
	})
}
