package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"github.com/escrowproxy/escrow/credential"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/proxy/egress"
)

// sidecarConfig is a minimal valid config in a fresh directory, plus extra.
func sidecarConfig(t *testing.T, extra string) *config.Config {
	t.Helper()
	dir := t.TempDir()
	pol := filepath.Join(dir, "policies")
	must(t, os.MkdirAll(pol, 0o755))
	must(t, os.WriteFile(filepath.Join(pol, "p.cedar"), []byte(allowAll), 0o644))
	cfg, err := config.Parse([]byte("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nidentity: {static: " + testSPIFFEID + "}\n" +
		"ca_dir: " + filepath.Join(dir, "ca") + "\npolicy: {dir: " + pol + "}\n" + extra))
	must(t, err)
	return cfg
}

func TestBuild_ReusesThePodCAKeptInCAKeyDir(t *testing.T) {
	keyDir := filepath.Join(t.TempDir(), "ca-key")
	cfg := sidecarConfig(t, "ca_key_dir: "+keyDir+"\n")
	first, err := Build(context.Background(), cfg, Deps{})
	must(t, err)
	must(t, first.Close())
	second, err := Build(context.Background(), cfg, Deps{})
	must(t, err)
	defer second.Close()
	if !bytes.Equal(first.CAPEM, second.CAPEM) {
		t.Fatal("a restart with ca_key_dir made a new pod CA; agents that loaded the old one would stop trusting escrow")
	}
	written, err := os.ReadFile(filepath.Join(cfg.CADir, config.CACertFile))
	must(t, err)
	if !bytes.Equal(written, second.CAPEM) {
		t.Error("ca_dir does not hold the reused CA")
	}
	// Without ca_key_dir every start makes a new CA.
	plain := sidecarConfig(t, "")
	a, err := Build(context.Background(), plain, Deps{})
	must(t, err)
	must(t, a.Close())
	b, err := Build(context.Background(), plain, Deps{})
	must(t, err)
	defer b.Close()
	if bytes.Equal(a.CAPEM, b.CAPEM) {
		t.Error("without ca_key_dir the CA was reused")
	}
}

func TestBuild_RefusesAConfigThatWasNotValidated(t *testing.T) {
	if _, err := Build(context.Background(), &config.Config{Listen: "127.0.0.1:0"}, Deps{}); err == nil || !strings.Contains(err.Error(), "not validated") {
		t.Fatalf("got %v", err)
	}
}

func TestBuild_ClosesWhatItOpenedWhenItFails(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	addr := ln.Addr().String()
	must(t, ln.Close())
	// The admin address is taken, so Build fails after opening the proxy listener on addr.
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer taken.Close()
	cfg := sidecarConfig(t, "")
	cfg.Listen, cfg.Admin = addr, taken.Addr().String()
	must(t, cfg.Validate())
	if _, err := Build(context.Background(), cfg, Deps{}); err == nil || !strings.Contains(err.Error(), "admin") {
		t.Fatalf("want an admin listen error, got %v", err)
	}
	again, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("the failed Build left the proxy listener open: %v", err)
	}
	again.Close()
}

func TestSidecar_ProviderHTTPClientDialsThroughTheEgressRulesAndIgnoresTheEnvironmentProxy(t *testing.T) {
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:1")
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:1")
	idp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("token")) }))
	defer idp.Close()

	denied, err := Build(context.Background(), sidecarConfig(t, ""), Deps{})
	must(t, err)
	defer denied.Close()
	_, err = denied.credDep.HTTPClient.Get(idp.URL)
	var de *egress.DeniedError
	if !errors.As(err, &de) {
		t.Fatalf("a provider reached a loopback token endpoint the egress rules deny: %v", err)
	}

	allowed, err := Build(context.Background(), sidecarConfig(t, "egress: {allow_cidrs: [127.0.0.0/8]}\n"), Deps{})
	must(t, err)
	defer allowed.Close()
	resp, err := allowed.credDep.HTTPClient.Get(idp.URL)
	if err != nil {
		t.Fatalf("with loopback allowed (and HTTP_PROXY pointing nowhere): %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
}

func TestSidecar_ServeStopsAndClosesOnCancel(t *testing.T) {
	sc, err := Build(context.Background(), sidecarConfig(t, ""), Deps{DrainTimeout: time.Second})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Serve(ctx) }()
	resp, err := direct.Get("http://" + sc.AdminAddr.String() + "/readyz")
	must(t, err)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/readyz %d", resp.StatusCode)
	}
	cancel()
	select {
	case err := <-done:
		must(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
	if c, err := net.DialTimeout("tcp", sc.ProxyAddr.String(), time.Second); err == nil {
		c.Close()
		t.Fatal("the proxy listener is still open after Serve returned")
	}
}

func TestBuild_TakesThePolicySetAsBytes(t *testing.T) {
	up := newTLSUpstream(t, okHandler(nil), false, "api.example.com")
	cfg := sidecarConfig(t, "egress: {allow_cidrs: [127.0.0.0/8]}\nupstreams:\n"+up.route("api.example.com"))
	src := policy.Source{Origin: "test", Policies: map[string][]byte{
		"p.cedar": []byte(`@id("bytes-forbid") forbid (principal, action, resource);`)}}
	sc, err := Build(context.Background(), cfg, Deps{Policies: &src, Audit: audit.SinkFunc(func(*audit.Record) {})})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(sc.CAPEM)
	client := &http.Client{Transport: &http.Transport{
		Proxy:           http.ProxyURL(&url.URL{Scheme: "http", Host: sc.ProxyAddr.String()}),
		TLSClientConfig: &tls.Config{RootCAs: roots},
	}, Timeout: 10 * time.Second}
	resp, err := client.Get("https://api.example.com/")
	must(t, err)
	resp.Body.Close()
	// The directory allows everything; the bytes forbid: the bytes are in force.
	if resp.StatusCode != http.StatusForbidden || resp.Header.Get(ReasonHeader) != string(ReasonPolicyDenied) {
		t.Fatalf("status %d %s, want 403 policy_denied from the set given as bytes", resp.StatusCode, resp.Header.Get(ReasonHeader))
	}
}

func TestBuild_AFailedStartLeavesTheTrustFilesOfTheRunningOne(t *testing.T) {
	dir := t.TempDir()
	keyDir := filepath.Join(dir, "ca-key")
	caDir := filepath.Join(dir, "ca")
	cfg := sidecarConfig(t, "ca_key_dir: "+keyDir+"\n")
	cfg.CADir = caDir
	running, err := Build(context.Background(), cfg, Deps{})
	must(t, err)
	defer running.Close()
	files := func() map[string][]byte {
		out := map[string][]byte{}
		for _, p := range []string{filepath.Join(caDir, config.CACertFile), filepath.Join(caDir, config.TrustBundleFile)} {
			b, err := os.ReadFile(p)
			must(t, err)
			out[p] = b
		}
		ents, err := os.ReadDir(keyDir)
		must(t, err)
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(keyDir, e.Name()))
			must(t, err)
			out[e.Name()] = b
		}
		return out
	}
	before := files()
	// The kept CA is replaced by a new one only when it is unusable: make it so, so that a start
	// would have to write a new one.
	ents, err := os.ReadDir(keyDir)
	must(t, err)
	for _, e := range ents {
		must(t, os.WriteFile(filepath.Join(keyDir, e.Name()), []byte("corrupt"), 0o600))
	}
	before = files()
	if len(before) < 4 {
		t.Fatalf("files: %d", len(before))
	}

	notPEM := filepath.Join(dir, "not-a-ca.pem")
	must(t, os.WriteFile(notPEM, []byte("not a certificate"), 0o644))
	for name, extra := range map[string]string{
		// A port in use: the running sidecar's (set below).
		"listen in use": "",
		// Discovered late: an upstream's ca_file that holds no certificate.
		"bad ca_file": "upstreams:\n  - host: api.example.com\n    ca_file: " + notPEM + "\n",
	} {
		second := sidecarConfig(t, "ca_key_dir: "+keyDir+"\n"+extra)
		second.CADir = caDir
		if extra == "" {
			second.Listen = running.ProxyAddr.String()
		}
		if sc, err := Build(context.Background(), second, Deps{}); err == nil {
			sc.Close()
			t.Fatalf("%s: Build succeeded", name)
		}
		after := files()
		for p, b := range before {
			if !bytes.Equal(after[p], b) {
				t.Errorf("%s: the failed start changed %s", name, p)
			}
		}
	}
}

func TestBuild_AdminOnANonLoopbackAddressNeedsTheUnsafeSwitch(t *testing.T) {
	cfg := sidecarConfig(t, "")
	cfg.Admin = "0.0.0.0:0" // as if a name had resolved there: Build checks what it bound
	if sc, err := Build(context.Background(), cfg, Deps{}); err == nil {
		sc.Close()
		t.Fatal("Build bound admin on 0.0.0.0 without unsafe_allow_non_loopback_admin")
	} else if !strings.Contains(err.Error(), "unsafe_allow_non_loopback_admin") {
		t.Errorf("error %q does not name the switch", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.CADir, config.CACertFile)); !os.IsNotExist(err) {
		t.Errorf("the refused start wrote ca_dir: %v", err)
	}
	cfg.UnsafeAllowNonLoopbackAdmin = true
	sc, err := Build(context.Background(), cfg, Deps{})
	must(t, err)
	sc.Close()
}

func TestSidecar_ReadyzNamesTheCredentialThatCannotBeFetched(t *testing.T) {
	dir := t.TempDir()
	good, gone := filepath.Join(dir, "good"), filepath.Join(dir, "gone")
	must(t, os.WriteFile(good, []byte(testSecret+"\n"), 0o600))
	must(t, os.WriteFile(gone, []byte("sk-gone-"+testSecret+"\n"), 0o600))
	cfg := sidecarConfig(t, "credentials:\n  good-key: {static: {file: "+good+"}}\n  gone-key: {static: {file: "+gone+"}}\n")
	must(t, os.Remove(gone)) // after the config was checked: lost before the start
	sc, err := Build(context.Background(), cfg, Deps{SystemRoots: func() ([]byte, error) { return nil, nil }})
	must(t, err)
	defer sc.Close()
	rec := httptest.NewRecorder()
	sc.Admin().ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	body := rec.Body.String()
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(body, "gone-key") || strings.Contains(body, "good-key:") {
		t.Errorf("/readyz = %d %s; want 503 naming gone-key only", rec.Code, body)
	}
	if strings.Contains(body, testSecret) {
		t.Error("/readyz shows a secret")
	}
}

// A credential provider call is a fetch (counted with its provider kind and duration, and the
// token's expiry exported); a cache hit is a lookup, not a fetch.
func TestSidecar_CredentialMetricsCountProviderFetchesNotCacheHits(t *testing.T) {
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), false, "api.example.test")
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.test", "credential: api"))
	for range 3 {
		resp := tp.Get(t, "https://api.example.test/")
		readBody(t, resp)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	fetches := testutil.ToFloat64(tp.Metrics.CredentialFetches.WithLabelValues("static", "success"))
	lookups := testutil.ToFloat64(tp.Metrics.CredentialLookups.WithLabelValues("ok"))
	if fetches < 1 || fetches >= lookups {
		t.Errorf("fetches{static,success} = %v with %v lookups: want at least one fetch and fewer fetches than lookups", fetches, lookups)
	}
	if n := testutil.CollectAndCount(tp.Metrics.CredentialFetchDuration); n == 0 {
		t.Error("escrow_credential_fetch_duration_seconds has no series")
	}
	resp, err := http.Get(tp.AdminURL + "/metrics")
	must(t, err)
	body := string(readBody(t, resp))
	for _, want := range []string{"escrow_credential_cache_entries", `escrow_credential_expiry_timestamp_seconds{credential="api"}`} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// revokingProvider mints one token and counts the revocations the manager asks for.
type revokingProvider struct{ revoked atomic.Int32 }

func (p *revokingProvider) Fetch(_ context.Context, a credential.FetchArgs) (credential.Token, error) {
	return credential.NewToken(a.Name, "revocable-token-value", time.Now().Add(time.Hour)), nil
}

func (p *revokingProvider) Revoke(context.Context, credential.Token) error {
	p.revoked.Add(1)
	return nil
}

// A stopping sidecar revokes the tokens it holds at their issuer (GitHub installation tokens,
// Vault leases): a token nobody uses any more does not stay valid until it expires.
func TestSidecar_StopRevokesTheTokensItHolds(t *testing.T) {
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), false, "api.example.test")
	prov := &revokingProvider{}
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.test", "credential: api"), withProvider("api", prov))
	resp := tp.Get(t, "https://api.example.test/")
	readBody(t, resp)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if n := prov.revoked.Load(); n != 0 {
		t.Fatalf("%d revocations while running", n)
	}
	tp.Transport.CloseIdleConnections()
	must(t, tp.Stop())
	if n := prov.revoked.Load(); n == 0 {
		t.Error("no token was revoked on stop")
	}
}

// subjectRecorder is a per-caller provider (not Shared) that records what it is asked to mint.
type subjectRecorder struct {
	mu    sync.Mutex
	asked []credential.FetchArgs
}

func (p *subjectRecorder) Fetch(_ context.Context, a credential.FetchArgs) (credential.Token, error) {
	p.mu.Lock()
	p.asked = append(p.asked, a)
	p.mu.Unlock()
	return credential.NewToken(a.Name, "per-caller-token-value", time.Now().Add(time.Hour)), nil
}

func (p *subjectRecorder) fetches() []credential.FetchArgs {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]credential.FetchArgs(nil), p.asked...)
}

// Start-up warms a per-caller credential for the sidecar's own identity, the subject every
// request is made as, so the first request reuses that token: one fetch in all. (It used to be
// warmed for no subject, a token no request used, and the first request fetched again.)
func TestSidecar_WarmsPerCallerCredentialsForItsOwnIdentityAndTheFirstRequestReusesThem(t *testing.T) {
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), false, "api.example.test")
	prov := &subjectRecorder{}
	tp := newTestProxy(t, "upstreams:\n"+up.route("api.example.test", "credential: api"), withProvider("api", prov))
	if got := prov.fetches(); len(got) != 1 || got[0].Subject != testSPIFFEID {
		t.Fatalf("fetches at start-up: %+v; want one, for %s", got, testSPIFFEID)
	}
	resp := tp.Get(t, "https://api.example.test/")
	readBody(t, resp)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if got := prov.fetches(); len(got) != 1 {
		t.Errorf("fetches after the first request: %+v; want only the warm one, reused", got)
	}
}
