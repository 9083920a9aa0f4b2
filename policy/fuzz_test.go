package policy

import (
	"testing"
)

// FuzzLoad feeds arbitrary bytes to the loader as a .cedar file, with and without the default
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
		src := &source{dir: "fuzz", policies: []sourceFile{{name: "fuzz.cedar", data: data}}}
		if withSchema {
			src.schema = &sourceFile{name: SchemaFile, data: schema}
		}
		src.hash = hashSource(src)
		s, err := compile(src)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
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
