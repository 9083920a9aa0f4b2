package harness_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/test/realparts/harness"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestMain(m *testing.M) { harness.Main(m) }

// TestSPIRE_FirstSVIDArrivesForTheTestsUID is the harness's smoke test: a real SPIRE server and
// agent issue this process an X509-SVID that chains to the server's bundle, and a JWT-SVID whose
// issuer is the discovery provider and whose signature verifies against the keys it serves.
func TestSPIRE_FirstSVIDArrivesForTheTestsUID(t *testing.T) {
	t.Parallel()
	sp := harness.StartSPIRE(t, harness.SPIREOptions{OIDCDiscovery: true})
	const id = "spiffe://example.org/smoke"
	start := time.Now()
	sp.CreateEntry(t, harness.Entry{SPIFFEID: id, Selectors: []string{harness.UIDSelector(os.Getuid())}, X509SVIDTTL: time.Hour})
	svid := sp.WaitX509SVID(t, id, time.Minute)
	t.Logf("first X509-SVID %s after %v", svid.ID, time.Since(start).Round(time.Millisecond))

	td := spiffeid.RequireTrustDomainFromString(sp.TrustDomain)
	bundle, err := x509bundle.Load(td, sp.BundleFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Errorf("the X509-SVID does not verify against the server's bundle: %v", err)
	}

	token := sp.FetchJWTSVID(t, "smoke-audience", id)
	res, err := http.Get(sp.JWKSURL)
	if err != nil {
		t.Fatal(err)
	}
	jwks, _ := io.ReadAll(res.Body)
	res.Body.Close()
	keys, err := jwtbundle.Parse(td, jwks)
	if err != nil {
		t.Fatalf("discovery provider's JWKS: %v", err)
	}
	jwt, err := jwtsvid.ParseAndValidate(token, keys, []string{"smoke-audience"})
	if err != nil {
		t.Fatalf("the JWT-SVID does not verify against the discovery provider's keys: %v", err)
	}
	if jwt.ID.String() != id || jwt.Claims["iss"] != sp.IssuerURL {
		t.Errorf("JWT-SVID sub %s iss %v, want %s iss %s", jwt.ID, jwt.Claims["iss"], id, sp.IssuerURL)
	}
}

// TestDex_ExchangesAJWTSVIDAndIssuesClientCredentials: dex started by the harness trusts SPIRE's
// discovery endpoint: an RFC 8693 exchange of a real JWT-SVID (audience: the connector's client
// ID) and a client_credentials grant both return access tokens.
func TestDex_ExchangesAJWTSVIDAndIssuesClientCredentials(t *testing.T) {
	t.Parallel()
	sp := harness.StartSPIRE(t, harness.SPIREOptions{OIDCDiscovery: true})
	const id = "spiffe://example.org/dex-client"
	sp.CreateEntry(t, harness.Entry{SPIFFEID: id, Selectors: []string{harness.UIDSelector(os.Getuid())}})
	sp.WaitX509SVID(t, id, time.Minute)
	dex := harness.StartDex(t, harness.DexOptions{SPIFFEIssuer: sp.IssuerURL, TLS: true})
	client := dex.Clients[0]
	hc := dex.HTTPClient(t)

	post := func(form url.Values) map[string]any {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, dex.TokenURL, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth(client.ID, client.Secret)
		res, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var body map[string]any
		_ = json.NewDecoder(res.Body).Decode(&body)
		if res.StatusCode != http.StatusOK || body["access_token"] == nil {
			t.Fatalf("dex token endpoint (%s): %s %v", form.Get("grant_type"), res.Status, body)
		}
		return body
	}
	post(url.Values{"grant_type": {"client_credentials"}, "scope": {"openid"}})
	post(url.Values{
		"grant_type":           {"urn:ietf:params:oauth:grant-type:token-exchange"},
		"connector_id":         {dex.ConnectorID},
		"scope":                {"openid"},
		"subject_token_type":   {"urn:ietf:params:oauth:token-type:id_token"},
		"requested_token_type": {"urn:ietf:params:oauth:token-type:access_token"},
		"subject_token":        {sp.FetchJWTSVID(t, "dex", id)},
	})
}

// TestMinIO_AssumeRoleWithWebIdentityTakesAJWTSVID: MinIO started by the harness trusts SPIRE's
// discovery endpoint: STS AssumeRoleWithWebIdentity with a real JWT-SVID (audience minio) returns
// temporary keys, and one with the wrong audience is refused.
func TestMinIO_AssumeRoleWithWebIdentityTakesAJWTSVID(t *testing.T) {
	t.Parallel()
	sp := harness.StartSPIRE(t, harness.SPIREOptions{OIDCDiscovery: true})
	const id = "spiffe://example.org/minio-client"
	sp.CreateEntry(t, harness.Entry{SPIFFEID: id, Selectors: []string{harness.UIDSelector(os.Getuid())}})
	sp.WaitX509SVID(t, id, time.Minute)
	m := harness.StartMinIO(t, harness.MinIOOptions{OpenIDConfigURL: sp.DiscoveryURL})

	sts := func(token string) (int, string) {
		t.Helper()
		form := url.Values{
			"Action": {"AssumeRoleWithWebIdentity"}, "Version": {"2011-06-15"}, "DurationSeconds": {"900"},
			"RoleArn": {m.RoleARN}, "WebIdentityToken": {token},
		}
		res, err := http.PostForm(m.URL+"/", form)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	if code, body := sts(sp.FetchJWTSVID(t, "minio", id)); code != http.StatusOK || !strings.Contains(body, "<AccessKeyId>") {
		t.Fatalf("AssumeRoleWithWebIdentity: %d %s", code, body)
	}
	if code, body := sts(sp.FetchJWTSVID(t, "not-minio", id)); code == http.StatusOK {
		t.Errorf("AssumeRoleWithWebIdentity accepted a JWT-SVID for another audience: %s", body)
	}
}

// TestPostgres_AcceptsOnlyPasswordLogins: the cluster StartPostgres brings up is reachable on
// loopback TCP and checks passwords (Vault's database engine and the tests rely on both).
func TestPostgres_AcceptsOnlyPasswordLogins(t *testing.T) {
	pg := harness.StartPostgres(t)
	if out, err := pg.Query(pg.Superuser, pg.SuperPassword, "select 40+2"); err != nil || out != "42" {
		t.Fatalf("superuser query: %q, %v", out, err)
	}
	if _, err := pg.Query(pg.Superuser, "wrong", "select 1"); err == nil {
		t.Fatal("a wrong password logged in")
	}
	if got := pg.Roles(t); len(got) != 0 {
		t.Fatalf("roles of a new cluster: %v; want none", got)
	}
}
