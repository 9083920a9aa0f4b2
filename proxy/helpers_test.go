package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/proxy/ca"
	"github.com/escrowproxy/escrow/proxy/egress"
	"github.com/escrowproxy/escrow/telemetry"
)

// direct is a client that never uses a proxy, for talking to escrow's listeners themselves.
var direct = &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 20 * time.Second}

// testSecret is the real credential escrow injects; it must never reach the agent, a log line,
// an audit record or a metric.
const testSecret = "sk-live-escrowTEST-9f8e7d6c5b4a3210"

// testSPIFFEID is the static identity of the test workload.
const testSPIFFEID = "spiffe://example.org/ns/agents/sa/coder"

// allowAll is the default policy set: everything is permitted.
const allowAll = `@id("allow-all") permit (principal, action, resource);`

// syncBuffer is a goroutine-safe bytes.Buffer for log sinks.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Sync() error { return nil }

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// setup is what the options of newTestProxy change.
type setup struct {
	policies      string
	mode          string
	allowLoopback bool
	identity      Identifier
	providers     map[string]credential.Provider
	credOpts      credential.Options
	resolver      egress.Resolver
	dial          func(ctx context.Context, network, addr string) (net.Conn, error)
	drain         time.Duration
	auditWriter   io.Writer // when set, records are also written as JSON lines through audit.NewZapSink
	keepRecords   bool
	wrapCA        func(LeafSource) LeafSource
	secretContent string
	inspectors    func(config.Upstream) Inspector
}

// withInspectors sets the request inspector of each upstream entry.
func withInspectors(f func(config.Upstream) Inspector) option {
	return func(s *setup) { s.inspectors = f }
}

// asSource makes an Identifier a sidecar identity source that is always ready.
func asSource(id Identifier) IdentitySource {
	if s, ok := id.(IdentitySource); ok {
		return s
	}
	return readySource{id}
}

type readySource struct{ Identifier }

func (readySource) Ready() bool  { return true }
func (readySource) Close() error { return nil }

type option func(*setup)

// withPolicy replaces the default allow-all policy set.
func withPolicy(cedar string) option { return func(s *setup) { s.policies = cedar } }

// withReportMode sets policy.mode: report.
func withReportMode() option { return func(s *setup) { s.mode = "report" } }

// withoutLoopbackEgress leaves egress.allow_cidrs out, so loopback upstreams are denied.
func withoutLoopbackEgress() option { return func(s *setup) { s.allowLoopback = false } }

// withIdentity replaces the static identity source.
func withIdentity(id Identifier) option { return func(s *setup) { s.identity = id } }

// withProvider replaces the provider of one configured credential name.
func withProvider(name string, p credential.Provider) option {
	return func(s *setup) { s.providers[name] = p }
}

// withCredentialOptions sets the credential manager's options.
func withCredentialOptions(o credential.Options) option { return func(s *setup) { s.credOpts = o } }

// withResolver injects the egress dialer's resolver.
func withResolver(r *fakeResolver) option { return func(s *setup) { s.resolver = r } }

// withDial injects the egress dialer's dial function (called with checked IP addresses).
func withDial(d func(ctx context.Context, network, addr string) (net.Conn, error)) option {
	return func(s *setup) { s.dial = d }
}

// withDrain sets ServeOptions.DrainTimeout.
func withDrain(d time.Duration) option { return func(s *setup) { s.drain = d } }

// withAuditJSON also writes every record through the production JSON sink into w.
func withAuditJSON(w io.Writer) option { return func(s *setup) { s.auditWriter = w } }

// withoutRecords keeps no records in memory (benchmarks).
func withoutRecords() option { return func(s *setup) { s.keepRecords = false } }

// withLeafSource wraps the pod CA as the proxy sees it.
func withLeafSource(wrap func(LeafSource) LeafSource) option {
	return func(s *setup) { s.wrapCA = wrap }
}

// withSecretContent sets the secret file's content (default testSecret plus a newline).
func withSecretContent(c string) option { return func(s *setup) { s.secretContent = c } }

// testProxy is a running escrow proxy with everything real but the listeners' addresses.
type testProxy struct {
	URL        *url.URL // the proxy listener, for HTTP_PROXY
	Addr       string
	AdminURL   string
	Client     *http.Client
	Transport  *http.Transport
	Roots      *x509.CertPool // the trust bundle the agent reads
	BundleFile string         // the trust bundle's file (pod CA), for real clients
	Proxy      *Proxy
	Sidecar    *Sidecar
	Metrics    *telemetry.Metrics
	Logs       *syncBuffer // ops logs (JSON, debug level)
	SecretFile string

	baseConfig string // the config newTestProxy wrote, before its yamlExtra

	mu      sync.Mutex
	recs    []*audit.Record
	recCond chan struct{} // closed and replaced on every record

	cancel  context.CancelFunc
	done    chan error
	stopped bool
}

// newTestProxy starts escrow on 127.0.0.1:0 with the config below plus yamlExtra (typically an
// upstreams: list), a static identity, the real policy engine, credential manager, pod CA and
// metrics, and returns it with an agent client that trusts the written trust bundle.
//
// Configured credentials: "api" (a secret file holding testSecret) and "broken" (a secret
// file that does not exist).
func newTestProxy(t testing.TB, yamlExtra string, opts ...option) *testProxy {
	t.Helper()
	s := &setup{
		policies: allowAll, mode: "enforce", allowLoopback: true,
		providers: map[string]credential.Provider{}, drain: 2 * time.Second, keepRecords: true,
		secretContent: testSecret + "\n",
	}
	for _, o := range opts {
		o(s)
	}
	dir := t.TempDir()
	polDir := filepath.Join(dir, "policies")
	must(t, os.MkdirAll(polDir, 0o755))
	must(t, os.WriteFile(filepath.Join(polDir, "policy.cedar"), []byte(s.policies), 0o644))
	secretFile := filepath.Join(dir, "api-key")
	must(t, os.WriteFile(secretFile, []byte(s.secretContent), 0o600))

	var y strings.Builder
	fmt.Fprintf(&y, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n")
	fmt.Fprintf(&y, "identity: {static: %q}\n", testSPIFFEID)
	fmt.Fprintf(&y, "ca_dir: %s\n", filepath.Join(dir, "ca"))
	fmt.Fprintf(&y, "policy: {dir: %s, mode: %s}\n", polDir, s.mode)
	if s.allowLoopback {
		fmt.Fprintf(&y, "egress:\n  allow_cidrs: [127.0.0.0/8]\n  dial_timeout: 5s\n")
	}
	fmt.Fprintf(&y, "credentials:\n  api: {static: {file: %s}}\n  broken: {static: {file: %s}}\n",
		secretFile, filepath.Join(dir, "no-such-secret"))
	base := y.String()
	y.WriteString(yamlExtra)
	cfg, err := config.Parse([]byte(y.String()))
	if err != nil {
		t.Fatalf("config:\n%s\n%v", y.String(), err)
	}

	logs := &syncBuffer{}
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), logs, zapcore.DebugLevel))

	tp := &testProxy{Logs: logs, SecretFile: secretFile, recCond: make(chan struct{}), baseConfig: base}
	var sink audit.Sink = audit.SinkFunc(tp.addRecord)
	if !s.keepRecords {
		sink = audit.SinkFunc(func(*audit.Record) {})
	}
	if s.auditWriter != nil {
		zs := audit.NewZapSink(s.auditWriter)
		mem := sink
		sink = audit.SinkFunc(func(r *audit.Record) { zs.Write(r); mem.Write(r) })
	}
	d := Deps{
		Providers: s.providers, CredentialOptions: s.credOpts, Dial: s.dial,
		Audit: sink, Logger: log, DrainTimeout: s.drain, WrapLeaves: s.wrapCA,
		Inspectors:  s.inspectors,
		SystemRoots: func() ([]byte, error) { return nil, nil }, // the bundle is the pod CA alone
	}
	if s.resolver != nil {
		d.Resolver = s.resolver
	}
	if s.identity != nil {
		d.Identity = asSource(s.identity)
	}
	sc, err := Build(context.Background(), cfg, d)
	must(t, err)
	tp.BundleFile = filepath.Join(cfg.CADir, config.TrustBundleFile)
	bundle, err := os.ReadFile(tp.BundleFile)
	must(t, err)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(bundle) {
		t.Fatal("trust bundle holds no certificate")
	}
	tp.Roots, tp.Metrics, tp.Sidecar = roots, sc.Metrics, sc
	p := sc.Proxy()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Serve(ctx) }()

	tp.Proxy, tp.cancel, tp.done = p, cancel, done
	tp.Addr = sc.ProxyAddr.String()
	tp.URL = &url.URL{Scheme: "http", Host: tp.Addr}
	tp.AdminURL = "http://" + sc.AdminAddr.String()
	tp.Transport = &http.Transport{
		Proxy:               http.ProxyURL(tp.URL),
		TLSClientConfig:     &tls.Config{RootCAs: roots},
		MaxIdleConnsPerHost: 16,
	}
	tp.Client = &http.Client{Transport: tp.Transport, Timeout: 20 * time.Second}
	t.Cleanup(func() {
		tp.Transport.CloseIdleConnections()
		if err := tp.Stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return tp
}

// Reconfigure updates the running sidecar to the test's base config plus yamlExtra (the same
// shape as newTestProxy's argument) through Sidecar.Update.
func (tp *testProxy) Reconfigure(yamlExtra string) error {
	cfg, err := config.Parse([]byte(tp.baseConfig + yamlExtra))
	if err != nil {
		return err
	}
	return tp.Sidecar.Update(context.Background(), Update{Config: cfg})
}

// Stop cancels Serve's context and waits for it to return (drain included).
func (tp *testProxy) Stop() error {
	tp.mu.Lock()
	if tp.stopped {
		tp.mu.Unlock()
		return nil
	}
	tp.stopped = true
	tp.mu.Unlock()
	tp.cancel()
	select {
	case err := <-tp.done:
		return err
	case <-time.After(30 * time.Second):
		return errors.New("Serve did not return 30s after its context ended")
	}
}

func (tp *testProxy) addRecord(r *audit.Record) {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	tp.recs = append(tp.recs, r)
	close(tp.recCond)
	tp.recCond = make(chan struct{})
}

// Records returns the audit records written so far.
func (tp *testProxy) Records() []*audit.Record {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return append([]*audit.Record(nil), tp.recs...)
}

// WaitRecords waits until at least n records were written and returns them. A response can
// reach the agent a moment before its record is written.
func (tp *testProxy) WaitRecords(t testing.TB, n int) []*audit.Record {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		tp.mu.Lock()
		if len(tp.recs) >= n {
			out := append([]*audit.Record(nil), tp.recs...)
			tp.mu.Unlock()
			return out
		}
		ch := tp.recCond
		tp.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("waited 10s for %d audit record(s), have %d", n, len(tp.Records()))
		}
	}
}

// Record waits for the n-th record (1-based) and returns it.
func (tp *testProxy) Record(t testing.TB, n int) *audit.Record {
	t.Helper()
	return tp.WaitRecords(t, n)[n-1]
}

// Get sends a GET through the proxy with the agent client.
func (tp *testProxy) Get(t testing.TB, rawURL string, hdr ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, rawURL, nil)
	must(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	return tp.Do(t, req)
}

// Do sends req with the agent client and reads the body into a replayable one.
func (tp *testProxy) Do(t testing.TB, req *http.Request) *http.Response {
	t.Helper()
	resp, err := tp.Client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	return resp
}

// rawConnect opens a TCP connection to the proxy, sends CONNECT authority (plus extra bytes
// right behind it) and returns the connection, a reader positioned after the response, and the
// response (its body read).
func (tp *testProxy) rawConnect(t testing.TB, authority string, extra []byte) (net.Conn, *bufio.Reader, *http.Response, []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", tp.Addr, 5*time.Second)
	must(t, err)
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	msg := "CONNECT " + authority + " HTTP/1.1\r\nHost: " + authority + "\r\n\r\n"
	if _, err := c.Write(append([]byte(msg), extra...)); err != nil {
		t.Fatalf("write CONNECT: %v", err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("read CONNECT response: %v", err)
	}
	var body []byte
	if resp.StatusCode != http.StatusOK {
		body, _ = io.ReadAll(resp.Body)
	}
	return c, br, resp, body
}

// denialOf checks a denial's status, X-Escrow-Reason and JSON body, and returns the body.
func denialOf(t testing.TB, resp *http.Response, body []byte, status int, reason Reason) denialBody {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status = %d, want %d (body %s)", resp.StatusCode, status, body)
	}
	if got := resp.Header.Get(ReasonHeader); got != string(reason) {
		t.Fatalf("%s = %q, want %q", ReasonHeader, got, reason)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	var d denialBody
	if err := json.Unmarshal(body, &d); err != nil {
		t.Fatalf("denial body %q: %v", body, err)
	}
	if d.Error != reason || d.Message == "" || d.RequestID == "" {
		t.Fatalf("denial body = %+v, want error %q, a message and a request id", d, reason)
	}
	return d
}

func readBody(t testing.TB, resp *http.Response) []byte {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return b
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// upstream is a real TLS (or plain) server playing an API escrow forwards to.
type upstream struct {
	*httptest.Server
	Addr   string // 127.0.0.1:port, for address:
	CAFile string // PEM of the CA that signed its certificate, for ca_file:
}

var (
	upCAOnce sync.Once
	upCA     *ca.CA
	upCAErr  error
)

// upstreamCA is the private CA of every test upstream (separate from escrow's pod CA).
func upstreamCA(t testing.TB) *ca.CA {
	upCAOnce.Do(func() { upCA, upCAErr = ca.New(ca.Options{Name: "test upstream CA"}) })
	must(t, upCAErr)
	return upCA
}

// newTLSUpstream starts an HTTPS server with a certificate for hosts (fake names, so the route
// pins its address) and HTTP/2 offered when h2 is true.
func newTLSUpstream(t testing.TB, h http.Handler, h2 bool, host string) *upstream {
	t.Helper()
	c := upstreamCA(t)
	leaf, err := c.Leaf(host)
	must(t, err)
	srv := httptest.NewUnstartedServer(h)
	srv.EnableHTTP2 = h2
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // handshake failures are expected in some tests
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{*leaf}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	caFile := filepath.Join(t.TempDir(), "upstream-ca.pem")
	must(t, os.WriteFile(caFile, c.CertPEM(), 0o644))
	return &upstream{Server: srv, Addr: srv.Listener.Addr().String(), CAFile: caFile}
}

// newPlainUpstream starts a plain HTTP server.
func newPlainUpstream(t testing.TB, h http.Handler) *upstream {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &upstream{Server: srv, Addr: srv.Listener.Addr().String()}
}

// route returns one upstreams: entry for host pinned to u, with extra lines (indented by the
// caller's convention: "    key: value").
func (u *upstream) route(host string, extra ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  - host: %s\n    address: %s\n", host, u.Addr)
	if u.CAFile != "" {
		fmt.Fprintf(&b, "    ca_file: %s\n", u.CAFile)
	}
	for _, e := range extra {
		fmt.Fprintf(&b, "    %s\n", e)
	}
	return b.String()
}

// fakeResolver answers fixed addresses per name.
type fakeResolver struct {
	answers map[string][]netip.Addr
}

func (r *fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := r.answers[host]; ok {
		return a, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

// unavailableIdentity is an identity source that cannot establish who is calling.
type unavailableIdentity struct{}

func (unavailableIdentity) Identify(context.Context, attest.Peer) (attest.Identity, error) {
	return attest.Identity{}, fmt.Errorf("%w: no X509-SVID received yet", attest.ErrUnavailable)
}

// counter counts handler invocations.
type counter struct {
	mu sync.Mutex
	n  int
}

func (c *counter) inc() {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
}

func (c *counter) get() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// okHandler answers 200 "ok" and counts calls.
func okHandler(c *counter) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if c != nil {
			c.inc()
		}
		_, _ = io.WriteString(w, "ok")
	}
}
