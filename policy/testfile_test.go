package policy

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRunTests_AllPass(t *testing.T) {
	rep, err := RunTests("testdata/policies.test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Cases) != 12 || !rep.OK() || rep.Passed() != 12 || rep.Version == "" {
		for _, c := range rep.Cases {
			t.Log(c)
		}
		t.Fatalf("report: %d cases, %d passed, version %q", len(rep.Cases), rep.Passed(), rep.Version)
	}
	if rep.PolicyDir != filepath.Join("testdata", "policies") {
		t.Errorf("PolicyDir = %q, want it relative to the test file", rep.PolicyDir)
	}
}

func TestRunTests_FailingCaseReportsGotAndWant(t *testing.T) {
	rep, err := RunTests("testdata/failing.test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Passed() != 1 || rep.Failed() != 1 {
		t.Fatalf("report: %+v", rep)
	}
	c := rep.Cases[1]
	if c.Pass || c.Name != "wrong expectation about delete" {
		t.Fatalf("case = %+v", c)
	}
	if c.Got.String() != "deny [forbid-github-delete]" || c.Want.String() != "allow [allow-github-read]" || c.Reason != ReasonDenied {
		t.Fatalf("got %q want %q reason %s", c.Got, c.Want, c.Reason)
	}
	if s := c.String(); !strings.HasPrefix(s, "FAIL wrong expectation about delete: got deny [forbid-github-delete] (policy_denied), want allow [allow-github-read]") {
		t.Fatalf("String() = %q", s)
	}
	// The right decision with the wrong determining policy also fails.
	dir := t.TempDir()
	file := filepath.Join(dir, "t.yaml")
	writeFiles(t, dir, map[string]string{"t.yaml": `
policies: ` + absTestdata(t) + `
cases:
  - name: right decision, wrong policy
    principal: spiffe://example.org/ns/agents/sa/coder
    request: {method: GET, host: api.github.com, credential: github}
    expect: allow
    policies: [some-other-policy]
`})
	rep, err = RunTests(file)
	if err != nil || rep.OK() {
		t.Fatalf("RunTests = %+v, %v", rep, err)
	}
}

func absTestdata(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs("testdata/policies")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRunTests_JSONFileAndPolicyDirOverride(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"t.json": `{"policies": "does-not-exist", "cases": [
	  {"name": "tunnel", "principal": "spiffe://example.org/ns/agents/sa/coder",
	   "request": {"action": "connect", "host": "pypi.org", "port": 443}, "expect": "allow"}]}`})
	rep, err := RunTests(filepath.Join(dir, "t.json"), WithPolicyDir(absTestdata(t)))
	if err != nil || !rep.OK() || len(rep.Cases) != 1 {
		t.Fatalf("RunTests = %+v, %v", rep, err)
	}
}

func TestRunTests_BadFile(t *testing.T) {
	if _, err := RunTests("testdata/unknown-key.test.yaml"); err == nil || !strings.HasSuffix(err.Error(), `: case 1 ("typo"): expected: unknown key (did you mean expect?)`) {
		t.Fatalf("unknown key: err = %v", err)
	}
	if _, err := RunTests("testdata/no-such.test.yaml"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: err = %v", err)
	}
	dir := t.TempDir()
	for name, tc := range map[string]struct{ body, want string }{
		"not yaml":          {"cases: [", "yaml"},
		"no cases":          {"policies: " + absTestdata(t) + "\ncases: []\n", "cases: no cases"},
		"no policies":       {"cases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h}, expect: allow}\n", "policies: required"},
		"bad expect":        {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h}, expect: allowed}\n", `case 1 ("a"): expect: must be allow or deny, not "allowed"`},
		"no host":           {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET}, expect: allow}\n", `case 1 ("a"): request.host: required`},
		"method and act":    {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, action: connect, host: h}, expect: allow}\n", `case 1 ("a"): request: has both action and method`},
		"bad action":        {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {action: GET, host: h}, expect: allow}\n", `case 1 ("a"): request.action: must be connect, tools/call, resources/read or prompts/get (use request.method for HTTP methods), not "GET"`},
		"tool without name": {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {action: tools/call, host: h}, expect: allow}\n", `case 1 ("a"): request.name: required for tools/call`},
		"name on GET":       {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h, name: x}, expect: allow}\n", `case 1 ("a"): request.name: only for the MCP actions`},
		"arguments as text": {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {action: tools/call, name: t, host: h, arguments: x}, expect: allow}\n", `case 1 ("a"): request.arguments: must be a mapping`},
		"caller uid text":   {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, caller: {uid: root}, request: {method: GET, host: h}, expect: allow}\n", `case 1 ("a"): caller.uid: must be a whole number, not the string "root"`},
		"duplicate name":    {"policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h}, expect: allow}\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h}, expect: allow}\n", `case 2 ("a"): name: duplicate name`},
		"bad policies dir":  {"policies: nope\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h}, expect: allow}\n", "no such file"},
		"broken policies":   {"policies: broken\ncases:\n  - {name: a, principal: spiffe://x/y, request: {method: GET, host: h}, expect: allow}\n", "@id"},
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.MkdirAll(filepath.Join(dir, "broken"), 0o755); err != nil {
				t.Fatal(err)
			}
			writeFiles(t, filepath.Join(dir, "broken"), map[string]string{"a.cedar": "permit(principal, action, resource);"})
			writeFiles(t, dir, map[string]string{"t.yaml": tc.body})
			_, err := RunTests(filepath.Join(dir, "t.yaml"))
			if err == nil || !strings.HasPrefix(err.Error(), "policy: ") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

// Every mistake of a test file is reported at once, each with the case number (and name) and
// the YAML key, in YAML terms: no "error unmarshaling JSON", no Go types.
func TestRunTests_ReportsEveryMistakeWithCaseAndKey(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"t.yaml": `
policies: ` + absTestdata(t) + `
tme: 2026-01-01T00:00:00Z
cases:
  - name: typo in a request key
    principal: spiffe://example.org/ns/agents/sa/coder
    request: {method: GET, host: api.github.com, prot: 443}
    expect: allow
  - name: port as text
    principal: spiffe://example.org/ns/agents/sa/coder
    request: {method: GET, host: api.github.com, port: "443x"}
    expect: allow
  - name: not a SPIFFE ID
    principal: coder
    request: {method: GET, host: api.github.com}
    expect: allow
  - principal: spiffe://example.org/ns/agents/sa/coder
    request: {method: GET, host: api.github.com}
    expct: deny
  - name: bad identity and time
    principal: spiffe://example.org/ns/agents/sa/coder
    identity: {attested: yes please, expires_in_s: 1.5, sorce: spiffe}
    time: tomorrow
    request: {method: GET, host: api.github.com}
    expect: allow
    policies: allow-github-read
`})
	_, err := RunTests(filepath.Join(dir, "t.yaml"))
	if err == nil {
		t.Fatal("a broken test file ran")
	}
	msg := err.Error()
	for _, want := range []string{
		"11 problems:",
		"\n\ttme: unknown key (did you mean time?)",
		"\n\tcase 1 (\"typo in a request key\"): request.prot: unknown key (did you mean port?)",
		"\n\tcase 2 (\"port as text\"): request.port: must be a whole number, not the string \"443x\"",
		"\n\tcase 3 (\"not a SPIFFE ID\"): principal: \"coder\" is not a SPIFFE ID",
		"\n\tcase 4: expct: unknown key (did you mean expect?)",
		"\n\tcase 4: name: required",
		"\n\tcase 5 (\"bad identity and time\"): identity.attested: must be true or false, not the string \"yes please\"",
		"\n\tcase 5 (\"bad identity and time\"): identity.expires_in_s: must be a whole number, not the number 1.5",
		"\n\tcase 5 (\"bad identity and time\"): identity.sorce: unknown key (did you mean source?)",
		"\n\tcase 5 (\"bad identity and time\"): time: must be an RFC 3339 time such as 2026-01-05T09:30:00Z, not the string \"tomorrow\"",
		"\n\tcase 5 (\"bad identity and time\"): policies: must be a list of strings, not the string \"allow-github-read\"",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q", want)
		}
	}
	for _, never := range []string{"JSON", "json", "unmarshal", "int64", "Go value", "expect: required"} {
		if strings.Contains(msg, never) {
			t.Errorf("error says %q:\n%s", never, msg)
		}
	}
	if t.Failed() {
		t.Log(msg)
	}
}

// A key written twice keeps only its last value in YAML: a case would test something other
// than what its author reads. Each is reported like every other mistake, with both places.
func TestRunTests_DuplicateKeysAreReportedWithCaseKeyAndPositions(t *testing.T) {
	msg := runTestFileErr(t, `policies: `+absTestdata(t)+`
cases:
  - name: delete is allowed
    principal: spiffe://example.org/ns/agents/sa/coder
    request: {method: DELETE, host: api.github.com, method: GET}
    expect: deny
    expect: allow
policies: elsewhere
`)
	for _, want := range []string{
		"3 problems:",
		"\n\tpolicies: duplicate key at line 8, column 1 (first at line 1, column 1)",
		"\n\tcase 1 (\"delete is allowed\"): request.method: duplicate key at line 5, column 53 (first at line 5, column 15)",
		"\n\tcase 1 (\"delete is allowed\"): expect: duplicate key at line 7, column 5 (first at line 6, column 5)",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
}

func TestRunTests_ASecondDocumentIsRefusedNotIgnored(t *testing.T) {
	one := "policies: " + absTestdata(t) + "\ncases:\n  - {name: a, principal: spiffe://example.org/ns/agents/sa/coder, request: {method: GET, host: api.github.com, credential: github}, expect: allow}\n"
	if msg := runTestFileErr(t, one+"---\n"+strings.ReplaceAll(one, "expect: allow", "expect: deny")); !strings.Contains(msg, "not valid YAML: yaml: line 4: a second document") {
		t.Fatalf("err = %v", msg)
	}
}

// uid and gid are 32-bit and unsigned, pid a positive int: a value outside used to wrap
// around silently (uid -1 tested as 4294967295).
func TestRunTests_CallerIDsOutsideTheirRangeAreRefused(t *testing.T) {
	msg := runTestFileErr(t, `policies: `+absTestdata(t)+`
cases:
  - name: a
    principal: spiffe://example.org/ns/agents/sa/coder
    caller: {uid: -1, gid: 4294967296, pid: 2147483648}
    request: {method: GET, host: api.github.com}
    expect: deny
`)
	for _, want := range []string{
		"3 problems:\n\tcase 1 (\"a\"): caller.uid: must be a whole number from 0 to 4294967295, not -1",
		"\n\tcase 1 (\"a\"): caller.gid: must be a whole number from 0 to 4294967295, not 4294967296",
		"\n\tcase 1 (\"a\"): caller.pid: must be a whole number from 0 to 2147483647, not 2147483648",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	tf, problems, ok := parseTestFile([]byte("cases:\n  - caller: {uid: 4294967295, gid: 0, pid: 2147483647}\n"))
	if c := tf.Cases[0].Caller; !ok || len(problems) != 0 || c.UID != 4294967295 || c.GID != 0 || c.PID != 2147483647 {
		t.Errorf("the bounds themselves: %+v %v", c, problems)
	}
}

// runTestFileErr runs a test file with this body and returns its error, which it must have.
func runTestFileErr(t *testing.T, body string) string {
	t.Helper()
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"t.yaml": body})
	_, err := RunTests(filepath.Join(dir, "t.yaml"))
	if err == nil {
		t.Fatalf("a bad test file ran:\n%s", body)
	}
	return err.Error()
}
