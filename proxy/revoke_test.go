package proxy

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/credential"
)

// mintingProvider mints one token per subject (a per-caller provider, like token exchange),
// counts its fetches, and records the tokens revoked at its "issuer". While gate is set, each
// fetch announces itself on entered and waits for gate.
type mintingProvider struct {
	mu      sync.Mutex
	fetches map[string]int // subject → fetches
	revoked chan string    // token IDs, as revoked
	entered chan struct{}
	gate    chan struct{}
}

func newMintingProvider() *mintingProvider {
	return &mintingProvider{fetches: map[string]int{}, revoked: make(chan string, 16)}
}

func (p *mintingProvider) Fetch(ctx context.Context, a credential.FetchArgs) (credential.Token, error) {
	p.mu.Lock()
	p.fetches[a.Subject]++
	n := p.fetches[a.Subject]
	gate, entered := p.gate, p.entered
	p.mu.Unlock()
	if gate != nil {
		entered <- struct{}{}
		select {
		case <-gate:
		case <-ctx.Done():
			return credential.Token{}, ctx.Err()
		}
	}
	return credential.NewToken(a.Name, testSecret+"-"+a.Subject+"-"+string(rune('0'+n)), time.Now().Add(time.Hour)), nil
}

func (p *mintingProvider) Revoke(_ context.Context, tok credential.Token) error {
	p.revoked <- tok.ID()
	return nil
}

func (p *mintingProvider) count(subject string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fetches[subject]
}

// waitRevoked waits for the provider to be asked to revoke the token with id.
func (p *mintingProvider) waitRevoked(t *testing.T, id string) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case got := <-p.revoked:
			if got == id {
				return
			}
		case <-timeout:
			t.Fatalf("token %s was not revoked at its issuer", id)
		}
	}
}

func revokeUpdate(rs ...Revocation) Update {
	if rs == nil {
		rs = []Revocation{}
	}
	return Update{Revocations: &rs}
}

// revocationRoutes is an intercepted route with the "api" credential and one without any.
func revocationRoutes(t *testing.T) string {
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	open := newTLSUpstream(t, okHandler(nil), false, "open.example.com")
	return "upstreams:\n" + up.route("api.example.com", "credential: api") + open.route("open.example.com")
}

func TestSidecar_RevokedIdentityIsDeniedWith403RevokedAndItsCachedCredentialsDropped(t *testing.T) {
	prov := newMintingProvider()
	var records bytes.Buffer
	var recMu sync.Mutex
	tp := newTestProxy(t, revocationRoutes(t), withProvider("api", prov),
		withAuditJSON(writerFunc(func(b []byte) (int, error) { recMu.Lock(); defer recMu.Unlock(); return records.Write(b) })))

	resp := tp.Get(t, "https://api.example.com/v1")
	if resp.StatusCode != 200 {
		t.Fatalf("before the revocation: %d %s", resp.StatusCode, readBody(t, resp))
	}
	minted := tp.Record(t, 1).CredentialID
	cached := tp.Sidecar.creds.Len()
	if cached == 0 || prov.count(testSPIFFEID) != 1 {
		t.Fatal("the credential was not cached for the identity")
	}

	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{
		Name: "agents/stop-coder", SPIFFEIDs: []string{testSPIFFEID}, Reason: "compromised",
	})))
	// Dropped at once, and revoked at the issuer, before any request.
	prov.waitRevoked(t, minted)
	if n := tp.Sidecar.creds.Len(); n != cached-1 {
		t.Fatalf("cache holds %d token(s) after the revocation, want %d (the identity's dropped)", n, cached-1)
	}

	for _, u := range []string{"https://api.example.com/v1", "https://open.example.com/"} {
		resp := tp.Get(t, u)
		d := denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonRevoked)
		if strings.Contains(d.Message, "compromised") || strings.Contains(d.Message, "stop-coder") {
			t.Errorf("the denial tells the agent the revocation's internals: %q", d.Message)
		}
	}
	recs := tp.WaitRecords(t, 3)
	for _, r := range recs[1:] {
		if r.Decision != audit.Deny || r.Reason != string(ReasonRevoked) || r.Revocation != "agents/stop-coder" || r.SPIFFEID != testSPIFFEID {
			t.Errorf("record = %+v, want a revoked denial naming agents/stop-coder", r)
		}
		if len(r.PolicyIDs) != 0 || r.PolicyDur != 0 {
			t.Errorf("the policy was asked about a revoked identity: %v", r.PolicyIDs)
		}
	}
	if prov.count(testSPIFFEID) != 1 {
		t.Errorf("the provider minted for the revoked identity: %d fetches", prov.count(testSPIFFEID))
	}
	recMu.Lock()
	if !strings.Contains(records.String(), `"revocation":"agents/stop-coder"`) {
		t.Errorf("the JSON audit record does not name the revocation:\n%s", records.String())
	}
	recMu.Unlock()

	// Lifting it restores service, with a fresh token.
	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate()))
	resp = tp.Get(t, "https://api.example.com/v1")
	if resp.StatusCode != 200 {
		t.Fatalf("after lifting the revocation: %d %s", resp.StatusCode, readBody(t, resp))
	}
	if prov.count(testSPIFFEID) != 2 {
		t.Errorf("fetches = %d, want 2 (a new token after the revocation was lifted)", prov.count(testSPIFFEID))
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func TestSidecar_RevocationByPrefixCoversPathSegmentsOnly(t *testing.T) {
	prov := newMintingProvider()
	tp := newTestProxy(t, revocationRoutes(t), withProvider("api", prov))
	resp := tp.Get(t, "https://api.example.com/v1")
	if resp.StatusCode != 200 {
		t.Fatalf("%d", resp.StatusCode)
	}
	minted := tp.Record(t, 1).CredentialID

	// ".../ns/agent" is not a path-segment prefix of ".../ns/agents/sa/coder".
	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{Name: "a/near-miss", SPIFFEIDPrefixes: []string{"spiffe://example.org/ns/agent"}})))
	if resp := tp.Get(t, "https://api.example.com/v1"); resp.StatusCode != 200 {
		t.Fatalf("a prefix that is not a path-segment prefix denied the request: %d", resp.StatusCode)
	}

	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{Name: "a/namespace", SPIFFEIDPrefixes: []string{"spiffe://example.org/ns/agents/"}})))
	prov.waitRevoked(t, minted) // the prefix's identities' tokens are dropped too
	resp = tp.Get(t, "https://api.example.com/v1")
	denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonRevoked)
	if r := tp.Record(t, 3); r.Revocation != "a/namespace" {
		t.Errorf("revocation = %q, want a/namespace", r.Revocation)
	}
}

func TestSidecar_RevokedIdentityIsDeniedInReportModeAndOnTunnels(t *testing.T) {
	tun := newTLSUpstream(t, okHandler(nil), false, "tunnel.example.com")
	tp := newTestProxy(t, "upstreams:\n"+tun.route("tunnel.example.com", "tunnel: true"), withReportMode(),
		withPolicy(`@id("deny-all") forbid (principal, action, resource);`))
	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{Name: "x/y", SPIFFEIDs: []string{testSPIFFEID}})))

	_, _, resp, body := tp.rawConnect(t, "tunnel.example.com:443", nil)
	denialOf(t, resp, body, http.StatusForbidden, ReasonRevoked)
	if r := tp.Record(t, 1); r.Kind != kindTunnel || r.Decision != audit.Deny || r.WouldDeny {
		t.Errorf("record = %+v: report mode must not let a revoked identity through", r)
	}
}

func TestSidecar_RevokedCredentialIsNeitherServedNorMinted(t *testing.T) {
	prov := newMintingProvider()
	tp := newTestProxy(t, revocationRoutes(t), withProvider("api", prov))
	resp := tp.Get(t, "https://api.example.com/v1")
	if resp.StatusCode != 200 {
		t.Fatalf("%d", resp.StatusCode)
	}
	minted := tp.Record(t, 1).CredentialID
	fetched := prov.count(testSPIFFEID) + prov.count("")

	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{Name: "ops/leaked-key", Credentials: []string{"api"}})))
	prov.waitRevoked(t, minted)
	resp = tp.Get(t, "https://api.example.com/v1")
	denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonRevoked)
	if r := tp.Record(t, 2); r.Revocation != "ops/leaked-key" || r.Credential != "api" || r.CredentialID != "" {
		t.Errorf("record = %+v, want a revoked denial naming ops/leaked-key and no credential instance", r)
	}
	// The same identity still reaches routes without that credential.
	if resp := tp.Get(t, "https://open.example.com/"); resp.StatusCode != 200 {
		t.Errorf("a route without the revoked credential: %d", resp.StatusCode)
	}
	// Readiness does not fetch (mint) a revoked credential either.
	if resp, err := direct.Get(tp.AdminURL + "/readyz"); err == nil {
		resp.Body.Close()
	}
	if n := prov.count(testSPIFFEID) + prov.count(""); n != fetched {
		t.Errorf("the revoked credential was minted: %d fetches, want %d", n, fetched)
	}

	// A config update while the revocation is in force keeps it.
	must(t, tp.Reconfigure(revocationRoutes(t)))
	resp = tp.Get(t, "https://api.example.com/v1")
	denialOf(t, resp, readBody(t, resp), http.StatusForbidden, ReasonRevoked)

	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate()))
	if resp := tp.Get(t, "https://api.example.com/v1"); resp.StatusCode != 200 {
		t.Fatalf("after lifting: %d %s", resp.StatusCode, readBody(t, resp))
	}
}

// A revocation that arrives while a request's credential is being fetched: the request is
// denied as revoked (not served with the token, not reported as an unavailable credential),
// and no token stays cached for the revoked identity.
func TestSidecar_RevocationDuringACredentialFetchDeniesTheRequest(t *testing.T) {
	prov := newMintingProvider()
	tp := newTestProxy(t, revocationRoutes(t), withProvider("api", prov))
	prov.mu.Lock() // after Build's warm-up fetches: from now on fetches wait
	prov.gate, prov.entered = make(chan struct{}), make(chan struct{}, 1)
	prov.mu.Unlock()
	tp.Sidecar.creds.ForgetSubject(testSPIFFEID) // the request must fetch
	warm := tp.Sidecar.creds.Len()
	done := make(chan *http.Response, 1)
	go func() {
		resp, err := tp.Client.Get("https://api.example.com/v1")
		if err != nil {
			t.Error(err)
			close(done)
			return
		}
		done <- resp
	}()
	select { // the request's fetch is running
	case <-prov.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the request did not fetch its credential")
	}
	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{Name: "a/b", SPIFFEIDs: []string{testSPIFFEID}})))
	close(prov.gate)
	resp := <-done
	if resp == nil {
		return
	}
	body := readBody(t, resp)
	resp.Body.Close()
	denialOf(t, resp, body, http.StatusForbidden, ReasonRevoked)
	if n := tp.Sidecar.creds.Len(); n != warm {
		t.Errorf("%d token(s) cached for the revoked identity", n-warm)
	}
}

func TestSidecar_AnInvalidRevocationChangesNothing(t *testing.T) {
	tp := newTestProxy(t, revocationRoutes(t))
	for _, bad := range [][]Revocation{
		{{SPIFFEIDs: []string{testSPIFFEID}}},                         // no name
		{{Name: "a/b"}},                                               // revokes nothing
		{{Name: "a/b", SPIFFEIDPrefixes: []string{"spiffe://"}}},      // would revoke everyone
		{{Name: "a/b", SPIFFEIDs: []string{"not-a-spiffe-id"}}},       // not an ID
		{{Name: "ok", SPIFFEIDs: []string{testSPIFFEID}}, {Name: ""}}, // one bad entry: all refused
	} {
		if err := tp.Sidecar.Update(context.Background(), revokeUpdate(bad...)); err == nil {
			t.Errorf("Update(%+v) accepted", bad)
		}
	}
	if resp := tp.Get(t, "https://open.example.com/"); resp.StatusCode != 200 {
		t.Fatalf("a refused revocation changed something: %d", resp.StatusCode)
	}
}

// A revocation ends the tunnels already open for the identity, not only new requests.
func TestSidecar_RevocationClosesTheIdentitysOpenTunnels(t *testing.T) {
	tun := newTLSUpstream(t, okHandler(nil), false, "tunnel.example.com")
	tp := newTestProxy(t, "upstreams:\n"+tun.route("tunnel.example.com", "tunnel: true"))
	c, br, resp, _ := tp.rawConnect(t, "tunnel.example.com:443", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT = %d", resp.StatusCode)
	}
	// Another identity's revocation leaves it open.
	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{Name: "a/other", SPIFFEIDs: []string{"spiffe://example.org/ns/x/sa/y"}})))
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := br.ReadByte(); err == nil || !isTimeout(err) {
		t.Fatalf("the tunnel was closed by another identity's revocation: %v", err)
	}

	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	must(t, tp.Sidecar.Update(context.Background(), revokeUpdate(Revocation{Name: "a/b", SPIFFEIDs: []string{testSPIFFEID}})))
	if _, err := br.ReadByte(); err == nil || isTimeout(err) {
		t.Fatalf("the revoked identity's tunnel is still open: %v", err)
	}
	if r := tp.Record(t, 1); r.Kind != kindTunnel || r.Decision != audit.Allow {
		t.Errorf("tunnel record = %+v", r)
	}
}

func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}
