package policy

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	cedar "github.com/cedar-policy/cedar-go"
)

// compileText compiles policies held in memory (no directory), without schema validation:
// the generated sets deliberately hold policies that error at evaluation.
func compileText(t testing.TB, text string) *Set {
	t.Helper()
	s, err := Compile(Source{Origin: "mem", Policies: map[string][]byte{"mem.cedar": []byte(text)}, unvalidated: true})
	if err != nil {
		t.Fatalf("compile: %v\n%s", err, text)
	}
	return s
}

// engineWith returns an enforcing engine with s installed.
func engineWith(s *Set) *Engine {
	e := NewEngine(Options{Now: fixedClock})
	e.Install(s)
	return e
}

var (
	genIDs   = []string{coderID, reviewerID, etlID, vmID, "spiffe://other.org/ns/agents/sa/coder"}
	genSAs   = []string{"agents/coder", "agents/reviewer", "batch/etl", "batch/coder"}
	genNSs   = []string{"agents", "batch", "other"}
	genActs  = []string{"GET", "HEAD", "POST", "DELETE", "PROPFIND", "connect", "CONNECT", "read", "write", "tools/call", "resources/read", "prompts/get"}
	genHosts = []string{"a.example", "b.example", "api.github.com"}
	genTools = []string{"read_file", "delete_repo"}
	genMCP   = []string{TypeTool, TypeResource, TypePrompt}
)

func pick[T any](r *rand.Rand, s []T) T { return s[r.IntN(len(s))] }

func genPrincipalScope(r *rand.Rand) string {
	switch r.IntN(12) {
	case 0, 1:
		return "principal"
	case 2:
		return fmt.Sprintf(`principal == Workload::%q`, pick(r, genIDs))
	case 3:
		return fmt.Sprintf(`principal in Workload::%q`, pick(r, genIDs))
	case 4:
		return fmt.Sprintf(`principal in ServiceAccount::%q`, pick(r, genSAs))
	case 5:
		return fmt.Sprintf(`principal in Namespace::%q`, pick(r, genNSs))
	case 6:
		return fmt.Sprintf(`principal == ServiceAccount::%q`, pick(r, genSAs)) // never matches a Workload
	case 7:
		return "principal is Workload"
	case 8:
		return "principal is Host"
	case 9:
		return fmt.Sprintf(`principal is Workload in Namespace::%q`, pick(r, genNSs))
	case 10:
		return fmt.Sprintf(`principal is Workload in ServiceAccount::%q`, pick(r, genSAs))
	default:
		return fmt.Sprintf(`principal == Namespace::%q`, pick(r, genNSs))
	}
}

func genActionScope(r *rand.Rand) string {
	switch r.IntN(7) {
	case 0, 1:
		return "action"
	case 2:
		return fmt.Sprintf(`action == Action::%q`, pick(r, genActs))
	case 3:
		return fmt.Sprintf(`action in Action::%q`, pick(r, genActs))
	case 4:
		return `action in [Action::"GET", Action::"read"]` // both keys of a GET request
	case 5:
		return fmt.Sprintf(`action in [Action::%q, Action::%q, Action::%q]`, pick(r, genActs), pick(r, genActs), pick(r, genActs))
	default:
		return fmt.Sprintf(`action in [Action::%q]`, pick(r, genActs))
	}
}

func genResourceScope(r *rand.Rand) string {
	switch r.IntN(14) {
	case 8:
		return fmt.Sprintf(`resource == %s::"%s/%s"`, pick(r, genMCP), pick(r, genHosts), pick(r, genTools))
	case 9:
		return fmt.Sprintf(`resource in %s::"%s/%s"`, pick(r, genMCP), pick(r, genHosts), pick(r, genTools))
	case 10:
		return "resource is " + pick(r, genMCP)
	case 11:
		return fmt.Sprintf(`resource is %s in Host::%q`, pick(r, genMCP), pick(r, genHosts))
	case 12:
		return fmt.Sprintf(`resource in Host::%q`, pick(r, genHosts)) // covers the host's tools too
	case 13:
		return fmt.Sprintf(`resource == Host::"%s/%s"`, pick(r, genHosts), pick(r, genTools)) // a host named like a tool: never matches
	case 0, 1:
		return "resource"
	case 2:
		return fmt.Sprintf(`resource == Host::%q`, pick(r, genHosts))
	case 3:
		return fmt.Sprintf(`resource in Host::%q`, pick(r, genHosts))
	case 4:
		return "resource is Host"
	case 5:
		return fmt.Sprintf(`resource is Host in Host::%q`, pick(r, genHosts))
	case 6:
		return "resource is Workload"
	default:
		return fmt.Sprintf(`resource == Workload::%q`, pick(r, genIDs))
	}
}

var genConditions = []string{
	`when { context.path like "/v1/*" }`,
	`when { context.method == "GET" }`,
	`unless { context.port == 80 }`,
	`when { context.credential == "gh" }`,
	`when { context.attestation.attested }`,
	`when { principal.attested && principal.trust_domain == "example.org" }`,
	`when { action in Action::"read" }`,
	`when { principal in Namespace::"agents" }`,
	// These error at runtime (missing attributes), always or only sometimes.
	`when { context.nope == 1 }`,
	`when { principal.missing }`,
	`when { resource.owner == "x" }`,
	`when { context.path like "/admin*" && context.nope }`,
	`unless { context.port == 443 || principal.missing }`,
	`when { context has mcp && context.mcp.arguments has path && context.mcp.arguments.path like "/w*" }`,
	`when { context.mcp.arguments.path like "/w*" }`, // errors without mcp or path
	`when { context has mcp && context.mcp.name == "read_file" }`,
	`when { resource in Host::"a.example" }`,
}

func genPolicySet(r *rand.Rand, n int) string {
	var b strings.Builder
	for i := range n {
		effect := "permit"
		if r.IntN(5) < 2 {
			effect = "forbid"
		}
		fmt.Fprintf(&b, "@id(\"p%d\") %s (%s, %s, %s)", i, effect, genPrincipalScope(r), genActionScope(r), genResourceScope(r))
		for range r.IntN(3) {
			b.WriteString(" " + pick(r, genConditions))
		}
		b.WriteString(";\n")
	}
	return b.String()
}

func genInput(r *rand.Rand) Input {
	in := get(pick(r, genIDs), pick(r, append([]string{"c.example"}, genHosts...)), pick(r, []string{"/v1/x", "/admin", "/"}))
	in.Action = pick(r, []string{"GET", "HEAD", "POST", "DELETE", "PROPFIND", "connect", "CONNECT", "get"})
	in.Port = pick(r, []int{443, 80})
	in.Credential = pick(r, []string{"", "gh"})
	if r.IntN(4) == 0 {
		in.Identity = staticIdentity(in.Identity.SPIFFEID)
	}
	if r.IntN(3) == 0 {
		i := r.IntN(len(genMCP))
		name := pick(r, genTools)
		in.Action = []string{ActionToolsCall, ActionResourcesRead, ActionPromptsGet}[i]
		in.Resource = Resource{Type: genMCP[i], ID: in.Host + "/" + name}
		in.MCP = &MCPCall{Method: in.Action, Name: name, Arguments: pick(r, []map[string]any{nil, {"path": "/w/x"}, {"path": "/etc"}, {"path": json.Number("1")}})}
	}
	return in
}

// comparable is the part of a decision that the index must not change.
func comparableDecision(d Decision) string {
	ids := slices.Clone(d.PolicyIDs)
	slices.Sort(ids)
	errs := slices.Clone(d.Errors)
	slices.Sort(errs)
	return fmt.Sprintf("allow=%v reason=%s ids=%v errors=%q", d.Allow, d.Reason, ids, errs)
}

// fullDecision evaluates the whole set with plain cedar.Authorize, no index.
func fullDecision(t testing.TB, s *Set, in Input) Decision {
	t.Helper()
	var pc principalCache
	r, err := buildRequest(&pc, in, fixedClock)
	if err != nil {
		t.Fatal(err)
	}
	return decisionFrom(cedar.Authorize(s.full, r, r.req))
}

// indexMismatches runs the property check over sets random policy sets and returns how many
// decisions of the indexed engine differed from full evaluation, and the first difference.
// sabotage, if not nil, damages each set's index after it is built.
func indexMismatches(t *testing.T, seed uint64, sets, inputs int, sabotage func(*Set)) (n int, first string) {
	r := rand.New(rand.NewPCG(seed, 0x65736372))
	var errored, allowed, total int
	for range sets {
		text := genPolicySet(r, 1+r.IntN(40))
		s := compileText(t, text)
		if sabotage != nil {
			sabotage(s)
		}
		e := engineWith(s)
		for range inputs {
			in := genInput(r)
			got, want := comparableDecision(decide(e, in)), comparableDecision(fullDecision(t, s, in))
			total++
			if strings.Contains(want, "policy_error") {
				errored++
			}
			if strings.HasPrefix(want, "allow=true") {
				allowed++
			}
			if got != want {
				if n == 0 {
					first = fmt.Sprintf("input %+v\nindexed: %s\nfull:    %s\npolicies:\n%s", in, got, want, text)
				}
				n++
			}
		}
	}
	if sabotage == nil {
		// Make sure the generator exercises every outcome.
		t.Logf("%d decisions: %d allowed, %d errored", total, allowed, errored)
		if allowed < total/20 || errored < total/20 || total-allowed-errored < total/20 {
			t.Fatalf("generator is lopsided: %d decisions, %d allowed, %d errored", total, allowed, errored)
		}
	}
	return n, first
}

func TestIndex_MatchesFullEvaluation(t *testing.T) {
	sets := 400
	if testing.Short() {
		sets = 100
	}
	if n, first := indexMismatches(t, 1, sets, 40, nil); n > 0 {
		t.Fatalf("%d indexed decisions differ from full evaluation; first:\n%s", n, first)
	}
}

// The property test must be able to fail: each deliberately broken (unsound or wrong) index
// is caught. (Over-approximating, e.g. treating `is` as `all` or `==` as `in`, is
// sound and cannot be caught here; TestIndex_EvaluatesOnlyCandidates checks the narrowing.)
func TestIndex_BrokenIndexIsCaught(t *testing.T) {
	for name, sabotage := range map[string]func(*Set){
		"always-buckets dropped": func(s *Set) {
			for d := range s.idx.dims {
				s.idx.dims[d].always = nil
			}
		},
		"principal ancestors ignored (in treated as ==)": func(s *Set) {
			for i := range s.idx.scopes {
				if sc := &s.idx.scopes[i][dimPrincipal]; sc.kind == scopeIn {
					sc.kind = scopeEq
				}
			}
		},
		// For a Host `in` and `==` are the same; only an MCP resource (a child of its host)
		// tells them apart.
		"resource ancestors ignored (in treated as ==)": func(s *Set) {
			for i := range s.idx.scopes {
				if sc := &s.idx.scopes[i][dimResource]; sc.kind == scopeIn || sc.kind == scopeIsIn {
					sc.kind = scopeEq
				}
			}
		},
		"namespace buckets dropped": func(s *Set) {
			for d := range s.idx.dims {
				for k := range s.idx.dims[d].byKey {
					if k.Type == TypeNamespace {
						delete(s.idx.dims[d].byKey, k)
					}
				}
			}
		},
		"action groups dropped": func(s *Set) {
			delete(s.idx.dims[dimAction].byKey, uidRead)
			delete(s.idx.dims[dimAction].byKey, uidWrite)
		},
		"is-scopes never match": func(s *Set) {
			for i := range s.idx.scopes {
				for d := range numDims {
					if s.idx.scopes[i][d].kind == scopeIs {
						s.idx.scopes[i][d] = scope{kind: scopeInSet}
					}
				}
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			if n, _ := indexMismatches(t, 2, 100, 40, sabotage); n == 0 {
				t.Fatal("the property test did not notice a broken index")
			}
		})
	}
}

func TestIndex_EvaluatesOnlyCandidates(t *testing.T) {
	s := compileText(t, benchPolicies(1000))
	var pc principalCache
	r, err := buildRequest(&pc, benchInput(1000), fixedClock)
	if err != nil {
		t.Fatal(err)
	}
	cands := s.idx.candidates(r, nil)
	var ids []string
	for _, i := range cands {
		ids = append(ids, string(s.ids[i]))
	}
	// The request's own permit plus the one global forbid.
	if len(cands) > 3 || !slices.Contains(ids, "global-forbid-unattested") {
		t.Fatalf("candidates = %v, want the matching policy and the global forbid only", ids)
	}
	want := comparableDecision(fullDecision(t, s, benchInput(1000)))
	if got := comparableDecision(decide(engineWith(s), benchInput(1000))); got != want || !strings.HasPrefix(got, "allow=true") {
		t.Fatalf("indexed %s, full %s", got, want)
	}
}

func TestIndex_CandidatesAreInLoadOrderWithoutDuplicates(t *testing.T) {
	s := compileText(t, `
@id("z") permit(principal, action in [Action::"GET", Action::"read"], resource);
@id("a") permit(principal in Namespace::"agents", action in Action::"read", resource);
@id("m") permit(principal == Workload::"`+coderID+`", action, resource == Host::"h.example");`)
	var pc principalCache
	r, err := buildRequest(&pc, get(coderID, "h.example", "/"), fixedClock)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.idx.candidates(r, nil); !slices.Equal(got, []int32{0, 1, 2}) {
		t.Fatalf("candidates = %v, want [0 1 2]", got)
	}
	d := decide(engineWith(s), get(coderID, "h.example", "/"))
	if !slices.Equal(d.PolicyIDs, []string{"z", "a", "m"}) {
		t.Fatalf("PolicyIDs = %v, want load order [z a m]", d.PolicyIDs)
	}
}
