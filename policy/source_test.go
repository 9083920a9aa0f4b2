package policy

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func bytesOf(files map[string]string) map[string][]byte {
	out := make(map[string][]byte, len(files))
	for k, v := range files {
		out[k] = []byte(v)
	}
	return out
}

func TestEngine_LoadFromBytes_SameVersionAsDir(t *testing.T) {
	files := map[string]string{
		"a.cedar": `@id("allow-github") permit(principal, action in Action::"read", resource == Host::"api.github.com");`,
		"b.cedar": `@id("forbid-admin") forbid(principal, action, resource) when { context.path like "/admin*" };`,
	}
	dir := writeDir(t, files)
	fromDir := NewEngine(Options{Now: fixedClock})
	if err := fromDir.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	want, n := fromDir.Info()

	fromBytes := NewEngine(Options{Now: fixedClock})
	if err := fromBytes.Load(Source{Origin: "xds", Policies: bytesOf(files)}); err != nil {
		t.Fatal(err)
	}
	if got, m := fromBytes.Info(); got != want || m != n || n != 2 {
		t.Fatalf("from bytes: version %q with %d policies; from the directory: %q with %d", got, m, want, n)
	}
	for _, in := range []Input{get(coderID, "api.github.com", "/repos"), get(coderID, "api.github.com", "/admin")} {
		if a, b := comparableDecision(decide(fromDir, in)), comparableDecision(decide(fromBytes, in)); a != b {
			t.Fatalf("%s: from the directory %s, from bytes %s", in.Path, a, b)
		}
	}

	// ReadDir gives the same Source, and Origin is not part of the version.
	src, err := ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if src.Origin != dir || src.Schema != nil || !maps.EqualFunc(src.Policies, bytesOf(files), slices.Equal) {
		t.Fatalf("ReadDir = %+v", src)
	}
	for _, origin := range []string{"", "policies/", "somewhere else"} {
		src.Origin = origin
		if s, err := Compile(src); err != nil || s.Version() != want || s.Len() != 2 {
			t.Fatalf("Compile with Origin %q: %v, %v", origin, s, err)
		}
	}

	// The version does depend on the names, the contents and the schema.
	versionOf := func(src Source) string {
		t.Helper()
		s, err := Compile(src)
		if err != nil {
			t.Fatal(err)
		}
		return s.Version()
	}
	renamed := bytesOf(files)
	renamed["c.cedar"] = renamed["b.cedar"]
	delete(renamed, "b.cedar")
	changed := bytesOf(files)
	changed["b.cedar"] = append(changed["b.cedar"], '\n')
	withSchema := Source{Policies: bytesOf(files), Schema: DefaultSchema()}
	seen := map[string]string{want: "original"}
	for name, v := range map[string]string{
		"renamed":     versionOf(Source{Policies: renamed}),
		"changed":     versionOf(Source{Policies: changed}),
		"with schema": versionOf(withSchema),
	} {
		if prev, dup := seen[v]; dup {
			t.Errorf("%s has the same version as %s: %q", name, prev, v)
		}
		seen[v] = name
	}

	// With a schema file, directory and bytes still agree.
	writeFiles(t, dir, map[string]string{SchemaFile: string(DefaultSchema())})
	if err := fromDir.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := fromBytes.Load(withSchema); err != nil {
		t.Fatal(err)
	}
	if a, _ := fromDir.Info(); a != versionOf(withSchema) {
		t.Fatalf("with a schema: from the directory %q, from bytes %q", a, versionOf(withSchema))
	}
	if a, b := fromDir.set.Load().Version(), fromBytes.set.Load().Version(); a != b {
		t.Fatalf("installed versions differ: %q, %q", a, b)
	}
}

func TestEngine_FailedLoadKeepsLastGoodSet(t *testing.T) {
	rl := newReloads()
	e := NewEngine(Options{OnReload: rl.on, Now: fixedClock})
	good := Source{Origin: "xds", Policies: bytesOf(map[string]string{"p.cedar": goodV1})}
	if err := e.Load(good); err != nil {
		t.Fatal(err)
	}
	rl.wait(t, "success")
	v1, _ := e.Info()
	stillV1 := func() {
		t.Helper()
		wantDecision(t, decide(e, get(coderID, "api.github.com", "/")), true, ReasonAllowed, "v1-allow-github")
		wantDecision(t, decide(e, get(coderID, "gitlab.com", "/")), false, ReasonDenied)
		if v, n := e.Info(); v != v1 || n != 1 {
			t.Fatalf("Info = %q, %d; want %q, 1", v, n, v1)
		}
	}

	for name, src := range map[string]Source{
		"no policies":  {Origin: "xds"},
		"parse error":  {Origin: "xds", Policies: bytesOf(map[string]string{"p.cedar": goodV2, "q.cedar": `permit(principal, action`})},
		"missing id":   {Origin: "xds", Policies: bytesOf(map[string]string{"p.cedar": goodV2, "q.cedar": `permit(principal, action, resource);`})},
		"duplicate id": {Origin: "xds", Policies: bytesOf(map[string]string{"p.cedar": goodV2, "q.cedar": goodV2})},
		"schema":       {Origin: "xds", Policies: bytesOf(map[string]string{"p.cedar": goodV2, "q.cedar": `@id("typo") permit(principal, action, resource) when { context.methd == "GET" };`}), Schema: DefaultSchema()},
		"bad schema":   {Origin: "xds", Policies: bytesOf(map[string]string{"p.cedar": goodV2}), Schema: []byte(`entity Workload {`)},
		"empty schema": {Origin: "xds", Policies: bytesOf(map[string]string{"p.cedar": goodV2}), Schema: []byte{}},
	} {
		t.Run(name, func(t *testing.T) {
			err := e.Load(src)
			var le *LoadError
			if !errors.As(err, &le) || le.Origin != "xds" || !strings.HasPrefix(err.Error(), "policy: load xds: ") {
				t.Fatalf("Load error = %v, want a *LoadError prefixed policy: load xds:", err)
			}
			rl.wait(t, "failure")
			stillV1()
		})
	}

	// Installing nil swaps nothing and reports nothing.
	e.Install(nil)
	stillV1()
	select {
	case r := <-rl.ch:
		t.Fatalf("Install(nil) reported %q", r)
	default:
	}

	// A good set takes over, through Load or Install.
	if err := e.Load(Source{Policies: bytesOf(map[string]string{"p.cedar": goodV2})}); err != nil {
		t.Fatal(err)
	}
	rl.wait(t, "success")
	wantDecision(t, decide(e, get(coderID, "gitlab.com", "/")), true, ReasonAllowed, "v2-allow-gitlab")
	wantDecision(t, decide(e, get(coderID, "api.github.com", "/")), false, ReasonDenied)
	s, err := Compile(good)
	if err != nil {
		t.Fatal(err)
	}
	e.Install(s)
	rl.wait(t, "success")
	stillV1()
}

func TestCompile_ReportsEveryProblemWithPosition(t *testing.T) {
	src := Source{
		Policies: bytesOf(map[string]string{
			"a.cedar": "@id(\"a\") permit(principal, action, resource);\npermit(principal, action, resource);",
			"b.cedar": "@id(\"b\") permit(principal, action,\n  resource) when { 1 + };",
			"c.cedar": `@id("a") forbid(principal, action, resource);`,
			"d.cedar": "\n\n@id(\"typo\") permit(principal, action, resource) when { context.methd == \"GET\" };",
		}),
		Schema: DefaultSchema(),
	}
	for _, origin := range []string{"", "xds"} {
		t.Run("origin="+origin, func(t *testing.T) {
			src.Origin = origin
			at := func(name string) string {
				if origin == "" {
					return name
				}
				return origin + "/" + name
			}
			s, err := Compile(src)
			var le *LoadError
			if s != nil || !errors.As(err, &le) {
				t.Fatalf("Compile = %v, %v; want a *LoadError", s, err)
			}
			msg := err.Error()
			for _, want := range []string{
				"policy: load" + map[bool]string{true: "", false: " " + origin}[origin == ""] + ": 4 problems:",
				"\n\t" + at("a.cedar") + ":2:1: " + ErrMissingID.Error(),
				"\n\t" + at("b.cedar") + ":2:25: parse error: near \";\"",
				"\n\t" + at("c.cedar") + ":1:1: policy \"a\": " + ErrDuplicateID.Error() + ": first defined at " + at("a.cedar") + ":1:1",
				// At the token, and naming the schema the policy was validated against.
				"\n\t" + at("d.cedar") + ":3:63: policy \"typo\": policy does not match " + at(SchemaFile) + ": attribute `methd`",
				"methd",
			} {
				if !strings.Contains(msg, want) {
					t.Errorf("error does not contain %q:\n%s", want, msg)
				}
			}
			for _, kind := range []error{ErrParse, ErrMissingID, ErrDuplicateID, ErrValidation} {
				if !errors.Is(err, kind) {
					t.Errorf("errors.Is(err, %v) = false", kind)
				}
			}
		})
	}

	// A broken schema is named with its position too.
	_, err := Compile(Source{Policies: bytesOf(map[string]string{"a.cedar": `@id("a") permit(principal, action, resource);`}), Schema: []byte("entity {")})
	var le *LoadError
	if !errors.As(err, &le) || !errors.Is(err, ErrSchema) || le.Problems[0].File != SchemaFile || le.Problems[0].Line == 0 {
		t.Fatalf("bad schema: %v", err)
	}
	// Nothing at all to compile.
	if _, err := Compile(Source{Origin: "xds"}); !errors.Is(err, ErrNoPolicies) || err.Error() != "policy: load xds: xds: "+ErrNoPolicies.Error() {
		t.Fatalf("empty source: %v", err)
	}
}

// Decisions made while sets are being swapped each come wholly from one set.
func TestEngine_InstallDuringDecide(t *testing.T) {
	compile := func(text string) *Set {
		t.Helper()
		s, err := Compile(Source{Policies: bytesOf(map[string]string{"p.cedar": text})})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// Each set has a decoy of the other kind that never determines its own decisions, so a
	// decision that mixed one set's policies with the other's ids or index would show.
	allowAll := compile(`
@id("allow-all") permit(principal, action, resource);
@id("allow-set-never-forbids") forbid(principal, action, resource) when { context.path == "/never" };`)
	denyAll := compile(`
@id("deny-set-never-permits") permit(principal, action, resource == Host::"never.example");
@id("deny-all") forbid(principal, action, resource);`)

	e := NewEngine(Options{Now: fixedClock})
	e.Install(allowAll)
	var allowed, denied atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := get(coderID, "api.github.com", "/")
			for {
				select {
				case <-stop:
					return
				default:
				}
				d := e.Decide(context.Background(), in)
				switch {
				case d.Allow && d.Reason == ReasonAllowed && slices.Equal(d.PolicyIDs, []string{"allow-all"}):
					allowed.Add(1)
				case !d.Allow && d.Reason == ReasonDenied && slices.Equal(d.PolicyIDs, []string{"deny-all"}):
					denied.Add(1)
				default:
					t.Errorf("decision from no single set: %+v", d)
					return
				}
			}
		}()
	}
	deadline := time.Now().Add(20 * time.Second)
	installs := 0
	for installs < 2000 || allowed.Load() < 100 || denied.Load() < 100 {
		if time.Now().After(deadline) {
			t.Errorf("after %d installs: %d allowed, %d denied; want both seen", installs, allowed.Load(), denied.Load())
			break
		}
		if installs%2 == 0 {
			e.Install(denyAll)
		} else {
			e.Install(allowAll)
		}
		installs++
	}
	close(stop)
	wg.Wait()
	t.Logf("%d installs, %d allowed, %d denied", installs, allowed.Load(), denied.Load())
}
