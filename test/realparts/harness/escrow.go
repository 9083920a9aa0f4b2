package harness

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// escrowBinEnv runs a prebuilt escrow binary instead of building ./cmd/escrow.
const escrowBinEnv = "ESCROW_BIN"

var build struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// Main runs the tests of a package that uses the harness and removes the escrow binary built
// for them. Call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	os.Exit(code)
}

// RepoRoot is the escrow repository's root directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
}

// EscrowBin returns the escrow binary under test: ESCROW_BIN when set, else ./cmd/escrow built
// once per test binary (as the image builds it: static, trimmed).
func EscrowBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv(escrowBinEnv); p != "" {
		abs, err := filepath.Abs(p)
		if err == nil {
			_, err = os.Stat(abs)
		}
		if err != nil {
			t.Fatalf("harness: %s=%s: %v", escrowBinEnv, p, err)
		}
		return abs
	}
	build.once.Do(func() {
		build.dir, build.err = os.MkdirTemp("", "escrow-realparts-bin-")
		if build.err != nil {
			return
		}
		build.bin = filepath.Join(build.dir, "escrow")
		cmd := exec.Command("go", "build", "-trimpath", "-o", build.bin, "./cmd/escrow")
		cmd.Dir = RepoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("go build ./cmd/escrow: %v\n%s", err, out)
		}
	})
	if build.err != nil {
		t.Fatalf("harness: %v", build.err)
	}
	return build.bin
}

// EscrowOptions configure StartEscrow.
type EscrowOptions struct {
	// Config is escrow's YAML config without listen, admin and ca_dir (the harness sets those:
	// kernel-chosen loopback ports and a temporary directory).
	Config string
	// Env is added to escrow's environment (this process's, without proxy, CA and SPIFFE
	// variables).
	Env []string
	// NoWaitReady returns as soon as the listeners are up, without waiting for /readyz.
	NoWaitReady bool
	// ReadyTimeout bounds the wait for /readyz; default 30s.
	ReadyTimeout time.Duration
	// Args are added to `escrow proxy --config F --log-level debug`.
	Args []string
}

// Escrow is a running `escrow proxy`.
type Escrow struct {
	// ProxyURL is the proxy listener (http://127.0.0.1:P), ProxyAddr its host:port.
	ProxyURL  string
	ProxyAddr string
	// AdminURL serves /healthz, /readyz and /metrics.
	AdminURL string
	// CADir holds CACert (the pod CA alone) and TrustBundle (system roots plus the pod CA).
	CADir       string
	CACert      string
	TrustBundle string
	// ConfigFile is the config escrow was started with.
	ConfigFile string

	proc *Process

	mu      sync.Mutex
	audit   []AuditRecord
	changed chan struct{}
}

// AuditRecord is one audit line of escrow's stdout. Fields holds the whole record.
type AuditRecord struct {
	RequestID string `json:"request_id"`
	Kind      string `json:"kind"`
	Identity  struct {
		SPIFFEID string `json:"spiffe_id"`
		Attested bool   `json:"attested"`
		Source   string `json:"source"`
	} `json:"identity"`
	Method         string   `json:"method"`
	Scheme         string   `json:"scheme"`
	Host           string   `json:"host"`
	Path           string   `json:"path"`
	Decision       string   `json:"decision"`
	Reason         string   `json:"reason"`
	PolicyIDs      []string `json:"policy_ids"`
	Credential     string   `json:"credential"`
	UpstreamStatus int      `json:"upstream_status"`

	Fields map[string]any `json:"-"`
	Raw    string         `json:"-"`
}

// StartEscrow writes the config (with listen, admin and ca_dir added) and runs `escrow proxy`
// until the test ends. It waits for the listeners and, unless NoWaitReady, for /readyz to say
// ready.
func StartEscrow(t testing.TB, o EscrowOptions) *Escrow {
	t.Helper()
	bin := EscrowBin(t)
	dir := ShortTempDir(t)
	e := &Escrow{CADir: filepath.Join(dir, "ca"), changed: make(chan struct{})}
	e.CACert = filepath.Join(e.CADir, "ca.crt")
	e.TrustBundle = filepath.Join(e.CADir, "trust-bundle.pem")
	e.ConfigFile = filepath.Join(dir, "escrow.yaml")
	writeFile(t, e.ConfigFile, fmt.Sprintf("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nca_dir: %s\n%s", e.CADir, o.Config))

	audit := &lineWriter{line: e.addAuditLine}
	e.proc = StartProcess(t, ProcessOptions{
		Name: "escrow", Path: bin,
		Args:   append([]string{"proxy", "--config", e.ConfigFile, "--log-level", "debug"}, o.Args...),
		Env:    CleanEnv(o.Env...),
		Stdout: audit,
	})

	// The listeners are on port 0: their addresses are in the startup log line.
	Eventually(t, 30*time.Second, "escrow's listener addresses in its log", func() error {
		if e.proc.Exited() {
			t.Fatalf("harness: escrow exited before listening (%v):\n%s", e.proc.Err(), tailBytes(e.proc.Output(), 8<<10))
		}
		for _, l := range strings.Split(e.proc.Output(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) != nil {
				continue
			}
			p, _ := m["proxy"].(string)
			a, _ := m["admin"].(string)
			if p != "" && a != "" {
				e.ProxyAddr, e.ProxyURL, e.AdminURL = p, "http://"+p, "http://"+a
				return nil
			}
		}
		return errors.New("not yet")
	})
	if !o.NoWaitReady {
		if o.ReadyTimeout == 0 {
			o.ReadyTimeout = 30 * time.Second
		}
		e.WaitReady(t, o.ReadyTimeout)
	}
	return e
}

// Process is the escrow child process (its Output has audit and ops lines interleaved).
func (e *Escrow) Process() *Process { return e.proc }

// Stop sends SIGTERM and fails the test unless escrow exits with status 0.
func (e *Escrow) Stop(t testing.TB) {
	t.Helper()
	e.proc.Stop()
	if err := e.proc.Err(); err != nil {
		t.Errorf("escrow exited with %v after SIGTERM; output:\n%s", err, tailBytes(e.proc.Output(), 8<<10))
	}
}

func (e *Escrow) addAuditLine(line string) {
	var r AuditRecord
	if json.Unmarshal([]byte(line), &r) != nil || json.Unmarshal([]byte(line), &r.Fields) != nil {
		return
	}
	if r.Fields["log_type"] != "audit" {
		return
	}
	r.Raw = line
	e.mu.Lock()
	e.audit = append(e.audit, r)
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
}

// Audit returns the audit records written so far.
func (e *Escrow) Audit() []AuditRecord {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]AuditRecord(nil), e.audit...)
}

// WaitAudit returns the first audit record for which match is true, waiting up to 10 seconds
// (records are written in batches, at most audit.flush_interval after the request).
func (e *Escrow) WaitAudit(t testing.TB, what string, match func(AuditRecord) bool) AuditRecord {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		e.mu.Lock()
		for _, r := range e.audit {
			if match(r) {
				e.mu.Unlock()
				return r
			}
		}
		ch, n := e.changed, len(e.audit)
		e.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("harness: no audit record for %s within 10s (%d records)", what, n)
		}
	}
}

// AdminGet fetches a path of the admin listener.
func (e *Escrow) AdminGet(t testing.TB, path string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	res, err := c.Get(e.AdminURL + path)
	if err != nil {
		t.Fatalf("harness: GET %s: %v", path, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("harness: GET %s: %v", path, err)
	}
	return res.StatusCode, string(body)
}

// Ready reports /readyz: whether it answered 200, and its body.
func (e *Escrow) Ready(t testing.TB) (bool, string) {
	t.Helper()
	code, body := e.AdminGet(t, "/readyz")
	return code == http.StatusOK, body
}

// WaitReady waits for /readyz to answer 200.
func (e *Escrow) WaitReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	Eventually(t, timeout, "escrow /readyz 200", func() error {
		if e.proc.Exited() {
			t.Fatalf("harness: escrow exited (%v):\n%s", e.proc.Err(), tailBytes(e.proc.Output(), 8<<10))
		}
		if ok, body := e.Ready(t); !ok {
			return errors.New(strings.TrimSpace(body))
		}
		return nil
	})
}

// Metric returns the value of the series name with exactly these label pairs
// ("result", "success", ...), and whether it is exposed.
func (e *Escrow) Metric(t testing.TB, name string, labels ...string) (float64, bool) {
	t.Helper()
	code, body := e.AdminGet(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("harness: /metrics: %d", code)
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		series := line[:i]
		n, ls, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		got := map[string]string{}
		if ls = strings.TrimSuffix(ls, "}"); ls != "" {
			for _, kv := range strings.Split(ls, ",") {
				if k, v, ok := strings.Cut(kv, "="); ok {
					got[k] = strings.Trim(v, `"`)
				}
			}
		}
		if len(got) != len(want) {
			continue
		}
		match := true
		for k, v := range want {
			match = match && got[k] == v
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("harness: metric line %q: %v", line, err)
		}
		return v, true
	}
	return 0, false
}

// Client is an HTTP client that goes through escrow and trusts escrow's pod CA only (what an
// agent configured by the README does). Each call makes a new client and transport.
func (e *Escrow) Client(t testing.TB) *http.Client {
	t.Helper()
	return &http.Client{Transport: e.Transport(t), Timeout: 30 * time.Second}
}

// Transport is Client's transport.
func (e *Escrow) Transport(t testing.TB) *http.Transport {
	t.Helper()
	pem, err := os.ReadFile(e.CACert)
	if err != nil {
		t.Fatalf("harness: escrow's CA: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("harness: no certificate in %s", e.CACert)
	}
	proxy, _ := url.Parse(e.ProxyURL)
	return &http.Transport{
		Proxy:           http.ProxyURL(proxy),
		TLSClientConfig: &tls.Config{RootCAs: roots},
	}
}

// Denial is escrow's JSON denial body: Error is the stable reason (identity_unavailable, ...).
type Denial struct {
	Error     string `json:"error"`
	Message   string `json:"message"`
	RequestID string `json:"request_id"`
}

// lineWriter calls line for every complete line written to it.
type lineWriter struct {
	mu   sync.Mutex
	buf  []byte
	line func(string)
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, b...)
	for {
		i := strings.IndexByte(string(w.buf), '\n')
		if i < 0 {
			break
		}
		w.line(strings.TrimRight(string(w.buf[:i]), "\r"))
		w.buf = w.buf[i+1:]
	}
	return len(b), nil
}
