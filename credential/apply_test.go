package credential

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/config"
)

func newRequest(t testing.TB, rawURL string) *http.Request {
	t.Helper()
	r, err := http.NewRequest(http.MethodGet, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// Injections as config compiles them (config has validated and split the template).
var (
	bearer = config.Injection{Kind: config.InjectHeader, Header: "Authorization", Prefix: "Bearer "}
	apiKey = config.Injection{Kind: config.InjectHeader, Header: "X-Api-Key"}
	basicU = config.Injection{Kind: config.InjectBasic, Header: "Authorization", Username: "user"}
	queryK = config.Injection{Kind: config.InjectQuery, Param: "key"}
)

func mustApplier(t testing.TB, in config.Injection) Applier {
	t.Helper()
	a, err := NewApplier(in)
	if err != nil {
		t.Fatalf("NewApplier(%+v): %v", in, err)
	}
	return a
}

// mustApply applies tok and fails the test on an error.
func mustApply(t testing.TB, a Applier, r *http.Request, tok Token) {
	t.Helper()
	if err := a.Apply(r, tok); err != nil {
		t.Fatalf("Apply: %v", err)
	}
}

// keysFold returns the header keys equal to name in any case, with their values.
func keysFold(h http.Header, name string) map[string][]string {
	out := map[string][]string{}
	for k, v := range h {
		if strings.EqualFold(k, name) {
			out[k] = v
		}
	}
	return out
}

func TestApply_ReplacesAgentAuthorization(t *testing.T) {
	r := newRequest(t, "https://api.openai.com/v1/models")
	r.Header.Add("Authorization", "Bearer agent-fake-1")
	r.Header.Add("Authorization", "Bearer agent-fake-2")
	r.Header["authorization"] = []string{"Bearer agent-lower"} // non-canonical key, set directly
	r.Header["AUTHORIZATION"] = []string{"Bearer agent-upper"}
	r.Header.Set("Accept", "application/json")

	mustApply(t, mustApplier(t, bearer), r, NewToken("openai", secretValue, time.Time{}))

	got := keysFold(r.Header, "Authorization")
	if len(got) != 1 || len(got["Authorization"]) != 1 || got["Authorization"][0] != "Bearer "+secretValue {
		t.Errorf("Authorization headers after Apply: %q; want exactly one, the real credential", got)
	}
	if r.Header.Get("Accept") != "application/json" {
		t.Errorf("unrelated header lost")
	}
}

func TestApply_StripsProxyAuthorization(t *testing.T) {
	for _, in := range []config.Injection{bearer, apiKey, basicU, queryK} {
		r := newRequest(t, "https://example.com/")
		r.Header.Set("Proxy-Authorization", "Bearer delegation-jwt")
		r.Header["proxy-authorization"] = []string{"Basic agent"}
		mustApply(t, mustApplier(t, in), r, NewToken("n", secretValue, time.Time{}))
		if got := keysFold(r.Header, "Proxy-Authorization"); len(got) != 0 {
			t.Errorf("%v: Proxy-Authorization survived: %q", in.Kind, got)
		}
	}
}

func TestApply_StripsAgentAuthorizationForEveryMethod(t *testing.T) {
	for _, in := range []config.Injection{apiKey, queryK} {
		r := newRequest(t, "https://example.com/")
		r.Header.Set("Authorization", "Bearer agent-fake")
		mustApply(t, mustApplier(t, in), r, NewToken("n", secretValue, time.Time{}))
		if got := keysFold(r.Header, "Authorization"); len(got) != 0 {
			t.Errorf("%+v: agent's Authorization survived: %q", in, got)
		}
	}
}

func TestApply_ReplacesConfiguredHeaderInAnyCase(t *testing.T) {
	r := newRequest(t, "https://api.anthropic.com/v1/messages")
	r.Header.Add("X-Api-Key", "agent-1")
	r.Header["x-api-key"] = []string{"agent-2"}
	r.Header["X-API-KEY"] = []string{"agent-3", "agent-4"}
	r.Header.Set("Anthropic-Version", "2023-06-01")

	mustApply(t, mustApplier(t, apiKey), r, NewToken("anthropic", secretValue, time.Time{}))

	got := keysFold(r.Header, "X-Api-Key")
	if len(got) != 1 || len(got["X-Api-Key"]) != 1 || got["X-Api-Key"][0] != secretValue {
		t.Errorf("X-Api-Key after Apply: %q; want exactly one canonical key with the real value", got)
	}
	if r.Header.Get("Anthropic-Version") != "2023-06-01" {
		t.Errorf("unrelated header lost")
	}
}

func TestApply_PrefixAndSuffix(t *testing.T) {
	for _, c := range []struct{ prefix, suffix, want string }{
		{"Bearer ", "", "Bearer S"},
		{"token ", "", "token S"},
		{"", "", "S"},
		{"key=", "; v=1", "key=S; v=1"},
		{"", " }x", "S }x"},
	} {
		r := newRequest(t, "https://example.com/")
		in := config.Injection{Kind: config.InjectHeader, Header: "Authorization", Prefix: c.prefix, Suffix: c.suffix}
		mustApply(t, mustApplier(t, in), r, NewToken("n", "S", time.Time{}))
		if got := r.Header.Values("Authorization"); len(got) != 1 || got[0] != c.want {
			t.Errorf("%q {{.Token}} %q: got %q, want %q", c.prefix, c.suffix, got, c.want)
		}
	}
}

func TestNewApplier_RefusesUnknownKindAndMissingField(t *testing.T) {
	for name, in := range map[string]config.Injection{
		"unknown kind":        {Kind: config.InjectKind(42), Header: "Authorization"},
		"header without name": {Kind: config.InjectHeader, Prefix: "Bearer "},
		"query without param": {Kind: config.InjectQuery},
	} {
		if a, err := NewApplier(in); err == nil || !strings.HasPrefix(err.Error(), "credential: ") {
			t.Errorf("%s: NewApplier(%+v) = %+v, %v; want a credential: error", name, in, a, err)
		}
	}
}

// TestNewApplier_TrustsConfigValidation: the template and header syntax are config's to check,
// once; NewApplier takes what it is given (the apply-time value check still guards the wire).
func TestNewApplier_TrustsConfigValidation(t *testing.T) {
	in := config.Injection{Kind: config.InjectHeader, Header: "X-Key", Prefix: "{{", Suffix: "}}"}
	r := newRequest(t, "https://example.com/")
	mustApply(t, mustApplier(t, in), r, NewToken("n", "S", time.Time{}))
	if got := r.Header.Get("X-Key"); got != "{{S}}" {
		t.Errorf("got %q", got)
	}
}

func TestApply_Basic(t *testing.T) {
	r := newRequest(t, "https://registry.example.com/")
	r.SetBasicAuth("agent", "fake")
	r.Header["authorization"] = []string{"Bearer other"}
	in := config.Injection{Kind: config.InjectBasic, Header: "Authorization", Username: "deploy"}
	mustApply(t, mustApplier(t, in), r, NewToken("reg", "p:ss w0rd", time.Time{}))
	if got := keysFold(r.Header, "Authorization"); len(got) != 1 || len(got["Authorization"]) != 1 {
		t.Fatalf("Authorization headers: %q", got)
	}
	v := r.Header.Get("Authorization")
	want := "Basic " + base64.StdEncoding.EncodeToString([]byte("deploy:p:ss w0rd"))
	if v != want {
		t.Errorf("got %q, want %q", v, want)
	}
	if u, p, ok := r.BasicAuth(); !ok || u != "deploy" || p != "p:ss w0rd" {
		t.Errorf("BasicAuth() = %q %q %v", u, p, ok)
	}
}

func TestApply_QueryParamReplacesAgentValue(t *testing.T) {
	r := newRequest(t, "https://maps.example.com/geo?api_key=agent&x=1&API_KEY=2&api%5Fkey=3&y=a%20b;api_key=4&z&api+key=5&api_key")
	r.Header.Set("Authorization", "Bearer agent")
	in := config.Injection{Kind: config.InjectQuery, Param: "api_key"}
	mustApply(t, mustApplier(t, in), r, NewToken("maps", "s3cr&t=+/ value", time.Time{}))

	if want := "x=1&y=a%20b&z&api+key=5&api_key=s3cr%26t%3D%2B%2F+value"; r.URL.RawQuery != want {
		t.Errorf("RawQuery = %q\n                 want %q", r.URL.RawQuery, want)
	}
	q := r.URL.Query()
	if got := q["api_key"]; len(got) != 1 || got[0] != "s3cr&t=+/ value" {
		t.Errorf("api_key values: %q; want exactly the real one", got)
	}
	if q.Get("x") != "1" || q.Get("y") != "a b" {
		t.Errorf("other parameters changed: %v", q)
	}
	if len(r.Header.Values("Authorization")) != 0 {
		t.Errorf("agent's Authorization survived")
	}
}

func TestApply_QueryOnEmptyQuery(t *testing.T) {
	for raw, want := range map[string]string{
		"https://e.com/p":              "key=S",
		"https://e.com/p?":             "key=S",
		"https://e.com/p?key=agent":    "key=S",
		"https://e.com/p?a=1&":         "a=1&key=S",
		"https://e.com/p?&&a=1&&b=2&;": "a=1&b=2&key=S",
	} {
		r := newRequest(t, raw)
		mustApply(t, mustApplier(t, queryK), r, NewToken("n", "S", time.Time{}))
		if r.URL.RawQuery != want {
			t.Errorf("%s: RawQuery %q, want %q", raw, r.URL.RawQuery, want)
		}
	}
}

// TestApply_RefusesTokenWithCRLF: a value that would split a header is an error (so the proxy
// denies with credential_unavailable), the agent's credentials are gone, and nothing is set.
func TestApply_RefusesTokenWithCRLF(t *testing.T) {
	a := mustApplier(t, config.Injection{Kind: config.InjectHeader, Header: "X-Api-Key", Prefix: "key "})
	for _, v := range []string{"abc\r\nX-Injected: 1", "abc\n", "abc\x00def", "abc\rdef"} {
		r := newRequest(t, "https://example.com/")
		r.Header.Set("X-Api-Key", "agent")
		r.Header.Set("Authorization", "Bearer agent")
		err := a.Apply(r, NewToken("n", v, time.Time{}))
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "control character") {
			t.Errorf("%q: Apply error %v; want ErrUnavailable about a control character", v, err)
		}
		if err != nil && (strings.Contains(err.Error(), "abc") || strings.Contains(err.Error(), "X-Injected")) {
			t.Errorf("%q: error reveals the value: %v", v, err)
		}
		for k, vs := range r.Header {
			for _, hv := range vs {
				if strings.ContainsAny(k+hv, "\r\n\x00") {
					t.Errorf("%q: header %q: %q contains a control character", v, k, hv)
				}
			}
		}
		if len(keysFold(r.Header, "X-Api-Key")) != 0 || len(keysFold(r.Header, "Authorization")) != 0 {
			t.Errorf("%q: want no credential header at all (agent's stripped, the bad one not set): %q", v, r.Header)
		}
		var buf bytes.Buffer
		if err := r.Write(&buf); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(buf.String(), "X-Injected") {
			t.Errorf("%q: wire form carries the injected header:\n%s", v, buf.String())
		}
	}
}

// TestApply_RefusesTokenWithoutSingleValue: a zero or multi-part token on a single-value route
// (a misconfigured route, a caller bug) fails rather than sending no credential; the agent's
// credentials are stripped either way.
func TestApply_RefusesTokenWithoutSingleValue(t *testing.T) {
	parts := NewTokenParts("aws", map[string]string{"access_key_id": "AKIDEXAMPLE", "secret_access_key": secretValue}, time.Time{})
	for _, in := range []config.Injection{bearer, apiKey, basicU, queryK} {
		for _, tok := range []Token{{}, parts} {
			r := newRequest(t, "https://example.com/?key=agent")
			r.Header.Set("Authorization", "Bearer agent")
			r.Header.Set("X-Api-Key", "agent")
			err := mustApplier(t, in).Apply(r, tok)
			if !errors.Is(err, ErrUnavailable) || strings.Contains(err.Error(), secretValue) {
				t.Errorf("%v %v: error %v; want ErrUnavailable without the secret", in.Kind, tok, err)
			}
			if len(keysFold(r.Header, "Authorization")) != 0 ||
				(in.Kind == config.InjectQuery && strings.Contains(r.URL.RawQuery, "key=")) ||
				(in.Kind == config.InjectHeader && len(keysFold(r.Header, in.Header)) != 0) {
				t.Errorf("%v %v: a credential is left: %q %q", in.Kind, tok, r.Header, r.URL.RawQuery)
			}
		}
	}
}

func TestApply_FollowsRotatedToken(t *testing.T) {
	for _, in := range []config.Injection{bearer, basicU, queryK} {
		a := mustApplier(t, in)
		for i, v := range []string{"first", "second", "second", "first"} {
			r := newRequest(t, "https://example.com/")
			mustApply(t, a, r, NewToken("n", v, time.Time{}))
			got := r.Header.Get("Authorization") + r.URL.RawQuery
			if _, p, _ := r.BasicAuth(); p != "" {
				got = p
			}
			if !strings.Contains(got, v) {
				t.Errorf("%v apply %d: %q does not carry %q (stale render cache?)", in.Kind, i, got, v)
			}
		}
	}
}

func TestApply_WireFormHasExactlyOneCredential(t *testing.T) {
	r := newRequest(t, "https://api.github.com/user")
	r.Header.Set("Authorization", "token agent")
	r.Header["authorization"] = []string{"token agent2"}
	in := config.Injection{Kind: config.InjectHeader, Header: "Authorization", Prefix: "token "}
	mustApply(t, mustApplier(t, in), r, NewToken("gh", secretValue, time.Time{}))
	var buf bytes.Buffer
	if err := r.Write(&buf); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(strings.ToLower(buf.String()), "\r\nauthorization:"); n != 1 {
		t.Errorf("%d Authorization lines on the wire:\n%s", n, buf.String())
	}
	back, err := http.ReadRequest(bufio.NewReader(&buf))
	if err != nil {
		t.Fatal(err)
	}
	if got := back.Header.Values("Authorization"); len(got) != 1 || got[0] != "token "+secretValue {
		t.Errorf("parsed back: %q", got)
	}
}

// validToken mirrors what config guarantees of a header name (an RFC 9110 token) so the fuzzer
// explores only injections config can produce.
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

func FuzzApplier(f *testing.F) {
	f.Add(uint8(0), "Authorization", "Bearer ", "", "", "", secretValue, "X-Agent")
	f.Add(uint8(0), "x-api-key", "", "", "", "", "a\r\nb", "X-API-KEY")
	f.Add(uint8(0), "X-K", "pre ", " post", "", "", "\x00\n", "authorization")
	f.Add(uint8(0), "X-K", "a\r\n", "", "", "", "v", "")
	f.Add(uint8(1), "", "", "", "user", "", "p\r\nw", "proxy-authorization")
	f.Add(uint8(2), "", "", "", "", "api_key", "v&x=1\n", "Api_Key")
	f.Add(uint8(2), "", "", "", "", "k;e%y", "%zz", "")
	f.Fuzz(func(t *testing.T, kind uint8, header, prefix, suffix, user, param, value, agentHeader string) {
		in := config.Injection{Kind: config.InjectKind(kind % 4), Prefix: prefix, Suffix: suffix, Username: user, Param: param}
		switch in.Kind {
		case config.InjectHeader:
			if !validToken(header) {
				return // config refuses it
			}
			in.Header = http.CanonicalHeaderKey(header)
		case config.InjectBasic:
			if user == "" || strings.Contains(user, ":") || ctlIndex(user) >= 0 {
				return // config refuses it
			}
			in.Header = "Authorization"
		}
		ap, err := NewApplier(in)
		if err != nil {
			if in.Kind <= config.InjectQuery && !(in.Kind == config.InjectQuery && param == "") {
				t.Fatalf("NewApplier(%+v): %v", in, err)
			}
			return
		}
		a := ap.(*valueApplier)
		r := &http.Request{
			Method: http.MethodGet,
			URL: &url.URL{Scheme: "https", Host: "example.com", Path: "/",
				RawQuery: "q=1&" + url.QueryEscape(param) + "=agent&" + param + "=agent2"},
			Header: http.Header{
				"Authorization":         {"Bearer agent"},
				"authorization":         {"Bearer agent"},
				"Proxy-Authorization":   {"Basic agent"},
				agentHeader:             {"agent"},
				header:                  {"agent"},
				strings.ToLower(header): {"agent"},
			},
		}
		applyErr := a.Apply(r, NewToken("n", value, time.Time{}))
		// The error text has no control characters, so a value with one must not be in it.
		if applyErr != nil && ctlIndex(value) >= 0 && strings.Contains(applyErr.Error(), value) {
			t.Fatalf("error reveals the value: %v", applyErr)
		}

		for k, vs := range r.Header {
			for _, v := range vs {
				if strings.ContainsAny(v, "\r\n\x00") {
					t.Fatalf("header %q has value %q with CR/LF/NUL", k, v)
				}
				if v == "agent" || strings.HasSuffix(v, " agent") {
					if strings.EqualFold(k, "Authorization") || strings.EqualFold(k, "Proxy-Authorization") ||
						(a.kind == config.InjectHeader && strings.EqualFold(k, a.header)) {
						t.Fatalf("agent credential survived in %q", k)
					}
				}
			}
		}
		switch a.kind {
		case config.InjectHeader:
			got := keysFold(r.Header, a.header)
			if ctlIndex(prefix+value+suffix) >= 0 {
				if len(got) != 0 || !errors.Is(applyErr, ErrUnavailable) {
					t.Fatalf("unusable value: applied %q, error %v; want nothing applied and ErrUnavailable", got, applyErr)
				}
				return
			}
			if applyErr != nil || len(got) != 1 || len(got[a.header]) != 1 || got[a.header][0] != prefix+value+suffix {
				t.Fatalf("header %s: %q, %v; want exactly %q", a.header, got, applyErr, prefix+value+suffix)
			}
		case config.InjectBasic:
			u, p, ok := r.BasicAuth()
			if applyErr != nil || !ok || u != user || p != value || len(keysFold(r.Header, "Authorization")["Authorization"]) != 1 {
				t.Fatalf("basic auth: %q %q %v, %v", u, p, ok, applyErr)
			}
		case config.InjectQuery:
			q, _ := url.ParseQuery(r.URL.RawQuery)
			if got := q[param]; applyErr != nil || len(got) != 1 || got[0] != value {
				t.Fatalf("query %q: %q, %v; want exactly [%q] (raw %q)", param, got, applyErr, value, r.URL.RawQuery)
			}
		}
	})
}
