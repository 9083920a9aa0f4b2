package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/policy"
)

// twoUpstreams starts upstreams "A" and "B" that answer with their name and the Authorization
// they received, and a second secret file; it returns the config of a route to each.
func twoUpstreams(t *testing.T) (toA, toB string) {
	t.Helper()
	h := func(name string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s", name, r.Header.Get("Authorization"))
		}
	}
	a := newTLSUpstream(t, h("A"), false, "api.example.com")
	b := newTLSUpstream(t, h("B"), true, "api.example.com")
	// The same credential, applied differently: the route and its applier move together.
	// The upstreams echo the credential for the test to check: not scrubbed.
	toA = "upstreams:\n" + a.route("api.example.com", "credential: api", "scrub_responses: false")
	toB = "upstreams:\n" + b.route("api.example.com", "credential: api", `inject: {header: Authorization, value: "Token {{.Token}}"}`, "scrub_responses: false")
	return toA, toB
}

func TestSidecar_UpdateSwapsRoutesCredentialsAndPoliciesWhileRequestsFlow(t *testing.T) {
	toA, toB := twoUpstreams(t)
	tp := newTestProxy(t, toA, withPolicy(`@id("v1") permit (principal, action, resource);`))
	wantA, wantB := "A Bearer "+testSecret, "B Token "+testSecret
	// A new connection per request: an intercepted connection keeps the route its CONNECT was
	// decided on, so only new CONNECTs see an update's routes.
	tr := tp.Transport.Clone()
	tr.DisableKeepAlives = true
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}

	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		seen    sync.Map // body → count
		failure atomic.Value
	)
	for range 4 {
		wg.Go(func() {
			for !stop.Load() {
				resp, err := client.Get("https://api.example.com/v1/models")
				if err != nil {
					failure.Store(err.Error())
					return
				}
				body := string(readBody(t, resp))
				resp.Body.Close()
				if resp.StatusCode != 200 || (body != wantA && body != wantB) {
					failure.Store(fmt.Sprintf("%d %q", resp.StatusCode, body))
					return
				}
				n, _ := seen.LoadOrStore(body, new(atomic.Int64))
				n.(*atomic.Int64).Add(1)
			}
		})
	}
	sets := []policy.Source{
		{Origin: "test", Policies: map[string][]byte{"p.cedar": []byte(`@id("v1") permit (principal, action, resource);`)}},
		{Origin: "test", Policies: map[string][]byte{"p.cedar": []byte(`@id("v2") permit (principal, action, resource);`)}},
	}
	time.Sleep(20 * time.Millisecond) // some requests on the first state
	for i := range 40 {
		cfg, err := config.Parse([]byte(tp.baseConfig + []string{toB, toA}[i%2]))
		must(t, err)
		if err := tp.Sidecar.Update(context.Background(), Update{Config: cfg, Policies: &sets[(i+1)%2]}); err != nil {
			t.Fatalf("update %d: %v", i, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	if f := failure.Load(); f != nil {
		t.Fatalf("a request saw half an update or failed: %v", f)
	}
	for _, b := range []string{wantA, wantB} {
		if n, ok := seen.Load(b); !ok || n.(*atomic.Int64).Load() == 0 {
			t.Errorf("no response %q: the update did not take effect", b)
		}
	}
	for _, rec := range tp.Records() {
		if len(rec.PolicyIDs) != 1 || (rec.PolicyIDs[0] != "v1" && rec.PolicyIDs[0] != "v2") {
			t.Fatalf("record with policy ids %v: want exactly one of v1, v2", rec.PolicyIDs)
		}
	}
}

func TestSidecar_UpdateChangesThePolicyModeAndNewRoutes(t *testing.T) {
	tp := newTestProxy(t, "", withPolicy(`@id("deny-all") forbid (principal, action, resource);`))
	up := newTLSUpstream(t, okHandler(nil), false, "new.example.com")
	if resp := tp.Get(t, "https://new.example.com/"); resp.StatusCode != http.StatusForbidden || resp.Header.Get(ReasonHeader) != string(ReasonUnknownDestination) {
		t.Fatalf("before the update: %d %s, want unknown_destination", resp.StatusCode, resp.Header.Get(ReasonHeader))
	}
	cfg, err := config.Parse([]byte(strings.Replace(tp.baseConfig, "mode: enforce", "mode: report", 1) +
		"upstreams:\n" + up.route("new.example.com")))
	must(t, err)
	must(t, tp.Sidecar.Update(context.Background(), Update{Config: cfg}))
	resp := tp.Get(t, "https://new.example.com/")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("after the update: %d, want 200 (new route, report mode lets the forbid through)", resp.StatusCode)
	}
	rec := tp.WaitRecords(t, 2)[1] // the refused CONNECT, then the request after the update
	if rec.Host != "new.example.com" || rec.Kind != "request" {
		t.Fatalf("record %+v", rec)
	}
	if rec.Mode != "report" || !rec.WouldDeny {
		t.Errorf("record mode=%q would_deny=%v, want report and true", rec.Mode, rec.WouldDeny)
	}
}

func TestSidecar_BadUpdateChangesNothing(t *testing.T) {
	toA, _ := twoUpstreams(t)
	tp := newTestProxy(t, toA)
	good := func() {
		t.Helper()
		resp := tp.Get(t, "https://api.example.com/")
		if body := string(readBody(t, resp)); body != "A Bearer "+testSecret {
			t.Fatalf("the running state changed: %d %q", resp.StatusCode, body)
		}
	}
	good()
	// A policy set that does not compile: refused whole, with the config in the same update.
	cfg, err := config.Parse([]byte(tp.baseConfig + "upstreams: []\n"))
	must(t, err)
	bad := policy.Source{Origin: "test", Policies: map[string][]byte{"p.cedar": []byte(`permit (principal, action`)}}
	if err := tp.Sidecar.Update(context.Background(), Update{Config: cfg, Policies: &bad}); err == nil {
		t.Fatal("an update with a broken policy set was accepted")
	}
	good()
	// A key that needs a restart: refused with its key path.
	moved, err := config.Parse([]byte(strings.Replace(tp.baseConfig, "leaf_ttl", "leaf_ttl", 1) + "leaf_ttl: 2h\n" + toA))
	must(t, err)
	err = tp.Sidecar.Update(context.Background(), Update{Config: moved})
	var fe config.Errors
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "leaf_ttl: cannot change while escrow runs") {
		t.Fatalf("want a leaf_ttl error, got %v", err)
	}
	good()
	// A config built by hand and never validated.
	if err := tp.Sidecar.Update(context.Background(), Update{Config: &config.Config{}}); err == nil {
		t.Fatal("an unvalidated config was accepted")
	}
	good()
}

func TestSidecar_UpdateRebuildsChangedCredentialsAndKeepsTheRest(t *testing.T) {
	up := newTLSUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(r.Header.Get("Authorization")))
	}), false, "api.example.com")
	routes := "upstreams:\n" + up.route("api.example.com", "credential: broken", "scrub_responses: false")
	tp := newTestProxy(t, routes)
	if resp := tp.Get(t, "https://api.example.com/"); resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("credential 'broken' (a missing file) answered %d, want 503", resp.StatusCode)
	}
	kept := tp.Sidecar.providers["api"]
	// Point "broken" at the real secret file; "api" is unchanged.
	fixed := strings.Replace(tp.baseConfig, "no-such-secret", "api-key", 1)
	cfg, err := config.Parse([]byte(fixed + routes))
	must(t, err)
	must(t, tp.Sidecar.Update(context.Background(), Update{Config: cfg}))
	resp := tp.Get(t, "https://api.example.com/")
	if body := string(readBody(t, resp)); resp.StatusCode != 200 || body != "Bearer "+testSecret {
		t.Fatalf("after the update: %d %q, want the fixed credential applied", resp.StatusCode, body)
	}
	if tp.Sidecar.providers["api"] != kept {
		t.Error("the unchanged credential 'api' got a new provider: its cached token would be lost")
	}
}
