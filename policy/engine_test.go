package policy

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestEngine_NoPolicyLoadedDenies(t *testing.T) {
	e := NewEngine(Options{})
	if e.Ready() {
		t.Fatal("Ready before any load")
	}
	d := decide(e, get(coderID, "api.github.com", "/"))
	wantDecision(t, d, false, ReasonUnavailable)
	if d.Overridable() {
		t.Fatalf("no policy set, yet overridable: %+v", d)
	}
}

func TestEngine_PermitAllowsWithItsID(t *testing.T) {
	e := loaded(t, `
@id("allow-github") permit(principal, action, resource == Host::"api.github.com");
@id("allow-other") permit(principal, action, resource == Host::"example.com");`)
	d := decide(e, get(coderID, "api.github.com", "/"))
	wantDecision(t, d, true, ReasonAllowed, "allow-github")
	if d.Overridable() || len(d.Errors) != 0 {
		t.Fatalf("decision = %+v", d)
	}
}

func TestEngine_DefaultDenyHasNoPolicyIDs(t *testing.T) {
	e := loaded(t, `@id("allow-github") permit(principal, action, resource == Host::"api.github.com");`)
	wantDecision(t, decide(e, get(coderID, "evil.example", "/")), false, ReasonDenied)
}

func TestEngine_ForbidWinsOverPermit(t *testing.T) {
	e := loaded(t, `
@id("allow-all") permit(principal, action, resource);
@id("forbid-admin") forbid(principal, action, resource) when { context.path like "/admin*" };`)
	wantDecision(t, decide(e, get(coderID, "h.example", "/admin/users")), false, ReasonDenied, "forbid-admin")
	wantDecision(t, decide(e, get(coderID, "h.example", "/ok")), true, ReasonAllowed, "allow-all")
}

func TestEngine_EvaluationErrorDenies(t *testing.T) {
	// The forbid errors (no such context attribute). Cedar skips it and would allow through
	// the permit; the engine must fail closed and name the erroring policy.
	e := loadedUnvalidated(t, `
@id("allow-all") permit(principal, action, resource);
@id("forbid-broken") forbid(principal, action, resource) when { context.no_such_field == "x" };`)
	d := decide(e, get(coderID, "h.example", "/"))
	wantDecision(t, d, false, ReasonError, "forbid-broken")
	if len(d.Errors) != 1 || !strings.Contains(d.Errors[0], "forbid-broken") || !strings.Contains(d.Errors[0], "no_such_field") {
		t.Fatalf("Errors = %q", d.Errors)
	}

	// An erroring permit alone also denies with policy_error, not a plain default deny.
	e = loadedUnvalidated(t, `@id("allow-broken") permit(principal, action, resource) when { resource.owner == "me" };`)
	wantDecision(t, decide(e, get(coderID, "h.example", "/")), false, ReasonError, "allow-broken")
}

func TestDecision_OverridableOnlyForPolicyDenials(t *testing.T) {
	e := loadedUnvalidated(t, `
@id("allow-read") permit(principal, action in Action::"read", resource);
@id("forbid-admin") forbid(principal, action, resource) when { context.path == "/admin" };
@id("forbid-broken") forbid(principal, action, resource) when { context.path == "/broken" && context.nope };`)
	for _, tc := range []struct {
		name        string
		in          Input
		reason      Reason
		overridable bool
	}{
		{"allowed: nothing to override", get(coderID, "h.example", "/fine"), ReasonAllowed, false},
		{"explicit forbid", get(coderID, "h.example", "/admin"), ReasonDenied, true},
		{"default deny", with(get(coderID, "h.example", "/x"), func(in *Input) { in.Action = "POST" }), ReasonDenied, true},
		{"evaluation error", get(coderID, "h.example", "/broken"), ReasonError, true},
		// An input the engine cannot build a request from is a caller bug: policy_error like
		// an evaluation error, but never overridable.
		{"no principal", with(get(coderID, "h.example", "/"), func(in *Input) { in.Identity.SPIFFEID = "" }), ReasonError, false},
		{"no action", with(get(coderID, "h.example", "/"), func(in *Input) { in.Action = "" }), ReasonError, false},
		{"no host", with(get(coderID, "h.example", "/"), func(in *Input) { in.Host = "" }), ReasonError, false},
	} {
		d := decide(e, tc.in)
		if d.Reason != tc.reason || d.Overridable() != tc.overridable || d.Allow != (tc.reason == ReasonAllowed) {
			t.Errorf("%s: %+v, Overridable=%v; want reason %s, Overridable=%v", tc.name, d, d.Overridable(), tc.reason, tc.overridable)
		}
		if tc.reason == ReasonError && len(d.Errors) == 0 {
			t.Errorf("%s: policy_error without errors: %+v", tc.name, d)
		}
	}
	if d := decide(NewEngine(Options{}), get(coderID, "h.example", "/")); d.Overridable() {
		t.Errorf("no policy set loaded, yet overridable: %+v", d)
	}
	// A decision made outside the engine (a test fake) is overridable by its reason alone.
	for r, want := range map[Reason]bool{ReasonAllowed: false, ReasonDenied: true, ReasonError: true, ReasonUnavailable: false, "": false} {
		if got := (Decision{Reason: r}).Overridable(); got != want {
			t.Errorf("Decision{Reason: %q}.Overridable() = %v, want %v", r, got, want)
		}
	}
}

func TestEngine_PrincipalInNamespaceMatchesK8sShapedID(t *testing.T) {
	e := loaded(t, `
@id("ns-agents") permit(principal in Namespace::"agents", action, resource == Host::"ns.example");
@id("sa-coder") permit(principal in ServiceAccount::"agents/coder", action, resource == Host::"sa.example");
@id("is-in-ns") permit(principal is Workload in Namespace::"agents", action, resource == Host::"isin.example");
@id("trust-domain") permit(principal, action, resource == Host::"td.example") when { principal.trust_domain == "example.org" };`)

	for _, tc := range []struct {
		id, host string
		allow    bool
	}{
		{coderID, "ns.example", true},
		{reviewerID, "ns.example", true},
		{etlID, "ns.example", false},
		{coderID, "sa.example", true},
		{reviewerID, "sa.example", false},
		{coderID, "isin.example", true},
		{etlID, "isin.example", false},
		// Not Kubernetes-shaped: no ServiceAccount/Namespace parents.
		{vmID, "ns.example", false},
		{"spiffe://example.org/ns/agents/sa/coder/extra", "ns.example", false},
		{"spiffe://example.org/ns/agents/coder", "ns.example", false},
		{"spiffe://example.org/ns//sa/coder", "ns.example", false},
		// The trust domain attribute is set for every shape.
		{vmID, "td.example", true},
		{"spiffe://other.org/ns/agents/sa/coder", "td.example", false},
	} {
		d := decide(e, get(tc.id, tc.host, "/"))
		if d.Allow != tc.allow {
			t.Errorf("%s → %s: Allow=%v (%s %v), want %v", tc.id, tc.host, d.Allow, d.Reason, d.Errors, tc.allow)
		}
	}
}

func TestEngine_ActionsAreGroupedIntoReadAndWrite(t *testing.T) {
	// A method outside the built-in schema needs a schema that declares it.
	schema := strings.Replace(string(DefaultSchema()), "action POST, PUT,", "action PROPFIND, POST, PUT,", 1)
	e := NewEngine(Options{Now: fixedClock})
	if err := e.LoadDir(writeDir(t, map[string]string{SchemaFile: schema, "p.cedar": `
@id("read") permit(principal, action in Action::"read", resource == Host::"r.example");
@id("write") permit(principal, action in Action::"write", resource == Host::"w.example");
@id("connect") permit(principal, action == Action::"connect", resource == Host::"c.example");
@id("propfind") permit(principal, action == Action::"PROPFIND", resource == Host::"p.example");`})); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		action, host string
		allow        bool
	}{
		{"GET", "r.example", true}, {"HEAD", "r.example", true}, {"OPTIONS", "r.example", true},
		{"get", "r.example", true}, // methods are upper-cased
		{"POST", "r.example", false}, {"DELETE", "w.example", true}, {"PUT", "w.example", true},
		{"PATCH", "w.example", true}, {"TRACE", "w.example", true}, {"CONNECT", "w.example", true},
		{"GET", "w.example", false},
		// Unknown methods are writes, and can be named.
		{"PROPFIND", "w.example", true}, {"PROPFIND", "r.example", false}, {"propfind", "p.example", true},
		// A blind tunnel is in neither group.
		{"connect", "c.example", true}, {"connect", "r.example", false}, {"connect", "w.example", false},
		{"CONNECT", "c.example", false},
	} {
		in := with(get(coderID, tc.host, "/"), func(in *Input) { in.Action = tc.action })
		if d := decide(e, in); d.Allow != tc.allow {
			t.Errorf("%s %s: Allow=%v (%s %v), want %v", tc.action, tc.host, d.Allow, d.Reason, d.Errors, tc.allow)
		}
	}
}

func TestEngine_ContextCarriesRequestAndAttestation(t *testing.T) {
	e := loaded(t, `
@id("all-fields") permit(principal, action, resource) when {
  context.scheme == "https" && context.port == 8443 && context.method == "PUT" &&
  context.path == "/v1/x" && context.credential == "cred" &&
  context.time == datetime("2026-06-01T12:00:00Z") &&
  context.attestation.source == "spiffe" && context.attestation.attested &&
  context.attestation.expires_in_s == 3600 && principal.attested
};
@id("static") permit(principal, action, resource == Host::"static.example") when {
  context.attestation.source == "static" && !context.attestation.attested &&
  context.attestation.expires_in_s == 0 && !principal.attested
};
@id("tunnel") permit(principal, action == Action::"connect", resource == Host::"tunnel.example") when {
  context.method == "CONNECT" && context.path == ""
};`)
	in := Input{Identity: spiffeIdentity(coderID), Action: "PUT", Scheme: "https", Host: "h.example", Port: 8443,
		Path: "/v1/x", Credential: "cred", Time: testNow}
	wantDecision(t, decide(e, in), true, ReasonAllowed, "all-fields")
	for _, change := range []func(*Input){
		func(in *Input) { in.Scheme = "http" },
		func(in *Input) { in.Port = 443 },
		func(in *Input) { in.Action = "POST" },
		func(in *Input) { in.Path = "/v1/y" },
		func(in *Input) { in.Credential = "" },
		func(in *Input) { in.Time = in.Time.Add(time.Second) },
		func(in *Input) { in.Identity.ExpiresAt = in.Identity.ExpiresAt.Add(time.Minute) },
		func(in *Input) { in.Identity.Attested = false },
	} {
		wantDecision(t, decide(e, with(in, change)), false, ReasonDenied)
	}

	st := Input{Identity: staticIdentity(coderID), Action: "GET", Scheme: "https", Host: "static.example", Port: 443, Time: testNow}
	wantDecision(t, decide(e, st), true, ReasonAllowed, "static")

	tun := Input{Identity: spiffeIdentity(coderID), Action: "connect", Host: "tunnel.example", Port: 443, Time: testNow}
	wantDecision(t, decide(e, tun), true, ReasonAllowed, "tunnel")
}

func TestEngine_UsesInjectedClockWhenInputHasNoTime(t *testing.T) {
	e := loaded(t, `@id("at-noon") permit(principal, action, resource) when { context.time == datetime("2026-06-01T12:00:00Z") };`)
	in := get(coderID, "h.example", "/")
	in.Time = time.Time{}
	wantDecision(t, decide(e, in), true, ReasonAllowed, "at-noon")
}

func TestEngine_HostIsNormalized(t *testing.T) {
	e := loaded(t, `@id("forbid-gh") forbid(principal, action, resource == Host::"api.github.com");
@id("allow-all") permit(principal, action, resource);`)
	for _, h := range []string{"api.github.com", "API.GitHub.com", "api.github.com."} {
		wantDecision(t, decide(e, get(coderID, h, "/")), false, ReasonDenied, "forbid-gh")
	}
}

func TestEngine_InvalidInputDenies(t *testing.T) {
	e := loaded(t, `@id("allow-all") permit(principal, action, resource);`)
	for name, change := range map[string]func(*Input){
		"no principal": func(in *Input) { in.Identity.SPIFFEID = "" },
		"no action":    func(in *Input) { in.Action = "" },
		"no host":      func(in *Input) { in.Host = "" },
	} {
		d := decide(e, with(get(coderID, "h.example", "/"), change))
		if d.Allow || d.Reason != ReasonError || len(d.Errors) != 1 || d.Overridable() {
			t.Errorf("%s: %+v", name, d)
		}
	}
}

func TestEngine_InfoReportsVersionAndCount(t *testing.T) {
	e := NewEngine(Options{})
	if v, n := e.Info(); v != "" || n != 0 {
		t.Fatalf("Info before load = %q, %d", v, n)
	}
	dir := writeDir(t, map[string]string{
		"a.cedar": `@id("a") permit(principal, action, resource); @id("b") forbid(principal, action, resource) when { false };`,
	})
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	v, n := e.Info()
	if len(v) != versionLen || n != 2 || !e.Ready() {
		t.Fatalf("Info = %q, %d; Ready=%v", v, n, e.Ready())
	}
	// Same content, same version; different content, different version.
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	if v2, _ := e.Info(); v2 != v {
		t.Fatalf("version changed on identical reload: %q → %q", v, v2)
	}
	writeFiles(t, dir, map[string]string{"a.cedar": `@id("a") permit(principal, action, resource);`})
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	if v3, n3 := e.Info(); v3 == v || n3 != 1 {
		t.Fatalf("after change Info = %q, %d (was %q)", v3, n3, v)
	}
}

// reloads records OnReload calls.
type reloads struct {
	mu  sync.Mutex
	got []string
	ch  chan string
}

func newReloads() *reloads { return &reloads{ch: make(chan string, 100)} }

func (r *reloads) on(result string, err error) {
	if (result == "success") != (err == nil) {
		panic("OnReload result and error disagree")
	}
	r.mu.Lock()
	r.got = append(r.got, result)
	r.mu.Unlock()
	r.ch <- result
}

func (r *reloads) wait(t *testing.T, want string) {
	t.Helper()
	select {
	case got := <-r.ch:
		if got != want {
			t.Fatalf("OnReload(%q), want %q", got, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no OnReload(%q) within 10s", want)
	}
}

const (
	goodV1 = `@id("v1-allow-github") permit(principal, action, resource == Host::"api.github.com");`
	goodV2 = `@id("v2-allow-gitlab") permit(principal, action, resource == Host::"gitlab.com");`
)

func TestEngine_BrokenReloadKeepsLastGoodSet(t *testing.T) {
	rl := newReloads()
	e := NewEngine(Options{OnReload: rl.on, Now: fixedClock})
	dir := writeDir(t, map[string]string{"p.cedar": goodV1})
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	rl.wait(t, "success")
	v1, _ := e.Info()
	stillV1 := func() {
		t.Helper()
		wantDecision(t, decide(e, get(coderID, "api.github.com", "/")), true, ReasonAllowed, "v1-allow-github")
		wantDecision(t, decide(e, get(coderID, "gitlab.com", "/")), false, ReasonDenied)
		if v, _ := e.Info(); v != v1 {
			t.Fatalf("version = %q, want %q", v, v1)
		}
	}
	stillV1()

	for name, files := range map[string]map[string]string{
		"parse error":  {"p.cedar": goodV2, "q.cedar": `permit(principal, action`},
		"missing id":   {"p.cedar": goodV2, "q.cedar": `permit(principal, action, resource);`},
		"duplicate id": {"p.cedar": goodV2, "q.cedar": goodV2},
		"schema":       {"p.cedar": goodV2, "q.cedar": `@id("typo") permit(principal, action, resource) when { context.methd == "GET" };`, SchemaFile: string(DefaultSchema())},
		"bad schema":   {"p.cedar": goodV2, SchemaFile: `entity Workload {`},
	} {
		t.Run(name, func(t *testing.T) {
			d := writeDir(t, files)
			err := e.LoadDir(d)
			var le *LoadError
			if !errors.As(err, &le) || !strings.HasPrefix(err.Error(), "policy: ") {
				t.Fatalf("LoadDir error = %v, want a *LoadError prefixed policy:", err)
			}
			rl.wait(t, "failure")
			stillV1()
		})
	}
	if err := e.LoadDir(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("loading a missing dir succeeded")
	}
	rl.wait(t, "failure")
	stillV1()

	// Fixed: the new set takes over.
	writeFiles(t, dir, map[string]string{"p.cedar": goodV2})
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	rl.wait(t, "success")
	wantDecision(t, decide(e, get(coderID, "gitlab.com", "/")), true, ReasonAllowed, "v2-allow-gitlab")
	wantDecision(t, decide(e, get(coderID, "api.github.com", "/")), false, ReasonDenied)
}

func TestEngine_WatchReloadsOnChange(t *testing.T) {
	rl := newReloads()
	e := NewEngine(Options{OnReload: rl.on, Now: fixedClock})
	dir := writeDir(t, map[string]string{"p.cedar": goodV1})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Watch(ctx, dir, time.Millisecond); close(done) }()
	defer func() {
		cancel()
		<-done
	}()

	rl.wait(t, "success") // initial load
	wantDecision(t, decide(e, get(coderID, "api.github.com", "/")), true, ReasonAllowed, "v1-allow-github")

	// Broken: reported once, old decisions stay.
	writeFiles(t, dir, map[string]string{"p.cedar": goodV2 + "\npermit(principal, action, resource);"})
	rl.wait(t, "failure")
	wantDecision(t, decide(e, get(coderID, "api.github.com", "/")), true, ReasonAllowed, "v1-allow-github")
	wantDecision(t, decide(e, get(coderID, "gitlab.com", "/")), false, ReasonDenied)

	// Fixed: new decisions.
	writeFiles(t, dir, map[string]string{"p.cedar": goodV2})
	rl.wait(t, "success")
	wantDecision(t, decide(e, get(coderID, "gitlab.com", "/")), true, ReasonAllowed, "v2-allow-gitlab")
	wantDecision(t, decide(e, get(coderID, "api.github.com", "/")), false, ReasonDenied)

	// A schema change is a change too (and here it breaks the set).
	writeFiles(t, dir, map[string]string{SchemaFile: "entity Host;"})
	rl.wait(t, "failure")
	if err := os.Remove(filepath.Join(dir, SchemaFile)); err != nil {
		t.Fatal(err)
	}
	rl.wait(t, "success")

	cancel()
	<-done
	// The broken state was reported once, not on every poll.
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if want := []string{"success", "failure", "success", "failure", "success"}; strings.Join(rl.got, ",") != strings.Join(want, ",") {
		t.Fatalf("OnReload calls = %v, want %v", rl.got, want)
	}
}

func TestEngine_WatchSkipsInitialLoadOfSameContent(t *testing.T) {
	rl := newReloads()
	e := NewEngine(Options{OnReload: rl.on})
	dir := writeDir(t, map[string]string{"p.cedar": goodV1})
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	rl.wait(t, "success")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	e.Watch(ctx, dir, time.Millisecond)
	select {
	case r := <-rl.ch:
		t.Fatalf("unexpected OnReload(%q) for unchanged content", r)
	default:
	}
}

func TestEngine_DecideIsSafeDuringReloads(t *testing.T) {
	e := NewEngine(Options{Now: fixedClock})
	dir := writeDir(t, map[string]string{"p.cedar": goodV1})
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				d := decide(e, get(coderID, "api.github.com", "/"))
				// Either set may be in force, but never a mix or an error.
				if d.Reason != ReasonAllowed && d.Reason != ReasonDenied {
					t.Errorf("decision during reload: %+v", d)
					return
				}
			}
		}()
	}
	for i := range 50 {
		body := goodV1
		if i%2 == 1 {
			body = goodV2
		}
		writeFiles(t, dir, map[string]string{"p.cedar": body})
		if err := e.LoadDir(dir); err != nil {
			t.Error(err)
		}
	}
	close(stop)
	wg.Wait()
}

func TestEngine_PrincipalCacheIsKeyedByWholeIdentityAndBounded(t *testing.T) {
	e := loaded(t, `@id("attested-only") permit(principal, action, resource) when { principal.attested && context.attestation.attested };`)
	// Same SPIFFE ID, attested then static: the cached entity must not leak between them.
	wantDecision(t, decide(e, get(coderID, "h.example", "/")), true, ReasonAllowed, "attested-only")
	wantDecision(t, decide(e, with(get(coderID, "h.example", "/"), func(in *Input) { in.Identity = staticIdentity(coderID) })), false, ReasonDenied)
	wantDecision(t, decide(e, get(coderID, "h.example", "/")), true, ReasonAllowed, "attested-only")
	// Far more identities than the cache holds still decide correctly.
	for i := range 2 * maxCachedPrincipals {
		id := "spiffe://example.org/ns/n" + strings.Repeat("x", i%7) + "/sa/s" + time.Duration(i).String()
		wantDecision(t, decide(e, get(id, "h.example", "/")), true, ReasonAllowed, "attested-only")
	}
	if m := e.principals.m.Load(); m == nil || len(*m) > maxCachedPrincipals {
		t.Fatalf("principal cache not bounded")
	}
}
