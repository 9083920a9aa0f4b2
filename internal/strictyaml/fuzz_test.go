package strictyaml

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	yamlnode "go.yaml.in/yaml/v3"
)

// FuzzDecode feeds arbitrary bytes to Decode, lax and strict. It must never panic; an error is
// a *SyntaxError; strict refuses at least what lax refuses and otherwise decodes the same
// values; every duplicate it reports is a key written again after its first place, and it
// misses none that yaml.v3's own unique-key check finds.
// Run longer with: go test -run x -fuzz FuzzDecode -fuzztime 30s ./internal/strictyaml/
func FuzzDecode(f *testing.F) {
	for _, seed := range []string{
		"", "a: 1\n", "a: 1\na: 2\n", "{a: 1, a: 2}", `{"a": 1, "a": [1, {"b": 2, "b": 3}]}`,
		"- {x: 1, x: 2}\n- [a, {y: 1, 'y': 2}]\n", "a: &x {k: 1, k: 2}\nb: [*x, *x]\nc: {<<: *x, k: 3}\n",
		"on: yes\n1: 2\n1.0: 3\n~: 4\n", "a: 1\n---\nb: 2\n", "a: 1\n---\n", "{}}%", "'a' x\nb: 1\n",
		"cases: [", "? [a]\n: 1\n", "big: 1e400\n", "n: 12345678901234567890\n",
	} {
		f.Add([]byte(seed))
	}
	known := []string{"policies", "time", "cases", "listen", "upstreams"}
	f.Fuzz(func(t *testing.T, data []byte) {
		lax, laxErr := Decode(data, Options{})
		strict, strictErr := Decode(data, Options{Strict: true, UseNumber: true})
		for _, err := range []error{laxErr, strictErr} {
			var se *SyntaxError
			if err != nil && (!errors.As(err, &se) || !strings.HasPrefix(err.Error(), "not valid YAML: ")) {
				t.Fatalf("error %T %q is not a SyntaxError", err, err)
			}
		}
		if laxErr != nil {
			if strictErr == nil {
				t.Fatalf("strict accepts what lax refuses: %v", laxErr)
			}
			return
		}
		if lax.Duplicates != nil {
			t.Fatalf("lax reported duplicates")
		}
		var again any
		if err := json.Unmarshal(lax.JSON, &again); err != nil || !reflect.DeepEqual(again, lax.Value) {
			t.Fatalf("Value %#v is not JSON %s decoded (%v)", lax.Value, lax.JSON, err)
		}
		if strictErr != nil {
			return
		}
		// Keys that convert to one JSON key (1 and 1.0) leave the conversion to keep one of
		// them at random; strict reports them as duplicates, and only then may the two differ.
		if len(strict.Duplicates) == 0 && !bytes.Equal(strict.JSON, lax.JSON) {
			t.Fatalf("strict JSON %s, lax %s (no duplicate reported)", strict.JSON, lax.JSON)
		}
		for _, d := range strict.Duplicates {
			if len(d.Path) == 0 || d.Msg() == "" || d.First.Line < 1 || d.First.Column < 1 ||
				d.At.Line < d.First.Line || d.At.Line == d.First.Line && d.At.Column <= d.First.Column {
				t.Fatalf("duplicate %#v", d)
			}
			if _, ok := d.Path[len(d.Path)-1].(string); !ok {
				t.Fatalf("duplicate %#v does not end in a key", d)
			}
		}
		// yaml.v3 decoding into plain values refuses a key written twice (the same text) in
		// any mapping it decodes; merges aside, that is exactly what the walk reports.
		var v any
		err := yamlnode.Unmarshal(data, &v)
		v3dup := err != nil && strings.Contains(err.Error(), "already defined")
		if v3dup && len(strict.Duplicates) == 0 && !bytes.Contains(data, []byte("<<")) {
			t.Fatalf("missed the duplicate yaml.v3 finds: %v", err)
		}
		if m, ok := lax.Value.(map[string]any); ok {
			u := UnknownKeys(m, known)
			if !slices.IsSortedFunc(u, func(a, b Unknown) int { return strings.Compare(a.Key, b.Key) }) {
				t.Fatalf("unknown keys not sorted: %v", u)
			}
			for _, k := range u {
				if _, in := m[k.Key]; !in || slices.Contains(known, k.Key) || k.Meant != "" && !slices.Contains(known, k.Meant) {
					t.Fatalf("unknown key %#v of %v", k, m)
				}
			}
		}
	})
}
