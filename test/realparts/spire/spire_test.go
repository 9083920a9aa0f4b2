// Package spire_test runs the real `escrow proxy` against a real SPIRE server and agent
// (identity.spiffe pointing at the agent's Workload API socket) through the life of a pod's
// identity: the first SVID, rotation of short-lived SVIDs under load, the agent going away and
// coming back, and the registration entry being deleted.
//
// The SPIRE binaries come from ESCROW_REALPARTS_BIN (test/tools/realparts.sh builds them); without
// it every test here skips. `make test-realparts` runs them.
package spire_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/test/realparts/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

const (
	workloadID = "spiffe://example.org/ns/agents/sa/coder"
	apiHost    = "api.example.test"
	// shortTTL is the X509-SVID lifetime of the rotation and agent-outage scenarios. SPIRE's agent
	// renews an SVID when about half of its lifetime (which starts 10s before issuance: SPIRE
	// backdates NotBefore) remains, checking at every sync (5s).
	shortTTL = 20 * time.Second
)

// fixture is one SPIRE (server and agent), one upstream API that requires the credential, and
// one escrow between them whose identity comes from the agent.
type fixture struct {
	sp     *harness.SPIRE
	e      *harness.Escrow
	api    *harness.Upstream
	client *http.Client
	secret string
	// upstreamHits counts the requests that reached the API.
	upstreamHits atomic.Int64
}

// start runs SPIRE and the API, then escrow (without waiting for /readyz: the caller decides
// when the entry exists).
func start(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{secret: fmt.Sprintf("sk-realparts-%d-%d", os.Getpid(), time.Now().UnixNano())}
	f.sp = harness.StartSPIRE(t, harness.SPIREOptions{})
	f.api = harness.StartUpstream(t, apiHost, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.upstreamHits.Add(1)
		if r.Header.Get("Authorization") != "Bearer "+f.secret {
			http.Error(w, "missing or wrong credential", http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, "ok "+r.URL.Path)
	}))
	secretFile := filepath.Join(t.TempDir(), "api-key")
	if err := os.WriteFile(secretFile, []byte(f.secret), 0o600); err != nil {
		t.Fatal(err)
	}
	policies := harness.PolicyDir(t, map[string]string{"coder.cedar": fmt.Sprintf(`@id("coder-reads-api")
permit (principal == Workload::%q, action, resource == Host::%q)
when { principal.attested };
`, workloadID, apiHost)})
	f.e = harness.StartEscrow(t, harness.EscrowOptions{NoWaitReady: true, Config: fmt.Sprintf(`
identity:
  spiffe: {socket: %q}
policy:
  dir: %s
upstreams:
  - host: %s
    credential: api-key
    address: %s
    ca_file: %s
credentials:
  api-key: {static: {file: %s}}
egress:
  allow_cidrs: [127.0.0.0/8]
audit:
  flush_interval: 0s
`, f.sp.WorkloadAPI, policies, apiHost, f.api.Addr, f.api.CAFile, secretFile)})
	f.client = f.e.Client(t)
	t.Cleanup(func() {
		// Whatever happened, the credential never reaches escrow's logs or records.
		if strings.Contains(f.e.Process().Output(), f.secret) {
			t.Errorf("the credential appears in escrow's output")
		}
	})
	return f
}

// register creates the workload's entry for this process's uid (escrow runs as it too).
func (f *fixture) register(t *testing.T, ttl time.Duration) harness.Entry {
	t.Helper()
	return f.sp.CreateEntry(t, harness.Entry{
		SPIFFEID: workloadID, Selectors: []string{harness.UIDSelector(os.Getuid())}, X509SVIDTTL: ttl,
	})
}

// result is one request through escrow.
type result struct {
	status int
	denial harness.Denial
	body   string
	err    error
}

func (r result) String() string {
	if r.err != nil {
		return "error: " + r.err.Error()
	}
	return fmt.Sprintf("%d %s", r.status, strings.TrimSpace(r.body))
}

// call sends GET https://api.example.test/<path> through escrow.
func (f *fixture) call(c *http.Client, path string) result {
	res, err := c.Get("https://" + apiHost + path)
	if err != nil {
		return result{err: err}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	r := result{status: res.StatusCode, body: string(b), err: err}
	if res.StatusCode != http.StatusOK {
		_ = json.Unmarshal(b, &r.denial)
	}
	return r
}

// mustAllow sends one request and requires a 200 from the API, recorded with the workload's
// attested SPIFFE ID.
func (f *fixture) mustAllow(t *testing.T, path string) {
	t.Helper()
	r := f.call(f.client, path)
	if r.err != nil || r.status != http.StatusOK || r.body != "ok "+path {
		t.Fatalf("GET %s through escrow: %v, want 200 from the API", path, r)
	}
	rec := f.e.WaitAudit(t, path, func(a harness.AuditRecord) bool { return a.Path == path })
	if rec.Decision != "allow" || rec.Identity.SPIFFEID != workloadID || !rec.Identity.Attested || rec.Identity.Source != "spiffe" {
		t.Errorf("audit record %s, want allow with %s attested by spiffe", rec.Raw, workloadID)
	}
}

// mustDenyIdentityUnavailable sends one request and requires escrow's 503 identity_unavailable,
// recorded, with nothing sent upstream.
func (f *fixture) mustDenyIdentityUnavailable(t *testing.T, path string) {
	t.Helper()
	before := f.upstreamHits.Load()
	r := f.call(f.client, path)
	checkIdentityDenial(t, r)
	rec := f.e.WaitAudit(t, path, func(a harness.AuditRecord) bool { return a.Path == path })
	if rec.Decision != "deny" || rec.Reason != "identity_unavailable" || rec.Identity.Attested {
		t.Errorf("audit record %s, want deny identity_unavailable, not attested", rec.Raw)
	}
	if n := f.upstreamHits.Load() - before; n != 0 {
		t.Errorf("the API was called %d time(s) without an identity", n)
	}
}

func checkIdentityDenial(t *testing.T, r result) {
	t.Helper()
	if r.err != nil || r.status != http.StatusServiceUnavailable || r.denial.Error != "identity_unavailable" || r.denial.RequestID == "" {
		t.Fatalf("got %v, want 503 with error identity_unavailable and a request_id", r)
	}
}

// readyz returns whether escrow says it is ready, and the identity check's text.
func (f *fixture) readyz(t *testing.T) (bool, string) {
	t.Helper()
	ok, body := f.e.Ready(t)
	var r struct {
		Checks map[string]string `json:"checks"`
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatalf("/readyz body %q: %v", body, err)
	}
	return ok, r.Checks["identity"]
}

// svidExpiry is escrow's view of its SVID's NotAfter (escrow_svid_expiry_timestamp_seconds).
func (f *fixture) svidExpiry(t *testing.T) time.Time {
	t.Helper()
	v, ok := f.e.Metric(t, "escrow_svid_expiry_timestamp_seconds")
	if !ok || v == 0 {
		return time.Time{}
	}
	return time.Unix(int64(v), 0)
}

// TestSPIRE_FirstSVIDMakesEscrowReady: escrow starts before its workload is registered. It says
// not ready and denies with 503 identity_unavailable; once the entry exists and the agent issues
// the first SVID, /readyz turns ready and requests carry the SPIFFE ID.
func TestSPIRE_FirstSVIDMakesEscrowReady(t *testing.T) {
	t.Parallel()
	f := start(t)

	if ok, check := f.readyz(t); ok || check == "ok" {
		t.Errorf("/readyz ready=%v identity=%q before any entry exists, want not ready", ok, check)
	}
	f.mustDenyIdentityUnavailable(t, "/v1/before-entry")

	registered := time.Now()
	f.register(t, time.Hour)
	f.e.WaitReady(t, 90*time.Second)
	t.Logf("escrow ready %v after the entry was created", time.Since(registered).Round(time.Millisecond))
	f.mustAllow(t, "/v1/after-first-svid")
	if exp := f.svidExpiry(t); time.Until(exp) < 50*time.Minute {
		t.Errorf("escrow_svid_expiry_timestamp_seconds = %v, want about an hour from now", exp)
	}
}

// TestSPIRE_ShortLivedSVIDsRotateUnderLoadWithNoFailedRequest: with 20-second SVIDs, requests
// keep flowing (on kept-alive and on new connections) while the agent rotates the SVID several
// times, past the first SVID's expiry; not one request fails.
func TestSPIRE_ShortLivedSVIDsRotateUnderLoadWithNoFailedRequest(t *testing.T) {
	t.Parallel()
	f := start(t)
	f.register(t, shortTTL)
	f.e.WaitReady(t, 90*time.Second)
	first := f.svidExpiry(t)
	if first.IsZero() || time.Until(first) > shortTTL+time.Second {
		t.Fatalf("first SVID expires at %v, want within %v", first, shortTTL)
	}

	// Run until the first SVID has expired and at least two rotations were seen.
	var (
		stop     = make(chan struct{})
		wg       sync.WaitGroup
		okCount  atomic.Int64
		failMu   sync.Mutex
		failures []string
		lastOK   atomic.Int64 // unix nanos of the last successful request
	)
	worker := func(name string, c *http.Client) {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			path := fmt.Sprintf("/v1/load/%s/%d", name, i)
			if r := f.call(c, path); r.err != nil || r.status != http.StatusOK {
				failMu.Lock()
				failures = append(failures, fmt.Sprintf("%s %s: %v", time.Now().Format(time.StampMilli), path, r))
				failMu.Unlock()
			} else {
				okCount.Add(1)
				lastOK.Store(time.Now().UnixNano())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	fresh := f.e.Transport(t)
	fresh.DisableKeepAlives = true
	for i, c := range []*http.Client{f.client, f.e.Client(t), {Transport: fresh, Timeout: 30 * time.Second}} {
		wg.Add(1)
		go worker(fmt.Sprintf("w%d", i), c)
	}

	expiries := []time.Time{first}
	deadline := time.Now().Add(3 * shortTTL)
	for time.Now().Before(deadline) && (len(expiries) < 3 || time.Now().Before(first.Add(2*time.Second))) {
		time.Sleep(250 * time.Millisecond)
		if exp := f.svidExpiry(t); !exp.IsZero() && exp.After(expiries[len(expiries)-1]) {
			expiries = append(expiries, exp)
		}
	}
	close(stop)
	wg.Wait()

	t.Logf("%d requests succeeded; SVID expiries seen: %v", okCount.Load(), expiries)
	if len(failures) > 0 {
		t.Errorf("%d request(s) failed during rotation, first: %s", len(failures), strings.Join(failures[:min(5, len(failures))], "; "))
	}
	if len(expiries) < 3 {
		t.Errorf("escrow followed %d rotation(s) in %v, want at least 2", len(expiries)-1, 3*shortTTL)
	}
	if last := time.Unix(0, lastOK.Load()); !last.After(first) {
		t.Errorf("no request succeeded after the first SVID expired at %v (last success %v): the rotated SVID was not used", first, last)
	}
	if okCount.Load() < 100 {
		t.Errorf("only %d requests succeeded: the load was not steady", okCount.Load())
	}
}

// TestSPIRE_AgentOutage: the agent stops. escrow keeps serving on the SVID it holds until that
// expires, then denies with 503 identity_unavailable and reports not ready. The agent comes back
// and escrow recovers by itself (same process, no restart).
func TestSPIRE_AgentOutage(t *testing.T) {
	t.Parallel()
	f := start(t)
	f.register(t, shortTTL)
	f.e.WaitReady(t, 90*time.Second)
	f.mustAllow(t, "/v1/before-outage")

	f.sp.StopAgent(t)
	held := f.svidExpiry(t) // no rotation can arrive any more
	t.Logf("agent stopped; escrow holds an SVID expiring in %v", time.Until(held).Round(time.Millisecond))

	t.Run("serves_on_the_held_SVID_until_it_expires", func(t *testing.T) {
		// A request must be handled before the SVID's NotAfter: keep a margin for a busy machine.
		if time.Until(held) < 4*time.Second {
			t.Skipf("the held SVID expires in %v: too close to tell", time.Until(held))
		}
		n := 0
		for time.Until(held) > 2*time.Second {
			f.mustAllow(t, fmt.Sprintf("/v1/outage/held/%d", n))
			if ok, check := f.readyz(t); !ok {
				t.Fatalf("/readyz not ready (identity %q) %v before the held SVID expires", check, time.Until(held))
			}
			n++
			time.Sleep(250 * time.Millisecond)
		}
		t.Logf("%d requests served on the held SVID after the agent stopped", n)
	})

	t.Run("denies_with_503_identity_unavailable_once_it_expired", func(t *testing.T) {
		time.Sleep(time.Until(held.Add(500 * time.Millisecond)))
		f.mustDenyIdentityUnavailable(t, "/v1/outage/expired")
		if ok, check := f.readyz(t); ok || check == "ok" {
			t.Errorf("/readyz ready=%v identity=%q with an expired SVID, want not ready", ok, check)
		}
	})

	t.Run("recovers_when_the_agent_is_back_without_a_restart", func(t *testing.T) {
		pid := f.e.Process().Pid()
		restarted := time.Now()
		f.sp.StartAgent(t)
		f.e.WaitReady(t, 90*time.Second)
		t.Logf("escrow ready %v after the agent restarted", time.Since(restarted).Round(time.Millisecond))
		f.mustAllow(t, "/v1/outage/recovered")
		if f.e.Process().Exited() || f.e.Process().Pid() != pid {
			t.Errorf("escrow was restarted (pid %d → %d)", pid, f.e.Process().Pid())
		}
		if exp := f.svidExpiry(t); !exp.After(held) {
			t.Errorf("SVID expiry %v after recovery, want later than the expired one (%v)", exp, held)
		}
	})
}

// TestSPIRE_EntryDeletedDropsIdentityAtOnce: the workload's registration entry is deleted. escrow
// stops serving the identity as soon as the agent says so (its next sync), long before the
// hour-long SVID expires; when the entry is back, so is the traffic.
func TestSPIRE_EntryDeletedDropsIdentityAtOnce(t *testing.T) {
	t.Parallel()
	f := start(t)
	entry := f.register(t, time.Hour)
	f.e.WaitReady(t, 90*time.Second)
	f.mustAllow(t, "/v1/before-delete")
	held := f.svidExpiry(t)

	deleted := time.Now()
	f.sp.DeleteEntry(t, entry.ID)
	var last result
	harness.Eventually(t, 30*time.Second, "escrow to deny after the entry was deleted", func() error {
		last = f.call(f.client, fmt.Sprintf("/v1/deleted/%d", time.Now().UnixNano()))
		if last.status == http.StatusServiceUnavailable {
			return nil
		}
		return fmt.Errorf("still %v", last)
	})
	took := time.Since(deleted)
	t.Logf("identity dropped %v after the entry was deleted (the SVID was valid for %v more)", took.Round(time.Millisecond), time.Until(held).Round(time.Second))
	checkIdentityDenial(t, last)
	f.mustDenyIdentityUnavailable(t, "/v1/deleted/final")
	if ok, check := f.readyz(t); ok || check == "ok" {
		t.Errorf("/readyz ready=%v identity=%q after the entry was deleted, want not ready", ok, check)
	}
	if exp := f.svidExpiry(t); !exp.IsZero() {
		t.Errorf("escrow_svid_expiry_timestamp_seconds = %v after the entry was deleted, want 0", exp)
	}

	f.register(t, time.Hour)
	f.e.WaitReady(t, 90*time.Second)
	f.mustAllow(t, "/v1/entry-back")
}
