package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// escrow is one running `escrow proxy` subprocess.
type escrow struct {
	t        *testing.T
	name     string
	cmd      *exec.Cmd
	ProxyURL string // http://127.0.0.1:P
	ProxyHP  string // 127.0.0.1:P
	AdminURL string
	CADir    string
	Bundle   string // CADir/trust-bundle.pem
	Rec      *recorder

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every new line
	audit   []auditRecord
	stdout  []string
	stderr  []string

	readersDone sync.WaitGroup
	exited      chan struct{}
	exitErr     error
	stopped     bool
}

// auditRecord is one audit line (stdout).
type auditRecord struct {
	LogType   string `json:"log_type"`
	Msg       string `json:"msg"`
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
	Port           int      `json:"port"`
	Path           string   `json:"path"`
	Decision       string   `json:"decision"`
	Reason         string   `json:"reason"`
	Outcome        string   `json:"outcome"`
	Status         int      `json:"status"`
	Upgrade        string   `json:"upgrade"`
	SNI            string   `json:"sni"`
	PolicyIDs      []string `json:"policy_ids"`
	Mode           string   `json:"mode"`
	WouldDeny      bool     `json:"would_deny"`
	Credential     string   `json:"credential"`
	CredentialID   string   `json:"credential_id"`
	UpstreamStatus int      `json:"upstream_status"`
	BytesIn        int64    `json:"bytes_in"`
	BytesOut       int64    `json:"bytes_out"`
	Raw            string   `json:"-"`
}

type escrowOptions struct {
	// Env is added to escrow's (cleaned) environment.
	Env []string
	// NotReady: do not wait for /readyz (only for the listeners).
	NotReady bool
	// DrainTimeout is --drain-timeout (default 5s).
	DrainTimeout time.Duration
}

// startEscrow writes configYAML (listen, admin and ca_dir are added) and runs
// `escrow proxy --config F` until the test ends (or Stop). It waits for the listeners and, unless
// o.NotReady, for /readyz to answer 200.
func startEscrow(t *testing.T, configYAML string, o escrowOptions) *escrow {
	t.Helper()
	dir := t.TempDir()
	e := &escrow{
		t: t, name: t.Name(), CADir: filepath.Join(dir, "ca"), Rec: newRecorder(),
		changed: make(chan struct{}), exited: make(chan struct{}),
	}
	e.Bundle = filepath.Join(e.CADir, "trust-bundle.pem")
	cfg := fmt.Sprintf("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nca_dir: %s\n%s", e.CADir, configYAML)
	cfgPath := filepath.Join(dir, "escrow.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if o.DrainTimeout == 0 {
		o.DrainTimeout = 5 * time.Second
	}
	e.cmd = exec.Command(escrowBin, "proxy", "--config", cfgPath, "--log-level", "debug", "--drain-timeout", o.DrainTimeout.String())
	e.cmd.Env = escrowEnv(o.Env...)
	stdout, err := e.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := e.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	e.cmd.SysProcAttr = dieWithParent()
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("start escrow: %v", err)
	}
	e.readersDone.Add(2)
	go e.readLines(stdout, true)
	go e.readLines(stderr, false)
	go func() {
		e.readersDone.Wait()
		e.exitErr = e.cmd.Wait()
		close(e.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-e.exited:
		default:
			_ = e.cmd.Process.Kill()
			<-e.exited
		}
	})

	// The listeners are on port 0: their addresses are in the startup log line.
	deadline := time.Now().Add(20 * time.Second)
	for e.ProxyHP == "" {
		e.mu.Lock()
		for _, l := range e.stderr {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil {
				p, _ := m["proxy"].(string)
				a, _ := m["admin"].(string)
				if p != "" && a != "" {
					e.ProxyHP, e.ProxyURL, e.AdminURL = p, "http://"+p, "http://"+a
				}
			}
		}
		ch := e.changed
		e.mu.Unlock()
		if e.ProxyHP != "" {
			break
		}
		select {
		case <-e.exited:
			t.Fatalf("escrow exited before listening (%v); stderr:\n%s", e.exitErr, e.stderrText())
		case <-ch:
		case <-time.After(time.Until(deadline)):
			t.Fatalf("escrow did not log its listener addresses within 20s; stderr:\n%s", e.stderrText())
		}
	}
	if !o.NotReady {
		e.waitReady(t, 20*time.Second)
	}
	return e
}

func (e *escrow) readLines(r io.Reader, isStdout bool) {
	defer e.readersDone.Done()
	br := bufio.NewReaderSize(r, 1<<16)
	for {
		line, err := br.ReadString('\n')
		if line = strings.TrimRight(line, "\r\n"); line != "" {
			e.addLine(line, isStdout)
		}
		if err != nil {
			return
		}
	}
}

func (e *escrow) addLine(line string, isStdout bool) {
	if isStdout {
		e.Rec.add(e.name+": escrow stdout (audit)", []byte(line))
	} else {
		e.Rec.add(e.name+": escrow stderr (ops log)", []byte(line))
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if isStdout {
		e.stdout = append(e.stdout, line)
		var r auditRecord
		if json.Unmarshal([]byte(line), &r) == nil && r.LogType == "audit" {
			r.Raw = line
			e.audit = append(e.audit, r)
		}
	} else {
		e.stderr = append(e.stderr, line)
	}
	close(e.changed)
	e.changed = make(chan struct{})
}

func (e *escrow) stderrText() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return strings.Join(e.stderr, "\n")
}

// waitAudit returns the first audit record matching pred, waiting up to 10s for it (a record is
// written after the response, and a tunnel's when it closes).
func (e *escrow) waitAudit(t testing.TB, what string, pred func(auditRecord) bool) auditRecord {
	t.Helper()
	return e.waitAuditFrom(t, 0, what, pred)
}

// waitAuditFrom is waitAudit among the records from index since on (see auditCount).
func (e *escrow) waitAuditFrom(t testing.TB, since int, what string, pred func(auditRecord) bool) auditRecord {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		e.mu.Lock()
		for _, r := range e.audit[min(since, len(e.audit)):] {
			if pred(r) {
				e.mu.Unlock()
				return r
			}
		}
		ch := e.changed
		n := len(e.audit)
		e.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("no audit record for %s within 10s (%d records so far):\n%s", what, n, e.auditText())
		}
	}
}

// auditFor waits for the record of the request with this path (paths are unique per call).
func (e *escrow) auditFor(t testing.TB, path string) auditRecord {
	t.Helper()
	return e.waitAudit(t, "path "+path, func(r auditRecord) bool { return r.Path == path })
}

// auditByID waits for the record with this request_id.
func (e *escrow) auditByID(t testing.TB, id string) auditRecord {
	t.Helper()
	if id == "" {
		t.Fatal("no request_id to look for")
	}
	return e.waitAudit(t, "request_id "+id, func(r auditRecord) bool { return r.RequestID == id })
}

// auditRecordsSnapshot returns the records written so far.
func (e *escrow) auditRecordsSnapshot() []auditRecord {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]auditRecord(nil), e.audit...)
}

// auditCount is the number of records written so far.
func (e *escrow) auditCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.audit)
}

func (e *escrow) auditText() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var b strings.Builder
	for _, r := range e.audit {
		b.WriteString("  " + r.Raw + "\n")
	}
	return b.String()
}

// adminGet fetches an admin path; the answer is recorded for the hygiene check.
func (e *escrow) adminGet(t testing.TB, path string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(e.AdminURL + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read: %v", path, err)
	}
	var hdr bytes.Buffer
	_ = resp.Header.Write(&hdr)
	e.Rec.add(e.name+": admin "+path+" headers", hdr.Bytes())
	e.Rec.add(e.name+": admin "+path, body)
	return resp.StatusCode, string(body)
}

func (e *escrow) waitReady(t testing.TB, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		code, body := e.adminGet(t, "/readyz")
		if code == http.StatusOK {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("escrow not ready within %v: /readyz %d %s", within, code, body)
		}
		select {
		case <-e.exited:
			t.Fatalf("escrow exited (%v); stderr:\n%s", e.exitErr, e.stderrText())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// metrics scrapes /metrics.
func (e *escrow) metrics(t testing.TB) metricSet {
	t.Helper()
	code, body := e.adminGet(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	return parseMetrics(body)
}

// metricSet maps `name{k="v",...}` (labels sorted as exposed) to the value, plus the raw text.
type metricSet struct {
	text   string
	values map[string]float64
}

func parseMetrics(text string) metricSet {
	m := metricSet{text: text, values: map[string]float64{}}
	for _, line := range strings.Split(text, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m.values[line[:i]] = v
	}
	return m
}

// get returns the value of series name with exactly these labels (0 if absent).
func (m metricSet) get(name string, labels ...string) float64 {
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for series, v := range m.values {
		n, ls, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		got := map[string]string{}
		for _, kv := range strings.Split(strings.TrimSuffix(ls, "}"), ",") {
			if k, val, ok := strings.Cut(kv, "="); ok {
				got[k] = strings.Trim(val, `"`)
			}
		}
		if len(got) != len(want) {
			continue
		}
		match := true
		for k, val := range want {
			if got[k] != val {
				match = false
			}
		}
		if match {
			return v
		}
	}
	return 0
}

// finish ends a group: a last scrape of /metrics and /readyz (for the hygiene check, unless
// escrow was already stopped), SIGTERM with a clean exit, then the secret hygiene check over
// everything the group saw.
func (e *escrow) finish(t *testing.T) {
	t.Helper()
	if !e.stopped {
		e.metrics(t)
		e.adminGet(t, "/readyz")
		e.Stop(t)
	}
	checkSecretHygiene(t, e.Rec)
}

// Stop sends SIGTERM and asserts a clean exit (0) within 10s, audit lines only on stdout, ops
// lines only on stderr, and no race report.
func (e *escrow) Stop(t *testing.T) {
	t.Helper()
	if e.stopped {
		return
	}
	e.stopped = true
	start := time.Now()
	if err := e.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-e.exited:
	case <-time.After(10 * time.Second):
		_ = e.cmd.Process.Kill()
		<-e.exited
		t.Fatalf("escrow did not exit within 10s of SIGTERM; stderr tail:\n%s", tail(e.stderrText(), 30))
	}
	took := time.Since(start)
	e.mu.Lock()
	stdout, stderr := append([]string(nil), e.stdout...), append([]string(nil), e.stderr...)
	e.mu.Unlock()
	if joined := strings.Join(stderr, "\n"); strings.Contains(joined, "DATA RACE") {
		t.Errorf("the race detector found a data race in escrow:\n%s", joined)
	}
	var ee *exec.ExitError
	switch {
	case e.exitErr == nil:
	case errors.As(e.exitErr, &ee):
		t.Errorf("escrow exited with code %d after SIGTERM, want 0; stderr tail:\n%s", ee.ExitCode(), tail(strings.Join(stderr, "\n"), 30))
	default:
		t.Errorf("escrow: %v", e.exitErr)
	}
	t.Logf("escrow stopped %v after SIGTERM", took.Round(time.Millisecond))
	if os.Getenv("ESCROW_E2E_VERBOSE") == "1" {
		t.Logf("escrow stdout:\n%s\nescrow stderr:\n%s", strings.Join(stdout, "\n"), strings.Join(stderr, "\n"))
	}
	checkAuditInvariants(t, e.auditRecordsSnapshot())
	for _, l := range stdout {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil || m["log_type"] != "audit" {
			t.Errorf("stdout must carry only audit records (JSON, log_type audit); got: %s", l)
		}
	}
	for _, l := range stderr {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil || m["log_type"] != "ops" {
			if raceEnabled && !strings.HasPrefix(l, "{") {
				continue // race detector output, reported above
			}
			t.Errorf("stderr must carry only ops log lines (JSON, log_type ops); got: %s", l)
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// knownReasons are the reasons of the README's denial table, plus allowed and agent_closed.
var knownReasons = map[string]bool{
	"allowed": true, "unknown_destination": true, "policy_denied": true, "policy_error": true,
	"egress_denied": true, "plaintext_credential_refused": true, "host_mismatch": true,
	"bad_request": true, "identity_unavailable": true, "policy_unavailable": true,
	"credential_unavailable": true, "upstream_unavailable": true, "upstream_timeout": true,
	"shutting_down": true, "agent_closed": true, "method_not_allowed": true, "audit_unavailable": true,
	"delegation_invalid": true, "response_unscannable": true,
}

// checkAuditInvariants holds for every record of every group: a unique request_id, a decision
// of allow, deny or would_deny, a reason from the closed set, and no denial that says "allowed".
func checkAuditInvariants(t *testing.T, recs []auditRecord) {
	t.Helper()
	ids := map[string]bool{}
	for _, r := range recs {
		switch {
		case r.RequestID == "" || ids[r.RequestID]:
			t.Errorf("audit record without a unique request_id: %s", r.Raw)
		case r.Decision != "allow" && r.Decision != "deny" && r.Decision != "would_deny":
			t.Errorf("audit record with decision %q: %s", r.Decision, r.Raw)
		case !knownReasons[r.Reason]:
			t.Errorf("audit record with reason %q outside the documented set: %s", r.Reason, r.Raw)
		case r.Decision == "deny" && r.Reason == "allowed":
			t.Errorf("denial with reason allowed: %s", r.Raw)
		}
		ids[r.RequestID] = true
	}
}
