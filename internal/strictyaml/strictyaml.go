// Package strictyaml is the document layer of escrow's strict file readers (the config file,
// the injector's config, policy test files): it reads YAML (or JSON, which is YAML too) into
// the plain values encoding/json produces, reports (Options.Strict) every mapping key written
// twice with its two places, and finds the unknown keys of a mapping with the known key each is
// a near miss of. The callers walk the values against what they expect and word the problems
// in their file's own terms.
package strictyaml

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	yamlnode "go.yaml.in/yaml/v3"
	"sigs.k8s.io/yaml"
)

// Options changes what Decode does.
type Options struct {
	// UseNumber decodes numbers as json.Number, exactly as written (what a caller that wants
	// whole numbers needs), rather than float64.
	UseNumber bool
	// Strict also reads the document as a syntax tree, with a stricter parser, to report what
	// the conversion lets pass without a word: mapping keys written more than once
	// (Document.Duplicates), and, as a *SyntaxError, anything after the first document's
	// root (a second document after ---, or text after a complete root value such as {}}x,
	// which the conversion drops). Off, the conversion's rules hold unremarked: the last value
	// of a duplicate key wins, and only the first document is read.
	Strict bool
}

// Document is one decoded YAML document.
type Document struct {
	// JSON is the document converted to JSON, what Value was decoded from.
	JSON []byte
	// Value is the document as encoding/json decodes it into an any: map[string]any, []any,
	// string, bool, float64 (json.Number with Options.UseNumber) or nil. It is nil for an empty
	// document.
	Value any
	// Duplicates are the mapping keys written more than once, in the order they appear, when
	// Options.Strict asks for them. YAML keeps only the last value of such a key, silently; a
	// strict reader reports them.
	Duplicates []Duplicate
}

// SyntaxError is input that is not YAML at all; nothing of it was decoded.
type SyntaxError struct{ Err error }

func (e *SyntaxError) Error() string { return "not valid YAML: " + e.Err.Error() }
func (e *SyntaxError) Unwrap() error { return e.Err }

// Decode reads one YAML document. Its values are those of sigs.k8s.io/yaml's YAML-to-JSON
// conversion (YAML 1.1 scalars: yes/no are booleans; mapping keys become strings); the only
// error is a *SyntaxError. A document with duplicate keys still decodes (the last value of
// each wins, as in YAML) so that the caller can check the rest and report everything at once.
// Unknown keys and values of the wrong kind are the caller's to find, in the values, against
// what it expects (UnknownKeys helps).
func Decode(data []byte, o Options) (Document, error) {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return Document{}, &SyntaxError{Err: err}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	if o.UseNumber {
		dec.UseNumber()
	}
	var v any
	if err := dec.Decode(&v); err != nil {
		return Document{}, &SyntaxError{Err: err}
	}
	doc := Document{JSON: js, Value: v}
	if o.Strict {
		if doc.Duplicates, err = duplicates(data); err != nil {
			return Document{}, &SyntaxError{Err: err}
		}
	}
	return doc, nil
}

// Duplicate is a mapping key written again in the same mapping.
type Duplicate struct {
	Path  Path // the key's path
	At    Pos  // where it is written again
	First Pos  // where it is written first
}

// Msg says what is wrong, for a problem reported at d.Path.
func (d Duplicate) Msg() string {
	return fmt.Sprintf("duplicate key at %s (first at %s)", d.At, d.First)
}

// Pos is a place in the file, both counted from 1.
type Pos struct{ Line, Column int }

func (p Pos) String() string { return fmt.Sprintf("line %d, column %d", p.Line, p.Column) }

// Path is where a value sits in a document: the mapping keys (string) and list indices (int)
// from the root.
type Path []any

// String writes the path as the readers name keys: upstreams[1].inject.header; "" is the root.
func (p Path) String() string {
	var b strings.Builder
	for _, e := range p {
		switch e := e.(type) {
		case int:
			b.WriteString("[" + strconv.Itoa(e) + "]")
		default:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			fmt.Fprint(&b, e)
		}
	}
	return b.String()
}

// duplicates walks the document's syntax tree for keys written twice in one mapping. The
// values come from the YAML-to-JSON conversion, which keeps the last of them without a word;
// only the tree still has both, with their positions. A merge (<<) is not looked into: a key
// merged in may be overridden, that is what a merge is for. Aliases are not followed (their
// anchor is walked where it stands), so the walk is linear in the input. The error is for what
// follows the first document's root that the conversion ignored.
func duplicates(data []byte) ([]Duplicate, error) {
	dec := yamlnode.NewDecoder(bytes.NewReader(data))
	var root yamlnode.Node
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil // no document: the conversion's null
		}
		return nil, err
	}
	for {
		var next yamlnode.Node
		err := dec.Decode(&next)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if !empty(&next) {
			return nil, fmt.Errorf("yaml: line %d: a second document; the file holds one", next.Line)
		}
	}
	var out []Duplicate
	walk(&root, nil, &out)
	return out, nil
}

// empty reports whether document n holds nothing (as a trailing --- does) or only null.
func empty(n *yamlnode.Node) bool {
	for _, c := range n.Content {
		if c.Kind != yamlnode.ScalarNode || c.Tag != "!!null" {
			return false
		}
	}
	return true
}

func walk(n *yamlnode.Node, path Path, out *[]Duplicate) {
	switch n.Kind {
	case yamlnode.DocumentNode:
		for _, c := range n.Content {
			walk(c, path, out)
		}
	case yamlnode.SequenceNode:
		for i, c := range n.Content {
			walk(c, append(path[:len(path):len(path)], i), out)
		}
	case yamlnode.MappingNode:
		first := map[string]*yamlnode.Node{}   // by the key's text
		firstJS := map[string]*yamlnode.Node{} // by the JSON key the conversion makes of it
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Kind != yamlnode.ScalarNode || k.Tag == "!!merge" {
				continue // a complex key does not convert to JSON; a merge, see above
			}
			at := append(path[:len(path):len(path)], k.Value)
			// The same text twice, or two texts the conversion makes one JSON key (1 and 1.0,
			// yes and true, '1' and 1), of which it keeps one at random.
			jk := jsonKey(k)
			f, ok := first[k.Value]
			if !ok {
				f, ok = firstJS[jk]
			}
			if ok {
				*out = append(*out, Duplicate{Path: at, At: pos(k), First: pos(f)})
			} else {
				first[k.Value], firstJS[jk] = k, k
			}
			walk(v, at, out)
		}
	}
}

func pos(n *yamlnode.Node) Pos { return Pos{Line: n.Line, Column: n.Column} }

// jsonKey is the JSON object key the YAML-to-JSON conversion makes of the scalar key k (its
// YAML 1.1 reading: a plain 1.0 is the number 1, a plain yes is true), found by converting the
// key alone. If that fails, the key's text stands for itself.
func jsonKey(k *yamlnode.Node) string {
	src := k.Value
	if k.Style != 0 && k.Style != yamlnode.FlowStyle {
		// Quoted, literal or folded: a string, whatever it looks like.
		b, err := json.Marshal(k.Value)
		if err != nil {
			return k.Value
		}
		src = string(b)
	}
	js, err := yaml.YAMLToJSON([]byte(src + ": null\n"))
	if err != nil {
		return k.Value
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(js, &m) != nil || len(m) != 1 {
		return k.Value
	}
	for key := range m {
		return key
	}
	return k.Value
}
