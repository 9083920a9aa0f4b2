package policy

import (
	"errors"
	"strings"
	"testing"
)

// FuzzLoad feeds arbitrary bytes to Compile as a .cedar file, with and without the default
// schema. It must never panic; a set that loads must also decide without panicking.
// Run longer with: go test -run x -fuzz FuzzLoad -fuzztime 30s ./policy/
func FuzzLoad(f *testing.F) {
	for _, seed := range []string{
		"",
		`@id("a") permit(principal, action, resource);`,
		`permit(principal, action, resource);`,
		`@id("a") permit(principal, action, resource); @id("a") forbid(principal, action, resource);`,
		`@id("a") forbid(principal in Namespace::"agents", action in [Action::"GET", Action::"read"], resource is Host in Host::"h") when { context.path like "/v1/*" } unless { context.nope };`,
		`@id("a") permit(principal is Workload, action == Action::"connect", resource) when { context.time < datetime("2030-01-01T00:00:00Z") && ip("10.0.0.1").isLoopback() && decimal("1.5") > decimal("1.0") };`,
		`@id("a") permit(principal, action, resource) when { principal.trust_domain == "x" && context.attestation.expires_in_s > -1 };`,
		`@id("\u0000") permit(principal, action, resource`,
		"@id(\"a\")\npermit(principal == Workload::\"spiffe://example.org/ns/a/sa/b\", action, resource) when { [1,2,3].containsAll([1]) && {a: 1}.a == 1 };",
	} {
		f.Add([]byte(seed), false)
		f.Add([]byte(seed), true)
	}
	schema := DefaultSchema()
	f.Fuzz(func(t *testing.T, data []byte, withSchema bool) {
		src := Source{Origin: "fuzz", Policies: map[string][]byte{"fuzz.cedar": data}}
		if withSchema {
			src.Schema = schema
		}
		s, err := Compile(src)
		if err != nil {
			var le *LoadError
			if !errors.As(err, &le) || len(le.Problems) == 0 || !strings.HasPrefix(err.Error(), "policy: ") {
				t.Fatalf("Compile error %T %q is not a *LoadError with problems", err, err)
			}
			return
		}
		if len(s.Version()) != versionLen {
			t.Fatalf("compiled set: version %q", s.Version())
		}
		e := engineWith(s)
		for _, in := range []Input{
			get(coderID, "api.github.com", "/v1/x"),
			{Identity: staticIdentity(vmID), Action: ActionConnect, Host: "h", Port: 443, Time: testNow},
		} {
			d := decide(e, in)
			if d.Reason == "" {
				t.Fatalf("decision without a reason: %+v", d)
			}
		}
	})
}
