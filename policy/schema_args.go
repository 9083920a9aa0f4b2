package policy

// Validation of context.mcp.arguments. The arguments of an MCP call are whatever JSON object
// the tool takes, so no fixed schema can declare them. When a schema declares the common type
// MCPArguments as an empty record (the default schema does), each policy is validated against
// a copy of the schema in which MCPArguments declares exactly the attributes that policy uses,
// every one optional (so the strict validator requires a `has` guard, as evaluation does: an
// absent attribute is an error, and an error denies), typed by how the policy uses it.

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	cedar "github.com/cedar-policy/cedar-go"
	xast "github.com/cedar-policy/cedar-go/x/exp/ast"
	"github.com/cedar-policy/cedar-go/x/exp/schema"
	sast "github.com/cedar-policy/cedar-go/x/exp/schema/ast"
	"github.com/cedar-policy/cedar-go/x/exp/schema/validate"
)

// ArgumentsType is the common type that, declared as an empty record, asks for the arguments'
// attributes to be inferred per policy.
const ArgumentsType = "MCPArguments"

// inferArguments reports whether the schema declares `type MCPArguments = {};` at the top level.
func inferArguments(s *sast.Schema) bool {
	ct, ok := s.CommonTypes[ArgumentsType]
	if !ok {
		return false
	}
	rec, ok := ct.Type.(sast.RecordType)
	return ok && len(rec) == 0
}

// argNode is what a policy does with one attribute path under context.mcp.arguments.
type argNode struct {
	attrs map[string]*argNode // attributes tested or read below this one (it is a record)
	uses  []sast.IsType       // the type each read wants; nil where the use says nothing
}

func (n *argNode) child(name string) *argNode {
	if n.attrs == nil {
		n.attrs = map[string]*argNode{}
	}
	c := n.attrs[name]
	if c == nil {
		c = &argNode{}
		n.attrs[name] = c
	}
	return c
}

// argumentsShape returns the MCPArguments record type that policy p needs, or nil when p does
// not look inside context.mcp.arguments; problems lists uses that cannot be typed.
func argumentsShape(p *xast.Policy) (rec sast.RecordType, problems []string) {
	root := &argNode{}
	for _, c := range p.Conditions {
		walkArgs(root, c.Body, sast.Bool())
	}
	if len(root.attrs) == 0 {
		return nil, nil
	}
	rec = sast.RecordType{}
	for _, name := range slices.Sorted(maps.Keys(root.attrs)) {
		t, probs := root.attrs[name].schemaType("context.mcp.arguments" + argPathString([]string{name}))
		problems = append(problems, probs...)
		rec[cedar.String(name)] = sast.Attribute{Type: t, Optional: true}
	}
	return rec, problems
}

// schemaType is the type this attribute is declared with; path names it in problems.
func (n *argNode) schemaType(path string) (sast.IsType, []string) {
	var kinds []string
	var typ sast.IsType
	for _, u := range n.uses {
		if u == nil {
			continue
		}
		if k := typeName(u); !slices.Contains(kinds, k) {
			kinds = append(kinds, k)
			typ = u
		}
	}
	if n.attrs != nil {
		if len(kinds) > 0 {
			return sast.RecordType{}, []string{fmt.Sprintf("%s is used both as a record and as %s", path, strings.Join(kinds, " and "))}
		}
		rec := sast.RecordType{}
		var problems []string
		for _, name := range slices.Sorted(maps.Keys(n.attrs)) {
			t, probs := n.attrs[name].schemaType(path + argPathString([]string{name}))
			problems = append(problems, probs...)
			rec[cedar.String(name)] = sast.Attribute{Type: t, Optional: true}
		}
		return rec, problems
	}
	switch len(kinds) {
	case 0:
		if len(n.uses) == 0 {
			// Only tested with `has`, never read: any type will do.
			return sast.RecordType{}, nil
		}
		// Read where the use does not say (compared with a non-literal, passed to a
		// function): a JSON value compared with something is most often a string.
		return sast.String(), nil
	case 1:
		return typ, nil
	}
	slices.Sort(kinds)
	return sast.String(), []string{fmt.Sprintf("%s is used both as %s", path, strings.Join(kinds, " and "))}
}

func typeName(t sast.IsType) string {
	switch t := t.(type) {
	case sast.StringType:
		return "String"
	case sast.LongType:
		return "Long"
	case sast.BoolType:
		return "Bool"
	case sast.SetType:
		return "Set<" + typeName(t.Element) + ">"
	case sast.RecordType:
		return "a record"
	}
	return fmt.Sprintf("%v", t)
}

// argPath returns the attribute path of n below context.mcp.arguments (empty for the
// arguments themselves), or ok false if n is not such an access.
func argPath(n xast.IsNode) (path []string, ok bool) {
	for {
		a, isAccess := n.(xast.NodeTypeAccess)
		if !isAccess {
			return nil, false
		}
		if inner, isAccess := a.Arg.(xast.NodeTypeAccess); isAccess && a.Value == "arguments" && inner.Value == "mcp" {
			if v, isVar := inner.Arg.(xast.NodeTypeVariable); isVar && v.Name == "context" {
				slices.Reverse(path)
				return path, true
			}
		}
		path = append(path, string(a.Value))
		n = a.Arg
	}
}

// argPathString renders path as Cedar would write it, e.g. `.path` or `["x-y"]`.
func argPathString(path []string) string {
	var b strings.Builder
	for _, p := range path {
		if isIdent(p) {
			b.WriteString("." + p)
		} else {
			fmt.Fprintf(&b, "[%q]", p)
		}
	}
	return b.String()
}

func isIdent(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		if r != '_' && !('a' <= r && r <= 'z') && !('A' <= r && r <= 'Z') && (i == 0 || !('0' <= r && r <= '9')) {
			return false
		}
	}
	return true
}

// record notes a read of path (below root) whose use wants type want (nil: unknown).
func (root *argNode) record(path []string, want sast.IsType) {
	n := root
	for _, p := range path {
		n = n.child(p)
	}
	n.uses = append(n.uses, want)
}

// literalType is the schema type of a literal (a value, or a set of values of one type), or
// nil when n is not such a literal.
func literalType(n xast.IsNode) sast.IsType {
	switch n := n.(type) {
	case xast.NodeValue:
		switch n.Value.(type) {
		case cedar.String:
			return sast.String()
		case cedar.Long:
			return sast.Long()
		case cedar.Boolean:
			return sast.Bool()
		}
	case xast.NodeTypeSet:
		if len(n.Elements) == 0 {
			return nil
		}
		e := literalType(n.Elements[0])
		if e == nil {
			return nil
		}
		for _, x := range n.Elements[1:] {
			if t := literalType(x); t == nil || typeName(t) != typeName(e) {
				return nil
			}
		}
		return sast.Set(e)
	}
	return nil
}

func elementType(t sast.IsType) sast.IsType {
	if s, ok := t.(sast.SetType); ok {
		return s.Element
	}
	return nil
}

func setOf(t sast.IsType) sast.IsType {
	if t == nil {
		t = sast.String()
	}
	return sast.Set(t)
}

// walkArgs records every use of context.mcp.arguments in n, whose parent wants type want
// (nil: unknown).
func walkArgs(root *argNode, n xast.IsNode, want sast.IsType) {
	if path, ok := argPath(n); ok {
		if len(path) > 0 {
			root.record(path, want)
		}
		return
	}
	w := func(c xast.IsNode, t sast.IsType) { walkArgs(root, c, t) }
	switch n := n.(type) {
	case xast.NodeTypeHas:
		if path, ok := argPath(n.Arg); ok {
			t := root
			for _, p := range path {
				t = t.child(p)
			}
			t.child(string(n.Value))
			return
		}
		w(n.Arg, nil)
	case xast.NodeTypeAccess:
		w(n.Arg, nil)
	case xast.NodeTypeAnd:
		w(n.Left, sast.Bool())
		w(n.Right, sast.Bool())
	case xast.NodeTypeOr:
		w(n.Left, sast.Bool())
		w(n.Right, sast.Bool())
	case xast.NodeTypeNot:
		w(n.Arg, sast.Bool())
	case xast.NodeTypeIfThenElse:
		w(n.If, sast.Bool())
		w(n.Then, want)
		w(n.Else, want)
	case xast.NodeTypeEquals:
		w(n.Left, literalType(n.Right))
		w(n.Right, literalType(n.Left))
	case xast.NodeTypeNotEquals:
		w(n.Left, literalType(n.Right))
		w(n.Right, literalType(n.Left))
	case xast.NodeTypeLessThan:
		w(n.Left, sast.Long())
		w(n.Right, sast.Long())
	case xast.NodeTypeLessThanOrEqual:
		w(n.Left, sast.Long())
		w(n.Right, sast.Long())
	case xast.NodeTypeGreaterThan:
		w(n.Left, sast.Long())
		w(n.Right, sast.Long())
	case xast.NodeTypeGreaterThanOrEqual:
		w(n.Left, sast.Long())
		w(n.Right, sast.Long())
	case xast.NodeTypeAdd:
		w(n.Left, sast.Long())
		w(n.Right, sast.Long())
	case xast.NodeTypeSub:
		w(n.Left, sast.Long())
		w(n.Right, sast.Long())
	case xast.NodeTypeMult:
		w(n.Left, sast.Long())
		w(n.Right, sast.Long())
	case xast.NodeTypeNegate:
		w(n.Arg, sast.Long())
	case xast.NodeTypeLike:
		w(n.Arg, sast.String())
	case xast.NodeTypeContains:
		w(n.Left, setOf(literalType(n.Right)))
		w(n.Right, elementType(literalType(n.Left)))
	case xast.NodeTypeContainsAll:
		w(n.Left, setOf(elementType(literalType(n.Right))))
		w(n.Right, setOf(elementType(literalType(n.Left))))
	case xast.NodeTypeContainsAny:
		w(n.Left, setOf(elementType(literalType(n.Right))))
		w(n.Right, setOf(elementType(literalType(n.Left))))
	case xast.NodeTypeIsEmpty:
		w(n.Arg, setOf(nil))
	case xast.NodeTypeIn:
		w(n.Left, nil)
		w(n.Right, nil)
	case xast.NodeTypeIs:
		w(n.Left, nil)
	case xast.NodeTypeIsIn:
		w(n.Left, nil)
		w(n.Entity, nil)
	case xast.NodeTypeHasTag:
		w(n.Left, nil)
		w(n.Right, nil)
	case xast.NodeTypeGetTag:
		w(n.Left, nil)
		w(n.Right, nil)
	case xast.NodeTypeRecord:
		for _, e := range n.Elements {
			w(e.Value, nil)
		}
	case xast.NodeTypeSet:
		for _, e := range n.Elements {
			w(e, nil)
		}
	case xast.NodeTypeExtensionCall:
		for _, a := range n.Args {
			w(a, nil)
		}
	}
}

// withArguments returns a validator for a copy of the schema whose MCPArguments is rec.
func withArguments(s *sast.Schema, rec sast.RecordType) (*validate.Validator, error) {
	cp := *s
	cp.CommonTypes = maps.Clone(s.CommonTypes)
	cp.CommonTypes[ArgumentsType] = sast.CommonType{Type: rec}
	rs, err := schema.NewSchemaFromAST(&cp).Resolve()
	if err != nil {
		return nil, err
	}
	return validate.New(rs), nil
}
