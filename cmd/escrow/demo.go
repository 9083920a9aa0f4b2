package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/proxy"
	"github.com/escrowproxy/escrow/proxy/ca"
)

//go:embed demo/policies.cedar
var demoPolicies []byte

const (
	demoHost = "api.example.com"
	// demoLLMHost takes a short-lived OAuth2 access token that escrow mints from the demo's
	// token endpoint (client credentials, RFC 6749 section 4.4) and refreshes before it expires.
	demoLLMHost  = "llm.example.com"
	demoIdentity = "spiffe://demo.escrow.dev/ns/agents/sa/coder"
)

func cmdDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", "escrow demo [--keep-running] [--dir DIR]",
		"Runs escrow, a local HTTPS API that needs a key, and an agent that calls it four times\n(allowed, denied by policy, unknown destination, allowed with a short-lived token escrow mints), printing each answer and audit record.", stdout, stderr)
	keep := fs.Bool("keep-running", false, "after the four calls, keep the proxy and the API running (Ctrl-C stops them) so you can try curl")
	dir := fs.String("dir", "", "working directory for the demo's config, policies, secret and CA files (default: a new temporary directory)")
	if err := fs.parse(args); err != nil {
		return err
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "escrow-demo-")
		if err != nil {
			return err
		}
		*dir = d
		// Removed however the demo ends, --keep-running included (Ctrl-C ends the context
		// and this function returns): it holds the demo's secret and CA key.
		defer os.RemoveAll(d)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// 1. A local HTTPS "API" that requires a bearer token. Its certificate comes from a CA of its
	//    own, which only escrow trusts (ca_file): the agent never talks to it directly.
	secret := randomHex(24)
	clientSecret := randomHex(24)
	api, apiCAFile, err := startDemoAPI(*dir, secret, clientSecret)
	if err != nil {
		return err
	}
	defer api.Close()

	// 2. The secret lives in a file only escrow reads; the config names the file, never the value.
	secretFile := filepath.Join(*dir, "secrets", "example-api-key")
	if err := writeFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		return err
	}
	clientSecretFile := filepath.Join(*dir, "secrets", "token-client-secret")
	if err := writeFile(clientSecretFile, []byte(clientSecret+"\n"), 0o600); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(*dir, "policies", "demo.cedar"), demoPolicies, 0o644); err != nil {
		return err
	}
	cfgText := fmt.Sprintf(`# escrow demo config (generated)
listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  static: %s
ca_dir: %s
policy:
  dir: %s
upstreams:
  - host: %s
    credential: example-api
    address: %s            # the demo API runs on loopback; pin the name there
    ca_file: %[6]s
  - host: %[9]s
    credential: llm-token      # minted per workload, short-lived, refreshed ahead of expiry
    address: %[5]s
    ca_file: %[6]s
credentials:
  example-api:
    static: {file: %[7]s}
  llm-token:
    oauth2:                    # client credentials: escrow trades its client secret for a 5-minute token
      token_url: %[10]s
      client_id: escrow-demo
      client_secret_file: %[8]s
      scopes: [models.read]
egress:
  allow_cidrs: [127.0.0.0/8]  # the demo API is on loopback, which is denied by default
`, demoIdentity, filepath.Join(*dir, "ca"), filepath.Join(*dir, "policies"), demoHost, api.Addr, apiCAFile, secretFile,
		clientSecretFile, demoLLMHost, api.TokenURL)
	cfgPath := filepath.Join(*dir, "escrow.yaml")
	if err := writeFile(cfgPath, []byte(cfgText), 0o644); err != nil {
		return err
	}
	cfg, err := config.Parse([]byte(cfgText))
	if err != nil {
		return err
	}

	// 3. escrow itself, with audit records captured so each call can show its own.
	records := make(chan audit.Record, 16)
	printer := audit.NewZapSink(stdout)
	log, _ := newLogger("warn", stderr)
	rt, err := proxy.Build(ctx, cfg, proxy.Deps{Logger: log, Version: version, DrainTimeout: 2 * time.Second,
		Audit: audit.SinkFunc(func(r *audit.Record) { records <- *r })})
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- rt.Serve(ctx) }()
	proxyURL := "http://" + rt.ProxyAddr.String()
	bundle := filepath.Join(cfg.CADir, config.TrustBundleFile)

	fmt.Fprintf(stdout, "escrow demo\n  proxy:   %s   (HTTPS_PROXY for the agent)\n  admin:   http://%s/metrics\n  bundle:  %s\n  API:     https://%s (really %s), needs a bearer token the agent does not have\n\n",
		proxyURL, rt.AdminAddr, bundle, demoHost, api.Addr)

	// 4. The agent: an ordinary HTTP client that only knows HTTPS_PROXY and the trust bundle.
	agent, lastConnect, err := demoAgent(proxyURL, bundle)
	if err != nil {
		return err
	}
	type call struct {
		title, method, url string
		wantStatus         int
		wantReason         string
	}
	calls := []call{
		{"allowed: read the API; escrow injects the real key", http.MethodGet, "https://" + demoHost + "/v1/models", 200, "allowed"},
		{"denied by policy: DELETE is forbidden", http.MethodDelete, "https://" + demoHost + "/v1/models/gpt-x", 403, "policy_denied"},
		{"denied: a host escrow does not know", http.MethodGet, "https://unknown.example.net/", 403, "unknown_destination"},
		{"allowed with a short-lived token: escrow minted it from the token endpoint for this workload", http.MethodGet, "https://" + demoLLMHost + "/v1/models", 200, "allowed"},
	}
	failed := 0
	for i, c := range calls {
		fmt.Fprintf(stdout, "%d. %s\n   agent: %s %s  (sending its own \"Authorization: Bearer not-a-real-key\")\n", i+1, c.title, c.method, c.url)
		status, reason, body := doDemoCall(ctx, agent, lastConnect, c.method, c.url)
		fmt.Fprintf(stdout, "   escrow answered: %d %s\n", status, reason)
		if body != "" {
			fmt.Fprintf(stdout, "   body: %s\n", strings.TrimSpace(body))
		}
		select {
		case rec := <-records:
			fmt.Fprint(stdout, "   audit record: ")
			printer.Write(&rec)
		case <-time.After(5 * time.Second):
			fmt.Fprintln(stdout, "   (no audit record arrived)")
			failed++
		}
		if status != c.wantStatus || reason != c.wantReason {
			fmt.Fprintf(stdout, "   UNEXPECTED: wanted %d %s\n", c.wantStatus, c.wantReason)
			failed++
		}
		fmt.Fprintln(stdout)
	}
	curl := fmt.Sprintf("curl --proxy %s --cacert %s https://%s/v1/models", proxyURL, bundle, demoHost)
	if *keep {
		fmt.Fprintf(stdout, "escrow is running (Ctrl-C to stop). Point any client at it:\n  %s\n  HTTPS_PROXY=%s SSL_CERT_FILE=%s python3 -c 'import urllib.request; print(urllib.request.urlopen(\"https://%s/v1/models\").read())'\n  curl http://%s/metrics\nconfig: %s\n",
			curl, proxyURL, bundle, demoHost, rt.AdminAddr, cfgPath)
		go func() {
			for rec := range records {
				printer.Write(&rec)
			}
		}()
		<-ctx.Done()
	} else {
		fmt.Fprintf(stdout, "To try it yourself, run `escrow demo --keep-running` and then, in another shell:\n  curl --proxy http://127.0.0.1:PORT --cacert <ca_dir>/trust-bundle.pem https://%s/v1/models\n(the exact command is printed)\n", demoHost)
	}
	cancel()
	if err := <-served; err != nil {
		log.Warn("proxy stopped with an error", zap.Error(err))
	}
	if failed > 0 {
		return fmt.Errorf("demo: %d call(s) did not behave as expected", failed)
	}
	return nil
}

// demoAgent builds the agent's client: proxy from HTTPS_PROXY, roots from the trust bundle
// escrow wrote, exactly what the injector gives an agent container.
func demoAgent(proxyURL, bundle string) (*http.Client, func() string, error) {
	pem, err := os.ReadFile(bundle)
	if err != nil {
		return nil, nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, nil, errors.New("demo: trust bundle holds no certificates")
	}
	u, err := url.Parse(proxyURL)
	if err != nil {
		return nil, nil, err
	}
	var connectReason string
	tr := &http.Transport{
		// What HTTPS_PROXY=<proxyURL> gives any client; set explicitly so the demo does not depend
		// on (or change) this process's environment.
		Proxy:           http.ProxyURL(u),
		TLSClientConfig: &tls.Config{RootCAs: roots},
		OnProxyConnectResponse: func(_ context.Context, _ *url.URL, _ *http.Request, res *http.Response) error {
			connectReason = res.Header.Get("X-Escrow-Reason")
			return nil
		},
	}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}, func() string { return connectReason }, nil
}

func doDemoCall(ctx context.Context, c *http.Client, lastConnect func() string, method, u string) (int, string, string) {
	req, _ := http.NewRequestWithContext(ctx, method, u, nil)
	req.Header.Set("Authorization", "Bearer not-a-real-key")
	resp, err := c.Do(req)
	if err != nil {
		// A refused CONNECT surfaces as a transport error; its reason came in the CONNECT response.
		if r := lastConnect(); r != "" {
			return http.StatusForbidden, r, ""
		}
		return 0, "error: " + err.Error(), ""
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	reason := resp.Header.Get("X-Escrow-Reason")
	if reason == "" && resp.StatusCode < 400 {
		reason = "allowed"
	}
	return resp.StatusCode, reason, string(body)
}

type demoAPI struct {
	Addr     string
	TokenURL string // the token endpoint, plain HTTP on loopback
	srv      *http.Server
	tokSrv   *http.Server
}

func (a *demoAPI) Close() { _ = a.srv.Close(); _ = a.tokSrv.Close() }

// demoTokenTTL is the lifetime of the access tokens the demo's token endpoint mints.
const demoTokenTTL = 5 * time.Minute

// startDemoAPI serves https://api.example.com and https://llm.example.com on loopback, plus an
// OAuth2 token endpoint (client credentials, RFC 6749 section 4.4, with client_secret_basic).
// api.example.com answers 200 only to the static key; llm.example.com only to an access token
// the endpoint minted and that has not expired. Neither ever echoes a token.
func startDemoAPI(dir, secret, clientSecret string) (*demoAPI, string, error) {
	apiCA, err := ca.New(ca.Options{Name: "escrow demo API CA"})
	if err != nil {
		return nil, "", err
	}
	caFile := filepath.Join(dir, "api-ca.crt")
	if err := writeFile(caFile, apiCA.CertPEM(), 0o644); err != nil {
		return nil, "", err
	}
	leaves := map[string]*tls.Certificate{}
	for _, h := range []string{demoHost, demoLLMHost} {
		if leaves[h], err = apiCA.Leaf(h); err != nil {
			return nil, "", err
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	tokLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		_ = ln.Close()
		return nil, "", err
	}
	var mu sync.Mutex
	minted := map[string]time.Time{} // access token -> expiry
	tokSrv := &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Cache-Control", "no-store")
			id, pw, ok := r.BasicAuth()
			if r.Method != http.MethodPost || r.URL.Path != "/token" {
				w.WriteHeader(http.StatusNotFound)
				return
			}
			if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "client_credentials" {
				w.WriteHeader(http.StatusBadRequest)
				_ = json.NewEncoder(w).Encode(map[string]string{"error": "unsupported_grant_type"})
				return
			}
			if !ok || id != "escrow-demo" || subtle.ConstantTimeCompare([]byte(pw), []byte(clientSecret)) != 1 {
				w.Header().Set("WWW-Authenticate", `Basic realm="token"`)
				w.WriteHeader(http.StatusUnauthorized)
				_ = json.NewEncoder(w).Encode(map[string]string{"error": "invalid_client"})
				return
			}
			tok := randomHex(20)
			mu.Lock()
			minted[tok] = time.Now().Add(demoTokenTTL)
			mu.Unlock()
			_ = json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "token_type": "Bearer",
				"expires_in": int(demoTokenTTL.Seconds()), "scope": r.PostForm.Get("scope")})
		}),
	}
	want := []byte("Bearer " + secret)
	srv := &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		TLSConfig: &tls.Config{GetCertificate: func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if c := leaves[hi.ServerName]; c != nil {
				return c, nil
			}
			return leaves[demoHost], nil
		}},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			auth := r.Header.Get("Authorization")
			var ok bool
			var note string
			if r.TLS != nil && r.TLS.ServerName == demoLLMHost {
				mu.Lock()
				exp, found := minted[strings.TrimPrefix(auth, "Bearer ")]
				mu.Unlock()
				ok = strings.HasPrefix(auth, "Bearer ") && found && time.Now().Before(exp)
				note = "the API saw a short-lived token escrow minted for this workload; the agent never had it"
			} else {
				ok = subtle.ConstantTimeCompare([]byte(auth), want) == 1
				note = "the API saw escrow's key; the agent never had it"
			}
			if !ok {
				w.WriteHeader(http.StatusUnauthorized)
				_ = json.NewEncoder(w).Encode(map[string]any{"error": "missing or wrong API key"})
				return
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": []string{"gpt-x"}, "note": note})
		}),
	}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	go func() { _ = tokSrv.Serve(tokLn) }()
	return &demoAPI{Addr: ln.Addr().String(), TokenURL: "http://" + tokLn.Addr().String() + "/token", srv: srv, tokSrv: tokSrv}, caFile, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, data, mode)
}
