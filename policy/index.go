package policy

import (
	"iter"
	"slices"

	cedar "github.com/cedar-policy/cedar-go"
	xast "github.com/cedar-policy/cedar-go/x/exp/ast"
)

// The index narrows a request down to the policies whose scope can match it, so that Cedar
// evaluates a handful of policies instead of the whole set.
//
// Each of the three scope dimensions (principal, action, resource) has its own index:
// `== E`, `in E` and `is T in E` scopes are bucketed under E, `in [E1, E2]` under each Ei, and
// everything else (`principal`, `is T`, anything unknown) goes to an always-bucket. A request
// entity can only match a keyed scope whose E is the entity itself or one of its ancestors, so
// its candidates in a dimension are the buckets of the entity and its ancestors plus the
// always-bucket. The engine picks the dimension with the fewest candidates and keeps those
// whose three scopes all match the request exactly. That is sound because Cedar evaluates a
// policy as `scope && conditions` and scope checks never error: a policy whose scope does not
// match evaluates to false without evaluating (or erroring in) its conditions, so dropping it
// cannot change the decision, the determining policies or the errors.

type scopeKind uint8

const (
	scopeAll scopeKind = iota
	scopeEq
	scopeIn
	scopeInSet
	scopeIs
	scopeIsIn
	scopeUnknown // a scope node this package does not know: always evaluated
)

// scope is a policy's scope in one dimension.
type scope struct {
	kind scopeKind
	typ  cedar.EntityType
	uid  cedar.EntityUID
	set  []cedar.EntityUID
}

func scopeOf(n xast.IsScopeNode) scope {
	switch s := n.(type) {
	case xast.ScopeTypeAll:
		return scope{kind: scopeAll}
	case xast.ScopeTypeEq:
		return scope{kind: scopeEq, uid: s.Entity}
	case xast.ScopeTypeIn:
		return scope{kind: scopeIn, uid: s.Entity}
	case xast.ScopeTypeInSet:
		return scope{kind: scopeInSet, set: slices.Clone(s.Entities)}
	case xast.ScopeTypeIs:
		return scope{kind: scopeIs, typ: s.Type}
	case xast.ScopeTypeIsIn:
		return scope{kind: scopeIsIn, typ: s.Type, uid: s.Entity}
	default:
		return scope{kind: scopeUnknown}
	}
}

// matches reports whether the scope matches the request entity uid, whose ancestors-or-self
// are keys (uid first).
func (s *scope) matches(uid cedar.EntityUID, keys []cedar.EntityUID) bool {
	switch s.kind {
	case scopeEq:
		return uid == s.uid
	case scopeIn:
		return slices.Contains(keys, s.uid)
	case scopeInSet:
		for _, e := range s.set {
			if slices.Contains(keys, e) {
				return true
			}
		}
		return false
	case scopeIs:
		return uid.Type == s.typ
	case scopeIsIn:
		return uid.Type == s.typ && slices.Contains(keys, s.uid)
	default: // scopeAll, scopeUnknown
		return true
	}
}

// dimIndex indexes one scope dimension. Values are policy positions in load order.
type dimIndex struct {
	byKey  map[cedar.EntityUID][]int32
	always []int32
}

func (d *dimIndex) add(i int32, s scope) {
	if d.byKey == nil {
		d.byKey = make(map[cedar.EntityUID][]int32)
	}
	switch s.kind {
	case scopeEq, scopeIn, scopeIsIn:
		d.byKey[s.uid] = append(d.byKey[s.uid], i)
	case scopeInSet:
		if len(s.set) == 0 {
			d.always = append(d.always, i)
			return
		}
		seen := make(map[cedar.EntityUID]bool, len(s.set))
		for _, e := range s.set {
			if !seen[e] {
				seen[e] = true
				d.byKey[e] = append(d.byKey[e], i)
			}
		}
	default:
		d.always = append(d.always, i)
	}
}

const (
	dimPrincipal = iota
	dimAction
	dimResource
	numDims
)

// index is the scope index of a loaded policy set.
type index struct {
	scopes [][numDims]scope // per policy
	dims   [numDims]dimIndex
}

func newIndex(pols []*cedar.Policy) index {
	ix := index{scopes: make([][numDims]scope, len(pols))}
	for i, p := range pols {
		a := (*xast.Policy)(p.AST())
		sc := [numDims]scope{scopeOf(a.Principal), scopeOf(a.Action), scopeOf(a.Resource)}
		ix.scopes[i] = sc
		for d := range numDims {
			ix.dims[d].add(int32(i), sc[d])
		}
	}
	return ix
}

// maxKeys bounds the number of ancestors-or-self of a request entity: Workload,
// ServiceAccount, Namespace; an action and its group; an MCP Tool and its Host.
const maxKeys = 3

// candidates appends to buf, in load order and without duplicates, the positions of the
// policies whose scopes all match the request.
func (ix *index) candidates(r *request, buf []int32) []int32 {
	uids := [numDims]cedar.EntityUID{r.req.Principal, r.req.Action, r.req.Resource}
	keys := [numDims][]cedar.EntityUID{r.principal.keys, r.action.keys, r.resourceKeys()}

	// Collect each dimension's buckets and pick the dimension with the fewest candidates.
	var lists [numDims][maxKeys + 1][]int32
	var nLists [numDims]int
	best, bestN := 0, -1
	for d := range numDims {
		n := 0
		dim := &ix.dims[d]
		for _, k := range keys[d] {
			if l := dim.byKey[k]; len(l) > 0 && nLists[d] < maxKeys {
				lists[d][nLists[d]] = l
				nLists[d]++
				n += len(l)
			}
		}
		if len(keys[d]) > maxKeys {
			// Never happens with this package's entity model; stay sound if it ever does.
			n = int(^uint(0) >> 1)
		}
		lists[d][nLists[d]] = dim.always
		nLists[d]++
		n += len(dim.always)
		if bestN < 0 || n < bestN {
			best, bestN = d, n
		}
	}

	start := len(buf)
	for _, l := range lists[best][:nLists[best]] {
	next:
		for _, i := range l {
			sc := &ix.scopes[i]
			for d := range numDims {
				if d != best && !sc[d].matches(uids[d], keys[d]) {
					continue next
				}
			}
			// In the chosen dimension the bucket only says "keyed by one of the request's
			// keys"; check the scope exactly too (e.g. `==` on an ancestor does not match).
			if !sc[best].matches(uids[best], keys[best]) {
				continue
			}
			buf = append(buf, i)
		}
	}
	out := buf[start:]
	if nLists[best] > 1 {
		slices.Sort(out)
		out = slices.Compact(out)
	}
	return buf[:start+len(out)]
}

// subset is a PolicyIterator over some policies of a set, in load order.
type subset struct {
	ids  []cedar.PolicyID
	pols []*cedar.Policy
	idx  []int32
}

func (s *subset) All() iter.Seq2[cedar.PolicyID, *cedar.Policy] {
	return func(yield func(cedar.PolicyID, *cedar.Policy) bool) {
		for _, i := range s.idx {
			if !yield(s.ids[i], s.pols[i]) {
				return
			}
		}
	}
}
