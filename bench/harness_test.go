package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestPercentile_IsNearestRank(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 1000; i++ {
		s = append(s, time.Duration(1001-i)*time.Millisecond) // unsorted on purpose
	}
	l := summarize(s, 3)
	for _, c := range []struct {
		name      string
		got, want time.Duration
	}{
		{"p50", l.P50, 500 * time.Millisecond},
		{"p90", l.P90, 900 * time.Millisecond},
		{"p99", l.P99, 990 * time.Millisecond},
		{"p99.9", l.P999, 999 * time.Millisecond},
		{"max", l.Max, 1000 * time.Millisecond},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if l.N != 1000 || l.Errors != 3 {
		t.Errorf("N, Errors = %d, %d; want 1000, 3", l.N, l.Errors)
	}
	if got := percentile([]time.Duration{7}, 99.9); got != 7 {
		t.Errorf("one sample: p99.9 = %v, want 7ns", got)
	}
	if got := summarize(nil, 0); got.P50 != 0 || got.N != 0 {
		t.Errorf("no samples: %+v", got)
	}
}

func TestParseStatCPU_CountsFieldsAfterTheCommandName(t *testing.T) {
	// A command name with spaces and a ')' must not shift the fields: utime=250, stime=50.
	line := "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 0 0\n"
	got, err := parseStatCPU([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if want := 300 * clockTick; got != want {
		t.Errorf("cpu = %v, want %v", got, want)
	}
	if _, err := parseStatCPU([]byte("4242 (x) S 1 2")); err == nil {
		t.Error("a short stat line was accepted")
	}
}

func TestReadUsage_SeesThisProcess(t *testing.T) {
	u, err := readUsage(os.Getpid())
	if err != nil {
		t.Skipf("no /proc here: %v", err)
	}
	if u.RSS <= 0 || u.HWM < u.RSS {
		t.Errorf("RSS %d, HWM %d: want 0 < RSS <= HWM", u.RSS, u.HWM)
	}
}

func TestParseBench_ReadsBenchmemLines(t *testing.T) {
	out := `goos: linux
BenchmarkDecide/policies=1000-2         	  552481	      2134 ns/op	    1232 B/op	      21 allocs/op
BenchmarkManagerGet_Hit-2               	24000000	        50.3 ns/op	       0 B/op	       0 allocs/op
BenchmarkLeaf-Mint                      	    1000	   1000000 ns/op
PASS
ok  	github.com/escrowproxy/escrow/policy	3.1s
`
	got := parseBench(out)
	if len(got) != 3 {
		t.Fatalf("parsed %d results, want 3: %+v", len(got), got)
	}
	if got[0].Name != "BenchmarkDecide/policies=1000" || got[0].NsPerOp != 2134 || got[0].BytesPerOp != 1232 || got[0].AllocsPerOp != 21 {
		t.Errorf("first = %+v", got[0])
	}
	if got[1].NsPerOp != 50.3 {
		t.Errorf("fractional ns/op: %+v", got[1])
	}
	if got[2].Name != "BenchmarkLeaf-Mint" {
		t.Errorf("a name whose suffix is not a GOMAXPROCS count was trimmed: %q", got[2].Name)
	}
}

func TestUpdateDocs_ReplacesOnlyTheGeneratedBlock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "benchmarks.md")
	if err := updateDocs(p, "first table"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	doc := "# Benchmarks\n\nHand-written intro.\n\n" + strings.TrimPrefix(string(b), "# Benchmarks\n\n") + "\n## Analysis\n\nStays.\n"
	if err := os.WriteFile(p, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := updateDocs(p, "second table"); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(p)
	got := string(b)
	for _, want := range []string{"Hand-written intro.", "second table", "## Analysis\n\nStays."} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in:\n%s", want, got)
		}
	}
	if strings.Contains(got, "first table") {
		t.Errorf("the old generated block survived:\n%s", got)
	}
	if strings.Count(got, docsBegin) != 1 || strings.Count(got, docsEnd) != 1 {
		t.Errorf("markers duplicated:\n%s", got)
	}
}

// A stall in one response must show up in the latency of the requests that fell due during
// it (they waited for a worker), not vanish as it would in a closed loop.
func TestOpenLoop_CountsQueueingBehindASlowResponse(t *testing.T) {
	const stall = 300 * time.Millisecond
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 20 {
			time.Sleep(stall)
		}
	}))
	defer srv.Close()
	c := client{HTTP: srv.Client(), URL: srv.URL}
	// One worker at 100 req/s: requests are due every 10 ms; about 30 fall due during the stall.
	res := fixedRate(context.Background(), c, 100, time.Second, 1)
	if res.Errors != 0 {
		t.Fatalf("%d errors: %s", res.Errors, res.FirstErr)
	}
	queued := 0
	for _, l := range res.Samples {
		if l >= 100*time.Millisecond {
			queued++
		}
	}
	// Due times 10 ms apart inside a 300 ms stall: at least 15 requests waited 100 ms or more
	// (lower bounds only: a slow machine can only add to them).
	if queued < 15 {
		t.Errorf("%d requests counted ≥100 ms behind a %v stall, want ≥ 15 (coordinated omission)", queued, stall)
	}
	if len(res.Samples) != 100 {
		t.Errorf("%d samples, want all 100 requests of the phase", len(res.Samples))
	}
}

func TestClient_FailsOnUnexpectedStatus(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Escrow-Reason", "policy_denied")
		w.WriteHeader(http.StatusForbidden)
	}))
	defer srv.Close()
	msg := client{HTTP: srv.Client(), URL: srv.URL}.do(context.Background())
	if !strings.Contains(msg, "403") || !strings.Contains(msg, "policy_denied") {
		t.Errorf("failure message %q should name the status and escrow's reason", msg)
	}
}

func TestUpstream_RejectsARequestWithoutTheExpectedCredential(t *testing.T) {
	u, err := startUpstream(t.TempDir(), 1024, "sk-test")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	get := func(h http.Header) int {
		req, _ := http.NewRequest(http.MethodGet, "http://"+u.HTTPAddr+"/v1/models", nil)
		req.Header = h
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := get(hdr(expectHeader, expectAuth, "Authorization", "Bearer placeholder")); got != http.StatusUnauthorized {
		t.Errorf("placeholder credential: %d, want 401", got)
	}
	if got := get(hdr(expectHeader, expectAuth, "Authorization", "Bearer sk-test")); got != http.StatusOK {
		t.Errorf("real credential: %d, want 200", got)
	}
	if got := get(hdr(expectHeader, expectInject)); got != http.StatusUnauthorized {
		t.Errorf("header not injected: %d, want 401", got)
	}
	if u.Rejected.Load() != 2 {
		t.Errorf("rejected = %d, want 2", u.Rejected.Load())
	}
}

func TestReport_MarksMissedGoalsAndFailsOnEscrowErrors(t *testing.T) {
	rep := &report{o: options{Rate: 1000}, Idle: map[string]int64{"escrow": 25 << 20}, Scenarios: []scenarioResult{{
		Name: "plain",
		Rows: []row{
			{Subject: "direct", Direct: true, Lat: latency{N: 10, P50: 50 * time.Microsecond}, SatRPS: 30000},
			{Subject: "escrow", Measured: true, Added: [4]time.Duration{80 * time.Microsecond, 0, 700 * time.Microsecond, 0},
				SatRPS: 24000, CPUPer1k: 0.05, RSS: 30 << 20, Lat: latency{N: 10, Errors: 1}, FirstErr: "status 403 (policy_denied)"},
			{Subject: "squid", Measured: true, SatRPS: 19000},
		},
	}}}
	status := map[string]string{}
	for _, g := range rep.goals() {
		s := "unknown"
		if g.Met != nil {
			s = map[bool]string{true: "met", false: "missed"}[*g.Met]
		}
		status[g.What] = s
	}
	for what, want := range map[string]string{
		"added latency, plain HTTP, p50":                                "met",
		"added latency, plain HTTP, p99":                                "missed",
		"saturation throughput, plain HTTP, escrow ÷ best peer (squid)": "met", // 24k / 19k = 1.26
		"escrow RSS, idle":                                              "missed",
		"escrow CPU per 1,000 requests, plain HTTP":                     "met",
		"policy decision, policies=1000":                                "unknown",
	} {
		if status[what] != want {
			t.Errorf("%s: %s, want %s (all: %v)", what, status[what], want, status)
		}
	}
	if bad := rep.escrowFailures(); len(bad) != 1 || !strings.Contains(bad[0], "plain/escrow") {
		t.Errorf("escrowFailures = %v, want the escrow row", bad)
	}
	if md := rep.markdown(); !strings.Contains(md, "**missed**") || !strings.Contains(md, "status 403") {
		t.Errorf("markdown lacks the missed goal or the failure:\n%s", md)
	}
}

func TestParseFlags_QuickShortensPhasesButKeepsExplicitValues(t *testing.T) {
	o, err := parseFlags([]string{"--quick", "--duration", "5s"})
	if err != nil {
		t.Fatal(err)
	}
	if o.Duration != 5*time.Second || o.SatDuration != 1500*time.Millisecond || o.Micro || o.Docs != "" {
		t.Errorf("quick options = %+v", o)
	}
	o, err = parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.Docs != "docs/benchmarks.md" || !o.Micro {
		t.Errorf("a full run should write docs/benchmarks.md and run the micro-benchmarks: %+v", o)
	}
	if _, err := parseFlags([]string{"--only", "plain,nope", "--rate", "0"}); err == nil ||
		!strings.Contains(err.Error(), `"nope"`) || !strings.Contains(err.Error(), "--rate") {
		t.Errorf("bad flags: err = %v, want both problems named", err)
	}
}
