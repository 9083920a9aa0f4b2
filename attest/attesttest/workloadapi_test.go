package attesttest_test

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/escrowproxy/escrow/attest/attesttest"
)

const id = "spiffe://example.org/ns/agents/sa/coder"

func TestServesVerifiableSVIDsToTheRealClient(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, "example.org")
	notAfter := time.Now().Add(time.Hour).Truncate(time.Second)
	w.SetSVID(id, notAfter)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := workloadapi.New(ctx, workloadapi.WithAddr(w.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	xc, err := c.FetchX509Context(ctx)
	if err != nil {
		t.Fatalf("FetchX509Context: %v", err)
	}
	svid := xc.DefaultSVID()
	if svid.ID.String() != id || !svid.Certificates[0].NotAfter.Equal(notAfter) {
		t.Fatalf("SVID %s expiring %v, want %s expiring %v", svid.ID, svid.Certificates[0].NotAfter, id, notAfter)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	if _, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, w.X509Authorities())); err != nil {
		t.Fatalf("SVID does not verify against the server's CA: %v", err)
	}
	b, err := xc.Bundles.GetX509BundleForTrustDomain(td)
	if err != nil || !b.HasX509Authority(w.X509Authorities()[0]) {
		t.Fatalf("X.509 bundle in the response lacks the CA: %v", err)
	}

	js, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "aud"})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	jb, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(js.Marshal(), jb, []string{"aud"}); err != nil {
		t.Fatalf("JWT-SVID does not validate against the served JWT bundle: %v", err)
	}
	if n := w.JWTSVIDCalls(); n != 1 {
		t.Fatalf("JWTSVIDCalls = %d, want 1", n)
	}
}

func TestRejectsRequestsWithoutSecurityHeader(t *testing.T) {
	w := attesttest.NewWorkloadAPI(t, "example.org")
	w.SetSVID(id, time.Now().Add(time.Hour))
	conn, err := grpc.NewClient(w.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := workload.NewSpiffeWorkloadAPIClient(conn)

	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchX509SVID without the header: %v, want InvalidArgument", err)
	}
	_, err = client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"aud"}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchJWTSVID without the header: %v, want InvalidArgument", err)
	}
	if n := w.JWTSVIDCalls(); n != 0 {
		t.Fatalf("a rejected request was counted: JWTSVIDCalls = %d", n)
	}
}
