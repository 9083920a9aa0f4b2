package controller

import (
	"context"
	"flag"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
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
	ts := startServer(b)
	n := *benchSidecars
	objs := Objects{Policies: []v1alpha1.Policy{pol(sys, "base", allowGitHub)}}
	ts.Update(Compute(objs, sys))

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	var mu sync.Mutex
	cond := sync.NewCond(&mu)
	seen := map[string]int{} // revocation name -> sidecars that have it
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
			for {
				r, bun, err := c.Recv()
				if err != nil {
					return
				}
				if err := c.ACK(r); err != nil {
					return
				}
				mu.Lock()
				for _, rv := range bun.Revocations {
					seen[rv.Name]++
				}
				cond.Broadcast()
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
		name := fmt.Sprintf("r%d", i)
		objs.Revocations = []v1alpha1.Revocation{revoke("agents", name, "spiffe://example.org/ns/agents/sa/sidecar-0")}
		start := time.Now()
		ts.Update(Compute(objs, sys))
		mu.Lock()
		for seen["agents/"+name] < n {
			cond.Wait()
		}
		mu.Unlock()
		total += time.Since(start)
	}
	b.StopTimer()
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/all-sidecars")
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(n), "heap-B/sidecar")
	b.ReportMetric(float64(n), "sidecars")
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
