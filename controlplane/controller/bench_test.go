package controller

import (
	"context"
	"flag"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
)

var benchSidecars = flag.Int("sidecars", 1000, "simulated sidecars in BenchmarkServer_RevocationReachesEverySidecar")

// BenchmarkServer_RevocationReachesEverySidecar: N sidecars (real gRPC streams over mTLS, each
// with its own X509-SVID, so N snapshot-cache entries) follow their bundle and ACK it; one op is
// a Revocation computed and published (Compute, Update) until every sidecar has received it. Reported: ms from the
// Update to the last sidecar, and the heap per connected sidecar (client and server side, both
// in this process).
//
//	go test ./controlplane/controller -run '^$' -bench RevocationReachesEverySidecar -benchtime 20x -sidecars 1000
func BenchmarkServer_RevocationReachesEverySidecar(b *testing.B) {
	benchReachEverySidecar(b, Objects{Policies: []v1alpha1.Policy{pol(sys, "base", allowGitHub)}}, revokeOp)
}

// revokeOp is one op: a new Revocation.
func revokeOp(i int, objs *Objects) func(bundle.Bundle) bool {
	name := fmt.Sprintf("r%d", i)
	objs.Revocations = []v1alpha1.Revocation{revoke("agents", name, "spiffe://example.org/ns/agents/sa/sidecar-0")}
	return func(bun bundle.Bundle) bool {
		return slices.ContainsFunc(bun.Revocations, func(r bundle.Revocation) bool { return r.Name == "agents/"+name })
	}
}

// BenchmarkServer_RevocationReachesEverySidecarOfTwoAudiences is the same with a brokered
// Credential (and an Upstream naming it) that half of the sidecars may use (500 spiffe_ids):
// two bundles for the namespace, each encoded once and shared by its half.
//
//	go test ./controlplane/controller -run '^$' -bench RevocationReachesEverySidecarOfTwoAudiences -benchtime 5x -sidecars 1000
func BenchmarkServer_RevocationReachesEverySidecarOfTwoAudiences(b *testing.B) {
	var ids []string
	for i := 0; i < *benchSidecars; i += 2 {
		ids = append(ids, fmt.Sprintf("spiffe://example.org/ns/agents/sa/sidecar-%d", i))
	}
	gh := v1alpha1.Credential{ObjectMeta: meta(sys, "github"), Spec: v1alpha1.CredentialSpec{
		GitHubApp: &v1alpha1.GitHubAppSpec{GitHubApp: config.GitHubApp{AppID: ghAppID, InstallationID: ghInstallation},
			PrivateKeyRef: v1alpha1.SecretKeyRef{Name: "github-app", Key: "private-key.pem"}},
		Broker: &v1alpha1.BrokerSpec{SPIFFEIDs: ids},
	}}
	objs := Objects{Policies: []v1alpha1.Policy{pol(sys, "base", allowGitHub)}, Credentials: []v1alpha1.Credential{gh},
		Upstreams: []v1alpha1.Upstream{withCred(up("agents", "github", "api.github.com", 0), "github")}}
	if v := Compute(objs, sys); len(v.Problems()) != 0 || len(v.Brokered()) != 1 {
		b.Fatalf("problems %v", v.Problems())
	}
	benchReachEverySidecar(b, objs, revokeOp)
}

// BenchmarkServer_PolicyChangeReachesEverySidecar is the same with a changed Policy as the op:
// the controller validates the Cedar text against escrow's schema (as it does for every Policy
// it serves) before computing and publishing the bundles.
//
//	go test ./controlplane/controller -run '^$' -bench PolicyChangeReachesEverySidecar -benchtime 20x -sidecars 1000
func BenchmarkServer_PolicyChangeReachesEverySidecar(b *testing.B) {
	benchReachEverySidecar(b, Objects{Policies: []v1alpha1.Policy{pol(sys, "base", allowGitHub)}}, func(i int, objs *Objects) func(bundle.Bundle) bool {
		id := fmt.Sprintf("agents-change-%d", i)
		objs.Policies = []v1alpha1.Policy{pol(sys, "base", allowGitHub), pol("agents", "change",
			`@id("`+id+`")
permit(principal in Namespace::"agents", action == Action::"GET", resource == Host::"api.github.com");`)}
		return func(bun bundle.Bundle) bool { return strings.Contains(bun.Policies["agents/change.cedar"], id) }
	})
}

// benchReachEverySidecar connects -sidecars clients and times, per op, change (which edits the
// objects and returns how to recognise its result in a bundle) until every client has a bundle
// with that result.
func benchReachEverySidecar(b *testing.B, objs Objects, change func(i int, objs *Objects) func(bundle.Bundle) bool) {
	ts := startServer(b)
	n := *benchSidecars
	ts.Update(Compute(objs, sys))

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	var mu sync.Mutex
	cond := sync.NewCond(&mu)
	var want func(bundle.Bundle) bool // the current op's result; nil between ops
	op, done := 0, 0                  // the current op's number; clients that have its result
	var clients []*controllertest.Client
	ready := make(chan struct{}, n)
	for i := range n {
		id := fmt.Sprintf("spiffe://example.org/ns/agents/sa/sidecar-%d", i)
		svid, err := ts.ca.SVID(id)
		if err != nil {
			b.Fatal(err)
		}
		c, err := controllertest.Dial(context.Background(), ts.addr, controllertest.ClientTLS(svid, ts.ca.Bundle()), id)
		if err != nil {
			b.Fatal(err)
		}
		clients = append(clients, c)
		go func() {
			first := true
			counted := -1 // the op this client was last counted for
			for {
				r, bun, err := c.Recv()
				if err != nil {
					return
				}
				if err := c.ACK(r); err != nil {
					return
				}
				mu.Lock()
				if want != nil && counted != op && want(bun) {
					counted = op
					done++
					cond.Broadcast()
				}
				mu.Unlock()
				if first {
					first = false
					ready <- struct{}{}
				}
			}
		}()
	}
	for range n {
		<-ready
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	b.Cleanup(func() {
		for _, c := range clients {
			c.Close()
		}
	})

	b.ResetTimer()
	var total time.Duration
	for i := 0; i < b.N; i++ {
		has := change(i, &objs)
		mu.Lock()
		want, done = has, 0
		op++
		mu.Unlock()
		start := time.Now()
		ts.Update(Compute(objs, sys))
		mu.Lock()
		for done < n {
			cond.Wait()
		}
		want = nil
		mu.Unlock()
		total += time.Since(start)
	}
	b.StopTimer()
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/all-sidecars")
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(n), "heap-B/sidecar")
	b.ReportMetric(float64(n), "sidecars")
	ts.mu.Lock()
	b.ReportMetric(float64(len(ts.snaps)), "snapshots")
	ts.mu.Unlock()
}

// BenchmarkCompute_NamespacesWithObjects: one op is a Compute over escrow's namespace and N
// tenant namespaces, each with an Upstream and a Credential, plus a cluster-wide Upstream
// naming a Credential every tenant defines: every namespace's bundle is built and validated,
// and every object judged (what each burst of changes costs the controller).
//
//	go test ./controlplane/controller -run '^$' -bench Compute_NamespacesWithObjects
func BenchmarkCompute_NamespacesWithObjects(b *testing.B) {
	for _, n := range []int{10, 100} {
		b.Run(fmt.Sprintf("namespaces=%d", n), func(b *testing.B) {
			shared := up(sys, "openai", "api.openai.com", 0)
			shared.Spec.Credential = "openai"
			objs := Objects{Upstreams: []v1alpha1.Upstream{shared}, Policies: []v1alpha1.Policy{pol(sys, "base", allowGitHub)}}
			for i := range n {
				ns := fmt.Sprintf("team-%d", i)
				u := up(ns, "api", ns+".example.com", 0)
				u.Spec.Credential = "key"
				objs.Upstreams = append(objs.Upstreams, u)
				objs.Credentials = append(objs.Credentials, static(ns, "key", "s"), static(ns, "openai", "o"))
			}
			b.ReportAllocs()
			for b.Loop() {
				if v := Compute(objs, sys); len(v.Problems()) != 0 {
					b.Fatal(v.Problems())
				}
			}
		})
	}
}
