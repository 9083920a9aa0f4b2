package credential

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

func newRequest(t testing.TB, rawURL string) *http.Request {
	t.Helper()
	r, err := http.NewRequest(http.MethodGet, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func mustApplier(t testing.TB, spec ApplySpec) *Applier {
	t.Helper()
	a, err := NewApplier(spec)
	if err != nil {
		t.Fatalf("NewApplier(%+v): %v", spec, err)
	}
	return a
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

	mustApplier(t, ApplySpec{}).Apply(r, NewToken("openai", secretValue, time.Time{}))

	got := keysFold(r.Header, "Authorization")
	if len(got) != 1 || len(got["Authorization"]) != 1 || got["Authorization"][0] != "Bearer "+secretValue {
		t.Errorf("Authorization headers after Apply: %q; want exactly one, the real credential", got)
	}
	if r.Header.Get("Accept") != "application/json" {
		t.Errorf("unrelated header lost")
	}
}

func TestApply_StripsProxyAuthorization(t *testing.T) {
	for _, spec := range []ApplySpec{
		{},
		{Header: "X-Api-Key", Template: "{{.Token}}"},
		{Method: MethodBasic, Username: "user"},
		{Method: MethodQuery, Param: "key"},
	} {
		r := newRequest(t, "https://example.com/")
		r.Header.Set("Proxy-Authorization", "Bearer delegation-jwt")
		r.Header["proxy-authorization"] = []string{"Basic agent"}
		mustApplier(t, spec).Apply(r, NewToken("n", secretValue, time.Time{}))
		if got := keysFold(r.Header, "Proxy-Authorization"); len(got) != 0 {
			t.Errorf("%v: Proxy-Authorization survived: %q", spec.Method, got)
		}
	}
}

func TestApply_StripsAgentAuthorizationForEveryMethod(t *testing.T) {
	for _, spec := range []ApplySpec{
		{Header: "X-Api-Key", Template: "{{.Token}}"},
		{Method: MethodQuery, Param: "key"},
	} {
		r := newRequest(t, "https://example.com/")
		r.Header.Set("Authorization", "Bearer agent-fake")
		mustApplier(t, spec).Apply(r, NewToken("n", secretValue, time.Time{}))
		if got := keysFold(r.Header, "Authorization"); len(got) != 0 {
			t.Errorf("%+v: agent's Authorization survived: %q", spec, got)
		}
	}
}

func TestApply_ReplacesConfiguredHeaderInAnyCase(t *testing.T) {
	r := newRequest(t, "https://api.anthropic.com/v1/messages")
	r.Header.Add("X-Api-Key", "agent-1")
	r.Header["x-api-key"] = []string{"agent-2"}
	r.Header["X-API-KEY"] = []string{"agent-3", "agent-4"}
	r.Header.Set("Anthropic-Version", "2023-06-01")

	mustApplier(t, ApplySpec{Header: "x-api-key", Template: "{{.Token}}"}).Apply(r, NewToken("anthropic", secretValue, time.Time{}))

	got := keysFold(r.Header, "X-Api-Key")
	if len(got) != 1 || len(got["X-Api-Key"]) != 1 || got["X-Api-Key"][0] != secretValue {
		t.Errorf("X-Api-Key after Apply: %q; want exactly one canonical key with the real value", got)
	}
	if r.Header.Get("Anthropic-Version") != "2023-06-01" {
		t.Errorf("unrelated header lost")
	}
}

func TestApply_Templates(t *testing.T) {
	for tmpl, want := range map[string]string{
		"":                    "Bearer S",
		"Bearer {{.Token}}":   "Bearer S",
		"token {{.Token}}":    "token S",
		"{{.Token}}":          "S",
		"{{ .Token }}":        "S",
		"key={{.Token}}; v=1": "key=S; v=1",
		"{{.Token}} }x":       "S }x",
	} {
		r := newRequest(t, "https://example.com/")
		mustApplier(t, ApplySpec{Template: tmpl}).Apply(r, NewToken("n", "S", time.Time{}))
		if got := r.Header.Values("Authorization"); len(got) != 1 || got[0] != want {
			t.Errorf("template %q: got %q, want %q", tmpl, got, want)
		}
	}
}

func TestNewApplier_RejectsBadSpecs(t *testing.T) {
	for name, spec := range map[string]ApplySpec{
		"no action":           {Template: "Bearer"},
		"two actions":         {Template: "{{.Token}}:{{.Token}}"},
		"other field":         {Template: "Bearer {{.Secret}}"},
		"pipeline":            {Template: "{{.Token | printf \"%s\"}}"},
		"control structure":   {Template: "{{if .Token}}{{.Token}}{{end}}"},
		"trim markers":        {Template: "{{- .Token -}}"},
		"unclosed":            {Template: "Bearer {{.Token"},
		"stray close":         {Template: "{{.Token}} }}"},
		"CRLF in template":    {Template: "Bearer {{.Token}}\r\nX-Evil: 1"},
		"LF in prefix":        {Template: "a\n{{.Token}}"},
		"TAB":                 {Template: "Bearer\t{{.Token}}"},
		"header with space":   {Header: "X Api Key"},
		"header with colon":   {Header: "X-Key:"},
		"header with CRLF":    {Header: "X-Key\r\nX-Evil"},
		"Host header":         {Header: "host"},
		"Content-Length":      {Header: "Content-Length"},
		"Proxy-Authorization": {Header: "proxy-authorization"},
		"basic no username":   {Method: MethodBasic},
		"basic colon user":    {Method: MethodBasic, Username: "a:b"},
		"basic CR user":       {Method: MethodBasic, Username: "a\rb"},
		"query no param":      {Method: MethodQuery},
		"unknown method":      {Method: Method(42)},
	} {
		if a, err := NewApplier(spec); err == nil {
			t.Errorf("%s: NewApplier(%+v) = %+v, want an error", name, spec, a)
		}
	}
}

func TestApply_Basic(t *testing.T) {
	r := newRequest(t, "https://registry.example.com/")
	r.SetBasicAuth("agent", "fake")
	r.Header["authorization"] = []string{"Bearer other"}
	mustApplier(t, ApplySpec{Method: MethodBasic, Username: "deploy"}).Apply(r, NewToken("reg", "p:ss w0rd", time.Time{}))
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
	mustApplier(t, ApplySpec{Method: MethodQuery, Param: "api_key"}).Apply(r, NewToken("maps", "s3cr&t=+/ value", time.Time{}))

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
		mustApplier(t, ApplySpec{Method: MethodQuery, Param: "key"}).Apply(r, NewToken("n", "S", time.Time{}))
		if r.URL.RawQuery != want {
			t.Errorf("%s: RawQuery %q, want %q", raw, r.URL.RawQuery, want)
		}
	}
}

func TestApply_RefusesTokenWithCRLF(t *testing.T) {
	a := mustApplier(t, ApplySpec{Header: "X-Api-Key", Template: "key {{.Token}}"})
	for _, v := range []string{"abc\r\nX-Injected: 1", "abc\n", "abc\x00def", "abc\rdef"} {
		r := newRequest(t, "https://example.com/")
		r.Header.Set("X-Api-Key", "agent")
		r.Header.Set("Authorization", "Bearer agent")
		a.Apply(r, NewToken("n", v, time.Time{}))
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

func TestApply_FollowsRotatedToken(t *testing.T) {
	for _, spec := range []ApplySpec{{}, {Method: MethodBasic, Username: "u"}, {Method: MethodQuery, Param: "k"}} {
		a := mustApplier(t, spec)
		for i, v := range []string{"first", "second", "second", "first"} {
			r := newRequest(t, "https://example.com/")
			a.Apply(r, NewToken("n", v, time.Time{}))
			got := r.Header.Get("Authorization") + r.URL.RawQuery
			if _, p, _ := r.BasicAuth(); p != "" {
				got = p
			}
			if !strings.Contains(got, v) {
				t.Errorf("%v apply %d: %q does not carry %q (stale render cache?)", spec.Method, i, got, v)
			}
		}
	}
}

func TestApply_WireFormHasExactlyOneCredential(t *testing.T) {
	r := newRequest(t, "https://api.github.com/user")
	r.Header.Set("Authorization", "token agent")
	r.Header["authorization"] = []string{"token agent2"}
	mustApplier(t, ApplySpec{Template: "token {{.Token}}"}).Apply(r, NewToken("gh", secretValue, time.Time{}))
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

func TestMethod_String(t *testing.T) {
	if MethodHeader.String() != "header" || MethodBasic.String() != "basic" || MethodQuery.String() != "query" || Method(9).String() != "Method(9)" {
		t.Errorf("Method.String")
	}
}

func FuzzApplier(f *testing.F) {
	f.Add(uint8(0), "Authorization", "Bearer {{.Token}}", "", "", secretValue, "X-Agent")
	f.Add(uint8(0), "x-api-key", "{{.Token}}", "", "", "a\r\nb", "X-API-KEY")
	f.Add(uint8(0), "X-K", "pre {{ .Token }} post", "", "", "\x00\n", "authorization")
	f.Add(uint8(0), "X-K", "a\r\n{{.Token}}", "", "", "v", "")
	f.Add(uint8(1), "", "", "user", "", "p\r\nw", "proxy-authorization")
	f.Add(uint8(2), "", "", "", "api_key", "v&x=1\n", "Api_Key")
	f.Add(uint8(2), "", "", "", "k;e%y", "%zz", "")
	f.Fuzz(func(t *testing.T, method uint8, header, tmpl, user, param, value, agentHeader string) {
		spec := ApplySpec{Method: Method(method % 4), Header: header, Template: tmpl, Username: user, Param: param}
		a, err := NewApplier(spec)
		if err != nil {
			return
		}
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
		a.Apply(r, NewToken("n", value, time.Time{}))

		for k, vs := range r.Header {
			for _, v := range vs {
				if strings.ContainsAny(v, "\r\n\x00") {
					t.Fatalf("header %q has value %q with CR/LF/NUL", k, v)
				}
				if v == "agent" || strings.HasSuffix(v, " agent") {
					if strings.EqualFold(k, "Authorization") || strings.EqualFold(k, "Proxy-Authorization") ||
						(a.method == MethodHeader && strings.EqualFold(k, a.header)) {
						t.Fatalf("agent credential survived in %q", k)
					}
				}
			}
		}
		switch a.method {
		case MethodHeader:
			got := keysFold(r.Header, a.header)
			if hasCTL(value) {
				if len(got) != 0 {
					t.Fatalf("unusable value applied: %q", got)
				}
				return
			}
			if len(got) != 1 || len(got[a.header]) != 1 || got[a.header][0] != a.prefix+value+a.suffix {
				t.Fatalf("header %s: %q; want exactly %q", a.header, got, a.prefix+value+a.suffix)
			}
		case MethodBasic:
			u, p, ok := r.BasicAuth()
			if !ok || u != user || p != value || len(keysFold(r.Header, "Authorization")["Authorization"]) != 1 {
				t.Fatalf("basic auth: %q %q %v", u, p, ok)
			}
		case MethodQuery:
			q, _ := url.ParseQuery(r.URL.RawQuery)
			if got := q[param]; len(got) != 1 || got[0] != value {
				t.Fatalf("query %q: %q; want exactly [%q] (raw %q)", param, got, value, r.URL.RawQuery)
			}
		}
	})
}
