package attest_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/attest/attesttest"
	"github.com/escrowproxy/escrow/internal/fakeclock"
)

const (
	td  = "example.org"
	id1 = "spiffe://example.org/ns/agents/sa/coder"
	id2 = "spiffe://example.org/ns/agents/sa/reviewer"
)

// newClock is the injected clock. It starts at the wall clock (go-spiffe checks JWT times
// against the wall clock), truncated to seconds as certificate and JWT times are.
func newClock() *fakeclock.Clock { return fakeclock.New(time.Now().Truncate(time.Second)) }

type harness struct {
	src     *attest.SPIFFE
	clk     *fakeclock.Clock
	logs    *observer.ObservedLogs
	updates chan time.Time

	resultsMu sync.Mutex
	results   map[attest.UpdateResult]int
}

// resultCount is how many times OnUpdateResult reported r.
func (h *harness) resultCount(r attest.UpdateResult) int {
	h.resultsMu.Lock()
	defer h.resultsMu.Unlock()
	return h.results[r]
}

func startSPIFFE(t *testing.T, ctx context.Context, addr string, clk *fakeclock.Clock) *harness {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	h := &harness{clk: clk, logs: logs, updates: make(chan time.Time, 64), results: map[attest.UpdateResult]int{}}
	src, err := attest.NewSPIFFE(ctx, attest.SPIFFEOptions{
		Addr:     addr,
		Now:      clk.Now,
		Logger:   zap.New(core),
		OnUpdate: func(exp time.Time) { h.updates <- exp },
		OnUpdateResult: func(r attest.UpdateResult) {
			h.resultsMu.Lock()
			h.results[r]++
			h.resultsMu.Unlock()
		},
	})
	if err != nil {
		t.Fatalf("NewSPIFFE: %v", err)
	}
	t.Cleanup(func() { _ = src.Close() })
	h.src = src
	return h
}

// waitUpdate waits until OnUpdate reports an SVID expiring at want.
func (h *harness) waitUpdate(t *testing.T, want time.Time) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case got := <-h.updates:
			if got.Equal(want) {
				return
			}
		case <-timeout:
			t.Fatalf("no SVID update expiring at %v within 10s", want)
		}
	}
}

func (h *harness) waitLog(t *testing.T, msg string) {
	t.Helper()
	eventually(t, func() bool { return h.logs.FilterMessage(msg).Len() > 0 }, "log "+msg)
}

func eventually(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func mustIdentify(t *testing.T, src attest.Source, wantID string, wantExp time.Time) {
	t.Helper()
	got, err := src.Identify(context.Background(), attest.Peer{})
	if err != nil {
		t.Fatalf("Identify: %v", err)
	}
	if got.SPIFFEID != wantID || got.TrustDomain != td || !got.Attested || got.Source != attest.SourceSPIFFE ||
		!got.ExpiresAt.Equal(wantExp) {
		t.Fatalf("Identify = %+v, want %s in %s, attested, source spiffe, expiring %v", got, wantID, td, wantExp)
	}
}

func mustUnavailable(t *testing.T, src attest.Source, wantMsg string) {
	t.Helper()
	got, err := src.Identify(context.Background(), attest.Peer{})
	if !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("Identify = %+v, %v; want an error wrapping ErrUnavailable", got, err)
	}
	if got != (attest.Identity{}) {
		t.Fatalf("Identify returned %+v along with its error; want the zero Identity", got)
	}
	if !strings.Contains(err.Error(), wantMsg) {
		t.Fatalf("Identify error %q does not say %q", err, wantMsg)
	}
}

func TestSPIFFEFirstSVIDMakesReady(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	h := startSPIFFE(t, context.Background(), w.Addr(), newClock())

	// Connected and watching, but nothing issued yet: not ready, and no identity.
	eventually(t, func() bool { return w.X509Streams() == 1 }, "the source to watch")
	if h.src.Ready() {
		t.Fatal("Ready before the first SVID")
	}
	mustUnavailable(t, h.src, "no SVID yet")
	if !h.src.ExpiresAt().IsZero() {
		t.Fatalf("ExpiresAt = %v before the first SVID, want zero", h.src.ExpiresAt())
	}

	exp := h.clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)
	if !h.src.Ready() {
		t.Fatal("not Ready after the first SVID")
	}
	mustIdentify(t, h.src, id1, exp)
	if !h.src.ExpiresAt().Equal(exp) {
		t.Fatalf("ExpiresAt = %v, want %v", h.src.ExpiresAt(), exp)
	}
	h.waitLog(t, "X509-SVID received")
}

func TestSPIFFEDoesNotBlockWithoutWorkloadAPI(t *testing.T) {
	// Nothing listens here: NewSPIFFE must return at once, report not ready, deny, and log the
	// failing watch while it keeps retrying.
	addr := "unix://" + t.TempDir() + "/absent.sock"
	start := time.Now()
	h := startSPIFFE(t, context.Background(), addr, newClock())
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("NewSPIFFE took %v; it must not wait for the Workload API", d)
	}
	if h.src.Ready() {
		t.Fatal("Ready without a Workload API")
	}
	mustUnavailable(t, h.src, "no SVID yet")
	h.waitLog(t, "SPIFFE Workload API watch failed; retrying")
}

func TestSPIFFERotationIsFollowed(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	t0 := clk.Now()

	w.SetSVID(id1, t0.Add(time.Hour))
	h.waitUpdate(t, t0.Add(time.Hour))
	mustIdentify(t, h.src, id1, t0.Add(time.Hour))

	// A new SPIFFE ID and NotAfter replace the old ones.
	w.SetSVID(id2, t0.Add(2*time.Hour))
	h.waitUpdate(t, t0.Add(2*time.Hour))
	mustIdentify(t, h.src, id2, t0.Add(2*time.Hour))

	// The expiry check uses the new NotAfter: past the first SVID's, still valid.
	clk.Advance(90 * time.Minute)
	mustIdentify(t, h.src, id2, t0.Add(2*time.Hour))

	// Same ID, renewed.
	w.SetSVID(id2, t0.Add(3*time.Hour))
	h.waitUpdate(t, t0.Add(3*time.Hour))
	mustIdentify(t, h.src, id2, t0.Add(3*time.Hour))
}

func TestSPIFFEExpiredSVIDIsUnavailable(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(10 * time.Minute)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)

	clk.Advance(10*time.Minute - time.Second)
	mustIdentify(t, h.src, id1, exp)
	if !h.src.Ready() {
		t.Fatal("not Ready one second before NotAfter")
	}

	clk.Advance(time.Second) // Now == NotAfter: expired.
	mustUnavailable(t, h.src, "SVID expired at "+exp.UTC().Format(time.RFC3339))
	if h.src.Ready() {
		t.Fatal("Ready with an expired SVID")
	}
	if !h.src.ExpiresAt().Equal(exp) {
		t.Fatalf("ExpiresAt = %v, want %v", h.src.ExpiresAt(), exp)
	}

	// A renewed SVID brings the identity back.
	exp2 := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp2)
	h.waitUpdate(t, exp2)
	mustIdentify(t, h.src, id1, exp2)
}

func TestSPIFFEWorkloadAPIGoneKeepsSVIDOnlyUntilExpiry(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)

	w.Close() // the SPIRE agent goes away
	h.waitLog(t, "SPIFFE Workload API watch failed; retrying")
	for _, e := range h.logs.All() {
		for k, v := range e.ContextMap() {
			if s, ok := v.(string); ok && strings.Contains(s, "PRIVATE KEY") {
				t.Fatalf("log %q field %s carries key material", e.Message, k)
			}
		}
	}

	clk.Advance(59 * time.Minute)
	mustIdentify(t, h.src, id1, exp)

	clk.Advance(time.Minute)
	mustUnavailable(t, h.src, "SVID expired at")
	if h.src.Ready() {
		t.Fatal("Ready after the last SVID expired with no Workload API")
	}
}

func TestSPIFFECloseStopsWatchAndIsIdempotent(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)
	eventually(t, func() bool { return w.X509Streams() == 1 }, "the watch stream")

	if err := h.src.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := h.src.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	eventually(t, func() bool { return w.X509Streams() == 0 }, "the watch stream to end")
	// A closed source identifies nobody, even with an unexpired SVID.
	mustUnavailable(t, h.src, "closed")
	if h.src.Ready() {
		t.Fatal("Ready after Close")
	}
	if _, _, err := h.src.JWTSVID(context.Background(), "aud"); !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("JWTSVID after Close: %v, want ErrUnavailable", err)
	}
	if n := h.logs.FilterMessage("SPIFFE Workload API watch failed; retrying").Len(); n != 0 {
		t.Fatalf("Close logged %d watch failures; closing is not a failure", n)
	}
}

func TestSPIFFEContextEndStopsWatch(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	ctx, cancel := context.WithCancel(context.Background())
	startSPIFFE(t, ctx, w.Addr(), newClock())
	eventually(t, func() bool { return w.X509Streams() == 1 }, "the watch stream")
	cancel()
	eventually(t, func() bool { return w.X509Streams() == 0 }, "the watch stream to end")
}

func TestSPIFFEIdentifyDoesNotAllocate(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)
	ctx := context.Background()
	var sink attest.Identity
	allocs := testing.AllocsPerRun(1000, func() {
		id, err := h.src.Identify(ctx, attest.Peer{})
		if err != nil {
			panic(err)
		}
		sink = id
	})
	if allocs != 0 {
		t.Fatalf("Identify allocates %v times per call, want 0", allocs)
	}
	_ = sink
}

func TestSPIFFEAddress(t *testing.T) {
	t.Run("missing address and no env", func(t *testing.T) {
		t.Setenv("SPIFFE_ENDPOINT_SOCKET", "")
		_, err := attest.NewSPIFFE(context.Background(), attest.SPIFFEOptions{})
		if err == nil {
			t.Fatal("NewSPIFFE without an address succeeded")
		}
		for _, want := range []string{"attest: ", "no SPIFFE Workload API address", "SPIFFE_ENDPOINT_SOCKET"} {
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q does not contain %q", err, want)
			}
		}
	})
	t.Run("malformed address", func(t *testing.T) {
		for _, addr := range []string{"/run/spire/agent.sock", "tcp://localhost:8081", "http://127.0.0.1:1"} {
			_, err := attest.NewSPIFFE(context.Background(), attest.SPIFFEOptions{Addr: addr})
			if err == nil || !strings.HasPrefix(err.Error(), "attest: ") {
				t.Fatalf("NewSPIFFE(%q) = %v, want an attest: error", addr, err)
			}
		}
	})
	t.Run("address from env", func(t *testing.T) {
		w := attesttest.NewWorkloadAPI(t, td)
		t.Setenv("SPIFFE_ENDPOINT_SOCKET", w.Addr())
		h := startSPIFFE(t, context.Background(), "", newClock())
		exp := h.clk.Now().Add(time.Hour)
		w.SetSVID(id1, exp)
		h.waitUpdate(t, exp)
		mustIdentify(t, h.src, id1, exp)
	})
}

func BenchmarkSPIFFEIdentify(b *testing.B) {
	w := attesttest.NewWorkloadAPI(b, td)
	w.SetSVID(id1, time.Now().Add(time.Hour))
	src, err := attest.NewSPIFFE(context.Background(), attest.SPIFFEOptions{Addr: w.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	for !src.Ready() {
		time.Sleep(time.Millisecond)
	}
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := src.Identify(ctx, attest.Peer{}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func TestSPIFFERevokedIdentityIsUnavailableBeforeExpiry(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	t0 := clk.Now()
	w.SetSVID(id1, t0.Add(time.Hour))
	h.waitUpdate(t, t0.Add(time.Hour))
	mustIdentify(t, h.src, id1, t0.Add(time.Hour))
	if _, _, err := h.src.JWTSVID(context.Background(), "aud"); err != nil {
		t.Fatal(err)
	}

	// The registration entry is removed: the agent ends the stream with "no identity issued".
	w.Revoke()
	deadline := time.Now().Add(10 * time.Second)
	for h.src.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("still ready 10s after the Workload API revoked the identity")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := h.src.Identify(context.Background(), attest.Peer{}); !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("Identify after revocation: %v, want ErrUnavailable", err)
	}
	if !h.src.ExpiresAt().IsZero() {
		t.Error("ExpiresAt still reports the revoked SVID")
	}
	if h.resultCount(attest.UpdateRevoked) == 0 {
		t.Error("the revocation was not reported as an update result")
	}
	calls := w.JWTSVIDCalls()
	_, _, _ = h.src.JWTSVID(context.Background(), "aud")
	if w.JWTSVIDCalls() == calls {
		t.Error("a JWT-SVID cached for the revoked identity was served from the cache")
	}

	// A new SVID (entry re-created) is picked up again.
	w.SetSVID(id1, t0.Add(2*time.Hour))
	h.waitUpdate(t, t0.Add(2*time.Hour))
	mustIdentify(t, h.src, id1, t0.Add(2*time.Hour))
}

func TestSPIFFE_AgentStoppedServesUntilExpiryThenRecoversWhenRestarted(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)
	if h.resultCount(attest.UpdateOK) != 1 {
		t.Fatalf("results ok = %d after the first SVID, want 1", h.resultCount(attest.UpdateOK))
	}

	w.Stop() // the SPIRE agent is stopped
	eventually(t, func() bool { return h.resultCount(attest.UpdateError) > 0 }, "a watch error result")
	clk.Advance(59 * time.Minute)
	mustIdentify(t, h.src, id1, exp) // still serving the SVID it holds
	clk.Advance(time.Minute)
	mustUnavailable(t, h.src, "SVID expired at")
	if h.src.Ready() {
		t.Fatal("Ready after the held SVID expired with the agent stopped")
	}

	// The agent comes back with a renewed SVID: the same source recovers.
	exp2 := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp2)
	w.Start()
	h.waitUpdate(t, exp2)
	mustIdentify(t, h.src, id1, exp2)
	if !h.src.Ready() {
		t.Fatal("not Ready after the agent came back")
	}
	if h.resultCount(attest.UpdateRevoked) != 0 {
		t.Fatal("an agent outage was reported as a revocation")
	}
}

func TestSPIFFE_UpdateWithoutSVIDDropsIdentityAtOnce(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)

	// The entry is deleted: the Workload API's next update lists no SVID for us.
	w.SendNoSVID()
	h.waitUpdate(t, time.Time{})
	if h.src.Ready() {
		t.Fatal("still Ready after an update without our SVID")
	}
	mustUnavailable(t, h.src, "no SVID yet")
	if h.resultCount(attest.UpdateRevoked) == 0 {
		t.Fatal("the dropped identity was not reported as revoked")
	}

	exp2 := clk.Now().Add(2 * time.Hour)
	w.SetSVID(id1, exp2)
	h.waitUpdate(t, exp2)
	mustIdentify(t, h.src, id1, exp2)
}

// Whoever waits on OnUpdate (a readiness gate, the metric tests) must find the same event
// already counted by OnUpdateResult; CI once saw the count lag behind.
func TestSPIFFE_ReportsUpdateResultBeforeOnUpdate(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	var (
		mu       sync.Mutex
		okCount  int
		seenAtUp = make(chan int, 8)
	)
	src, err := attest.NewSPIFFE(context.Background(), attest.SPIFFEOptions{
		Addr: w.Addr(),
		OnUpdate: func(time.Time) {
			mu.Lock()
			seenAtUp <- okCount
			mu.Unlock()
		},
		OnUpdateResult: func(r attest.UpdateResult) {
			mu.Lock()
			if r == attest.UpdateOK {
				okCount++
			}
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Close() })
	w.SetSVID(id1, time.Now().Add(time.Hour))
	select {
	case n := <-seenAtUp:
		if n != 1 {
			t.Fatalf("OnUpdate ran with %d ok results counted, want 1 (the result must be reported first)", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no update within 10s")
	}
}

// TestSPIFFE_X509SourceServesTheLatestSVIDAndFailsClosed: the source escrow's own mTLS client
// (the control-plane connection) presents: nothing before the first SVID, the current SVID and
// its trust domain's bundle after, nothing once the SVID expired or the source closed.
func TestSPIFFE_X509SourceServesTheLatestSVIDAndFailsClosed(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	x := h.src.X509Source()
	trust := spiffeid.RequireTrustDomainFromString(td)
	if _, err := x.GetX509SVID(); !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("before the first SVID: %v, want ErrUnavailable", err)
	}
	exp := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)
	svid, err := x.GetX509SVID()
	if err != nil || svid.ID.String() != id1 || !svid.Certificates[0].NotAfter.Equal(exp) || svid.PrivateKey == nil {
		t.Fatalf("GetX509SVID = %+v, %v; want %s expiring %v with its key", svid, err, id1, exp)
	}
	b, err := x.GetX509BundleForTrustDomain(trust)
	if err != nil || len(b.X509Authorities()) == 0 || !b.X509Authorities()[0].Equal(w.X509Authorities()[0]) {
		t.Fatalf("bundle = %v, %v; want the Workload API's CA", b, err)
	}
	if _, err := x.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("evil.org")); err == nil {
		t.Fatal("a bundle for a trust domain the Workload API never sent")
	}
	clk.Advance(time.Hour)
	if _, err := x.GetX509SVID(); !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("after expiry: %v, want ErrUnavailable", err)
	}
	_ = h.src.Close()
	if _, err := x.GetX509BundleForTrustDomain(trust); !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("after Close: %v, want ErrUnavailable", err)
	}
}
