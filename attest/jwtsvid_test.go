package attest_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/attest/attesttest"
)

// jwtHarness: a Workload API whose JWT-SVIDs live 10 minutes on the test's fake clock, with an
// X509-SVID for id1 already received by the source.
func jwtHarness(t *testing.T) (*attesttest.WorkloadAPI, *harness) {
	t.Helper()
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	w.SetClock(clk.Now)
	w.SetJWTTTL(10 * time.Minute)
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(24 * time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)
	return w, h
}

func mustJWT(t *testing.T, w *attesttest.WorkloadAPI, src *attest.SPIFFE, aud, wantSub string) (string, time.Time) {
	t.Helper()
	tok, exp, err := src.JWTSVID(context.Background(), aud)
	if err != nil {
		t.Fatalf("JWTSVID(%q): %v", aud, err)
	}
	svid, err := jwtsvid.ParseAndValidate(tok, w.JWTBundle(), []string{aud})
	if err != nil {
		t.Fatalf("JWTSVID(%q) returned a token that does not validate: %v", aud, err)
	}
	if svid.ID.String() != wantSub {
		t.Fatalf("JWT-SVID subject %s, want %s", svid.ID, wantSub)
	}
	if !svid.Expiry.Equal(exp) {
		t.Fatalf("JWTSVID expiresAt %v, token exp %v", exp, svid.Expiry)
	}
	return tok, exp
}

func TestJWTSVIDCachedUntilHalfLife(t *testing.T) {
	w, h := jwtHarness(t)
	t0 := h.clk.Now()

	tok1, exp1 := mustJWT(t, w, h.src, "https://idp.example/token", id1)
	if !exp1.Equal(t0.Add(10 * time.Minute)) {
		t.Fatalf("expiresAt %v, want %v", exp1, t0.Add(10*time.Minute))
	}
	if n := w.JWTSVIDCalls(); n != 1 {
		t.Fatalf("%d fetches after the first call, want 1", n)
	}

	h.clk.Advance(5*time.Minute - time.Second) // just before half-life: cached
	tok, exp := mustJWT(t, w, h.src, "https://idp.example/token", id1)
	if tok != tok1 || !exp.Equal(exp1) || w.JWTSVIDCalls() != 1 {
		t.Fatalf("before half-life: fetches %d, same token %v; want 1 fetch and the cached token",
			w.JWTSVIDCalls(), tok == tok1)
	}

	h.clk.Advance(time.Second) // half-life reached: fetch again
	tok2, exp2 := mustJWT(t, w, h.src, "https://idp.example/token", id1)
	if tok2 == tok1 || !exp2.Equal(t0.Add(15*time.Minute)) || w.JWTSVIDCalls() != 2 {
		t.Fatalf("at half-life: fetches %d, exp %v, new token %v; want 2 fetches, exp %v, a new token",
			w.JWTSVIDCalls(), exp2, tok2 != tok1, t0.Add(15*time.Minute))
	}

	// Another audience has its own entry.
	mustJWT(t, w, h.src, "sts.amazonaws.com", id1)
	if n := w.JWTSVIDCalls(); n != 3 {
		t.Fatalf("%d fetches after a second audience, want 3", n)
	}
	mustJWT(t, w, h.src, "https://idp.example/token", id1)
	mustJWT(t, w, h.src, "sts.amazonaws.com", id1)
	if n := w.JWTSVIDCalls(); n != 3 {
		t.Fatalf("%d fetches after repeating both audiences, want 3 (both cached)", n)
	}
}

func TestJWTSVIDConcurrentCallersShareOneFetch(t *testing.T) {
	w, h := jwtHarness(t)
	release := w.HoldJWTSVIDs()
	defer release()

	const callers = 20
	var wg sync.WaitGroup
	toks := make([]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() { toks[i], _, errs[i] = h.src.JWTSVID(context.Background(), "aud") })
	}
	eventually(t, func() bool { return w.JWTSVIDCalls() >= 1 }, "the first fetch")
	// Give every caller time to reach the server if they were not sharing the fetch.
	time.Sleep(100 * time.Millisecond)
	release()
	wg.Wait()
	for i := range callers {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if toks[i] != toks[0] {
			t.Fatalf("caller %d got a different token", i)
		}
	}
	if n := w.JWTSVIDCalls(); n != 1 {
		t.Fatalf("%d concurrent callers made %d fetches, want 1", callers, n)
	}
}

func TestJWTSVIDCallerContextBoundsOnlyItsWait(t *testing.T) {
	w, h := jwtHarness(t)
	release := w.HoldJWTSVIDs()
	defer release()

	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, _, err := h.src.JWTSVID(ctx, "aud")
		errc <- err
	}()
	eventually(t, func() bool { return w.JWTSVIDCalls() == 1 }, "the fetch")
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("JWTSVID with a cancelled context: %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("JWTSVID did not return when its context was cancelled")
	}

	// The shared fetch was not cancelled with that caller: its result is used.
	release()
	mustJWT(t, w, h.src, "aud", id1)
	if n := w.JWTSVIDCalls(); n != 1 {
		t.Fatalf("%d fetches, want 1 (the abandoned caller's fetch completes and is cached)", n)
	}
}

func TestJWTSVIDFailureIsUnavailableAndNotCached(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)

	// No identity issued: the Workload API answers PermissionDenied.
	_, _, err := h.src.JWTSVID(context.Background(), "aud")
	if !errors.Is(err, attest.ErrUnavailable) || status.Code(err) != codes.PermissionDenied {
		t.Fatalf("JWTSVID without an identity: %v; want ErrUnavailable wrapping PermissionDenied", err)
	}

	w.SetSVID(id1, clk.Now().Add(time.Hour))
	mustJWT(t, w, h.src, "aud", id1)
	if n := w.JWTSVIDCalls(); n != 2 {
		t.Fatalf("%d fetches, want 2 (the failure is not cached)", n)
	}

	if _, _, err := h.src.JWTSVID(context.Background(), ""); err == nil {
		t.Fatal("JWTSVID with an empty audience succeeded")
	}
}

func TestJWTSVIDExpiredOnArrivalIsRejected(t *testing.T) {
	w, h := jwtHarness(t)
	// Our clock is 50 minutes ahead of the Workload API's, whose tokens live 20 minutes: a
	// token arrives already expired by our clock (exp = t0+20m, our now = t0+50m), though not
	// by the wall clock (about t0), so go-spiffe's parser accepts it and our check must act.
	t0 := h.clk.Now()
	w.SetClock(func() time.Time { return t0 })
	w.SetJWTTTL(20 * time.Minute)
	h.clk.Advance(50 * time.Minute)
	_, _, err := h.src.JWTSVID(context.Background(), "aud")
	if !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("JWTSVID with an expired token: %v, want ErrUnavailable", err)
	}
}

func TestJWTSVIDDroppedWhenIdentityChanges(t *testing.T) {
	w, h := jwtHarness(t)
	mustJWT(t, w, h.src, "aud", id1)

	exp := h.clk.Now().Add(2 * time.Hour)
	w.SetSVID(id2, exp)
	h.waitUpdate(t, exp)
	mustJWT(t, w, h.src, "aud", id2)
	if n := w.JWTSVIDCalls(); n != 2 {
		t.Fatalf("%d fetches, want 2 (the token for the old identity is not reused)", n)
	}
}

func TestJWTSVID_AgentOutageServesThePreviousTokenUntilNineTenthsOfItsLife(t *testing.T) {
	w, h := jwtHarness(t) // tokens live 10 minutes
	tok1, exp1 := mustJWT(t, w, h.src, "aud", id1)

	w.Stop() // the SPIRE agent restarts
	h.clk.Advance(6 * time.Minute)
	tok, exp, err := h.src.JWTSVID(context.Background(), "aud")
	if err != nil || tok != tok1 || !exp.Equal(exp1) {
		t.Fatalf("past half-life with the agent down: err %v, same token %v; want the previous token", err, tok == tok1)
	}
	h.clk.Advance(3 * time.Minute) // 9 minutes: within a tenth of expiry, too close to send
	if _, _, err := h.src.JWTSVID(context.Background(), "aud"); !errors.Is(err, attest.ErrUnavailable) {
		t.Fatalf("near expiry with the agent down: %v, want ErrUnavailable", err)
	}

	// The agent is back: the next call fetches a fresh token.
	w.Start()
	eventually(t, func() bool {
		tok, _, err := h.src.JWTSVID(context.Background(), "aud")
		return err == nil && tok != tok1
	}, "a fresh JWT-SVID once the agent is back")
}

func TestJWTSVID_RevokedIdentityGetsNoPreviousToken(t *testing.T) {
	w, h := jwtHarness(t)
	mustJWT(t, w, h.src, "aud", id1)
	h.clk.Advance(6 * time.Minute) // past half-life: the next call must fetch
	w.Revoke()                     // the registration entry is removed: a refusal, not an outage
	eventually(t, func() bool {
		_, _, err := h.src.JWTSVID(context.Background(), "aud")
		return errors.Is(err, attest.ErrUnavailable)
	}, "JWTSVID refused after the identity was withdrawn")
}
