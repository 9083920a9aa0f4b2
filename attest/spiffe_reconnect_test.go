package attest_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/attest/attesttest"
)

// rejectingAgent is a Workload API that answers the first FetchX509SVID and the first
// FetchJWTBundles stream with InvalidArgument and serves normally after that. InvalidArgument
// is the one error on which go-spiffe ends a watch for good instead of retrying, so the
// source's own restart loop is what brings the watch back.
type rejectingAgent struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	svid   *workload.X509SVIDResponse
	jwks   []byte
	td     spiffeid.TrustDomain
	mu     sync.Mutex
	x509N  int
	bundle int
}

func startRejectingAgent(t *testing.T) (addr string, notAfter time.Time) {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString(td)
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey, leafKey, jwtKey := key(), key(), key()
	now := time.Now().Truncate(time.Second)
	notAfter = now.Add(time.Hour)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{td.ID().URL()},
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), NotBefore: now.Add(-time.Hour), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
		URIs: []*url.URL{spiffeid.RequireFromString(id1).URL()},
	}, ca, leafKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(leafKey)
	if err != nil {
		t.Fatal(err)
	}
	jwks, err := jwtbundle.FromJWTAuthorities(td, map[string]crypto.PublicKey{"k1": jwtKey.Public()}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	a := &rejectingAgent{
		svid: &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
			SpiffeId: id1, X509Svid: leafDER, X509SvidKey: keyDER, Bundle: caDER,
		}}},
		jwks: jwks,
		td:   td,
	}
	path := filepath.Join(t.TempDir(), "agent.sock")
	if len(path) > 100 {
		t.Skipf("socket path %s too long for a unix socket", path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(srv, a)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return "unix://" + path, notAfter
}

func (a *rejectingAgent) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	a.mu.Lock()
	a.x509N++
	first := a.x509N == 1
	a.mu.Unlock()
	if first {
		return status.Error(codes.InvalidArgument, "rejected once")
	}
	if err := stream.Send(a.svid); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func (a *rejectingAgent) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	a.mu.Lock()
	a.bundle++
	first := a.bundle == 1
	a.mu.Unlock()
	if first {
		return status.Error(codes.InvalidArgument, "rejected once")
	}
	if err := stream.Send(&workload.JWTBundlesResponse{Bundles: map[string][]byte{a.td.IDString(): a.jwks}}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

// go-spiffe gives a watch up on InvalidArgument and the source restarts it itself; that
// restart used to wait a fixed 5 s, the slowest way back to an identity. It now waits the
// reconnect backoff's first step (200 ms ±20% by default). The bound, 2.5 s, is half the old
// wait and leaves seconds of slack on a loaded machine.
func TestSPIFFE_RestartsAGivenUpWatchAfterTheReconnectBackoff(t *testing.T) {
	const bound = 2500 * time.Millisecond
	addr, notAfter := startRejectingAgent(t)
	clk := newClock()
	start := time.Now()
	h := startSPIFFE(t, context.Background(), addr, clk)
	select {
	case got := <-h.updates:
		if !got.Equal(notAfter) {
			t.Fatalf("update expiring %v, want %v", got, notAfter)
		}
	case <-time.After(bound):
		t.Fatalf("no X509-SVID within %v after the first watch was rejected", bound)
	}
	t.Logf("X509-SVID after %v", time.Since(start).Round(time.Millisecond))
	mustIdentify(t, h.src, id1, notAfter)
	if h.logs.FilterMessage("SPIFFE Workload API watch stopped; restarting").Len() != 1 {
		t.Error("the restart of the given-up watch was not logged")
	}

	// The JWT bundle watch has its own restart loop; the same holds.
	bundles := h.src.JWTBundles()
	td := spiffeid.RequireTrustDomainFromString(td)
	start = time.Now()
	for {
		_, err := bundles.GetJWTBundleForTrustDomain(td)
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "no JWT bundles") {
			t.Fatalf("GetJWTBundleForTrustDomain: %v", err)
		}
		if time.Since(start) > bound {
			t.Fatalf("no JWT bundles within %v after the first bundle watch was rejected", bound)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("JWT bundles after %v", time.Since(start).Round(time.Millisecond))
}

func TestNewSPIFFE_RejectsAnInvalidReconnectBackoff(t *testing.T) {
	for _, b := range []attest.ReconnectBackoff{
		{Initial: -time.Second},
		{Max: -time.Second},
		{Initial: 2 * time.Second, Max: time.Second},
	} {
		_, err := attest.NewSPIFFE(context.Background(), attest.SPIFFEOptions{Addr: "unix:///tmp/agent.sock", Reconnect: b})
		if err == nil || !strings.Contains(err.Error(), "attest: reconnect backoff") {
			t.Errorf("Reconnect %+v: err = %v, want a reconnect backoff error", b, err)
		}
	}
}

// After a long agent outage the source must see the restarted agent within seconds: until it
// does, requests are denied (the held SVID expired) and /readyz is not ready. go-spiffe's
// default backoff grows by a second per failure (up to 30 s) and gRPC's channel backoff by
// 1.6× (up to 120 s), so after this outage the old watch would next try about 3.7 s after the
// restart, or 8.7 s when its try fell into the channel's own backoff; measured 8.5 s. With the
// default ReconnectBackoff the worst case is one channel wait plus one watch wait, 2×1.2 s;
// typically about 1 s.
//
// The waits are go-spiffe's and gRPC's timers, not the injected clock, so this test needs
// wall time: the outage must last long enough for the old backoff to have grown. The bound
// (3.5 s) stays below the old behaviour's best case (3.7 s) and leaves over a second of
// scheduling slack on a loaded machine above the new worst case.
func TestSPIFFE_SeesRestartedAgentWithinSecondsAfterLongOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("waits out a 6.3 s agent outage")
	}
	t.Parallel()
	const (
		outage = 6300 * time.Millisecond // just past the old watch's 3rd retry (1+2+3 s)
		bound  = 3500 * time.Millisecond
	)
	w := attesttest.NewWorkloadAPI(t, td)
	clk := newClock()
	h := startSPIFFE(t, context.Background(), w.Addr(), clk)
	exp := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp)
	h.waitUpdate(t, exp)

	w.Stop()
	clk.Advance(time.Hour) // the held SVID expires during the outage
	mustUnavailable(t, h.src, "SVID expired at")
	time.Sleep(outage)

	exp2 := clk.Now().Add(time.Hour)
	w.SetSVID(id1, exp2)
	start := time.Now()
	w.Start()
	deadline := time.After(bound)
	for recovered := false; !recovered; {
		select {
		case got := <-h.updates:
			recovered = got.Equal(exp2)
		case <-deadline:
			t.Fatalf("the restarted agent's SVID was not seen within %v of the restart (after a %v outage)", bound, outage)
		}
	}
	t.Logf("recovered %v after the restart", time.Since(start).Round(time.Millisecond))
	mustIdentify(t, h.src, id1, exp2)
	if !h.src.Ready() {
		t.Fatal("not Ready after the agent came back")
	}
	if n := h.logs.FilterMessage("SPIFFE Workload API watch failed; retrying").FilterLevelExact(zap.WarnLevel).Len(); n != 1 {
		t.Errorf("%d warnings for one outage, want 1 (the retries are debug lines)", n)
	}
	if h.logs.FilterMessage("SPIFFE Workload API watch recovered").Len() != 1 {
		t.Error("the recovery was not logged")
	}
}
