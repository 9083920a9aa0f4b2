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
	"strconv"
	"strings"

	cedar "github.com/cedar-policy/cedar-go"
)

// Kinds of load problems; a [Problem] wraps one of these, so errors.Is works on the error
// returned by [Engine.LoadDir] and [ValidateDir].
var (
	ErrNoPolicies  = errors.New("no *.cedar policy files")
	ErrParse       = errors.New("parse error")
	ErrMissingID   = errors.New(`policy has no @id("...") annotation`)
	ErrDuplicateID = errors.New("duplicate policy @id")
	ErrSchema      = errors.New("invalid schema")
	ErrValidation  = errors.New("policy does not match the schema")
)

// Problem is one thing wrong with a policy directory.
type Problem struct {
	File     string // the file, as dir/name
	Line     int    // 1-based; 0 if unknown
	Column   int    // 1-based; 0 if unknown
	PolicyID string // the policy's @id, when known
	Kind     error  // one of the Err* kinds above
	Detail   string // what cedar said, if anything
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
	b.WriteString(p.Kind.Error())
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

// LoadError is returned when a policy directory cannot be loaded; it lists every problem.
type LoadError struct {
	Dir      string
	Problems []*Problem
}

func (e *LoadError) Error() string {
	if len(e.Problems) == 1 {
		return "policy: load " + e.Dir + ": " + e.Problems[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "policy: load %s: %d problems:", e.Dir, len(e.Problems))
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

// sourceFile is one file read from a policy directory.
type sourceFile struct {
	name string // dir/name, for messages and positions
	data []byte
}

// source is the content of a policy directory, read once.
type source struct {
	dir      string
	policies []sourceFile // sorted by name
	schema   *sourceFile
	hash     string // hex sha256 over the names and contents
}

// readSource reads dir/*.cedar (sorted, dot-files skipped, symlinks followed, so Kubernetes
// ConfigMap mounts work) and dir/schema.cedarschema if present.
func readSource(dir string) (*source, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("policy: read %s: %w", dir, err)
	}
	src := &source{dir: dir}
	for _, de := range ents {
		name := de.Name()
		isPolicy := strings.HasSuffix(name, ".cedar")
		if strings.HasPrefix(name, ".") || (!isPolicy && name != SchemaFile) {
			continue
		}
		path := filepath.Join(dir, name)
		fi, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("policy: read %s: %w", path, err)
		}
		if fi.IsDir() {
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("policy: read %s: %w", path, err)
		}
		f := sourceFile{name: path, data: data}
		if isPolicy {
			src.policies = append(src.policies, f)
		} else {
			src.schema = &f
		}
	}
	src.hash = hashSource(src)
	return src, nil
}

func hashSource(src *source) string {
	h := sha256.New()
	write := func(tag byte, f sourceFile) {
		var n [8]byte
		h.Write([]byte{tag})
		binary.BigEndian.PutUint64(n[:], uint64(len(f.name)))
		h.Write(n[:])
		h.Write([]byte(filepath.Base(f.name)))
		binary.BigEndian.PutUint64(n[:], uint64(len(f.data)))
		h.Write(n[:])
		h.Write(f.data)
	}
	for _, f := range src.policies {
		write('p', f)
	}
	if src.schema != nil {
		write('s', *src.schema)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// compiledSet is a loaded, validated and indexed policy set. It is immutable once built.
type compiledSet struct {
	dir     string
	hash    string
	version string // short hash
	ids     []cedar.PolicyID
	pols    []*cedar.Policy
	idx     index
	full    *cedar.PolicySet // the same policies, unindexed (tests and the baseline benchmark)
}

// versionLen is the length of the short content hash returned by Info.
const versionLen = 12

// compile parses, checks, validates and indexes a source. On any problem it returns a
// *LoadError listing all of them.
func compile(src *source) (*compiledSet, error) {
	var probs []*Problem
	if len(src.policies) == 0 {
		probs = append(probs, &Problem{File: src.dir, Kind: ErrNoPolicies})
	}
	var sch *Schema
	if src.schema != nil {
		s, err := ParseSchema(src.schema.name, src.schema.data)
		if err != nil {
			line, col, detail := splitPosition(src.schema.name, err.Error())
			probs = append(probs, &Problem{File: src.schema.name, Line: line, Column: col, Kind: ErrSchema, Detail: detail, cause: err})
		}
		sch = s
	}

	set := &compiledSet{dir: src.dir, hash: src.hash, version: src.hash[:versionLen], full: cedar.NewPolicySet()}
	firstAt := map[cedar.PolicyID]cedar.Position{}
	for _, f := range src.policies {
		list, err := cedar.NewPolicyListFromBytes(f.name, f.data)
		if err != nil {
			probs = append(probs, parseProblem(f.name, err))
			continue
		}
		for _, p := range list {
			pos := p.Position()
			prob := func(id string, kind error, detail string) *Problem {
				return &Problem{File: f.name, Line: pos.Line, Column: pos.Column, PolicyID: id, Kind: kind, Detail: detail}
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
			if sch != nil {
				if err := sch.ValidatePolicy(id, p); err != nil {
					for line := range strings.SplitSeq(err.Error(), "\n") {
						pr := prob(id, ErrValidation, line)
						pr.cause = err
						probs = append(probs, pr)
					}
				}
			}
		}
	}
	if len(probs) > 0 {
		return nil, &LoadError{Dir: src.dir, Problems: probs}
	}
	set.idx = newIndex(set.pols)
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

// ValidateDir loads dir exactly as [Engine.LoadDir] would, without installing it, and returns
// the number of policies. It is `escrow policy validate --dir D`.
func ValidateDir(dir string) (policies int, err error) {
	src, err := readSource(dir)
	if err != nil {
		return 0, err
	}
	set, err := compile(src)
	if err != nil {
		return 0, err
	}
	return len(set.ids), nil
}
