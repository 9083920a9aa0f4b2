package policy

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/internal/strictyaml"
)

// parseTestFile reads a test file strictly and reports every mistake at once, in the file's
// own terms: the key (with the case's number and name), what was expected and what was found.
// It does not check values against their sets (that is testFile.check).
// When the file is not YAML at all, that is the only problem and ok is false.
func parseTestFile(raw []byte) (tf testFile, problems []fileProblem, ok bool) {
	// Numbers as written, so that a whole number is told from 1.5 or 1e99 exactly.
	doc, err := strictyaml.Decode(raw, strictyaml.Options{UseNumber: true, Strict: true})
	if err != nil {
		return tf, []fileProblem{{msg: err.Error()}}, false
	}
	d := &fileDecoder{}
	top := d.mapping("", "", doc.Value, "policies", "time", "cases")
	tf.Policies = d.str("", "policies", top["policies"])
	tf.Time = d.time("", "time", top["time"])
	if v, ok := top["cases"]; ok && v != nil {
		list, ok := v.([]any)
		if !ok {
			d.errf("", "cases", "must be a list of cases, not %s", describe(v))
		}
		for i, item := range list {
			tf.Cases = append(tf.Cases, d.testCase(i, item))
		}
	}
	for _, dup := range doc.Duplicates {
		// A key written twice in a case is named like every other problem of that case.
		p := fileProblem{key: dup.Path.String(), msg: dup.Msg()}
		if i, ok := caseIndex(dup.Path); ok && i < len(tf.Cases) {
			p.where, p.key = caseLabel(i, tf.Cases[i].Name), dup.Path[2:].String()
		}
		d.errs = append(d.errs, p)
	}
	return tf, d.errs, true
}

// caseIndex is the index of the case p is within (cases[i]...).
func caseIndex(p strictyaml.Path) (int, bool) {
	if len(p) < 3 || p[0] != "cases" {
		return 0, false
	}
	i, ok := p[1].(int)
	return i, ok
}

// fileProblem is one mistake in a test file: where is the case label ("" outside cases), key
// the key path within it, meant the key an unknown key is a near miss of.
type fileProblem struct {
	where, key, msg string
	meant           string
}

func (p fileProblem) String() string {
	s := p.msg
	if p.key != "" {
		s = p.key + ": " + s
	}
	if p.where != "" {
		s = p.where + ": " + s
	}
	return s
}

// mergeProblems is the parse problems followed by the check problems that do not repeat them:
// none at a key the parse already reported, nor a missing key an unknown key was a near miss
// of (`expct` says it all; "expect: required" would only repeat it).
func mergeProblems(parse, check []fileProblem) []string {
	out := make([]string, 0, len(parse)+len(check))
	for _, p := range parse {
		out = append(out, p.String())
	}
next:
	for _, c := range check {
		for _, p := range parse {
			if p.where == c.where && (p.key == c.key || p.meant == c.key) {
				continue next
			}
		}
		out = append(out, c.String())
	}
	return out
}

// fileDecoder collects problems.
type fileDecoder struct {
	errs []fileProblem
}

func (d *fileDecoder) errf(where, key, format string, args ...any) {
	d.errs = append(d.errs, fileProblem{where: where, key: key, msg: fmt.Sprintf(format, args...)})
}

func (d *fileDecoder) testCase(i int, v any) testCase {
	var c testCase
	// The name first, so that every other problem of the case can be labelled with it.
	if m, ok := v.(map[string]any); ok {
		if n, ok := m["name"].(string); ok {
			c.Name = n
		}
	}
	where := caseLabel(i, c.Name)
	m := d.mapping(where, "", v, "name", "principal", "identity", "caller", "delegation", "time", "request", "expect", "policies")
	c.Name = d.str(where, "name", m["name"])
	c.Principal = d.str(where, "principal", m["principal"])
	c.Time = d.time(where, "time", m["time"])
	c.Expect = d.str(where, "expect", m["expect"])
	if v, ok := m["policies"]; ok && v != nil {
		c.Policies = d.strList(where, "policies", v)
	}
	if v, ok := m["identity"]; ok && v != nil {
		im := d.mapping(where, "identity", v, "attested", "source", "expires_in_s")
		id := &testIdentity{Source: d.str(where, "identity.source", im["source"])}
		if v, ok := im["attested"]; ok && v != nil {
			if b, ok := v.(bool); ok {
				id.Attested = &b
			} else {
				d.errf(where, "identity.attested", "must be true or false, not %s", describe(v))
			}
		}
		if v, ok := im["expires_in_s"]; ok && v != nil {
			if n, ok := d.integer(where, "identity.expires_in_s", v); ok {
				id.ExpiresInS = &n
			}
		}
		c.Identity = id
	}
	if v, ok := m["caller"]; ok && v != nil {
		cm := d.mapping(where, "caller", v, "uid", "gid", "pid", "exe", "sha256")
		p := &attest.Process{Exe: d.str(where, "caller.exe", cm["exe"]), SHA256: d.str(where, "caller.sha256", cm["sha256"])}
		// In a fixed order (the problems are), each within the kernel's range: a value outside
		// would silently wrap around.
		for _, f := range []struct {
			key   string
			limit int64
			set   func(int64)
		}{
			{"uid", math.MaxUint32, func(n int64) { p.UID = uint32(n) }},
			{"gid", math.MaxUint32, func(n int64) { p.GID = uint32(n) }},
			{"pid", math.MaxInt32, func(n int64) { p.PID = int(n) }},
		} {
			v, ok := cm[f.key]
			if !ok || v == nil {
				continue
			}
			if n, ok := d.integer(where, "caller."+f.key, v); ok {
				if n < 0 || n > f.limit {
					d.errf(where, "caller."+f.key, "must be a whole number from 0 to %d, not %d", f.limit, n)
				} else {
					f.set(n)
				}
			}
		}
		c.Caller = p
	}
	if v, ok := m["delegation"]; ok && v != nil {
		dm := d.mapping(where, "delegation", v, "subject", "actors", "issuer")
		c.Delegation = &attest.Delegation{Subject: d.str(where, "delegation.subject", dm["subject"]), Issuer: d.str(where, "delegation.issuer", dm["issuer"])}
		if v, ok := dm["actors"]; ok && v != nil {
			c.Delegation.Actors = d.strList(where, "delegation.actors", v)
		}
	}
	rm := d.mapping(where, "request", m["request"], "action", "method", "scheme", "host", "port", "path", "credential", "upgrade", "name", "arguments")
	if v, ok := rm["arguments"]; ok && v != nil {
		if args, ok := v.(map[string]any); ok {
			c.Request.Arguments = args
		} else {
			d.errf(where, "request.arguments", "must be a mapping (the call's arguments object), not %s", describe(v))
		}
	}
	c.Request = testRequest{
		Arguments:  c.Request.Arguments,
		Upgrade:    d.str(where, "request.upgrade", rm["upgrade"]),
		Name:       d.str(where, "request.name", rm["name"]),
		Action:     d.str(where, "request.action", rm["action"]),
		Method:     d.str(where, "request.method", rm["method"]),
		Scheme:     d.str(where, "request.scheme", rm["scheme"]),
		Host:       d.str(where, "request.host", rm["host"]),
		Path:       d.str(where, "request.path", rm["path"]),
		Credential: d.str(where, "request.credential", rm["credential"]),
	}
	if v, ok := rm["port"]; ok && v != nil {
		if n, ok := d.integer(where, "request.port", v); ok {
			c.Request.Port = int(max(min(n, 1<<20), -1)) // out of range either way: check says so
		}
	}
	return c
}

// mapping returns v as a mapping, reporting every key not in keys (with a "did you mean").
// A missing or null v is an empty mapping: check reports the required keys.
func (d *fileDecoder) mapping(where, key string, v any, keys ...string) map[string]any {
	if v == nil {
		return map[string]any{}
	}
	m, ok := v.(map[string]any)
	if !ok {
		d.errf(where, key, "must be a mapping (key: value), not %s", describe(v))
		return map[string]any{}
	}
	within := func(k string) string {
		if key == "" {
			return k
		}
		return key + "." + k
	}
	for _, u := range strictyaml.UnknownKeys(m, keys) {
		p := fileProblem{where: where, key: within(u.Key), msg: "unknown key"}
		if u.Meant != "" {
			p.msg += " (did you mean " + u.Meant + "?)"
			p.meant = within(u.Meant)
		} else {
			p.msg += " (known keys: " + strings.Join(keys, ", ") + ")"
		}
		d.errs = append(d.errs, p)
	}
	return m
}

func (d *fileDecoder) str(where, key string, v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return v
	}
	d.errf(where, key, "must be a string, not %s", describe(v))
	return ""
}

func (d *fileDecoder) integer(where, key string, v any) (int64, bool) {
	if n, ok := v.(json.Number); ok {
		if i, err := n.Int64(); err == nil {
			return i, true
		}
	}
	d.errf(where, key, "must be a whole number, not %s", describe(v))
	return 0, false
}

func (d *fileDecoder) time(where, key string, v any) *time.Time {
	if v == nil {
		return nil
	}
	if s, ok := v.(string); ok {
		if t, err := time.Parse(time.RFC3339, s); err == nil {
			return &t
		}
	}
	d.errf(where, key, "must be an RFC 3339 time such as 2026-01-05T09:30:00Z, not %s", describe(v))
	return nil
}

func (d *fileDecoder) strList(where, key string, v any) []string {
	list, ok := v.([]any)
	if !ok {
		d.errf(where, key, "must be a list of strings, not %s", describe(v))
		return nil
	}
	out := make([]string, 0, len(list))
	for i, e := range list {
		if s, ok := e.(string); ok {
			out = append(out, s)
		} else {
			d.errf(where, fmt.Sprintf("%s[%d]", key, i), "must be a string, not %s", describe(e))
		}
	}
	return out
}

// describe names a decoded YAML value in the file's terms.
func describe(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case string:
		return fmt.Sprintf("the string %q", v)
	case json.Number:
		return "the number " + v.String()
	case bool:
		return fmt.Sprintf("%v", v)
	case []any:
		return "a list"
	case map[string]any:
		return "a mapping"
	}
	return fmt.Sprintf("%v", v)
}
