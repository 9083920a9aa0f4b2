package config

import (
	"bytes"
	"encoding"
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/escrowproxy/escrow/internal/strictyaml"
)

// This file is the strict reader every escrow config file goes through (the proxy's and the
// injector's): YAML to values (strictyaml), a walk of the document against the Go type that
// names every unknown key and wrong kind with its key path, then a best-effort decode so value
// checks still run.

// FieldError is one problem at one key path.
type FieldError struct {
	Path string // e.g. upstreams[1].inject.header
	Msg  string
}

func (e FieldError) Error() string { return e.Path + ": " + e.Msg }

// Errors is every problem found in one file, reported at once.
type Errors []FieldError

func (es Errors) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "config: %d error(s):", len(es))
	for _, e := range es {
		b.WriteString("\n  ")
		b.WriteString(e.Error())
	}
	return b.String()
}

// Shaper is implemented (on its pointer) by a field type whose YAML form is not what its Go
// kind suggests, e.g. a Duration written as "2s". CheckShape gets the decoded YAML value
// (string, float64, bool, map[string]any or []any) and returns what is wrong with it, or "".
type Shaper interface {
	CheckShape(v any) string
}

// Decode decodes YAML (or JSON) into out, a pointer to a struct with json tags. It reports
// every unknown key (with a "did you mean" for a near miss) and every value of the wrong kind,
// each with its key path, all at once, as shape errors; out is then filled best effort, so that
// the caller's value checks can still run and one run names every mistake (see Combine). err
// is for input that is not YAML at all. Every escrow config file (the proxy's, the injector's)
// is read through it.
func Decode(data []byte, out any) (shape Errors, err error) {
	// Strict: a key written twice is an error, not "the last one wins" (a second credential:
	// or allow_cidrs: under the same upstream would otherwise silently replace the first), and
	// so is a second document or text after the first one's end.
	doc, err := strictyaml.Decode(data, strictyaml.Options{Strict: true})
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	for _, d := range doc.Duplicates {
		shape = append(shape, FieldError{Path: d.Path.String(), Msg: d.Msg()})
	}
	if doc.Value == nil {
		return shape, nil // an empty document: every key at its default
	}
	dups := len(shape)
	raw, ok := checkShape(&shape, "", doc.Value, reflect.TypeOf(out).Elem())
	if !ok {
		return shape, nil // the document itself has the wrong shape: nothing to decode
	}
	js := doc.JSON
	if len(shape) > dups {
		// Decode what is left once every wrong value and unknown key is cut out: encoding/json
		// stops at the first error a custom UnmarshalJSON returns, and every key after it would
		// look missing (false "required" errors, real mistakes unreported).
		if js, err = json.Marshal(raw); err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(out); err != nil && len(shape) == dups {
		// checkShape catches everything with a path; this is the backstop.
		return Errors{{Path: "(root)", Msg: err.Error()}}, nil
	}
	return shape, nil
}

// Combine is every problem of one document, sorted by key path: the shape errors Decode
// reported and the value errors of the caller's checks, less the value errors at or below a
// path that already has a shape error (they would only repeat it). Nil when there are none.
func Combine(shape, values Errors) Errors {
	errs := append(Errors(nil), shape...)
	for _, e := range values {
		if !coveredBy(e.Path, shape) {
			errs = append(errs, e)
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return sortErrs(errs)
}

func coveredBy(path string, shape Errors) bool {
	for _, s := range shape {
		if s.Path == "(root)" || path == s.Path || strings.HasPrefix(path, s.Path+".") || strings.HasPrefix(path, s.Path+"[") {
			return true
		}
	}
	return false
}

func sortErrs(es Errors) Errors {
	sort.SliceStable(es, func(i, j int) bool { return es[i].Path < es[j].Path })
	return es
}

var shaperType = reflect.TypeOf((*Shaper)(nil)).Elem()

var (
	jsonUnmarshalerType = reflect.TypeOf((*json.Unmarshaler)(nil)).Elem()
	textUnmarshalerType = reflect.TypeOf((*encoding.TextUnmarshaler)(nil)).Elem()
)

// checkShape walks the decoded document against the Go type, reporting unknown keys and wrong
// kinds with their paths, so that one run names every mistake. It returns v with every wrong
// part cut out (a mapping's key deleted, a list element set to null) and whether v itself is
// acceptable, so that what is left decodes without an error.
func checkShape(errs *Errors, path string, v any, t reflect.Type) (any, bool) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	at := path
	if at == "" {
		at = "(root)"
	}
	if v == nil {
		return nil, true // null: leave the zero value
	}
	bad := func(msg string) (any, bool) {
		*errs = append(*errs, FieldError{at, msg})
		return nil, false
	}
	pt := reflect.PointerTo(t)
	if pt.Implements(shaperType) {
		if msg := reflect.New(t).Interface().(Shaper).CheckShape(v); msg != "" {
			return bad(msg)
		}
		return v, true
	}
	if pt.Implements(jsonUnmarshalerType) || pt.Implements(textUnmarshalerType) {
		// A type that reads itself and says nothing of its shape: let it try.
		b, err := json.Marshal(v)
		if err == nil {
			err = json.Unmarshal(b, reflect.New(t).Interface())
		}
		if err != nil {
			return bad(strings.TrimPrefix(err.Error(), "json: "))
		}
		return v, true
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return bad("want a mapping, got " + kindOf(v))
		}
		fields := map[string]reflect.Type{}
		var names []string
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name != "" && name != "-" {
				fields[name] = f.Type
				names = append(names, name)
			}
		}
		for _, u := range strictyaml.UnknownKeys(m, names) {
			msg := "unknown key"
			if u.Meant != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", u.Meant)
			}
			*errs = append(*errs, FieldError{join(path, u.Key), msg})
			delete(m, u.Key)
		}
		for _, k := range sortedKeys(m) {
			if nv, ok := checkShape(errs, join(path, k), m[k], fields[k]); ok {
				m[k] = nv
			} else {
				delete(m, k)
			}
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			return bad("want a mapping, got " + kindOf(v))
		}
		for _, k := range sortedKeys(m) {
			if nv, ok := checkShape(errs, join(path, k), m[k], t.Elem()); ok {
				m[k] = nv
			} else {
				delete(m, k)
			}
		}
	case reflect.Slice:
		l, ok := v.([]any)
		if !ok {
			return bad("want a list, got " + kindOf(v))
		}
		for i, e := range l {
			// A bad element becomes null (its zero value): the indices of the rest stay true.
			l[i], _ = checkShape(errs, fmt.Sprintf("%s[%d]", path, i), e, t.Elem())
		}
	case reflect.String:
		if _, ok := v.(string); !ok {
			msg := "want a string, got " + kindOf(v)
			if _, isBool := v.(bool); isBool {
				// YAML 1.1 reads a plain y, n, yes, no, on, off as booleans: a name like "no"
				// or "y" needs quotes.
				msg += ` (YAML reads unquoted y/n, yes/no, on/off, true/false as booleans: quote the value, e.g. "no")`
			}
			return bad(msg)
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			return bad("want true or false, got " + kindOf(v))
		}
	case reflect.Int, reflect.Int64, reflect.Int32:
		f, ok := v.(float64)
		if !ok || f != float64(int64(f)) || !fitsInt(f, t) {
			return bad("want an integer, got " + kindOf(v))
		}
	}
	return v, true
}

// fitsInt reports whether the integer f fits t's kind.
func fitsInt(f float64, t reflect.Type) bool {
	bits := t.Bits()
	lim := float64(uint64(1) << (bits - 1))
	return f >= -lim && f < lim
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// KindOf names the kind of a decoded YAML value for messages ("a mapping", "the number 5").
func KindOf(v any) string { return kindOf(v) }

func kindOf(v any) string {
	switch x := v.(type) {
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case float64:
		return "the number " + strconv.FormatFloat(x, 'g', -1, 64)
	default:
		return fmt.Sprintf("%T", v)
	}
}
