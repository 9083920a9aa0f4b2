package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// TestProxy_ExchangesThePresentedDelegationTokenPerSubject configures a token_exchange credential
// whose subject_token is the delegation token the agent presents (RFC 8693 §2.1) and shows that
// each presented token is exchanged for its own upstream token, that a request without one is
// refused rather than exchanged, and that the presented tokens appear in no log, record or
// answer. The token endpoint stand-in follows RFC 8693 §2.1 (form POST, grant_type, subject_token
// and subject_token_type) and §2.2.1 (access_token, issued_token_type, token_type, expires_in).
func TestProxy_ExchangesThePresentedDelegationTokenPerSubject(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	jwks, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k1", Algorithm: "ES256", Use: "sig"}}})
	must(t, err)
	jwksFile := filepath.Join(t.TempDir(), "jwks.json")
	must(t, os.WriteFile(jwksFile, jwks, 0o644))
	sign := func(sub string) string {
		sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k1").WithType("JWT"))
		must(t, err)
		now := time.Now()
		tok, err := jwt.Signed(sig).Claims(map[string]any{"iss": "https://idp.example.com", "sub": sub, "aud": "escrow",
			"exp": now.Add(time.Hour).Unix(), "iat": now.Unix(), "jti": "same-jti", "act": map[string]any{"sub": testSPIFFEID}}).Serialize()
		must(t, err)
		return tok
	}
	// Both carry the same jti: the exchanged tokens must still be kept apart.
	alice, bob := sign("alice@example.com"), sign("bob@example.com")
	exchangedFor := func(subjectToken string) string {
		sum := sha256.Sum256([]byte(subjectToken))
		return "xt-" + hex.EncodeToString(sum[:8])
	}

	var mu sync.Mutex
	var exchanged []string // subject_token of every exchange
	sts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseForm(); err != nil || r.Method != http.MethodPost ||
			r.PostForm.Get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange" ||
			r.PostForm.Get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt" || r.PostForm.Get("subject_token") == "" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"error":"invalid_request"}`))
			return
		}
		st := r.PostForm.Get("subject_token")
		mu.Lock()
		exchanged = append(exchanged, st)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": exchangedFor(st), "token_type": "Bearer",
			"issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "expires_in": 3600})
	}))
	t.Cleanup(sts.Close)

	var seen seenRequests
	api := newPlainUpstream(t, http.HandlerFunc(seen.handler))
	// The first lines continue the base config's credentials: map (a key written twice is an
	// error).
	tp := newTestProxy(t, "  onbehalf:\n    token_exchange: {token_url: "+sts.URL+"/token, subject_token: {delegation: {}}}\n"+
		"delegation:\n  audience: escrow\n  issuers:\n  - oidc: {issuer: https://idp.example.com, jwks_file: "+jwksFile+"}\n"+
		"upstreams:\n"+api.route("api.example.com", "credential: onbehalf", "unsafe_plaintext_credential: true"))

	get := func(auth string) (*http.Response, []byte) {
		h := ""
		if auth != "" {
			h = "Proxy-Authorization: " + auth + "\r\n"
		}
		resp, body, _ := rawProxyRequest(t, tp, "GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n"+h+"\r\n")
		return resp, body
	}
	var bodies [][]byte
	for i, auth := range []string{"Bearer " + alice, "Bearer " + bob, "Bearer " + alice} {
		resp, body := get(auth)
		bodies = append(bodies, body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
	}
	got := seen.all()
	if len(got) != 3 {
		t.Fatalf("upstream saw %d requests, want 3", len(got))
	}
	want := []string{exchangedFor(alice), exchangedFor(bob), exchangedFor(alice)}
	for i, r := range got {
		if a := r.Header.Get("Authorization"); a != "Bearer "+want[i] {
			t.Errorf("upstream request %d carried %q, want the token exchanged for its own presented token %q", i, a, want[i])
		}
		if r.Header.Get("Proxy-Authorization") != "" {
			t.Errorf("upstream request %d carried the delegation token", i)
		}
	}
	mu.Lock()
	if len(exchanged) != 2 || exchanged[0] != alice || exchanged[1] != bob {
		t.Errorf("the token endpoint exchanged %d tokens; want alice's then bob's, once each (alice's again from the cache)", len(exchanged))
	}
	mu.Unlock()

	// No presented token: fail closed, never an exchange without it.
	resp, body := get("")
	bodies = append(bodies, body)
	d := denialOf(t, resp, body, http.StatusServiceUnavailable, ReasonCredentialUnavailable)
	if rec := findRecord(t, tp, d.RequestID); rec.Reason != string(ReasonCredentialUnavailable) || rec.Credential != "onbehalf" {
		t.Errorf("record %+v", rec)
	}
	if n := len(seen.all()); n != 3 {
		t.Errorf("upstream reached without a presented token (%d requests)", n)
	}
	mu.Lock()
	if len(exchanged) != 2 {
		t.Errorf("an exchange ran without a presented token")
	}
	mu.Unlock()

	// The presented tokens are credentials of their subjects: in no log, record or answer.
	var scanned []string
	scanned = append(scanned, tp.Logs.String())
	for _, b := range bodies {
		scanned = append(scanned, string(b))
	}
	for _, r := range tp.Records() {
		j, err := json.Marshal(r)
		must(t, err)
		scanned = append(scanned, string(j))
	}
	for _, s := range scanned {
		for _, tok := range []string{alice, bob, exchangedFor(alice), exchangedFor(bob)} {
			if strings.Contains(s, tok) {
				t.Errorf("a presented or exchanged token leaked into %.200q", s)
			}
		}
	}
}
