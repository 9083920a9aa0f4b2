package policy

// This file and schema_args.go are the only ones that use cedar-go's experimental schema API
// (x/exp/schema, no semver guarantee). Keep it that way: if the API changes, only they change.

import (
	_ "embed"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"

	cedar "github.com/cedar-policy/cedar-go"
	xast "github.com/cedar-policy/cedar-go/x/exp/ast"
	"github.com/cedar-policy/cedar-go/x/exp/schema"
	sast "github.com/cedar-policy/cedar-go/x/exp/schema/ast"
	"github.com/cedar-policy/cedar-go/x/exp/schema/validate"
)

// SchemaFile is the name of the optional schema file in a policy directory.
const SchemaFile = "schema.cedarschema"

//go:embed schema.cedarschema
var defaultSchema []byte

// DefaultSchema returns the Cedar schema (human-readable format) of the model this package
// builds for every request. Copy it next to your policies as schema.cedarschema to have them
// validated at load.
func DefaultSchema() []byte {
	return slices.Clone(defaultSchema)
}

// Schema is a parsed and resolved Cedar schema that validates policies in strict mode.
type Schema struct {
	name string
	ast  *sast.Schema
	v    *validate.Validator
	// inferArgs: the schema declares `type MCPArguments = {};`, so each policy's uses of
	// context.mcp.arguments declare its attributes (see schema_args.go).
	inferArgs bool
	// actions are the names of the schema's actions, for "did you mean" hints.
	actions []string
}

// builtinSchema is the default schema, parsed once: policies are validated against it when
// their Source has no schema of its own.
var builtinSchema = sync.OnceValues(func() (*Schema, error) {
	return ParseSchema(BuiltinSchemaName, defaultSchema)
})

// BuiltinSchemaName is how messages name the default schema.
const BuiltinSchemaName = "escrow's built-in schema"

// ParseSchema parses and resolves a schema in the Cedar human-readable format. name is used
// in error messages.
func ParseSchema(name string, src []byte) (s *Schema, err error) {
	defer recoverInto(&err, "parsing schema")
	var sc schema.Schema
	sc.SetFilename(name)
	if err := sc.UnmarshalCedar(src); err != nil {
		return nil, err
	}
	rs, err := sc.Resolve()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	var actions []string
	for uid := range rs.Actions {
		actions = append(actions, string(uid.ID))
	}
	slices.Sort(actions)
	return &Schema{name: name, ast: sc.AST(), v: validate.New(rs), inferArgs: inferArguments(sc.AST()), actions: actions}, nil
}

// ValidatePolicy type-checks one policy against the schema. The error lists every problem,
// one per line, sorted; problems that differ only in the action they were found for are
// merged into one line.
func (s *Schema) ValidatePolicy(id string, p *cedar.Policy) (err error) {
	defer recoverInto(&err, "validating policy")
	a := (*xast.Policy)(p.AST())
	v := s.v
	var problems []string
	if s.inferArgs {
		if rec, probs := argumentsShape(a); rec != nil {
			problems = probs
			if v, err = withArguments(s.ast, rec); err != nil {
				return fmt.Errorf("context.mcp.arguments: %w", err)
			}
		}
	}
	if err := v.Policy(id, a); err != nil {
		problems = append(problems, tidyValidation(id, err))
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "\n"))
	}
	return nil
}

// validateRequest checks a request and its entities against the schema (used by tests to keep
// the default schema and the request builder in sync).
func (s *Schema) validateRequest(req cedar.Request, entities []cedar.Entity) error {
	var errs []error
	if err := s.v.Request(req); err != nil {
		errs = append(errs, err)
	}
	for _, e := range entities {
		if err := s.v.Entity(e); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// recoverInto turns a panic in the experimental validator into an error, so a bad policy
// file cannot crash the proxy on reload.
func recoverInto(err *error, what string) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("internal error %s: %v", what, r)
	}
}

var forAction = regexp.MustCompile(` for (Action::"(?:[^"\\]|\\.)*")`)

// tidyValidation makes the validator's output stable and shorter: it drops the
// "for policy `id`, " prefix (the caller names the policy), merges lines that differ only in
// the action, and sorts them (the validator's order follows map iteration).
func tidyValidation(id string, err error) string {
	prefix := "for policy `" + id + "`, "
	type group struct {
		msg     string
		actions []string
	}
	groups := map[string]*group{}
	for line := range strings.SplitSeq(err.Error(), "\n") {
		line = strings.TrimSpace(strings.TrimPrefix(line, prefix))
		if line == "" {
			continue
		}
		key, act := line, ""
		if m := forAction.FindStringSubmatchIndex(line); m != nil {
			act = line[m[2]:m[3]]
			key = line[:m[0]] + line[m[1]:]
		}
		g := groups[key]
		if g == nil {
			g = &group{msg: key}
			groups[key] = g
		}
		if act != "" && !slices.Contains(g.actions, act) {
			g.actions = append(g.actions, act)
		}
	}
	lines := make([]string, 0, len(groups))
	for _, g := range groups {
		l := g.msg
		switch n := len(g.actions); {
		case n > 3:
			l += fmt.Sprintf(" (for %d actions)", n)
		case n > 0:
			slices.Sort(g.actions)
			l += " (for " + strings.Join(g.actions, ", ") + ")"
		}
		lines = append(lines, l)
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}
