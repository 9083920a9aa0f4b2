package policy

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	cedar "github.com/cedar-policy/cedar-go"
)

// Kinds of load problems; a [Problem] wraps one of these, so errors.Is works on the error
// returned by [Compile], [Engine.Load], [Engine.LoadDir] and [ValidateDir].
var (
	ErrNoPolicies  = errors.New("no *.cedar policy files")
	ErrParse       = errors.New("parse error")
	ErrMissingID   = errors.New(`policy has no @id("...") annotation`)
	ErrDuplicateID = errors.New("duplicate policy @id")
	ErrSchema      = errors.New("invalid schema")
	ErrValidation  = errors.New("policy does not match the schema")
)

// Problem is one thing wrong with a policy set.
type Problem struct {
	File     string // the file, as origin/name (or name when the Source has no Origin)
	Line     int    // 1-based; 0 if unknown
	Column   int    // 1-based; 0 if unknown
	PolicyID string // the policy's @id, when known
	Kind     error  // one of the Err* kinds above
	Detail   string // what cedar said, if anything
	Schema   string // for ErrValidation: the schema's file, or BuiltinSchemaName
	cause    error
}

func (p *Problem) Error() string {
	var b strings.Builder
	if p.File != "" {
		b.WriteString(p.File)
		if p.Line > 0 {
			b.WriteString(":" + strconv.Itoa(p.Line))
			if p.Column > 0 {
				b.WriteString(":" + strconv.Itoa(p.Column))
			}
		}
		b.WriteString(": ")
	}
	if p.PolicyID != "" {
		b.WriteString("policy " + strconv.Quote(p.PolicyID) + ": ")
	}
	if p.Kind == ErrValidation && p.Schema != "" {
		b.WriteString("policy does not match " + p.Schema)
	} else {
		b.WriteString(p.Kind.Error())
	}
	if p.Detail != "" {
		b.WriteString(": " + p.Detail)
	}
	return b.String()
}

func (p *Problem) Unwrap() []error {
	if p.cause != nil {
		return []error{p.Kind, p.cause}
	}
	return []error{p.Kind}
}

// LoadError is returned when a policy set cannot be compiled; it lists every problem.
type LoadError struct {
	Origin   string // the Source's Origin (the directory, for ReadDir)
	Problems []*Problem
}

func (e *LoadError) Error() string {
	prefix := "policy: load"
	if e.Origin != "" {
		prefix += " " + e.Origin
	}
	if len(e.Problems) == 1 {
		return prefix + ": " + e.Problems[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d problems:", prefix, len(e.Problems))
	for _, p := range e.Problems {
		b.WriteString("\n\t" + p.Error())
	}
	return b.String()
}

func (e *LoadError) Unwrap() []error {
	errs := make([]error, len(e.Problems))
	for i, p := range e.Problems {
		errs[i] = p
	}
	return errs
}

// Source is a complete policy set as text: what a policy directory holds, or what the control
// plane sends. Compile turns it into a [Set].
type Source struct {
	// Origin says where the text came from (a directory such as "policies/", or "xds"). It
	// only prefixes file names in messages: it is not part of the content hash, so the same
	// text has the same version wherever it came from.
	Origin string
	// Policies maps a file name (e.g. "base.cedar") to its Cedar text. Files are compiled in
	// name order, so policy order (and the order of determining policy ids) is stable.
	Policies map[string][]byte
	// Schema is the Cedar schema (human-readable format) every policy is validated against
	// (strict mode). nil means escrow's built-in schema ([DefaultSchema]), as for a directory
	// without schema.cedarschema. A non-nil empty schema is a schema that declares nothing.
	Schema []byte

	// unvalidated skips schema validation and the never-matches checks (this package's tests
	// of evaluation errors; never set outside them).
	unvalidated bool
}

// ReadDir reads dir/*.cedar (dot-files skipped, symlinks followed, so Kubernetes ConfigMap
// mounts work) and dir/schema.cedarschema if present. The Source's Origin is dir.
func ReadDir(dir string) (Source, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return Source{}, fmt.Errorf("policy: read %s: %w", dir, err)
	}
	src := Source{Origin: dir, Policies: map[string][]byte{}}
	for _, de := range ents {
		name := de.Name()
		isPolicy := strings.HasSuffix(name, ".cedar")
		if strings.HasPrefix(name, ".") || (!isPolicy && name != SchemaFile) {
			continue
		}
		path := filepath.Join(dir, name)
		fi, err := os.Stat(path)
		if err != nil {
			return Source{}, fmt.Errorf("policy: read %s: %w", path, err)
		}
		if fi.IsDir() {
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return Source{}, fmt.Errorf("policy: read %s: %w", path, err)
		}
		if data == nil {
			data = []byte{} // an empty schema file is still a schema (nil means none)
		}
		if isPolicy {
			src.Policies[name] = data
		} else {
			src.Schema = data
		}
	}
	return src, nil
}

// names returns the policy file names in the order they are compiled and hashed.
func (src *Source) names() []string {
	names := make([]string, 0, len(src.Policies))
	for n := range src.Policies {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// displayName is a file name as messages and positions show it: under Origin, if any.
func (src *Source) displayName(name string) string {
	if src.Origin == "" {
		return name
	}
	return filepath.Join(src.Origin, name)
}

// hash is the hex sha256 over the file names and contents (not Origin). Every part is
// length-prefixed so that no two different sources hash alike.
func (src *Source) hash() string {
	h := sha256.New()
	write := func(tag byte, name string, data []byte) {
		var n [8]byte
		h.Write([]byte{tag})
		binary.BigEndian.PutUint64(n[:], uint64(len(name)))
		h.Write(n[:])
		h.Write([]byte(name))
		binary.BigEndian.PutUint64(n[:], uint64(len(data)))
		h.Write(n[:])
		h.Write(data)
	}
	for _, name := range src.names() {
		write('p', name, src.Policies[name])
	}
	if src.Schema != nil {
		write('s', SchemaFile, src.Schema)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Set is a compiled policy set: parsed, checked, validated against the Source's schema and
// indexed. It is immutable, so one Set may be installed in several engines and read by any
// number of goroutines.
type Set struct {
	origin  string // for logs
	hash    string
	version string // short hash
	ids     []cedar.PolicyID
	pols    []*cedar.Policy
	idx     index
	full    *cedar.PolicySet // the same policies, unindexed (tests and the baseline benchmark)
	// static[i]: policy i's conditions read no context but the MCP call's name and method
	// (see Engine.MayAllow).
	static []bool
}

// Version returns the short content hash of the set: the same text gives the same version,
// whatever its Origin.
func (s *Set) Version() string { return s.version }

// Len returns the number of policies in the set.
func (s *Set) Len() int { return len(s.ids) }

// versionLen is the length of the short content hash returned by Version.
const versionLen = 12

// Compile parses, checks, validates and indexes src. It does no I/O, so text that arrives
// over the network is checked exactly like a directory. On any problem it returns a
// *LoadError listing all of them, each with its position as "name:line:col".
func Compile(src Source) (*Set, error) {
	var probs []*Problem
	names := src.names()
	if len(names) == 0 {
		probs = append(probs, &Problem{File: src.Origin, Kind: ErrNoPolicies})
	}
	var sch *Schema
	schemaName := BuiltinSchemaName
	switch {
	case src.unvalidated:
	case src.Schema == nil:
		s, err := builtinSchema()
		if err != nil {
			return nil, fmt.Errorf("policy: %w", err) // a bug: the embedded schema is tested
		}
		sch = s
	default:
		name := src.displayName(SchemaFile)
		schemaName = name
		s, err := ParseSchema(name, src.Schema)
		if err != nil {
			line, col, detail := splitPosition(name, err.Error())
			probs = append(probs, &Problem{File: name, Line: line, Column: col, Kind: ErrSchema, Detail: detail, cause: err})
		}
		sch = s
	}

	hash := src.hash()
	set := &Set{origin: src.Origin, hash: hash, version: hash[:versionLen], full: cedar.NewPolicySet()}
	firstAt := map[cedar.PolicyID]cedar.Position{}
	for _, name := range names {
		file := src.displayName(name)
		list, err := cedar.NewPolicyListFromBytes(file, src.Policies[name])
		if err != nil {
			probs = append(probs, parseProblem(file, err))
			continue
		}
		text := src.Policies[name]
		for i, p := range list {
			pos := p.Position()
			end := len(text)
			if i+1 < len(list) {
				end = list[i+1].Position().Offset
			}
			prob := func(id string, kind error, detail string) *Problem {
				return &Problem{File: file, Line: pos.Line, Column: pos.Column, PolicyID: id, Kind: kind, Detail: detail}
			}
			// at is prob at token's position in this policy's text, when it can be found.
			at := func(id string, kind error, detail, token string) *Problem {
				pr := prob(id, kind, detail)
				if l, c := locate(text, pos.Offset, end, token); l > 0 {
					pr.Line, pr.Column = l, c
				}
				return pr
			}
			rawID, hasID := p.Annotations()["id"]
			id := string(rawID)
			switch first, dup := firstAt[cedar.PolicyID(id)]; {
			case !hasID:
				probs = append(probs, prob("", ErrMissingID, ""))
			case strings.TrimSpace(id) == "":
				probs = append(probs, prob("", ErrMissingID, "the @id is empty"))
			case dup:
				probs = append(probs, prob(id, ErrDuplicateID, "first defined at "+formatPosition(first)))
			default:
				firstAt[cedar.PolicyID(id)] = pos
				set.ids = append(set.ids, cedar.PolicyID(id))
				set.pols = append(set.pols, p)
				set.full.Add(cedar.PolicyID(id), p)
			}
			if src.unvalidated {
				continue
			}
			lints := lintPolicy(p)
			for _, f := range lints {
				probs = append(probs, at(id, ErrNeverMatches, f.detail, f.token))
			}
			if sch != nil {
				if err := sch.ValidatePolicy(id, p); err != nil {
					lines := strings.Split(err.Error(), "\n")
					for _, line := range lines {
						if line == noApplicableAction && (len(lines) > 1 || len(lints) > 0) {
							continue // a consequence of what the other problems say
						}
						detail, token := explain(line, sch.actions)
						pr := at(id, ErrValidation, detail, token)
						pr.Schema = schemaName
						pr.cause = err
						probs = append(probs, pr)
					}
				}
			}
		}
	}
	if len(probs) > 0 {
		return nil, &LoadError{Origin: src.Origin, Problems: probs}
	}
	set.idx = newIndex(set.pols)
	set.static = make([]bool, len(set.pols))
	for i, p := range set.pols {
		set.static[i] = contextFree(p)
	}
	return set, nil
}

func formatPosition(p cedar.Position) string {
	return fmt.Sprintf("%s:%d:%d", p.Filename, p.Line, p.Column)
}

// cedar-go reports parse errors as `parser error: parse error at <input>:L:C "tok": msg`.
var parsePos = regexp.MustCompile(`^(?:parser error: )?(?:parse error at )?<input>:(\d+):(\d+):? ?`)

func parseProblem(file string, err error) *Problem {
	p := &Problem{File: file, Kind: ErrParse, cause: err}
	msg := err.Error()
	if m := parsePos.FindStringSubmatchIndex(msg); m != nil {
		p.Line, _ = strconv.Atoi(msg[m[2]:m[3]])
		p.Column, _ = strconv.Atoi(msg[m[4]:m[5]])
		msg = msg[m[1]:]
		if strings.HasPrefix(msg, `"`) {
			msg = "near " + msg
		}
	} else {
		msg = strings.TrimPrefix(msg, "parser error: ")
	}
	p.Detail = msg
	return p
}

// splitPosition strips a leading "name:L:C: " from msg.
func splitPosition(name, msg string) (line, col int, rest string) {
	rest, ok := strings.CutPrefix(msg, name+":")
	if !ok {
		return 0, 0, msg
	}
	l, r, ok1 := strings.Cut(rest, ":")
	c, r2, ok2 := strings.Cut(r, ":")
	ln, err1 := strconv.Atoi(l)
	cn, err2 := strconv.Atoi(c)
	if !ok1 || !ok2 || err1 != nil || err2 != nil {
		return 0, 0, msg
	}
	return ln, cn, strings.TrimSpace(r2)
}

// ValidateDir reads and compiles dir exactly as [Engine.LoadDir] would, without installing
// it, and returns the number of policies. It is `escrow policy validate --dir D`.
func ValidateDir(dir string) (policies int, err error) {
	src, err := ReadDir(dir)
	if err != nil {
		return 0, err
	}
	set, err := Compile(src)
	if err != nil {
		return 0, err
	}
	return set.Len(), nil
}
