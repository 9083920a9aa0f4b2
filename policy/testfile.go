package policy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/escrowproxy/escrow/attest"
)

// The `escrow policy test FILE` format (YAML, or JSON which is YAML too; one document;
// unknown and duplicate keys are errors):
//
//	policies: ../policies        # policy directory, relative to this file
//	time: 2026-01-01T12:00:00Z   # optional default request time (RFC 3339); default: now
//	cases:
//	  - name: coder may read github
//	    principal: spiffe://example.org/ns/agents/sa/coder
//	    identity: {attested: true, source: spiffe, expires_in_s: 3600}   # optional, these are the defaults
//	    time: 2026-01-01T12:00:00Z                                      # optional
//	    request: {method: GET, scheme: https, host: api.github.com, port: 443, path: /repos/x, credential: github}
//	    expect: allow                 # allow | deny
//	    policies: [allow-github-read] # optional: the exact determining policy ids (any order)
//	  - name: tunnel
//	    principal: spiffe://example.org/ns/agents/sa/coder
//	    request: {action: connect, host: pypi.org, port: 443}
//	    expect: deny
//	  - name: an MCP tool call, by a known process, for a user
//	    principal: spiffe://example.org/ns/agents/sa/coder
//	    caller: {uid: 1000, gid: 1000, pid: 42, exe: /usr/bin/node, sha256: ab12...}   # context.caller
//	    delegation: {subject: alice, actors: [spiffe://example.org/ns/agents/sa/orchestrator], issuer: https://idp}
//	    request: {action: tools/call, host: mcp.example.com, path: /mcp, name: read_file, arguments: {path: /workspace/a}}
//	    expect: allow
//
// request.scheme defaults to https, request.port to 443 (80 for http); a request has either
// a method or action: connect. "deny" matches every kind of deny (policy_denied or
// policy_error); the result reports which. Every mistake in the file is reported at once, each
// with the case's number and name and the key, e.g. `case 2 ("tunnel"): request.prot: unknown
// key (did you mean port?)`.

type testFile struct {
	Policies string
	Time     *time.Time
	Cases    []testCase
}

type testCase struct {
	Name       string
	Principal  string
	Identity   *testIdentity
	Caller     *attest.Process
	Delegation *attest.Delegation
	Time       *time.Time
	Request    testRequest
	Expect     string
	Policies   []string
}

type testIdentity struct {
	Attested   *bool
	Source     string
	ExpiresInS *int64
}

type testRequest struct {
	Action     string
	Method     string
	Scheme     string
	Host       string
	Port       int
	Path       string
	Credential string
	Upgrade    string
	// MCP calls (action tools/call, resources/read or prompts/get).
	Name      string
	Arguments map[string]any
}

// mcpResourceTypes maps the MCP actions to their resource's entity type.
var mcpResourceTypes = map[string]string{
	ActionToolsCall:     TypeTool,
	ActionResourcesRead: TypeResource,
	ActionPromptsGet:    TypePrompt,
}

// Report is the result of RunTests.
type Report struct {
	File      string       `json:"file"`
	PolicyDir string       `json:"policy_dir"`
	Version   string       `json:"version"`
	Cases     []CaseResult `json:"cases"`
}

// Passed returns the number of passing cases.
func (r Report) Passed() int {
	n := 0
	for _, c := range r.Cases {
		if c.Pass {
			n++
		}
	}
	return n
}

// Failed returns the number of failing cases.
func (r Report) Failed() int { return len(r.Cases) - r.Passed() }

// OK reports whether every case passed.
func (r Report) OK() bool { return r.Failed() == 0 }

// Outcome is a decision as the test file states it.
type Outcome struct {
	Decision string   `json:"decision"`           // "allow" | "deny"
	Policies []string `json:"policies,omitempty"` // sorted; in Want, nil means "not checked"
}

func (o Outcome) String() string {
	if o.Policies == nil {
		return o.Decision
	}
	return o.Decision + " [" + strings.Join(o.Policies, ", ") + "]"
}

// CaseResult is the result of one test case.
type CaseResult struct {
	Name   string   `json:"name"`
	Pass   bool     `json:"pass"`
	Want   Outcome  `json:"want"`
	Got    Outcome  `json:"got"`
	Reason Reason   `json:"reason"`
	Errors []string `json:"errors,omitempty"`
}

func (c CaseResult) String() string {
	if c.Pass {
		return "PASS " + c.Name
	}
	s := fmt.Sprintf("FAIL %s: got %s (%s), want %s", c.Name, c.Got, c.Reason, c.Want)
	for _, e := range c.Errors {
		s += "\n\t" + e
	}
	return s
}

// TestOption changes how RunTests runs.
type TestOption func(*testConfig)

type testConfig struct {
	dir string
	now func() time.Time
}

// WithPolicyDir tests the policies in dir instead of the file's `policies` directory.
func WithPolicyDir(dir string) TestOption { return func(c *testConfig) { c.dir = dir } }

// WithClock sets the default request time for cases without a time (default time.Now).
func WithClock(now func() time.Time) TestOption { return func(c *testConfig) { c.now = now } }

// RunTests runs the test cases in the file at path against its policy directory (see the
// format above). The error is non-nil when the file or the policies are bad; a failing case is
// not an error, it is reported in the Report.
func RunTests(path string, opts ...TestOption) (Report, error) {
	cfg := testConfig{now: time.Now}
	for _, o := range opts {
		o(&cfg)
	}
	rep := Report{File: path}
	raw, err := os.ReadFile(path)
	if err != nil {
		return rep, fmt.Errorf("policy: test file: %w", err)
	}
	tf, parsed, ok := parseTestFile(raw)
	var checked []fileProblem
	if ok {
		checked = tf.check(cfg.dir != "")
	}
	problems := mergeProblems(parsed, checked)
	switch len(problems) {
	case 0:
	case 1:
		return rep, fmt.Errorf("policy: test file %s: %s", path, problems[0])
	default:
		return rep, fmt.Errorf("policy: test file %s: %d problems:\n\t%s", path, len(problems), strings.Join(problems, "\n\t"))
	}
	dir := cfg.dir
	if dir == "" {
		dir = tf.Policies
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(filepath.Dir(path), dir)
		}
	}
	rep.PolicyDir = dir
	eng := NewEngine(Options{Now: cfg.now})
	if err := eng.LoadDir(dir); err != nil {
		return rep, err
	}
	rep.Version, _ = eng.Info()

	now := cfg.now()
	if tf.Time != nil {
		now = *tf.Time
	}
	for _, tc := range tf.Cases {
		d := eng.Decide(context.Background(), tc.input(now))
		res := CaseResult{
			Name:   tc.Name,
			Want:   Outcome{Decision: tc.Expect},
			Got:    Outcome{Decision: "deny", Policies: sortedCopy(d.PolicyIDs)},
			Reason: d.Reason,
			Errors: d.Errors,
		}
		if d.Allow {
			res.Got.Decision = "allow"
		}
		res.Pass = res.Got.Decision == res.Want.Decision
		if tc.Policies != nil {
			res.Want.Policies = sortedCopy(tc.Policies)
			res.Pass = res.Pass && slices.Equal(res.Want.Policies, res.Got.Policies)
		}
		rep.Cases = append(rep.Cases, res)
	}
	return rep, nil
}

func sortedCopy(s []string) []string {
	out := make([]string, len(s))
	copy(out, s)
	slices.Sort(out)
	return out
}

// check reports every malformed case at once (what parseTestFile cannot see: missing keys,
// values out of their sets, conflicts).
func (tf *testFile) check(dirGiven bool) []fileProblem {
	var errs []fileProblem
	if tf.Policies == "" && !dirGiven {
		errs = append(errs, fileProblem{key: "policies", msg: "required (the policy directory, relative to this file)"})
	}
	if len(tf.Cases) == 0 {
		errs = append(errs, fileProblem{key: "cases", msg: "no cases"})
	}
	names := map[string]bool{}
	for i, c := range tf.Cases {
		bad := func(key, format string, args ...any) {
			errs = append(errs, fileProblem{where: caseLabel(i, c.Name), key: key, msg: fmt.Sprintf(format, args...)})
		}
		switch {
		case c.Name == "":
			bad("name", "required")
		case names[c.Name]:
			bad("name", "duplicate name")
		}
		names[c.Name] = true
		if c.Principal == "" {
			bad("principal", "required")
		} else if _, err := spiffeid.FromString(c.Principal); err != nil {
			bad("principal", "%q is not a SPIFFE ID (spiffe://<trust domain>/<path>): %v", c.Principal, err)
		}
		switch c.Expect {
		case "allow", "deny":
		case "":
			bad("expect", "required: allow or deny")
		default:
			bad("expect", "must be allow or deny, not %q", c.Expect)
		}
		if ci := c.Identity; ci != nil && ci.Source != "" && ci.Source != attest.SourceSPIFFE && ci.Source != attest.SourceStatic {
			bad("identity.source", "must be %s or %s, not %q", attest.SourceSPIFFE, attest.SourceStatic, ci.Source)
		}
		r := c.Request
		if r.Host == "" {
			bad("request.host", "required")
		}
		_, isMCP := mcpResourceTypes[r.Action]
		switch {
		case r.Action != "" && r.Action != ActionConnect && !isMCP:
			bad("request.action", "must be %s, %s, %s or %s (use request.method for HTTP methods), not %q",
				ActionConnect, ActionToolsCall, ActionResourcesRead, ActionPromptsGet, r.Action)
		case r.Action != "" && r.Method != "":
			bad("request", "has both action and method")
		case r.Action == "" && r.Method == "":
			bad("request", "needs a method (or an action: connect, tools/call, resources/read, prompts/get)")
		}
		switch {
		case isMCP && r.Name == "":
			bad("request.name", "required for %s (the tool or prompt name, or the resource URI)", r.Action)
		case !isMCP && r.Name != "":
			bad("request.name", "only for the MCP actions (tools/call, resources/read, prompts/get)")
		case !isMCP && r.Arguments != nil:
			bad("request.arguments", "only for the MCP actions (tools/call, resources/read, prompts/get)")
		}
		if r.Scheme != "" && r.Scheme != "http" && r.Scheme != "https" {
			bad("request.scheme", "must be http or https, not %q", r.Scheme)
		}
		if r.Port < 0 || r.Port > 65535 {
			bad("request.port", "%d is out of range (1-65535; 0 or absent for the scheme's default)", r.Port)
		}
	}
	return errs
}

func caseLabel(i int, name string) string {
	if name == "" {
		return fmt.Sprintf("case %d", i+1)
	}
	return fmt.Sprintf("case %d (%q)", i+1, name)
}

func (c testCase) input(defaultTime time.Time) Input {
	t := defaultTime
	if c.Time != nil {
		t = *c.Time
	}
	id := attest.Identity{
		SPIFFEID:    c.Principal,
		TrustDomain: trustDomainOf(c.Principal),
		Attested:    true,
		Source:      attest.SourceSPIFFE,
	}
	expiresIn := int64(3600)
	if ci := c.Identity; ci != nil {
		if ci.Attested != nil {
			id.Attested = *ci.Attested
			if !id.Attested {
				id.Source = attest.SourceStatic
			}
		}
		if ci.Source != "" {
			id.Source = ci.Source
		}
		if ci.ExpiresInS != nil {
			expiresIn = *ci.ExpiresInS
		}
	}
	if id.Source != attest.SourceStatic {
		id.ExpiresAt = t.Add(time.Duration(expiresIn) * time.Second)
	}
	r := c.Request
	in := Input{
		Identity:   id,
		Action:     r.Method,
		Scheme:     r.Scheme,
		Host:       r.Host,
		Port:       r.Port,
		Path:       r.Path,
		Credential: r.Credential,
		Time:       t,
	}
	in.Caller, in.Delegation, in.Upgrade = c.Caller, c.Delegation, r.Upgrade
	if r.Action == ActionConnect {
		in.Action = ActionConnect
	}
	if typ, ok := mcpResourceTypes[r.Action]; ok {
		in.Action = r.Action
		in.Resource = Resource{Type: typ, ID: r.Host + "/" + r.Name}
		in.MCP = &MCPCall{Method: r.Action, Name: r.Name, Arguments: r.Arguments}
	}
	if in.Scheme == "" {
		in.Scheme = "https"
	}
	if in.Port == 0 {
		in.Port = 443
		if in.Scheme == "http" {
			in.Port = 80
		}
	}
	return in
}
