package strictyaml

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func decode(t *testing.T, doc string, o Options) Document {
	t.Helper()
	d, err := Decode([]byte(doc), o)
	if err != nil {
		t.Fatalf("Decode(%q): %v", doc, err)
	}
	return d
}

func TestDecode_ValuesAreThoseOfTheYAMLToJSONConversion(t *testing.T) {
	d := decode(t, "on: yes\n1: 2.5\nlist: [a, ~, {b: c}]\nbig: 12345678901234567890\n", Options{})
	want := map[string]any{
		"true": true, // YAML 1.1, as the config files have always been read
		"1":    2.5,
		"list": []any{"a", nil, map[string]any{"b": "c"}},
		"big":  1.2345678901234567e19,
	}
	if !reflect.DeepEqual(d.Value, want) {
		t.Errorf("Value = %#v, want %#v", d.Value, want)
	}
	if string(d.JSON) != `{"1":2.5,"big":12345678901234567890,"list":["a",null,{"b":"c"}],"true":true}` {
		t.Errorf("JSON = %s", d.JSON)
	}
	// With UseNumber a number is kept exactly as written.
	d = decode(t, "big: 12345678901234567890\nf: 1.5\n", Options{UseNumber: true})
	if m := d.Value.(map[string]any); m["big"] != json.Number("12345678901234567890") || m["f"] != json.Number("1.5") {
		t.Errorf("UseNumber: %#v", m)
	}
	// JSON is YAML too.
	d = decode(t, `{"a": [1, "x"]}`, Options{Strict: true})
	if !reflect.DeepEqual(d.Value, map[string]any{"a": []any{1.0, "x"}}) {
		t.Errorf("JSON input: %#v", d.Value)
	}
	for _, empty := range []string{"", "# nothing\n", "~\n"} {
		if d := decode(t, empty, Options{Strict: true}); d.Value != nil || d.Duplicates != nil {
			t.Errorf("%q: %#v", empty, d)
		}
	}
}

func TestDecode_NotYAMLIsASyntaxErrorAndNothingElse(t *testing.T) {
	for _, strict := range []bool{false, true} {
		d, err := Decode([]byte("cases: ["), Options{Strict: strict})
		var se *SyntaxError
		if !errors.As(err, &se) || !strings.HasPrefix(err.Error(), "not valid YAML: yaml: line 1:") || d.Value != nil || d.JSON != nil {
			t.Errorf("strict=%v: %#v, %v", strict, d, err)
		}
	}
}

func TestDecode_StrictReportsEveryDuplicateKeyWithItsPathAndBothPositions(t *testing.T) {
	d := decode(t, `name: a
cases:
  - {host: h, port: 1, host: i}
  - request:
      path: /a
      'path': /b
      path: /c
name: b
`, Options{Strict: true})
	want := []Duplicate{
		{Path: Path{"cases", 0, "host"}, At: Pos{3, 24}, First: Pos{3, 6}},
		{Path: Path{"cases", 1, "request", "path"}, At: Pos{6, 7}, First: Pos{5, 7}},
		{Path: Path{"cases", 1, "request", "path"}, At: Pos{7, 7}, First: Pos{5, 7}},
		{Path: Path{"name"}, At: Pos{8, 1}, First: Pos{1, 1}},
	}
	if !reflect.DeepEqual(d.Duplicates, want) {
		t.Fatalf("Duplicates =\n%#v\nwant\n%#v", d.Duplicates, want)
	}
	if got := d.Duplicates[0].Path.String() + ": " + d.Duplicates[0].Msg(); got != "cases[0].host: duplicate key at line 3, column 24 (first at line 3, column 6)" {
		t.Errorf("message: %s", got)
	}
	// The document still decodes, as YAML reads it (the last value wins), so the caller can
	// check the rest of it in the same run.
	m := d.Value.(map[string]any)
	req := m["cases"].([]any)[1].(map[string]any)["request"].(map[string]any)
	if m["name"] != "b" || req["path"] != "/c" {
		t.Errorf("Value = %#v", d.Value)
	}
}

func TestDecode_WithoutStrictDuplicatesAreYAMLsLastValueWins(t *testing.T) {
	d := decode(t, "a: 1\na: 2\n---\nb: 3\n", Options{})
	if d.Duplicates != nil || !reflect.DeepEqual(d.Value, map[string]any{"a": 2.0}) {
		t.Errorf("%#v", d)
	}
}

func TestDecode_MergedKeysMayBeOverriddenAndAliasesAreNotWalkedTwice(t *testing.T) {
	d := decode(t, `base: &b {a: 1, c: 3}
more: &m {d: 4}
x: {<<: *b, <<: *m, a: 2}
y: &y {k: 1, k: 2}
z: [*y, *y]
`, Options{Strict: true})
	want := []Duplicate{{Path: Path{"y", "k"}, At: Pos{4, 14}, First: Pos{4, 8}}}
	if !reflect.DeepEqual(d.Duplicates, want) {
		t.Errorf("Duplicates = %#v, want only y.k", d.Duplicates)
	}
	if x := d.Value.(map[string]any)["x"]; !reflect.DeepEqual(x, map[string]any{"a": 2.0, "c": 3.0, "d": 4.0}) {
		t.Errorf("x = %#v", x)
	}
}

func TestDecode_StrictRefusesWhatTheConversionWouldDropUnseen(t *testing.T) {
	for doc, want := range map[string]string{
		"a: 1\n---\nb: 2\n": "line 2: a second document",
		"{}}%":              "yaml:",
		"'a' x\nb: 1\n":     "line 2: mapping values are not allowed",
	} {
		if _, err := Decode([]byte(doc), Options{}); err != nil {
			t.Fatalf("%q: the lax conversion refuses it already (%v): the test proves nothing", doc, err)
		}
		_, err := Decode([]byte(doc), Options{Strict: true})
		var se *SyntaxError
		if !errors.As(err, &se) || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want a SyntaxError with %q", doc, err, want)
		}
	}
	// An empty document after --- (as some writers end a file) holds nothing to drop.
	for _, ok := range []string{"a: 1\n---\n", "---\na: 1\n", "a: 1\n...\n", "a: 1\n---\n~\n"} {
		if d := decode(t, ok, Options{Strict: true}); !reflect.DeepEqual(d.Value, map[string]any{"a": 1.0}) {
			t.Errorf("%q: %#v", ok, d.Value)
		}
	}
}

func TestPath_StringNamesKeysAsTheReadersDo(t *testing.T) {
	for _, tc := range []struct {
		p    Path
		want string
	}{
		{nil, ""},
		{Path{"upstreams", 1, "inject", "header"}, "upstreams[1].inject.header"},
		{Path{0, "a", 2, 3}, "[0].a[2][3]"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%#v: %q, want %q", tc.p, got, tc.want)
		}
	}
}

func TestUnknownKeys_AreSortedEachWithItsNearMiss(t *testing.T) {
	m := map[string]any{"expct": 1, "name": 2, "zzz": 3, "Host": 4, "request": 5}
	got := UnknownKeys(m, []string{"name", "request", "expect", "host"})
	want := []Unknown{{"Host", "host"}, {"expct", "expect"}, {"zzz", ""}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("UnknownKeys = %#v, want %#v", got, want)
	}
	if got := UnknownKeys(map[string]any{"a": 1}, []string{"a"}); got != nil {
		t.Errorf("no unknown keys: %#v", got)
	}
}

func TestNearest_IsATypoAwayAndDoesNotDependOnOrder(t *testing.T) {
	for _, tc := range []struct {
		s          string
		candidates []string
		want       string
	}{
		{"expct", []string{"name", "expect"}, "expect"},
		{"LISTEN", []string{"listen", "admin"}, "listen"},       // case is not a typo
		{"leaf_tl", []string{"leaf_ttl", "ca_dir"}, "leaf_ttl"}, // one edit
		{"lf_t", []string{"leaf_ttl"}, ""},                      // four edits: no guess
		{"githb", []string{"GitHub", "github"}, "github"},       // then the closest spelling
		{"githb", []string{"github", "GitHub"}, "github"},       // in any order
		{"ab", []string{"abd", "abc"}, "abc"},                   // then sort order
		{"opneai", []string{"openai", "github"}, "openai"},      // a swap is two edits
		{strings.Repeat("x", 1000), []string{"xx", "host"}, ""}, // far longer: not measured
		{"", []string{"a", "abc"}, "a"},
	} {
		if got := Nearest(tc.s, tc.candidates); got != tc.want {
			t.Errorf("Nearest(%q, %q) = %q, want %q", tc.s, tc.candidates, got, tc.want)
		}
	}
}

// Keys written differently that the conversion makes one JSON key are duplicates: which value
// survives the conversion is otherwise random (CI's fuzzing found 1 and 1.).
func TestDecode_KeysThatConvertToTheSameJSONKeyAreDuplicates(t *testing.T) {
	for _, doc := range []string{"a:\n  1: x\n  1.: y\n", "a:\n  1: x\n  '1': y\n", "a:\n  yes: x\n  true: y\n"} {
		d, err := Decode([]byte(doc), Options{Strict: true})
		if err != nil {
			t.Fatal(err)
		}
		if len(d.Duplicates) != 1 || d.Duplicates[0].At.Line != 3 || d.Duplicates[0].First.Line != 2 {
			t.Errorf("%q: duplicates %+v, want the key on line 3 (first on line 2)", doc, d.Duplicates)
		}
	}
	// Different JSON keys are not duplicates, however alike they look.
	d, err := Decode([]byte("a:\n  1: x\n  '1.5': y\n  \"yes\": z\n  no: w\n"), Options{Strict: true})
	if err != nil || len(d.Duplicates) != 0 {
		t.Errorf("duplicates %+v, %v; want none", d.Duplicates, err)
	}
}
