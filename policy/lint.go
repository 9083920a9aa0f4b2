package policy

// Checks for policies that are valid Cedar but can never match a request escrow builds, and
// hints for the common mistakes. They run with every schema (they are about the request model,
// which is fixed), and report the offending token's position.

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"unicode/utf8"

	cedar "github.com/cedar-policy/cedar-go"
	xast "github.com/cedar-policy/cedar-go/x/exp/ast"
)

// ErrNeverMatches is the kind of a policy that parses and validates but can never match a
// request (a principal compared with a ServiceAccount, a host name with upper case or a port).
var ErrNeverMatches = errors.New("policy can never match")

// finding is one lint result: what is wrong and the source text to point at.
type finding struct {
	detail string
	token  string // searched for in the policy's text to give the position; "" for none
}

// lintPolicy returns what makes p unable to match any request escrow builds.
func lintPolicy(p *cedar.Policy) []finding {
	a := (*xast.Policy)(p.AST())
	var out []finding
	add := func(f finding) {
		for _, g := range out {
			if g == f {
				return
			}
		}
		out = append(out, f)
	}
	switch s := a.Principal.(type) {
	case xast.ScopeTypeEq:
		if f, ok := principalEq(s.Entity); ok {
			add(f)
		}
	}
	checkUID := func(uid cedar.EntityUID) {
		if f, ok := hostFinding(uid); ok {
			add(f)
		}
	}
	for _, s := range []xast.IsScopeNode{a.Principal, a.Resource} {
		switch s := s.(type) {
		case xast.ScopeTypeEq:
			checkUID(s.Entity)
		case xast.ScopeTypeIn:
			checkUID(s.Entity)
		case xast.ScopeTypeIsIn:
			checkUID(s.Entity)
		}
	}
	for _, c := range a.Conditions {
		xast.Inspect(xast.NewNode(c.Body), func(n xast.IsNode) bool {
			switch n := n.(type) {
			case xast.NodeValue:
				if uid, ok := n.Value.(cedar.EntityUID); ok {
					checkUID(uid)
				}
			case xast.NodeTypeEquals:
				for _, pair := range [][2]xast.IsNode{{n.Left, n.Right}, {n.Right, n.Left}} {
					if v, ok := pair[0].(xast.NodeTypeVariable); ok && v.Name == "principal" {
						if val, ok := pair[1].(xast.NodeValue); ok {
							if uid, ok := val.Value.(cedar.EntityUID); ok {
								if f, ok := principalEq(uid); ok {
									add(f)
								}
							}
						}
					}
				}
			}
			return true
		})
	}
	return out
}

// principalEq reports `principal == E` where E is not a Workload: the principal always is one.
func principalEq(uid cedar.EntityUID) (finding, bool) {
	if uid.Type != TypeServiceAccount && uid.Type != TypeNamespace {
		return finding{}, false
	}
	return finding{
		detail: fmt.Sprintf("principal == %s is never true: a principal is a Workload; use `principal in %s`", uid, uid),
		token:  uid.String(),
	}, true
}

// hostFinding reports a Host (or the host part of a Tool, Resource or Prompt) that no request
// can have: escrow lower-cases host names and never includes the port.
func hostFinding(uid cedar.EntityUID) (finding, bool) {
	host := string(uid.ID)
	switch uid.Type {
	case TypeHost:
	case TypeTool, TypeResource, TypePrompt:
		host, _, _ = strings.Cut(host, "/")
	default:
		return finding{}, false
	}
	fixed := normalizeHost(host)
	if h, port, err := net.SplitHostPort(fixed); err == nil && port != "" && strings.Trim(port, "0123456789") == "" {
		fixed = strings.Trim(h, "[]")
	}
	if fixed == host {
		return finding{}, false
	}
	want := cedar.NewEntityUID(uid.Type, cedar.String(fixed+strings.TrimPrefix(string(uid.ID), host)))
	return finding{
		detail: fmt.Sprintf("%s never matches: host names are lower case, without port (did you mean %s?)", uid, want),
		token:  uid.String(),
	}, true
}

var (
	unrecognizedAction = regexp.MustCompile("unrecognized action `Action::\"((?:[^\"\\\\]|\\\\.)*)\"`")
	unrecognizedType   = regexp.MustCompile("unrecognized entity type `([^`]+)`")
	attributeNotFound  = regexp.MustCompile("attribute `([^`]+)` (?:in context|on entity type `[^`]+`) not found")
	optionalAttribute  = regexp.MustCompile("optional attribute `([^`]+)`")
)

// noApplicableAction is the validator's message for a scope no action applies to; it only
// repeats what a more precise message says, when there is one.
const noApplicableAction = "unable to find an applicable action given the policy scope constraints"

// explain adds a hint to a validation message where it helps, and returns the token to point
// at. actions are the schema's action names.
func explain(msg string, actions []string) (detail, token string) {
	if m := unrecognizedAction.FindStringSubmatch(msg); m != nil {
		name := m[1]
		for _, a := range actions {
			if a != name && strings.EqualFold(a, name) {
				msg += fmt.Sprintf(" (did you mean Action::%q? HTTP methods are upper case)", a)
				break
			}
		}
		return msg, fmt.Sprintf("Action::%q", name)
	}
	if m := unrecognizedType.FindStringSubmatch(msg); m != nil {
		return msg, m[1] + "::"
	}
	if m := attributeNotFound.FindStringSubmatch(msg); m != nil {
		return msg, "." + m[1]
	}
	if m := optionalAttribute.FindStringSubmatch(msg); m != nil {
		path := strings.Split(m[1], ".")
		return msg + " (test it with `has` first)", "." + path[len(path)-1]
	}
	return msg, ""
}

// locate returns the 1-based line and column of the first occurrence of token in
// text[from:to] that is not part of a longer identifier, or 0, 0.
func locate(text []byte, from, to int, token string) (line, col int) {
	if token == "" || from < 0 || to > len(text) || from >= to {
		return 0, 0
	}
	span := string(text[from:to])
	for off := 0; ; {
		i := strings.Index(span[off:], token)
		if i < 0 {
			return 0, 0
		}
		at := off + i
		end := at + len(token)
		if end < len(span) && isIdentByte(span[end]) && isIdentByte(token[len(token)-1]) {
			off = at + 1
			continue
		}
		before := string(text[:from+at])
		line = strings.Count(before, "\n") + 1
		col = utf8.RuneCountInString(before[strings.LastIndexByte(before, '\n')+1:]) + 1
		return line, col
	}
}

func isIdentByte(b byte) bool {
	return b == '_' || 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9'
}

// contextFree reports whether p's conditions read nothing of the context but `context has
// mcp`, context.mcp.name and context.mcp.method: what is known of an MCP call before its
// arguments (a tool in a tools/list).
func contextFree(p *cedar.Policy) bool {
	free := true
	for _, c := range (*xast.Policy)(p.AST()).Conditions {
		xast.Inspect(xast.NewNode(c.Body), func(n xast.IsNode) bool {
			switch n := n.(type) {
			case xast.NodeTypeHas:
				if isContext(n.Arg) && n.Value == "mcp" {
					return false
				}
			case xast.NodeTypeAccess:
				if inner, ok := n.Arg.(xast.NodeTypeAccess); ok && isContext(inner.Arg) && inner.Value == "mcp" && (n.Value == "name" || n.Value == "method") {
					return false
				}
			case xast.NodeTypeVariable:
				if n.Name == "context" {
					free = false
				}
			}
			return free
		})
	}
	return free
}

func isContext(n xast.IsNode) bool {
	v, ok := n.(xast.NodeTypeVariable)
	return ok && v.Name == "context"
}
