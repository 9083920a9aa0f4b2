package policy

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest"

	cedar "github.com/cedar-policy/cedar-go"
)

// everyField uses every entity, action group, attribute and context field of the model.
const everyField = `
@id("every-field") permit (
  principal in Namespace::"agents",
  action in Action::"read",
  resource == Host::"api.github.com"
) when {
  principal.trust_domain == "example.org" && principal.attested &&
  context.scheme == "https" && context.port == 443 && context.method == "GET" &&
  context.path like "/repos/*" && context.credential == "github" &&
  context.time < datetime("2030-01-01T00:00:00Z") &&
  context.attestation.source == "spiffe" && context.attestation.attested &&
  context.attestation.expires_in_s > 60
};
@id("sa-write") forbid (principal in ServiceAccount::"agents/coder", action in Action::"write", resource is Host);
@id("methods") permit (principal is Workload, action in [Action::"GET", Action::"HEAD", Action::"OPTIONS",
  Action::"POST", Action::"PUT", Action::"PATCH", Action::"DELETE", Action::"CONNECT", Action::"TRACE"], resource);
@id("tunnel") permit (principal == Workload::"spiffe://example.org/ns/agents/sa/coder", action == Action::"connect", resource)
  when { context.port == 443 && context.path == "" };
`

func parsedDefaultSchema(t *testing.T) *Schema {
	t.Helper()
	s, err := ParseSchema(SchemaFile, DefaultSchema())
	if err != nil {
		t.Fatalf("default schema: %v", err)
	}
	return s
}

func TestDefaultSchema_AcceptsEveryContextField(t *testing.T) {
	s := parsedDefaultSchema(t)
	list, err := cedar.NewPolicyListFromBytes("every.cedar", []byte(everyField))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range list {
		id := string(p.Annotations()["id"])
		if err := s.ValidatePolicy(id, p); err != nil {
			t.Errorf("policy %s: %v", id, err)
		}
	}
	// And through the loader.
	dir := writeDir(t, map[string]string{SchemaFile: string(DefaultSchema()), "every.cedar": everyField})
	if n, err := ValidateDir(dir); err != nil || n != 4 {
		t.Fatalf("ValidateDir = %d, %v", n, err)
	}
}

func TestDefaultSchema_RejectsTypoedAttribute(t *testing.T) {
	s := parsedDefaultSchema(t)
	for typo, name := range map[string]string{
		`context.methd == "GET"`:                "methd",
		`context.attestation.expires_in == 1`:   "expires_in",
		`principal.trustdomain == "x"`:          "trustdomain",
		`context.port == "443"`:                 "", // wrong type: any error will do
		`resource.owner == "me"`:                "owner",
		`context.time < "2030-01-01T00:00:00Z"`: "",
	} {
		list, err := cedar.NewPolicyListFromBytes("typo.cedar", []byte(`@id("typo") permit(principal, action, resource) when { `+typo+` };`))
		if err != nil {
			t.Fatal(err)
		}
		err = s.ValidatePolicy("typo", list[0])
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: error %v should name %q", typo, err, name)
		}
	}
}

func TestDefaultSchema_ValidationErrorsAreStable(t *testing.T) {
	s := parsedDefaultSchema(t)
	list, err := cedar.NewPolicyListFromBytes("typo.cedar", []byte(`@id("typo") permit(principal, action, resource) when { context.methd == "GET" && principal.modle == "x" };`))
	if err != nil {
		t.Fatal(err)
	}
	first := s.ValidatePolicy("typo", list[0]).Error()
	for range 20 {
		if got := s.ValidatePolicy("typo", list[0]).Error(); got != first {
			t.Fatalf("validation message changed between runs:\n%s\n---\n%s", first, got)
		}
	}
	if strings.Contains(first, "for policy `typo`") || !strings.Contains(first, "methd") || !strings.Contains(first, "modle") {
		t.Fatalf("message = %q", first)
	}
}

// The schema must describe exactly what buildRequest builds: every kind of request and its
// entities validate against it.
func TestDefaultSchema_MatchesBuiltRequests(t *testing.T) {
	s := parsedDefaultSchema(t)
	var pc principalCache
	for name, in := range map[string]Input{
		"k8s GET":       get(coderID, "api.github.com", "/repos/x"),
		"vm POST":       with(get(vmID, "example.com", "/"), func(in *Input) { in.Action = "POST"; in.Credential = "c" }),
		"static DELETE": with(get(coderID, "example.com", "/"), func(in *Input) { in.Action = "DELETE"; in.Identity = staticIdentity(coderID) }),
		"tunnel":        {Identity: spiffeIdentity(coderID), Action: ActionConnect, Host: "pypi.org", Port: 443, Time: testNow},
		"every method":  with(get(coderID, "h", "/"), func(in *Input) { in.Action = "TRACE" }),
		"every optional field": with(get(coderID, "h", "/"), func(in *Input) {
			in.Upgrade = "websocket"
			in.Caller = &attest.Process{PID: 1, UID: 2, GID: 3, Exe: "/bin/x", SHA256: "ab"}
			in.Delegation = &attest.Delegation{Subject: "s", Actors: []string{"a", "b"}, Issuer: "i"}
		}),
		"tools/call": toolCall(t, "read_file", `{"path": "/w", "n": 1, "o": {"a": [1, 2], "b": 1.5}}`),
		"tools/call with delegation": with(toolCall(t, "read_file", ``), func(in *Input) {
			in.Delegation = &attest.Delegation{Subject: "s", Issuer: "i"}
		}),
		"resources/read": with(get(coderID, "h", "/mcp"), func(in *Input) {
			in.Action, in.Resource, in.MCP = ActionResourcesRead, Resource{Type: TypeResource, ID: "h/file:///a"}, &MCPCall{Name: "file:///a"}
		}),
		"prompts/get": with(get(coderID, "h", "/mcp"), func(in *Input) {
			in.Action, in.Resource, in.MCP = ActionPromptsGet, Resource{Type: TypePrompt, ID: "h/p"}, &MCPCall{Name: "p", Arguments: map[string]any{"x": "y"}}
		}),
	} {
		r, err := buildRequest(&pc, in, time.Now)
		if err != nil {
			t.Fatal(err)
		}
		entities := append([]cedar.Entity{r.host}, r.principal.entities...)
		if r.mcp != nil {
			entities = append(entities, r.mcp.entity)
		}
		s := s
		if in.MCP != nil && len(in.MCP.Arguments) > 0 {
			// The arguments' attributes are declared per policy; declare these ones (an
			// argument's type is what the conversion makes of its JSON).
			s = schemaWithArguments(t, map[string]string{
				"tools/call":  "{path?: String, n?: Long, o?: {a?: Set<Long>, b?: String}}",
				"prompts/get": "{x?: String}",
			}[name])
		}
		if err := s.validateRequest(r.req, entities); err != nil {
			t.Errorf("%s: request does not match the default schema: %v", name, err)
		}
	}
	for _, m := range append(append([]string{}, readMethods...), knownWriteMethods...) {
		r, err := buildRequest(&pc, with(get(coderID, "h", "/"), func(in *Input) { in.Action = m }), time.Now)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.validateRequest(r.req, nil); err != nil {
			t.Errorf("method %s is not in the default schema: %v", m, err)
		}
	}
}

func schemaWithArguments(t *testing.T, record string) *Schema {
	t.Helper()
	src := bytes.Replace(DefaultSchema(), []byte("type MCPArguments = {};"), []byte("type MCPArguments = "+record+";"), 1)
	s, err := ParseSchema("custom.cedarschema", src)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestDefaultSchema_ShippedCopiesMatch(t *testing.T) {
	for _, path := range []string{"schema.cedarschema", "testdata/policies/schema.cedarschema"} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, DefaultSchema()) {
			t.Errorf("%s differs from DefaultSchema()", path)
		}
	}
	// DefaultSchema returns a copy.
	DefaultSchema()[0] = 'X'
	if DefaultSchema()[0] == 'X' {
		t.Error("DefaultSchema returns the embedded bytes, not a copy")
	}
}
