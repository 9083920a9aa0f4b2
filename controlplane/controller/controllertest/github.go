package controllertest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// GitHub is a stand-in for GitHub's REST API as a GitHub App uses it, following GitHub's
// published wire format:
//
//   - POST /app/installations/{installation_id}/access_tokens, authenticated by an App JWT
//     (RS256, iss = the App ID, iat..exp at most 10 minutes, including now), answers 201 with
//     {"token", "expires_at", "permissions", "repository_selection"}:
//     https://docs.github.com/en/rest/apps/apps#create-an-installation-access-token-for-an-app
//     and https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app
//   - DELETE /installation/token, authenticated by the installation token, answers 204:
//     https://docs.github.com/en/rest/apps/installations#revoke-an-installation-access-token
//   - GET /repos/{owner}/{repo} stands for the API behind: it answers 200 only to a live
//     installation token ("Authorization: Bearer" or "token"), and 401 {"message": "Bad
//     credentials"} otherwise.
//
// Every request must send Accept: application/vnd.github+json, or the API's 415. It serves
// HTTPS on loopback with a certificate for Hosts, from its own CA (CAPEM).
type GitHub struct {
	URL   string // https://127.0.0.1:PORT
	Addr  string // 127.0.0.1:PORT
	CAPEM []byte

	appID, installation int64
	pub                 *rsa.PublicKey
	srv                 *httptest.Server

	mu      sync.Mutex
	live    map[string]bool
	minted  int
	revoked []string
	apiOK   int
}

// NewGitHub starts the stand-in for App appID, installation installation, whose private key
// is key's; its certificate is valid for hosts (and 127.0.0.1). Close stops it.
func NewGitHub(appID, installation int64, key *rsa.PublicKey, hosts ...string) (*GitHub, error) {
	g := &GitHub{appID: appID, installation: installation, pub: key, live: map[string]bool{}}
	cert, caPEM, err := serverCert(hosts)
	if err != nil {
		return nil, err
	}
	g.srv = httptest.NewUnstartedServer(g)
	g.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	g.srv.StartTLS()
	g.URL, g.Addr, g.CAPEM = g.srv.URL, g.srv.Listener.Addr().String(), caPEM
	return g, nil
}

// Close stops the server.
func (g *GitHub) Close() { g.srv.Close() }

// Minted is how many installation tokens were created.
func (g *GitHub) Minted() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.minted
}

// Revoked lists the tokens revoked, in order.
func (g *GitHub) Revoked() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.revoked...)
}

// APICalls is how many API requests were answered 200.
func (g *GitHub) APICalls() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.apiOK
}

func ghError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"message": msg, "documentation_url": "https://docs.github.com/rest", "status": strconv.Itoa(status)})
}

func (g *GitHub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Accept") != "application/vnd.github+json" && !strings.HasPrefix(r.URL.Path, "/repos/") {
		ghError(w, http.StatusUnsupportedMediaType, "Unsupported 'Accept' header")
		return
	}
	auth := r.Header.Get("Authorization")
	bearer, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok {
		bearer, ok = strings.CutPrefix(auth, "token ")
	}
	switch {
	case r.Method == http.MethodPost && r.URL.Path == fmt.Sprintf("/app/installations/%d/access_tokens", g.installation):
		if !ok || !g.validAppJWT(bearer) {
			ghError(w, http.StatusUnauthorized, "A JSON web token could not be decoded")
			return
		}
		var body map[string]any
		if r.ContentLength != 0 {
			if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
				ghError(w, http.StatusBadRequest, "Problems parsing JSON")
				return
			}
		}
		tok := make([]byte, 18)
		_, _ = rand.Read(tok)
		token := fmt.Sprintf("ghs_%x", tok)
		g.mu.Lock()
		g.minted++
		g.live[token] = true
		g.mu.Unlock()
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(map[string]any{
			"token": token, "expires_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
			"permissions": map[string]string{"contents": "read", "metadata": "read"}, "repository_selection": "all",
		})
	case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/app/installations/"):
		ghError(w, http.StatusNotFound, "Not Found")
	case r.Method == http.MethodDelete && r.URL.Path == "/installation/token":
		g.mu.Lock()
		defer g.mu.Unlock()
		if !ok || !g.live[bearer] {
			ghError(w, http.StatusUnauthorized, "Bad credentials")
			return
		}
		delete(g.live, bearer)
		g.revoked = append(g.revoked, bearer)
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/repos/"):
		g.mu.Lock()
		live := ok && g.live[bearer]
		if live {
			g.apiOK++
		}
		g.mu.Unlock()
		if !live {
			ghError(w, http.StatusUnauthorized, "Bad credentials")
			return
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_ = json.NewEncoder(w).Encode(map[string]any{"full_name": strings.TrimPrefix(r.URL.Path, "/repos/"), "private": true})
	default:
		ghError(w, http.StatusNotFound, "Not Found")
	}
}

// validAppJWT checks what GitHub checks of an App JWT: the RS256 signature with the App's
// public key, iss = the App ID, and an iat..exp window of at most 10 minutes that includes now.
func (g *GitHub) validAppJWT(s string) bool {
	p, err := jwt.ParseSigned(s, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		return false
	}
	var c jwt.Claims
	if err := p.Claims(g.pub, &c); err != nil {
		return false
	}
	if c.Issuer != strconv.FormatInt(g.appID, 10) || c.IssuedAt == nil || c.Expiry == nil {
		return false
	}
	now := time.Now()
	iat, exp := c.IssuedAt.Time(), c.Expiry.Time()
	return exp.Sub(iat) <= 10*time.Minute && !iat.After(now) && exp.After(now)
}

// serverCert makes a CA and a server certificate for hosts and 127.0.0.1.
func serverCert(hosts []string) (tls.Certificate, []byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "GitHub stand-in CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "GitHub stand-in"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), DNSNames: hosts,
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, key.Public(), caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), nil
}
