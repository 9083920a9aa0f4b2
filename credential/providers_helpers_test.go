package credential

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// svidIssuer plays the pod's Workload API for providers: it signs JWT-SVIDs (ES256, kid, sub,
// aud, exp: the shape SPIRE issues) for the workload subject, and lets stand-ins verify them.
type svidIssuer struct {
	subject string
	key     *ecdsa.PrivateKey

	mu        sync.Mutex
	audiences []string
	issued    []string // every token handed out, for the leak scans
}

func newSVIDIssuer(t testing.TB, subject string) *svidIssuer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &svidIssuer{subject: subject, key: k}
}

func (s *svidIssuer) JWTSVID(ctx context.Context, audience string) (string, time.Time, error) {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: s.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", "spire-1"))
	if err != nil {
		return "", time.Time{}, err
	}
	exp := time.Now().Add(5 * time.Minute)
	tok, err := jwt.Signed(sig).Claims(jwt.Claims{
		Issuer: "https://spire.example.org", Subject: s.subject, Audience: jwt.Audience{audience},
		Expiry: jwt.NewNumericDate(exp), IssuedAt: jwt.NewNumericDate(time.Now()),
	}).Serialize()
	if err != nil {
		return "", time.Time{}, err
	}
	s.mu.Lock()
	s.audiences = append(s.audiences, audience)
	s.issued = append(s.issued, tok)
	s.mu.Unlock()
	return tok, exp, nil
}

// verify checks tok's signature, expiry and audience as a relying party would, and returns its
// subject; "" and the reason when it fails.
func (s *svidIssuer) verify(tok, audience string) (string, string) {
	p, err := jwt.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return "", err.Error()
	}
	var c jwt.Claims
	if err := p.Claims(&s.key.PublicKey, &c); err != nil {
		return "", err.Error()
	}
	if err := c.ValidateWithLeeway(jwt.Expected{AnyAudience: jwt.Audience{audience}, Time: time.Now()}, 0); err != nil {
		return "", err.Error()
	}
	return c.Subject, ""
}

func (s *svidIssuer) issuedTokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.issued)
}

// tlsStandIn starts an HTTPS stand-in and writes its certificate to a ca_file. The Deps'
// client trusts nothing else, so a provider reaches it only through its ca_file.
func tlsStandIn(t *testing.T, h http.Handler) (srv *httptest.Server, caFile string) {
	srv = httptest.NewTLSServer(h)
	t.Cleanup(srv.Close)
	caFile = filepath.Join(t.TempDir(), "ca.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(caFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return srv, caFile
}

// testDeps are Deps with a plain client (system roots only) and the issuer as the JWT source.
func testDeps(j JWTSource) Deps {
	d := Deps{HTTPClient: &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}}
	if j != nil {
		d.JWT = j
	}
	return d
}

// assertNoSecrets fails if any secret appears in s.
func assertNoSecrets(t *testing.T, what, s string, secrets ...string) {
	t.Helper()
	for _, v := range secrets {
		if v != "" && strings.Contains(s, v) {
			t.Errorf("%s leaks a secret (%.12s...): %q", what, v, s)
		}
	}
}

func writeSecret(t *testing.T, v string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, []byte(v+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// oauthErrorBody writes an RFC 6749 §5.2 error response.
func oauthErrorBody(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(`{"error":"` + code + `","error_description":"` + desc + `"}`))
}
