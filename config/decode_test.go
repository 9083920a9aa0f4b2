package config

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestParse_WronglyTypedDurationDoesNotHideTheRestOfTheDocument(t *testing.T) {
	// egress sorts first: a decoder that stops at its bad value loses every key after it.
	got := parseErr(t, `
egress: {dial_timeout: 10}
identity: {static: spiffe://example.org/a}
listen: 0.0.0.0:15480
policy: {dir: policies}
upstreams:
  - {host: "bad host!"}
`)
	wantAll(t, got,
		`egress.dial_timeout: want a duration string such as "2s"`,
		"listen: \"0.0.0.0\" is not a loopback address",
		"upstreams[0].host: want a host name",
	)
	for _, false_ := range []string{"policy.dir", "identity:"} {
		if strings.Contains(got, false_) {
			t.Errorf("false error %q (the key is there):\n%s", false_, got)
		}
	}
}

func TestParse_EveryTypeErrorIsReportedAndTheRestStillValidated(t *testing.T) {
	for _, doc := range []string{
		"leaf_ttl: 1d\npolicy: {dir: policies}\n",
		"policy: {dir: policies, reload_interval: 5}\n",
		"audit: {flush_interval: [1]}\npolicy: {dir: policies}\n",
		"policy: {dir: policies}\nupstreams: [{host: a.example, response_timeout: 30}, {host: b.example, credential: nope}]\n",
		"policy: {dir: policies}\ncredentials: {s3: {aws: {region: us-east-1, duration: 3600}}}\n",
	} {
		rest := "upstreams: [{host: b.example, credential: nope}]\n"
		if strings.Contains(doc, "upstreams:") {
			rest = ""
		}
		got := parseErr(t, doc+`
identity: {static: spiffe://example.org/a}
`+rest)
		wantAll(t, got, `upstreams[`, `credential: no credential named "nope"`)
		if strings.Contains(got, "policy.dir: required") {
			t.Errorf("%s: false policy.dir error:\n%s", doc, got)
		}
	}
}

// strictish is a type with its own UnmarshalJSON and no CheckShape: the decoder must still
// report its error at its path and go on.
type strictish struct{ v int }

func (s *strictish) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	if string(b) != `"ok"` {
		return errors.New(`want "ok"`)
	}
	s.v = 1
	return nil
}

func TestDecode_CustomUnmarshalerErrorIsAPathErrorNotTheEnd(t *testing.T) {
	var out struct {
		A    strictish   `json:"a"`
		B    string      `json:"b"`
		L    []strictish `json:"l"`
		Z    string      `json:"z"`
		Good strictish   `json:"good"`
	}
	shape, err := Decode([]byte("a: 5\nb: kept\nl: [ok, 7]\nz: also kept\ngood: ok\n"), &out)
	if err != nil {
		t.Fatal(err)
	}
	got := shape.Error()
	wantAll(t, got, `a: want "ok"`, `l[1]: want "ok"`)
	if len(shape) != 2 {
		t.Errorf("want 2 errors, got %v", shape)
	}
	if out.B != "kept" || out.Z != "also kept" || out.Good.v != 1 || len(out.L) != 2 || out.L[0].v != 1 {
		t.Errorf("the rest was not decoded: %+v", out)
	}
	var _ json.Unmarshaler = (*strictish)(nil)
}

func TestParse_NullDurationIsTheDefaultAndStopsNothing(t *testing.T) {
	// "leaf_ttl:" with no value is YAML null: the default, not an error, and not the end.
	c, err := Parse([]byte("leaf_ttl:\negress: {dial_timeout: ~}\n" + minimal))
	if err != nil {
		t.Fatal(err)
	}
	if c.LeafTTL.D() != DefaultLeafTTL || c.Egress.DialTimeout.D() != DefaultDialTimeout || c.Policy.Dir != "policies" {
		t.Errorf("leaf_ttl %v dial_timeout %v policy.dir %q", c.LeafTTL.D(), c.Egress.DialTimeout.D(), c.Policy.Dir)
	}
}

func TestParse_CredentialOnPlainHTTPPortIsReportedUnlessUnsafe(t *testing.T) {
	doc := minimal + "credentials: {k: {static: {env: K}}}\nupstreams:\n"
	got := parseErr(t, doc+"  - {host: a.example, port: 80, credential: k}\n")
	wantAll(t, got, "upstreams[0].port: port 80 is plain HTTP", "every request would be refused", "unsafe_plaintext_credential: true")
	for _, ok := range []string{
		"  - {host: a.example, port: 80, credential: k, unsafe_plaintext_credential: true}\n",
		"  - {host: a.example, port: 80}\n", // no credential: nothing to leak
		"  - {host: a.example, credential: k}\n",
		"  - {host: a.example, port: 8443, credential: k}\n",
	} {
		if got := parseErr(t, doc+ok); got != "" {
			t.Errorf("%s: %s", strings.TrimSpace(ok), got)
		}
	}
}

func TestParse_PortErrorsStateTheRealRange(t *testing.T) {
	got := parseErr(t, minimal+"listen: 127.0.0.1:70000\nupstreams: [{host: a.example, port: 70000}]\n")
	wantAll(t, got,
		`listen: invalid port "70000": want 1-65535, or 0 for any free port`,
		"upstreams[0].port: must be 1-65535, or omit it for the scheme's default",
	)
	if got := parseErr(t, minimal+"listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstreams: [{host: a.example, port: 0}]\n"); got != "" {
		t.Errorf("port 0 (any free port / the default) refused: %s", got)
	}
}

func TestParse_MinimumsAreStatedInTheErrors(t *testing.T) {
	got := parseErr(t, identityOnly+"leaf_ttl: 30s\npolicy: {dir: p, reload_interval: 10ms}\n")
	wantAll(t, got, "leaf_ttl: must be at least 1m", "policy.reload_interval: must be at least 100ms")
}

func TestParse_UnknownCredentialNameGetsDidYouMean(t *testing.T) {
	got := parseErr(t, minimal+`
credentials: {openai: {static: {env: K}}, github: {static: {env: G}}}
upstreams:
  - {host: a.example, credential: opneai}
  - {host: b.example, credential: something-else}
`)
	wantAll(t, got, `upstreams[0].credential: no credential named "opneai" in credentials (did you mean "openai"?)`)
	if strings.Contains(got, `"something-else" in credentials (did you mean`) {
		t.Errorf("a far name got a suggestion:\n%s", got)
	}
}

// A key written twice used to be decided silently by the last value (a second credential: under
// an upstream replaced the first); it is an error naming both places, and the rest of the file
// is still checked.
func TestParse_AKeyWrittenTwiceIsAnErrorNamingBothPlaces(t *testing.T) {
	got := parseErr(t, identityOnly+`policy: {dir: policies}
upstreams:
  - host: a.example
    credential: k
    credential: other
  - {host: b.example, credential: nope}
credentials:
  k: {static: {env: K}}
`)
	wantAll(t, got,
		"upstreams[0].credential: duplicate key at line 7, column 5 (first at line 6, column 5)",
		`upstreams[1].credential: no credential named "nope"`,
	)
}

// A name YAML 1.1 reads as a boolean (credential: no, host: y) gets a hint to quote it.
func TestParse_AStringThatYAMLReadsAsABooleanGetsAQuoteHint(t *testing.T) {
	got := parseErr(t, identityOnly+"policy: {dir: policies}\nupstreams: [{host: a.example, credential: no}]\ncredentials: {\"no\": {static: {env: K}}}\n")
	wantAll(t, got, `upstreams[0].credential: want a string, got a boolean (YAML reads unquoted`, `quote the value`)
}
