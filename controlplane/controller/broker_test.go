package controller

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/broker"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/internal/fakeclock"
)

const (
	ghAppID        = 4242
	ghInstallation = 77
)

var (
	appKeyOnce sync.Once
	appKey     *rsa.PrivateKey
	appKeyPEM  []byte
)

// githubAppKey is one RSA key for the tests of this package (2048 bits, as GitHub issues).
func githubAppKey(t *testing.T) (*rsa.PrivateKey, []byte) {
	t.Helper()
	appKeyOnce.Do(func() {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		appKey = k
		appKeyPEM = pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
	})
	return appKey, appKeyPEM
}

// brokerFixture is a GitHub stand-in, a Secret holding the App's key in escrow's namespace
// (in a fake API server), and a Broker reading it.
type brokerFixture struct {
	gh     *controllertest.GitHub
	caFile string
	b      *Broker
	keyPEM []byte
	client *dynamicfake.FakeDynamicClient
	clock  *fakeclock.Clock
}

func newBrokerFixture(t *testing.T) *brokerFixture {
	t.Helper()
	key, keyPEM := githubAppKey(t)
	gh, err := controllertest.NewGitHub(ghAppID, ghInstallation, &key.PublicKey, "api.github.test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gh.Close)
	caFile := filepath.Join(t.TempDir(), "github-ca.pem")
	if err := os.WriteFile(caFile, gh.CAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	client := fakeClient(t, []runtime.Object{appSecret("github-app", keyPEM)}...)
	// The stand-in checks the App JWT against real time: the clock starts there.
	clock := fakeclock.New(time.Now())
	b, err := NewBroker(BrokerOptions{Client: client, Namespace: sys, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return &brokerFixture{gh: gh, caFile: caFile, b: b, keyPEM: keyPEM, client: client, clock: clock}
}

func appSecret(name string, keyPEM []byte) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata": map[string]any{"name": name, "namespace": sys},
		"data":     map[string]any{"private-key.pem": base64.StdEncoding.EncodeToString(keyPEM)},
	}}
}

// githubCred is a brokered github_app Credential for the stand-in.
func (f *brokerFixture) githubCred(ns, name string, ids ...string) v1alpha1.Credential {
	return v1alpha1.Credential{ObjectMeta: meta(ns, name), Spec: v1alpha1.CredentialSpec{
		GitHubApp: &v1alpha1.GitHubAppSpec{
			GitHubApp:     config.GitHubApp{AppID: ghAppID, InstallationID: ghInstallation, APIURL: f.gh.URL, CAFile: f.caFile},
			PrivateKeyRef: v1alpha1.SecretKeyRef{Name: "github-app", Key: "private-key.pem"},
		},
		Broker: &v1alpha1.BrokerSpec{SPIFFEIDs: ids},
	}}
}

func mint(b *Broker, caller, cred string) (credential.Token, error) {
	return b.Mint(context.Background(), broker.Request{Caller: spiffeid.RequireFromString(caller), MintRequest: broker.MintRequest{Credential: cred}})
}

func refusal(err error) broker.Result {
	var r *broker.Refusal
	if errors.As(err, &r) {
		return r.Result
	}
	return broker.ResultOK
}

func TestCompute_ABrokeredCredentialReachesSidecarsAsItsKindAlone(t *testing.T) {
	f := newBrokerFixture(t)
	gh := f.githubCred(sys, "github", agentsID)
	api := up("agents", "github", "api.github.com", 0)
	api.Spec.Credential = "github"
	v := Compute(Objects{Credentials: []v1alpha1.Credential{gh}, Upstreams: []v1alpha1.Upstream{api}}, sys)
	b := v.BundleForNamespace("agents")
	c, ok := b.Credentials["github"]
	if !ok || c.Broker == nil || c.Broker.Revision == "" || c.Provider() != config.ProviderBroker || len(b.Upstreams) != 1 {
		t.Fatalf("bundle = %+v", b)
	}
	raw, _ := json.Marshal(b)
	for _, leak := range []string{"github-app", "private-key", "private_key", "app_id", agentsID} {
		if strings.Contains(string(raw), leak) {
			t.Errorf("the sidecar's bundle names %q: %s", leak, raw)
		}
	}
	if vd, _ := v.Verdict(v1alpha1.KindCredential, ObjectKey{sys, "github"}); !vd.Accepted {
		t.Errorf("verdict %+v", vd)
	}
	got := v.Brokered()["github"]
	if got.Config.GitHubApp == nil || got.Config.GitHubApp.PrivateKeyFile != "/var/run/escrow-secrets/github-app/private-key.pem" || !got.Allows(agentsID) || got.Allows(otherID) {
		t.Errorf("brokered = %+v", got)
	}

	// The revision follows the provider's config: sidecars drop the old token when it changes.
	changed := f.githubCred(sys, "github", agentsID)
	changed.Spec.GitHubApp.Permissions = map[string]string{"contents": "read"}
	v2 := Compute(Objects{Credentials: []v1alpha1.Credential{changed}}, sys)
	same := Compute(Objects{Credentials: []v1alpha1.Credential{f.githubCred(sys, "github", otherID)}}, sys)
	rev := func(v *View) string { return v.BundleForNamespace("agents").Credentials["github"].Broker.Revision }
	if rev(v2) == rev(v) || rev(same) != rev(v) {
		t.Errorf("revisions %s, changed config %s, other workloads %s", rev(v), rev(v2), rev(same))
	}
}

func TestCompute_RefusesToBrokerTenantCredentialsAndProvidersWithoutARootSecret(t *testing.T) {
	f := newBrokerFixture(t)
	tenant := f.githubCred("agents", "github", agentsID)
	st := static(sys, "openai", "openai")
	st.Spec.Broker = &v1alpha1.BrokerSpec{SPIFFEIDs: []string{agentsID}}
	assertion := v1alpha1.Credential{ObjectMeta: meta(sys, "idp"), Spec: v1alpha1.CredentialSpec{
		OAuth2: &v1alpha1.OAuth2Spec{OAuth2: config.OAuth2{TokenURL: "https://idp.example.com/token", ClientID: "c",
			ClientAssertion: &config.TokenSource{JWTSVID: &config.JWTSVID{Audience: "idp"}}}},
		Broker: &v1alpha1.BrokerSpec{SPIFFEIDs: []string{agentsID}}}}
	nobody := f.githubCred(sys, "nobody")
	badApp := f.githubCred(sys, "bad-app", agentsID)
	badApp.Spec.GitHubApp.AppID = 0
	secret := v1alpha1.Credential{ObjectMeta: meta(sys, "oauth"), Spec: v1alpha1.CredentialSpec{
		OAuth2: &v1alpha1.OAuth2Spec{OAuth2: config.OAuth2{TokenURL: "https://idp.example.com/token", ClientID: "c"},
			ClientSecretRef: &v1alpha1.SecretKeyRef{Name: "idp", Key: "secret"}},
		Broker: &v1alpha1.BrokerSpec{SPIFFEIDPrefixes: []string{"spiffe://example.org/ns/agents"}}}}
	v := Compute(Objects{Credentials: []v1alpha1.Credential{tenant, st, assertion, nobody, badApp, secret}}, sys)
	for _, c := range []struct{ ns, name, reason, msg string }{
		{"agents", "github", v1alpha1.ReasonNotBrokerable, "only a cluster-wide Credential"},
		{sys, "openai", v1alpha1.ReasonNotBrokerable, "a static credential has no root secret"},
		{sys, "idp", v1alpha1.ReasonNotBrokerable, "an oauth2 credential has no root secret"},
		{sys, "nobody", v1alpha1.ReasonInvalid, "spec.broker: names no spiffe_ids"},
		{sys, "bad-app", v1alpha1.ReasonInvalid, "spec.github_app.app_id"},
	} {
		vd, _ := v.Verdict(v1alpha1.KindCredential, ObjectKey{c.ns, c.name})
		if vd.Accepted || vd.Reason != c.reason || !strings.Contains(vd.Message, strings.TrimPrefix(c.msg, "an ")) {
			t.Errorf("%s/%s: verdict %+v; want %s %q", c.ns, c.name, vd, c.reason, c.msg)
		}
	}
	if got := slices.Sorted(func(yield func(string) bool) {
		for n := range v.Brokered() {
			if !yield(n) {
				return
			}
		}
	}); !slices.Equal(got, []string{"oauth"}) {
		t.Errorf("brokered %v; want only the oauth2 client-secret one", got)
	}
	if b := v.BundleForNamespace("agents"); b.Credentials["github"].GitHubApp != nil || b.Credentials["openai"].Static != nil {
		t.Errorf("a refused Credential reached the bundle: %+v", b.Credentials)
	}
}

func TestBroker_MintsOnceForEveryAllowedSidecarAndRefusesOthers(t *testing.T) {
	f := newBrokerFixture(t)
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{f.githubCred(sys, "github", agentsID, "spiffe://example.org/ns/agents/sa/reviewer")}}, sys))
	var first credential.Token
	for i, id := range []string{agentsID, agentsID, "spiffe://example.org/ns/agents/sa/reviewer"} {
		tok, err := mint(f.b, id, "github")
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = tok
		}
		if !strings.HasPrefix(tok.Value(), "ghs_") || tok.ID() != first.ID() || time.Until(tok.ExpiresAt()) < 59*time.Minute {
			t.Fatalf("token %d: %v expiring %v", i, tok, tok.ExpiresAt())
		}
	}
	if n := f.gh.Minted(); n != 1 {
		t.Errorf("GitHub minted %d tokens for three requests; want 1", n)
	}
	_, err := mint(f.b, otherID, "github")
	if refusal(err) != broker.ResultDenied || strings.Contains(err.Error(), string(f.keyPEM[40:80])) {
		t.Errorf("another workload: %v", err)
	}
	if _, err := mint(f.b, agentsID, "gitlab"); refusal(err) != broker.ResultNotFound {
		t.Errorf("unknown credential: %v", err)
	}
	_, err = f.b.Mint(context.Background(), broker.Request{Caller: spiffeid.RequireFromString(agentsID), MintRequest: broker.MintRequest{Credential: "github", Scope: "x"}})
	if refusal(err) != broker.ResultInvalid {
		t.Errorf("a scope: %v", err)
	}
}

func TestBroker_RevocationsRefuseMintsAndAClusterWideOneRevokesTheToken(t *testing.T) {
	f := newBrokerFixture(t)
	gh := f.githubCred(sys, "github", agentsID, "spiffe://example.org/ns/agents/sa/reviewer")
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{gh}}, sys))
	tok, err := mint(f.b, agentsID, "github")
	if err != nil {
		t.Fatal(err)
	}

	// A tenant's Revocation of its own workload refuses it, and drops nothing others use.
	self := revoke("agents", "coder", agentsID)
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{gh}, Revocations: []v1alpha1.Revocation{self}}, sys))
	if _, err := mint(f.b, agentsID, "github"); refusal(err) != broker.ResultRevoked {
		t.Errorf("revoked workload: %v", err)
	}
	if other, err := mint(f.b, "spiffe://example.org/ns/agents/sa/reviewer", "github"); err != nil || other.ID() != tok.ID() {
		t.Errorf("another workload: %v %v", other, err)
	}

	// A cluster-wide Revocation of the credential: refused for all, the token revoked at GitHub.
	incident := v1alpha1.Revocation{ObjectMeta: meta(sys, "incident"), Spec: v1alpha1.RevocationSpec{Credentials: []string{"github"}, Reason: "leak"}}
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{gh}, Revocations: []v1alpha1.Revocation{incident}}, sys))
	if _, err := mint(f.b, "spiffe://example.org/ns/agents/sa/reviewer", "github"); refusal(err) != broker.ResultRevoked || !strings.Contains(err.Error(), sys+"/incident") {
		t.Errorf("revoked credential: %v", err)
	}
	waitFor(t, "the token revoked at GitHub", func() bool { return slices.Equal(f.gh.Revoked(), []string{tok.Value()}) })

	// Gone: a new token.
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{gh}}, sys))
	again, err := mint(f.b, agentsID, "github")
	if err != nil || again.ID() == tok.ID() || f.gh.Minted() != 2 {
		t.Errorf("after the Revocation: %v %v, %d minted", again, err, f.gh.Minted())
	}

	// A changed Credential: the old token is revoked, the next mint is fresh.
	changed := f.githubCred(sys, "github", agentsID)
	changed.Spec.GitHubApp.Permissions = map[string]string{"contents": "read"}
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{changed}}, sys))
	waitFor(t, "the old token revoked", func() bool { return len(f.gh.Revoked()) == 2 && f.gh.Revoked()[1] == again.Value() })
	if third, err := mint(f.b, agentsID, "github"); err != nil || third.ID() == again.ID() {
		t.Errorf("after the change: %v %v", third, err)
	}
}

func TestBroker_AMissingSecretIsUnavailableUntilItExists(t *testing.T) {
	f := newBrokerFixture(t)
	gh := f.githubCred(sys, "github", agentsID)
	gh.Spec.GitHubApp.PrivateKeyRef.Name = "not-yet"
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{gh}}, sys))
	_, err := mint(f.b, agentsID, "github")
	if refusal(err) != broker.ResultUnavailable || !strings.Contains(err.Error(), `secrets "not-yet" not found`) {
		t.Fatalf("error %v", err)
	}
	if f.gh.Minted() != 0 {
		t.Errorf("GitHub was called")
	}
	// The Secret appears: after the failure backoff, the next mint reads it.
	if _, err := f.client.Resource(SecretsResource).Namespace(sys).Create(context.Background(), appSecret("not-yet", f.keyPEM), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(credential.DefaultFailureBackoff * 2)
	if tok, err := mint(f.b, agentsID, "github"); err != nil || f.gh.Minted() != 1 {
		t.Fatalf("after the Secret was created: %v %v", tok, err)
	}
}

// The controller's gRPC server serves the broker beside ADS, on the same mTLS listener, and
// counts the mints.
func TestServer_ServesTheBrokerOnTheADSListener(t *testing.T) {
	f := newBrokerFixture(t)
	f.b.Update(Compute(Objects{Credentials: []v1alpha1.Credential{f.githubCred(sys, "github", agentsID)}}, sys))
	ca, err := controllertest.NewCA("example.org")
	if err != nil {
		t.Fatal(err)
	}
	own, _ := ca.SVID("spiffe://example.org/ns/" + sys + "/sa/escrow-controller")
	m := NewMetrics(prometheus.NewRegistry())
	s, err := NewServer(ServerOptions{SVIDs: own, Bundles: ca.Bundle(), Metrics: m, Minter: f.b})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	defer func() { cancel(); <-done }()

	call := func(id string) (credential.Token, error) {
		svid, err := ca.SVID(id)
		if err != nil {
			t.Fatal(err)
		}
		conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(controllertest.ClientTLS(svid, ca.Bundle()))))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return broker.NewClient(conn).Mint(context.Background(), credential.BrokerRequest{Name: "github"})
	}
	tok, err := call(agentsID)
	if err != nil || !strings.HasPrefix(tok.Value(), "ghs_") {
		t.Fatalf("token %v, error %v", tok, err)
	}
	if _, err := call(otherID); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("another workload: %v", err)
	}
	if ok, denied := testutil.ToFloat64(m.BrokerMints.WithLabelValues("github", "ok")), testutil.ToFloat64(m.BrokerMints.WithLabelValues("github", "denied")); ok != 1 || denied != 1 {
		t.Errorf("broker_mints_total ok=%v denied=%v", ok, denied)
	}
}

func TestBroker_BeforeTheFirstViewEveryNameIsNotFound(t *testing.T) {
	f := newBrokerFixture(t)
	if _, err := mint(f.b, agentsID, "anything-a-caller-sends"); refusal(err) != broker.ResultNotFound {
		t.Fatalf("error %v; want not_found (a caller's name never becomes a label)", err)
	}
}

// An oauth2 client-credentials Credential is brokered too: the client secret comes from the
// Secret, sent as RFC 6749 §2.3.1 basic auth to a token endpoint that follows §4.4
// (https://www.rfc-editor.org/rfc/rfc6749#section-4.4).
func TestBroker_MintsOAuth2ClientCredentialsWithTheSecretFromTheAPIServer(t *testing.T) {
	const clientSecret = "s3cr3t-client-secret-never-in-a-pod"
	var calls atomic.Int32
	idp := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, secret, ok := r.BasicAuth()
		if r.Method != http.MethodPost || r.URL.Path != "/token" || !ok || id != "agents" || secret != clientSecret ||
			r.PostFormValue("grant_type") != "client_credentials" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"error":"invalid_client"}`)
			return
		}
		calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"access_token":"at-brokered-1","token_type":"Bearer","expires_in":3600}`)
	}))
	defer idp.Close()
	caFile := filepath.Join(t.TempDir(), "idp-ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: idp.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	secret := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Secret",
		"metadata": map[string]any{"name": "idp", "namespace": sys},
		"data":     map[string]any{"client-secret": base64.StdEncoding.EncodeToString([]byte(clientSecret))}}}
	b, err := NewBroker(BrokerOptions{Client: fakeClient(t, secret), Namespace: sys})
	if err != nil {
		t.Fatal(err)
	}
	cred := v1alpha1.Credential{ObjectMeta: meta(sys, "idp"), Spec: v1alpha1.CredentialSpec{
		OAuth2: &v1alpha1.OAuth2Spec{OAuth2: config.OAuth2{TokenURL: idp.URL + "/token", ClientID: "agents", CAFile: caFile},
			ClientSecretRef: &v1alpha1.SecretKeyRef{Name: "idp", Key: "client-secret"}},
		Broker: &v1alpha1.BrokerSpec{SPIFFEIDPrefixes: []string{"spiffe://example.org/ns/agents"}}}}
	v := Compute(Objects{Credentials: []v1alpha1.Credential{cred}}, sys)
	if c := v.BundleForNamespace("agents").Credentials["idp"]; c.Broker == nil || c.OAuth2 != nil {
		t.Fatalf("served as %+v", c)
	}
	b.Update(v)
	for range 3 {
		tok, err := mint(b, agentsID, "idp")
		if err != nil || tok.Value() != "at-brokered-1" {
			t.Fatalf("token %v, error %v", tok, err)
		}
	}
	if calls.Load() != 1 {
		t.Errorf("%d token requests for three mints", calls.Load())
	}
	if _, err := mint(b, "spiffe://example.org/ns/agents-2/sa/x", "idp"); refusal(err) != broker.ResultDenied {
		t.Errorf("a prefix matched across a segment boundary: %v", err)
	}
}
