package policy

import (
	"bytes"
	"encoding/json"
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

// FuzzArgumentsRecord feeds arbitrary JSON to the MCP arguments conversion, as the proxy
// decodes it (UseNumber). It must never panic; within the bounds it converts, beyond them it
// fails with one of the bound errors.
// Run longer with: go test -run x -fuzz FuzzArgumentsRecord -fuzztime 30s ./policy/
func FuzzArgumentsRecord(f *testing.F) {
	for _, seed := range []string{
		`{}`, `{"path": "/workspace/a"}`, `{"n": 1, "f": 1.5, "big": 1e400, "neg": -9223372036854775809}`,
		`{"a": [1, "x", null, true, {"b": [[]]}]}`, `{"a": {"a": {"a": {"a": {"a": {"a": {"a": {"a": 1}}}}}}}}`,
		`{"": null, "\u0000": "\u0000"}`,
	} {
		f.Add([]byte(seed))
	}
	e := NewEngine(Options{Now: fixedClock})
	e.Install(compileText(f, `@id("all") permit (principal, action, resource);`))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := json.NewDecoder(bytes.NewReader(data))
		d.UseNumber()
		var args map[string]any
		if d.Decode(&args) != nil {
			return
		}
		_, err := argumentsRecord(args)
		if err != nil && !errors.Is(err, ErrArgumentsTooDeep) && !errors.Is(err, ErrArgumentsTooLarge) {
			t.Fatalf("arguments %s: %v", data, err)
		}
		in := get(coderID, "h", "/mcp")
		in.Action, in.Resource = ActionToolsCall, Resource{Type: TypeTool, ID: "h/t"}
		in.MCP = &MCPCall{Name: "t", Arguments: args}
		dec := decide(e, in)
		if (err == nil) != dec.Allow {
			t.Fatalf("arguments %s: conversion error %v, decision %+v", data, err, dec)
		}
	})
}

// FuzzTestFile feeds arbitrary bytes to the policy test file reader: it must never panic, and
// a file it rejects is rejected with at least one problem.
func FuzzTestFile(f *testing.F) {
	for _, seed := range []string{
		"policies: p\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h}, expect: allow}\n",
		"cases: [", "{}", "cases: {a: 1}", "policies: [1]\ntime: 5\ncases:\n  - 7\n  - {identity: {attested: 1, expires_in_s: x}, request: {port: 1e99}}\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		tf, problems, ok := parseTestFile(data)
		if !ok && len(problems) != 1 {
			t.Fatalf("not YAML, yet %d problems", len(problems))
		}
		if ok {
			_ = mergeProblems(problems, tf.check(false))
		}
	})
}
