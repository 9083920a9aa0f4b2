package policy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// loadErr loads files into a fresh engine and returns the error, which must be a *LoadError.
func loadErr(t *testing.T, files map[string]string) (*LoadError, string) {
	t.Helper()
	dir := writeDir(t, files)
	err := NewEngine(Options{}).LoadDir(dir)
	if err == nil {
		t.Fatal("LoadDir succeeded, want an error")
	}
	var le *LoadError
	if !errors.As(err, &le) {
		t.Fatalf("error %T %v is not a *LoadError", err, err)
	}
	if !strings.HasPrefix(err.Error(), "policy: ") {
		t.Fatalf("error not prefixed policy: %v", err)
	}
	return le, dir
}

func TestLoad_KeepsTheIDAnnotation(t *testing.T) {
	e := loaded(t, `@id("allow-github-read") permit(principal, action, resource);`)
	wantDecision(t, decide(e, get(coderID, "h.example", "/")), true, ReasonAllowed, "allow-github-read")
}

func TestLoad_PolicyWithoutIDIsRejected(t *testing.T) {
	le, dir := loadErr(t, map[string]string{"a.cedar": "@id(\"ok\") permit(principal, action, resource);\n\n  forbid(principal, action, resource);\n"})
	if len(le.Problems) != 1 {
		t.Fatalf("problems = %v", le.Problems)
	}
	p := le.Problems[0]
	want := filepath.Join(dir, "a.cedar") + ":3:3: "
	if !errors.Is(le, ErrMissingID) || !strings.HasPrefix(p.Error(), want) || p.Line != 3 {
		t.Fatalf("problem = %q, want prefix %q and ErrMissingID", p.Error(), want)
	}
	// An empty @id is no better.
	le, _ = loadErr(t, map[string]string{"a.cedar": `@id("  ") permit(principal, action, resource);`})
	if !errors.Is(le, ErrMissingID) {
		t.Fatalf("empty id: %v", le)
	}
}

func TestLoad_DuplicateIDIsRejected(t *testing.T) {
	le, dir := loadErr(t, map[string]string{
		"a.cedar": `@id("same") permit(principal, action, resource);`,
		"b.cedar": "\n@id(\"same\") forbid(principal, action, resource);",
	})
	if !errors.Is(le, ErrDuplicateID) || len(le.Problems) != 1 {
		t.Fatalf("error = %v", le)
	}
	msg := le.Problems[0].Error()
	if !strings.HasPrefix(msg, filepath.Join(dir, "b.cedar")+":2:1: ") || !strings.Contains(msg, filepath.Join(dir, "a.cedar")+":1:1") {
		t.Fatalf("duplicate message %q should name both places", msg)
	}
}

func TestLoad_ReportsEveryProblemWithPositions(t *testing.T) {
	le, dir := loadErr(t, map[string]string{
		"a.cedar": "@id(\"a\") permit(principal, action, resource);\npermit(principal, action, resource);",
		"b.cedar": "@id(\"b\") permit(principal, action,\n  resource) when { 1 + };",
		"c.cedar": `@id("a") forbid(principal, action, resource);`,
	})
	msg := le.Error()
	for _, want := range []string{
		filepath.Join(dir, "a.cedar") + ":2:1: " + ErrMissingID.Error(),
		filepath.Join(dir, "b.cedar") + ":2:25: parse error: near \";\"",
		filepath.Join(dir, "c.cedar") + ":1:1: policy \"a\": " + ErrDuplicateID.Error(),
		"3 problems",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not contain %q:\n%s", want, msg)
		}
	}
	if !errors.Is(le, ErrParse) || !errors.Is(le, ErrMissingID) || !errors.Is(le, ErrDuplicateID) {
		t.Errorf("errors.Is fails on %v", le)
	}
}

func TestLoad_EmptyDirIsRejected(t *testing.T) {
	le, _ := loadErr(t, map[string]string{"README.md": "not a policy"})
	if !errors.Is(le, ErrNoPolicies) {
		t.Fatalf("error = %v", le)
	}
}

func TestLoad_MissingDirIsAnError(t *testing.T) {
	err := NewEngine(Options{}).LoadDir(filepath.Join(t.TempDir(), "nope"))
	if !errors.Is(err, os.ErrNotExist) || !strings.HasPrefix(err.Error(), "policy: ") {
		t.Fatalf("error = %v", err)
	}
}

func TestLoad_ReadsOnlyCedarFilesInNameOrder(t *testing.T) {
	dir := writeDir(t, map[string]string{
		"b.cedar":       `@id("b") permit(principal, action, resource == Host::"b.example");`,
		"a.cedar":       `@id("a") permit(principal, action, resource == Host::"a.example");`,
		"notes.txt":     `this is not cedar`,
		".hidden.cedar": `this is not cedar either`,
	})
	if err := os.Mkdir(filepath.Join(dir, "sub.cedar"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Kubernetes ConfigMap mounts are symlinks.
	if err := os.WriteFile(filepath.Join(dir, "target"), []byte(`@id("c") permit(principal, action, resource == Host::"c.example");`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("target", filepath.Join(dir, "c.cedar")); err != nil {
		t.Fatal(err)
	}
	e := NewEngine(Options{})
	if err := e.LoadDir(dir); err != nil {
		t.Fatal(err)
	}
	s := e.set.Load()
	if got := strings.Join(func() []string {
		var out []string
		for _, id := range s.ids {
			out = append(out, string(id))
		}
		return out
	}(), ","); got != "a,b,c" {
		t.Fatalf("load order = %s, want a,b,c", got)
	}
}

func TestLoad_SchemaViolationIsRejected(t *testing.T) {
	le, dir := loadErr(t, map[string]string{
		SchemaFile: string(DefaultSchema()),
		"a.cedar":  "@id(\"good\") permit(principal, action, resource) when { context.method == \"GET\" };\n@id(\"typo\") permit(principal, action, resource) when { context.methd == \"GET\" };",
	})
	if !errors.Is(le, ErrValidation) {
		t.Fatalf("error = %v", le)
	}
	msg := le.Error()
	// The position is the offending token's: `.methd` on line 2.
	col := strings.Index(`@id("typo") permit(principal, action, resource) when { context.methd == "GET" };`, ".methd") + 1
	if !strings.Contains(msg, fmt.Sprintf(`%s:2:%d: policy "typo": `, filepath.Join(dir, "a.cedar"), col)) || !strings.Contains(msg, "methd") || strings.Contains(msg, `"good"`) {
		t.Fatalf("error should name file:line:col, the policy and the attribute, and only that:\n%s", msg)
	}
}

func TestLoad_BadSchemaIsRejected(t *testing.T) {
	le, dir := loadErr(t, map[string]string{
		SchemaFile: "entity Host;\nentity Workload {\n  a: Strin\n};",
		"a.cedar":  `@id("a") permit(principal, action, resource);`,
	})
	if !errors.Is(le, ErrSchema) || !strings.Contains(le.Error(), filepath.Join(dir, SchemaFile)) || !strings.Contains(le.Error(), "Strin") {
		t.Fatalf("error = %v", le)
	}
	le, _ = loadErr(t, map[string]string{SchemaFile: "entity {", "a.cedar": `@id("a") permit(principal, action, resource);`})
	if !errors.Is(le, ErrSchema) || le.Problems[0].Line == 0 {
		t.Fatalf("syntax error in schema should have a position: %v", le)
	}
}

func TestValidateDir(t *testing.T) {
	n, err := ValidateDir("testdata/policies")
	if err != nil || n != 9 {
		t.Fatalf("ValidateDir(testdata/policies) = %d, %v; want 9, nil", n, err)
	}
	dir := writeDir(t, map[string]string{"a.cedar": `permit(principal, action, resource);`})
	if _, err := ValidateDir(dir); !errors.Is(err, ErrMissingID) {
		t.Fatalf("ValidateDir(bad) = %v", err)
	}
	if _, err := ValidateDir(filepath.Join(dir, "nope")); err == nil {
		t.Fatal("ValidateDir(missing) succeeded")
	}
}

// Without schema.cedarschema a directory is validated against the built-in schema: typos that
// would make every decision a policy_error at run time are rejected at load, each at its
// token, with a hint where one helps.
func TestLoad_DirWithoutSchemaIsValidatedAgainstTheBuiltinSchema(t *testing.T) {
	policies := `@id("ok") permit (principal, action == Action::"GET", resource == Host::"api.github.com");
@id("typo-attr") permit (principal, action, resource)
  when { context.methd == "GET" };
@id("typo-type") permit (principal in Namespce::"agents", action, resource);
@id("lower-method") permit (principal, action == Action::"get", resource);
`
	le, dir := loadErr(t, map[string]string{"p.cedar": policies})
	file := filepath.Join(dir, "p.cedar")
	pos := func(token string) string { // line:col of the first occurrence of token
		i := strings.Index(policies, token)
		before := policies[:i]
		return fmt.Sprintf("%s:%d:%d: ", file, strings.Count(before, "\n")+1, i-strings.LastIndex(before, "\n"))
	}
	msg := le.Error()
	for _, want := range []string{
		"3 problems",
		pos(".methd") + `policy "typo-attr": policy does not match escrow's built-in schema: attribute ` + "`methd`",
		pos("Namespce::") + `policy "typo-type": policy does not match escrow's built-in schema: unrecognized entity type ` + "`Namespce`",
		pos(`Action::"get"`) + `policy "lower-method": policy does not match escrow's built-in schema: unrecognized action ` + "`Action::\"get\"`" + ` (did you mean Action::"GET"? HTTP methods are upper case)`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, `"ok"`) || strings.Contains(msg, noApplicableAction) {
		t.Errorf("error names a good policy or repeats the generic scope message:\n%s", msg)
	}
	if !errors.Is(le, ErrValidation) {
		t.Errorf("errors.Is(ErrValidation) = false: %v", le)
	}
}

// A schema of one's own replaces the built-in one (how to write policies for methods it does
// not declare).
func TestLoad_OwnSchemaReplacesTheBuiltinSchema(t *testing.T) {
	propfind := `@id("propfind") permit (principal, action == Action::"PROPFIND", resource);`
	if le, _ := loadErr(t, map[string]string{"p.cedar": propfind}); !errors.Is(le, ErrValidation) {
		t.Fatalf("PROPFIND without a schema: %v", le)
	}
	schema := strings.Replace(string(DefaultSchema()), "action POST, PUT,", "action PROPFIND, POST, PUT,", 1)
	if _, err := ValidateDir(writeDir(t, map[string]string{"p.cedar": propfind, SchemaFile: schema})); err != nil {
		t.Fatalf("with a schema declaring PROPFIND: %v", err)
	}
}

// Policies that are valid Cedar but can never match a request escrow builds are rejected,
// whatever the schema, with the reason and the token's position.
func TestLoad_PolicyThatCanNeverMatchIsRejectedWithAHint(t *testing.T) {
	for name, c := range map[string]struct{ policy, token, want string }{
		"principal == ServiceAccount": {
			`@id("x") permit (principal == ServiceAccount::"agents/coder", action, resource);`,
			`ServiceAccount::`, "a principal is a Workload; use `principal in ServiceAccount::\"agents/coder\"`"},
		"principal == Namespace in a condition": {
			`@id("x") permit (principal, action, resource) when { principal == Namespace::"agents" };`,
			`Namespace::`, "a principal is a Workload; use `principal in Namespace::\"agents\"`"},
		"host with upper case": {
			`@id("x") permit (principal, action, resource == Host::"API.GitHub.com");`,
			`Host::`, `host names are lower case, without port (did you mean Host::"api.github.com"?)`},
		"host with port": {
			`@id("x") permit (principal, action, resource) when { resource in [Host::"a.example", Host::"h.example:443"] };`,
			`Host::"h.example:443"`, `did you mean Host::"h.example"?`},
		"tool on an upper-case host": {
			`@id("x") permit (principal, action == Action::"tools/call", resource == Tool::"MCP.example/Read_File");`,
			`Tool::`, `did you mean Tool::"mcp.example/Read_File"?`},
	} {
		t.Run(name, func(t *testing.T) {
			for _, schema := range []string{"", string(DefaultSchema())} {
				files := map[string]string{"p.cedar": "\n" + c.policy}
				if schema != "" {
					files[SchemaFile] = schema
				}
				le, dir := loadErr(t, files)
				col := strings.Index(c.policy, c.token) + 1
				want := fmt.Sprintf(`%s:2:%d: policy "x": %s: `, filepath.Join(dir, "p.cedar"), col, ErrNeverMatches)
				if !errors.Is(le, ErrNeverMatches) || !strings.Contains(le.Error(), want) || !strings.Contains(le.Error(), c.want) {
					t.Errorf("error = %v\nwant %q ... %q", le, want, c.want)
				}
			}
		})
	}
	// IPv6 literals and lower-case names are fine.
	if _, err := ValidateDir(writeDir(t, map[string]string{"p.cedar": `@id("x") permit (principal, action, resource) when { resource in [Host::"::1", Host::"10.0.0.1", Host::"api.github.com"] };`})); err != nil {
		t.Fatal(err)
	}
}
