package policy

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"

	cedar "github.com/cedar-policy/cedar-go"

	"github.com/escrowproxy/escrow/attest"
)

const mcpHost = "mcp.github.example"

// toolCall is a tools/call of tool on mcpHost with the given JSON arguments.
func toolCall(t testing.TB, tool, argsJSON string) Input {
	t.Helper()
	in := get(coderID, mcpHost, "/mcp")
	in.Action = ActionToolsCall
	in.Resource = Resource{Type: TypeTool, ID: mcpHost + "/" + tool}
	in.MCP = &MCPCall{Method: ActionToolsCall, Name: tool, Arguments: decodeArgs(t, argsJSON)}
	return in
}

func decodeArgs(t testing.TB, s string) map[string]any {
	t.Helper()
	if s == "" {
		return nil
	}
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var m map[string]any
	if err := d.Decode(&m); err != nil {
		t.Fatalf("decode %s: %v", s, err)
	}
	return m
}

// mcpPolicies is the worked example of the docs: per tool, per argument, whole server.
const mcpPolicies = `
@id("read-workspace") permit (
  principal in Namespace::"agents",
  action == Action::"tools/call",
  resource == Tool::"mcp.github.example/read_file"
) when { context.mcp.arguments has path && context.mcp.arguments.path like "/workspace/*" };
@id("search") permit (principal, action == Action::"tools/call", resource == Tool::"mcp.github.example/search");
@id("no-deletes-anywhere") forbid (principal, action, resource in Host::"mcp.github.example")
  when { context has mcp && context.mcp.name like "delete_*" };
@id("small-pages") forbid (principal, action == Action::"tools/call", resource is Tool in Host::"mcp.github.example")
  when { context.mcp.arguments has per_page && context.mcp.arguments.per_page > 100 };
@id("docs") permit (principal, action == Action::"resources/read", resource in Host::"mcp.github.example")
  when { context.mcp.name like "file:///docs/*" };
@id("prompts") permit (principal, action == Action::"prompts/get", resource == Prompt::"mcp.github.example/review");
@id("all-http") permit (principal, action in [Action::"read", Action::"write"], resource == Host::"mcp.github.example");
`

func mcpEngine(t testing.TB) *Engine {
	t.Helper()
	s, err := Compile(Source{Origin: "mem", Policies: map[string][]byte{"mcp.cedar": []byte(mcpPolicies)}, Schema: DefaultSchema()})
	if err != nil {
		t.Fatalf("the worked MCP example does not validate against the default schema: %v", err)
	}
	return engineWith(s)
}

func TestEngine_MCPToolCallDecidedPerToolAndArguments(t *testing.T) {
	e := mcpEngine(t)
	for _, c := range []struct {
		name  string
		in    Input
		allow bool
		ids   []string
	}{
		{"argument inside workspace", toolCall(t, "read_file", `{"path": "/workspace/a"}`), true, []string{"read-workspace"}},
		{"argument outside workspace", toolCall(t, "read_file", `{"path": "/etc/passwd"}`), false, nil},
		{"argument missing", toolCall(t, "read_file", `{}`), false, nil},
		{"no arguments at all", toolCall(t, "read_file", ``), false, nil},
		{"argument of another type", toolCall(t, "read_file", `{"path": 7}`), false, []string{"read-workspace"}},
		{"other tool permitted", toolCall(t, "search", `{"query": "x"}`), true, []string{"search"}},
		{"tool with no permit", toolCall(t, "list_secrets", `{}`), false, nil},
		{"forbid on the whole server", toolCall(t, "delete_repo", `{"name": "x"}`), false, []string{"no-deletes-anywhere"}},
		{"numeric argument over the limit", toolCall(t, "search", `{"query": "x", "per_page": 500}`), false, []string{"small-pages"}},
		{"numeric argument under the limit", toolCall(t, "search", `{"query": "x", "per_page": 50}`), true, []string{"search"}},
		{"same tool name on another server", with(toolCall(t, "search", `{}`), func(in *Input) {
			in.Host = "other.example"
			in.Resource.ID = "other.example/search"
		}), false, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := decide(e, c.in)
			reason := ReasonDenied
			if c.allow {
				reason = ReasonAllowed
			}
			if c.name == "argument of another type" {
				// like on a Long errors: the permit is skipped and the engine fails closed.
				reason = ReasonError
			}
			wantDecision(t, d, c.allow, reason, c.ids...)
		})
	}
}

func TestEngine_MCPResourceAndPromptActions(t *testing.T) {
	e := mcpEngine(t)
	read := func(uri string) Input {
		in := get(coderID, mcpHost, "/mcp")
		in.Action, in.Resource = ActionResourcesRead, Resource{Type: TypeResource, ID: mcpHost + "/" + uri}
		in.MCP = &MCPCall{Method: ActionResourcesRead, Name: uri}
		return in
	}
	wantDecision(t, decide(e, read("file:///docs/readme.md")), true, ReasonAllowed, "docs")
	wantDecision(t, decide(e, read("file:///etc/shadow")), false, ReasonDenied)

	prompt := func(name string) Input {
		in := get(coderID, mcpHost, "/mcp")
		in.Action, in.Resource = ActionPromptsGet, Resource{Type: TypePrompt, ID: mcpHost + "/" + name}
		in.MCP = &MCPCall{Name: name} // Method defaults to the action
		return in
	}
	wantDecision(t, decide(e, prompt("review")), true, ReasonAllowed, "prompts")
	wantDecision(t, decide(e, prompt("other")), false, ReasonDenied)

	// The transport (an HTTP POST to the server) is decided on the host, as before.
	wantDecision(t, decide(e, with(get(coderID, mcpHost, "/mcp"), func(in *Input) { in.Action = "POST" })), true, ReasonAllowed, "all-http")
	// An MCP action is in neither HTTP group: the HTTP permit does not cover tool calls.
	wantDecision(t, decide(e, toolCall(t, "unlisted", `{}`)), false, ReasonDenied)
}

func TestEngine_MCPResourceIDUsesTheNormalisedHost(t *testing.T) {
	e := mcpEngine(t)
	in := toolCall(t, "search", `{}`)
	in.Host, in.Resource.ID = "MCP.GitHub.Example.", "MCP.GitHub.Example./search"
	wantDecision(t, decide(e, in), true, ReasonAllowed, "search")
}

func TestEngine_MCPMalformedInputIsAFinalError(t *testing.T) {
	e := mcpEngine(t)
	for name, in := range map[string]Input{
		"tool call without resource": with(toolCall(t, "search", `{}`), func(in *Input) { in.Resource = Resource{} }),
		"tool call on a prompt":      with(toolCall(t, "search", `{}`), func(in *Input) { in.Resource.Type = TypePrompt }),
		"tool call without the call": with(toolCall(t, "search", `{}`), func(in *Input) { in.MCP = nil }),
		"method is not the action":   with(toolCall(t, "search", `{}`), func(in *Input) { in.MCP.Method = ActionPromptsGet }),
		"resource on another host":   with(toolCall(t, "search", `{}`), func(in *Input) { in.Resource.ID = "evil.example/search" }),
		"resource without host":      with(toolCall(t, "search", `{}`), func(in *Input) { in.Resource.ID = "search" }),
		"HTTP action with a tool":    with(toolCall(t, "search", `{}`), func(in *Input) { in.Action = "POST" }),
	} {
		d := decide(e, in)
		wantDecision(t, d, false, ReasonError)
		if d.Overridable() || len(d.Errors) != 1 || !strings.HasPrefix(d.Errors[0], "policy: ") {
			t.Errorf("%s: %+v, want a final error", name, d)
		}
	}
}

func TestEngine_MCPArgumentsOverTheBoundsFailClosed(t *testing.T) {
	e := loaded(t, `@id("all") permit (principal, action, resource);`)
	deep := strings.Repeat(`{"a":`, MaxArgumentsDepth) + `1` + strings.Repeat(`}`, MaxArgumentsDepth)
	deeper := strings.Repeat(`{"a":`, MaxArgumentsDepth+1) + `1` + strings.Repeat(`}`, MaxArgumentsDepth+1)
	deepArray := strings.Repeat(`{"a":`, MaxArgumentsDepth-1) + `[1]` + strings.Repeat(`}`, MaxArgumentsDepth-1)
	wide := func(n int) string { // the object itself, the array, n-2 numbers: n values
		return `{"a": [` + strings.TrimSuffix(strings.Repeat("1,", n-2), ",") + `]}`
	}
	wantDecision(t, decide(e, toolCall(t, "t", deep)), true, ReasonAllowed, "all")
	wantDecision(t, decide(e, toolCall(t, "t", wide(MaxArgumentsValues))), true, ReasonAllowed, "all")
	for name, c := range map[string]struct {
		args string
		err  error
	}{
		"one level too deep":          {deeper, ErrArgumentsTooDeep},
		"an array one level too deep": {strings.Replace(deepArray, "[1]", "[[1]]", 1), ErrArgumentsTooDeep},
		"one value too many":          {wide(MaxArgumentsValues + 1), ErrArgumentsTooLarge},
	} {
		d := decide(e, toolCall(t, "t", c.args))
		if d.Allow || d.Reason != ReasonError || d.Overridable() || len(d.Errors) != 1 || d.Errors[0] != c.err.Error() {
			t.Errorf("%s: decision %+v, want a final policy_error %q", name, d, c.err)
		}
	}
}

func TestArgumentsRecord_ConvertsJSONToCedar(t *testing.T) {
	rec, err := argumentsRecord(decodeArgs(t, `{
		"s": "x", "b": true, "i": 42, "neg": -7, "big": 9223372036854775807, "huge": 9223372036854775808,
		"f": 1.5, "e": 1e3, "null": null,
		"arr": [1, "a", null, 1], "obj": {"k": [{"deep": "v"}]}
	}`))
	if err != nil {
		t.Fatal(err)
	}
	want := cedar.NewRecord(cedar.RecordMap{
		"s": cedar.String("x"), "b": cedar.True, "i": cedar.Long(42), "neg": cedar.Long(-7),
		"big": cedar.Long(9223372036854775807), "huge": cedar.String("9223372036854775808"),
		"f": cedar.String("1.5"), "e": cedar.String("1e3"),
		"arr": cedar.NewSet(cedar.Long(1), cedar.String("a")),
		"obj": cedar.NewRecord(cedar.RecordMap{"k": cedar.NewSet(cedar.NewRecord(cedar.RecordMap{"deep": cedar.String("v")}))}),
	})
	if !rec.Equal(want) {
		t.Fatalf("record =\n%s\nwant\n%s", rec.MarshalCedar(), want.MarshalCedar())
	}
	// Decoded without UseNumber, and Go integers.
	rec, err = argumentsRecord(map[string]any{"f": 2.0, "g": 0.25, "n": 3})
	if err != nil || !rec.Equal(cedar.NewRecord(cedar.RecordMap{"f": cedar.Long(2), "g": cedar.String("0.25"), "n": cedar.Long(3)})) {
		t.Fatalf("float64/int: %v %v", rec, err)
	}
	if _, err := argumentsRecord(map[string]any{"c": make(chan int)}); err == nil {
		t.Fatal("a non-JSON Go value was accepted")
	}
}

func TestEngine_CallerDelegationAndUpgradeInContext(t *testing.T) {
	e := loaded(t, `
@id("curl-only") permit (principal, action == Action::"GET", resource == Host::"a.example")
  when { context has caller && context.caller.exe == "/usr/bin/curl" && context.caller.uid == 1000 &&
         context.caller.sha256 == "ab12" && context.caller.pid > 0 && context.caller.gid == 100 };
@id("for-alice") permit (principal, action == Action::"POST", resource == Host::"b.example")
  when { context has delegation && context.delegation.subject == "alice" && context.delegation.depth <= 2 &&
         context.delegation.actors.contains("spiffe://example.org/orchestrator") &&
         context.delegation.nearest == "spiffe://example.org/sub-agent" && context.delegation.issuer == "https://idp" };
@id("websocket") permit (principal, action == Action::"GET", resource == Host::"c.example")
  when { context has upgrade && context.upgrade == "websocket" };
`)
	curl := &attest.Process{PID: 42, UID: 1000, GID: 100, Exe: "/usr/bin/curl", SHA256: "ab12"}
	wantDecision(t, decide(e, with(get(coderID, "a.example", "/"), func(in *Input) { in.Caller = curl })), true, ReasonAllowed, "curl-only")
	other := *curl
	other.Exe = "/usr/bin/python3"
	wantDecision(t, decide(e, with(get(coderID, "a.example", "/"), func(in *Input) { in.Caller = &other })), false, ReasonDenied)
	wantDecision(t, decide(e, get(coderID, "a.example", "/")), false, ReasonDenied) // caller unknown

	chain := &attest.Delegation{Subject: "alice", Issuer: "https://idp",
		Actors: []string{"spiffe://example.org/sub-agent", "spiffe://example.org/orchestrator"}}
	post := func(d *attest.Delegation) Input {
		return with(get(coderID, "b.example", "/"), func(in *Input) { in.Action = "POST"; in.Delegation = d })
	}
	wantDecision(t, decide(e, post(chain)), true, ReasonAllowed, "for-alice")
	tooDeep := *chain
	tooDeep.Actors = append([]string{"spiffe://example.org/sub-agent"}, append(chain.Actors[1:], "x")...)
	wantDecision(t, decide(e, post(&tooDeep)), false, ReasonDenied)
	reversed := *chain
	reversed.Actors = []string{chain.Actors[1], chain.Actors[0]} // nearest is now the orchestrator
	wantDecision(t, decide(e, post(&reversed)), false, ReasonDenied)
	wantDecision(t, decide(e, post(nil)), false, ReasonDenied)

	wantDecision(t, decide(e, with(get(coderID, "c.example", "/"), func(in *Input) { in.Upgrade = "WebSocket" })), true, ReasonAllowed, "websocket")
	wantDecision(t, decide(e, get(coderID, "c.example", "/")), false, ReasonDenied)
}

// A delegation without actors (the subject calls directly) has depth 0 and nearest "".
func TestBuildContext_DelegationWithoutActors(t *testing.T) {
	var pc principalCache
	r, err := buildRequest(&pc, with(get(coderID, "h", "/"), func(in *Input) {
		in.Delegation = &attest.Delegation{Subject: "alice", Issuer: "i"}
	}), fixedClock)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := r.req.Context.Get("delegation")
	want := cedar.NewRecord(cedar.RecordMap{"subject": cedar.String("alice"), "actors": cedar.NewSet(),
		"nearest": cedar.String(""), "depth": cedar.Long(0), "issuer": cedar.String("i")})
	if !v.Equal(want) {
		t.Fatalf("delegation = %s", v.(cedar.Record).MarshalCedar())
	}
}

// Plain HTTP requests carry none of the optional fields: `context has ...` is false.
func TestBuildContext_OptionalFieldsAbsentForPlainRequests(t *testing.T) {
	var pc principalCache
	r, err := buildRequest(&pc, get(coderID, "h", "/"), fixedClock)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []cedar.String{"upgrade", "caller", "delegation", "mcp"} {
		if _, ok := r.req.Context.Get(k); ok {
			t.Errorf("context has %s for a plain request", k)
		}
	}
	if r.req.Resource != cedar.NewEntityUID(TypeHost, "h") {
		t.Errorf("resource = %v", r.req.Resource)
	}
}

func TestDefaultSchema_AcceptsArgumentPoliciesUnderGuards(t *testing.T) {
	s := parsedDefaultSchema(t)
	ok := []string{
		`permit (principal, action == Action::"tools/call", resource == Tool::"mcp.github.example/read_file") when { context has mcp && context.mcp.arguments has path && context.mcp.arguments.path like "/workspace/*" };`,
		`permit (principal, action, resource) when { context has mcp && context.mcp.arguments has path && context.mcp.arguments.path like "/workspace/*" };`,
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has opts && context.mcp.arguments.opts has n && context.mcp.arguments.opts.n >= 3 };`,
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has tags && context.mcp.arguments.tags.contains("x") && context.mcp.arguments has ids && context.mcp.arguments.ids.containsAny([1, 2]) };`,
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has force && !context.mcp.arguments.force };`,
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has "x-y" && context.mcp.arguments["x-y"] == "z" };`,
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has owner && context.mcp.arguments.owner == principal.trust_domain };`,
		`forbid (principal, action == Action::"tools/call", resource) unless { context.mcp.arguments has dry_run && context.mcp.arguments.dry_run == true };`,
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.name == "x" && context.mcp.method == "tools/call" };`,
	}
	for _, src := range ok {
		list, err := cedar.NewPolicyListFromBytes("a.cedar", []byte(`@id("a") `+src))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.ValidatePolicy("a", list[0]); err != nil {
			t.Errorf("%s\n  rejected: %v", src, err)
		}
	}
	bad := map[string]string{
		// No `has` guard: an absent argument would be a runtime error.
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments.path like "/w/*" };`: "optional attribute `mcp.arguments.path`",
		// No `context has mcp` for HTTP actions.
		`permit (principal, action, resource) when { context.mcp.arguments has path && context.mcp.arguments.path like "/w/*" };`: "optional attribute `mcp`",
		// Two types for one argument.
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has n && (context.mcp.arguments.n == 1 || context.mcp.arguments.n like "x") };`: "context.mcp.arguments.n is used both as Long and String",
		// A typo outside the arguments is still caught.
		`permit (principal, action == Action::"tools/call", resource) when { context.mcp.nmae == "x" };`: "nmae",
	}
	for src, want := range bad {
		list, err := cedar.NewPolicyListFromBytes("a.cedar", []byte(`@id("a") `+src))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.ValidatePolicy("a", list[0]); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s\n  error %v, want one containing %q", src, err, want)
		}
	}
}

// A schema that declares the arguments' attributes itself is used as written.
func TestSchema_DeclaredArgumentsAreNotInferred(t *testing.T) {
	s := schemaWithArguments(t, "{ path?: String }")
	for policy, wantErr := range map[string]bool{
		`@id("a") permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has path && context.mcp.arguments.path like "/w/*" };`: false,
		`@id("a") permit (principal, action == Action::"tools/call", resource) when { context.mcp.arguments has path && context.mcp.arguments.path == 1 };`:        true,
	} {
		list, err := cedar.NewPolicyListFromBytes("a.cedar", []byte(policy))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.ValidatePolicy("a", list[0]); (err != nil) != wantErr {
			t.Errorf("%s: error %v, want error %v", policy, err, wantErr)
		}
	}
}

// MayAllow is what filters a tools/list: it hides a tool only when no context could let the
// workload call it.
func TestEngine_MayAllowHidesOnlyToolsThatCanNeverBeCalled(t *testing.T) {
	e := NewEngine(Options{Now: fixedClock})
	if e.MayAllow(toolCall(t, "search", "")) {
		t.Fatal("MayAllow with no policy set")
	}
	if err := e.LoadDir("../examples/mcp/policies"); err != nil {
		t.Fatal(err)
	}
	researcherID := "spiffe://example.org/ns/agents/sa/researcher"
	for _, c := range []struct {
		who, tool string
		want      bool
	}{
		{coderID, "read_file", true},    // allowed for some arguments
		{coderID, "search", true},       // unless an argument is too large
		{coderID, "delete_repo", true},  // for some delegation and caller
		{coderID, "admin_reset", false}, // a forbid on the name alone
		{coderID, "list_secrets", false},
		{researcherID, "search", false}, // no permit for this workload
	} {
		in := toolCall(t, c.tool, "")
		in.Host, in.Resource.ID = mcpHost, mcpHost+"/"+c.tool
		in.Identity = spiffeIdentity(c.who)
		if got := e.MayAllow(in); got != c.want {
			t.Errorf("%s may call %s: %v, want %v", c.who, c.tool, got, c.want)
		}
	}
	if in := with(toolCall(t, "search", ""), func(in *Input) { in.MCP = nil }); e.MayAllow(in) {
		t.Error("MayAllow on a malformed input")
	}
}

// The property MayAllow must keep: whenever Decide allows, MayAllow says true, over random
// policy sets and inputs (arguments, times, identities).
func TestEngine_MayAllowNeverHidesAnAllowedCall(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 0x6d6179))
	allowed, hidden := 0, 0
	for range 300 {
		s := compileText(t, genPolicySet(r, 1+r.IntN(30)))
		e := engineWith(s)
		for range 40 {
			in := genInput(r)
			may := e.MayAllow(in)
			if !may {
				hidden++
			}
			if d := decide(e, in); d.Allow {
				allowed++
				if !may {
					t.Fatalf("Decide allows %+v (%v) but MayAllow says false", in, d.PolicyIDs)
				}
			}
		}
	}
	if allowed < 100 || hidden < 100 {
		t.Fatalf("generator is lopsided: %d allowed, %d hidden", allowed, hidden)
	}
}
