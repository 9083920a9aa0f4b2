package scrub

import (
	"encoding/base64"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// secret is a realistic credential with the characters that make its encodings differ.
const secret = "sk-live_4f8Q+z/Ab9=Kx7?tok&en~Zq"

// formsOf is the test's own oracle: the folded forms New must search for.
func formsOf(t testing.TB, values ...string) []string {
	t.Helper()
	var out []string
	for _, v := range values {
		if len(v) < MinLen {
			continue
		}
		for _, f := range forms(v) {
			if len(f) >= MinLen {
				out = append(out, foldString(f))
			}
		}
	}
	return out
}

// assertClean fails if out contains any form of values, or the first PrefixLen bytes of one,
// compared case-insensitively.
func assertClean(t testing.TB, out string, values ...string) {
	t.Helper()
	fo := foldString(out)
	for _, f := range formsOf(t, values...) {
		if f = f[:min(len(f), PrefixLen)]; strings.Contains(fo, f) {
			t.Fatalf("output still contains form %q:\n%q", f, out)
		}
	}
}

func TestForms_CoverEveryEncodingTheIssueNames(t *testing.T) {
	fs := forms(secret)
	want := []string{
		secret,
		url.QueryEscape(secret),
		url.PathEscape(secret),
		strings.ToLower(url.QueryEscape(secret)), // the same after folding, listed for the reader
		base64.StdEncoding.EncodeToString([]byte(secret)),
		base64.RawStdEncoding.EncodeToString([]byte(secret)),
		base64.URLEncoding.EncodeToString([]byte(secret)),
		base64.RawURLEncoding.EncodeToString([]byte(secret)),
	}
	folded := map[string]bool{}
	for _, f := range fs {
		folded[foldString(f)] = true
	}
	for _, w := range want {
		if !folded[foldString(w)] {
			t.Errorf("forms(%q) lacks %q", secret, w)
		}
	}
}

func TestString_ReplacesEveryFormInPlaceWithAMarkerOfTheSameLength(t *testing.T) {
	s := New(secret)
	for _, f := range forms(secret) {
		for _, variant := range []string{f, strings.ToUpper(f), strings.ToLower(f)} {
			in := "before " + variant + " after"
			out, n := s.String(in)
			if n != 1 {
				t.Errorf("form %q: replaced %d, want 1 (out %q)", variant, n, out)
			}
			if len(out) != len(in) || !strings.HasPrefix(out, "before [") || !strings.HasSuffix(out, "] after") {
				t.Errorf("form %q: got %q", variant, out)
			}
			assertClean(t, out, secret)
		}
	}
}

func TestString_MarkerReadsAsMarkerCutOrPadded(t *testing.T) {
	for _, tc := range []struct{ value, want string }{
		{"abcdefgh", "[escrow]"},
		{"abcdefghijklmnopq", Marker},
		{"abcdefghijklmnopqrstu", "[escrow:redacted****]"},
	} {
		out, _ := New(tc.value).String("x" + tc.value + "x")
		if out != "x"+tc.want+"x" {
			t.Errorf("%q → %q, want %q", tc.value, out, "x"+tc.want+"x")
		}
	}
}

func TestString_FindsTheValueInsideALongerBase64TextAtEveryAlignment(t *testing.T) {
	s := New(secret)
	r := rand.New(rand.NewPCG(1, 2))
	for pre := 0; pre < 6; pre++ {
		for post := 0; post < 4; post++ {
			raw := make([]byte, pre+len(secret)+post)
			for i := range raw {
				raw[i] = byte(r.IntN(256))
			}
			copy(raw[pre:], secret)
			for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
				in := `{"blob":"` + enc.EncodeToString(raw) + `"}`
				out, n := s.String(in)
				if n == 0 {
					t.Fatalf("pre %d post %d: not found in %q", pre, post, in)
				}
				assertClean(t, out, secret)
				// At most one character at each end of the value's part may remain.
				dec, _ := enc.DecodeString(strings.Trim(strings.TrimPrefix(out, `{"blob":"`), `"}`))
				if strings.Contains(string(dec), secret[1:len(secret)-1]) {
					t.Fatalf("pre %d post %d: the value's middle survives", pre, post)
				}
			}
		}
	}
}

func TestString_DoesNotChangeOrdinaryText(t *testing.T) {
	// Real text: Go's own HTTP server source and docs, under random secrets of every shape.
	var corpus []byte
	for _, f := range []string{"net/http/server.go", "net/url/url.go", "encoding/base64/base64.go"} {
		b, err := os.ReadFile(filepath.Join(runtime.GOROOT(), "src", f))
		if err != nil {
			t.Skipf("no Go source to read: %v", err)
		}
		corpus = append(corpus, b...)
	}
	r := rand.New(rand.NewPCG(3, 4))
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_+/="
	for i := 0; i < 20; i++ {
		v := make([]byte, MinLen+r.IntN(40))
		for j := range v {
			v[j] = alphabet[r.IntN(len(alphabet))]
		}
		out, n := New(string(v)).String(string(corpus))
		if n != 0 || out != string(corpus) {
			t.Fatalf("secret %q: %d replacements in ordinary text", v, n)
		}
	}
}

func TestNew_IgnoresValuesShorterThanMinLen(t *testing.T) {
	s := New("", "short", "1234567")
	if s.Active() || s.Ignored() != 2 {
		t.Fatalf("Active %v Ignored %d, want false 2", s.Active(), s.Ignored())
	}
	if out, n := s.String("short 1234567"); n != 0 || out != "short 1234567" {
		t.Fatalf("got %q %d", out, n)
	}
	var nilS *Scrubber
	if out, n := nilS.String("x"); n != 0 || out != "x" || nilS.Header(http.Header{"A": {"x"}}) != 0 {
		t.Fatal("a nil Scrubber must scrub nothing")
	}
}

func TestNew_DelimitersAreBytesNoFormContains(t *testing.T) {
	// A value ending in '[': "abcdefg" followed by a replacement starting with '[' would
	// otherwise spell it again.
	v := "abcdefg[]<>"
	s := New(v)
	if s.open == '[' || s.close == ']' || s.Weak() {
		t.Fatalf("delimiters %q %q weak %v", s.open, s.close, s.Weak())
	}
	in := "abcdefg" + v + "]<>"
	out, n := s.String(in)
	if n != 1 {
		t.Fatalf("replaced %d in %q", n, out)
	}
	assertClean(t, out, v)
}

func TestNew_AValueInsideTheMarkerIsReplacedByDelimitersOnly(t *testing.T) {
	v := "redacted****"
	s := New(v)
	in := "[escrow:" + v + "]"
	out, n := s.String(in)
	if want := "[escrow:" + strings.Repeat("[", 11) + "]]"; n != 1 || out != want {
		t.Fatalf("got %q %d", out, n)
	}
	assertClean(t, out, v)
}

func TestString_OverlappingOccurrencesBecomeOneReplacement(t *testing.T) {
	v := "abcabcab"
	out, n := New(v).String("xabcabcabcabx")
	if n != 1 || len(out) != len("xabcabcabcabx") {
		t.Fatalf("got %q %d", out, n)
	}
	assertClean(t, out, v)
}

func TestHeader_ScrubsEveryHeaderThatCarriesTheSecret(t *testing.T) {
	user, pass := "svc-reporting", "hunter2-but-longer"
	token := "ghp_0123456789abcdefABCDEF0123456789abcd"
	s := New(token, pass, BasicPair(user, pass))
	basic := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	h := http.Header{
		"Location":           {"https://api.example.com/cb?access_token=" + token + "&x=1"},
		"Content-Location":   {"/v1/items?key=" + url.QueryEscape(token)},
		"Link":               {`<https://api.example.com/p2?token=` + token + `>; rel="next"`},
		"Refresh":            {"0; url=/login?t=" + token},
		"Set-Cookie":         {"sess=" + base64.RawURLEncoding.EncodeToString([]byte(token)) + "; Path=/", "other=1"},
		"Www-Authenticate":   {`Bearer error="invalid_token", token="` + token + `"`},
		"X-Echo-Auth":        {"Basic " + basic},
		"X-Echo-Password":    {pass},
		"Content-Type":       {"application/json"},
		"X-Debug-" + token:   {"1"},
		"X-Upper-Hex-Escape": {strings.ToUpper(url.PathEscape(token))},
	}
	n := s.Header(h)
	if n != 10 {
		t.Errorf("Header returned %d, want 10", n)
	}
	if _, ok := h["X-Debug-"+token]; ok {
		t.Error("a header named with the secret must be removed")
	}
	if h.Get("Content-Type") != "application/json" || h.Values("Set-Cookie")[1] != "other=1" {
		t.Errorf("unrelated values changed: %v", h)
	}
	if !strings.HasPrefix(h.Get("Location"), "https://api.example.com/cb?access_token=[escrow:redacted") {
		t.Errorf("Location = %q", h.Get("Location"))
	}
	for name, vs := range h {
		for _, v := range vs {
			assertClean(t, name+": "+v, token, pass, BasicPair(user, pass))
		}
	}
}

func TestString_ReplacesAValueCutShortOncePrefixLenBytesOfAFormArePresent(t *testing.T) {
	v := "tok_" + strings.Repeat("a1B2c3D4e5", 4) // 44 bytes
	s := New(v)
	cut := v[:PrefixLen+3]
	out, n := s.String("echo " + cut + "... (truncated)")
	if n != 1 || out != "echo "+s.markerFor(len(cut))+"... (truncated)" {
		t.Fatalf("cut to %d bytes: got %q %d", len(cut), out, n)
	}
	short := v[:PrefixLen-1]
	if out, n := s.String("echo " + short + "..."); n != 0 || out != "echo "+short+"..." {
		t.Fatalf("a piece shorter than PrefixLen is not a match: got %q", out)
	}
}

func TestString_ALongTokenIsReplacedWholeWhereverItAppears(t *testing.T) {
	// A JWT-sized value: its forms run to kilobytes; deep states are sparse.
	r := rand.New(rand.NewPCG(7, 8))
	raw := make([]byte, 1500)
	for i := range raw {
		raw[i] = byte(r.IntN(256))
	}
	v := base64.RawURLEncoding.EncodeToString(raw)
	s := New(v)
	for _, f := range forms(v) {
		in := `{"echo":"` + f + `","n":1}`
		out, n := s.String(in)
		if n != 1 || len(out) != len(in) || !strings.HasPrefix(out, `{"echo":"[escrow:redacted**`) || !strings.HasSuffix(out, `*]","n":1}`) {
			t.Fatalf("form of %d bytes: %d replacements, %q...", len(f), n, out[:min(len(out), 60)])
		}
	}
	var sizes []int
	for range 200 {
		sizes = append(sizes, 1+r.IntN(300))
	}
	in := "a " + v + " b " + url.QueryEscape(v) + " c " + base64.StdEncoding.EncodeToString([]byte(v)) + " d"
	want, n := s.String(in)
	got, err := readAll(t, s.Body(&chunkReader{data: []byte(in), sizes: sizes}, BodyOptions{}), 700, 3, 5000)
	if n != 3 || err != nil || string(got) != want {
		t.Fatalf("streamed: %d replacements, err %v, equal %v", n, err, string(got) == want)
	}
	assertClean(t, string(got), v)
}

// markerFor is the replacement of a whole n-byte span.
func (s *Scrubber) markerFor(n int) string {
	b := make([]byte, n)
	s.redact(b, 0, []run{{0, int64(n)}})
	return string(b)
}
