package controller

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	cedar "github.com/cedar-policy/cedar-go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/policy"
)

// Objects is everything the controller has read of escrow's resources, decoded.
type Objects struct {
	Policies    []v1alpha1.Policy
	Upstreams   []v1alpha1.Upstream
	Credentials []v1alpha1.Credential
	Revocations []v1alpha1.Revocation
}

// ObjectKey names one object.
type ObjectKey struct{ Namespace, Name string }

func (k ObjectKey) String() string { return k.Namespace + "/" + k.Name }

func keyOf(m metav1.ObjectMeta) ObjectKey { return ObjectKey{m.Namespace, m.Name} }

// Verdict is what the controller decided about one Policy: its Accepted condition.
type Verdict struct {
	// Generation is the Policy's metadata.generation the verdict is about.
	Generation int64
	Accepted   bool
	// Reason is v1alpha1.ReasonValid, ReasonInvalid or ReasonDuplicateID.
	Reason string
	// Message says what is wrong, each problem as "<ns>/<name>.cedar:line:col: ...", or how
	// many policies were accepted.
	Message string
}

// Problem is an object that is left out of every bundle, and why (logged by the controller;
// Policies also carry it in their status).
type Problem struct {
	Kind string
	Key  ObjectKey
	Err  string
}

// View is the result of Compute: every namespace's contribution, the Policy verdicts, and
// the bundle of any sidecar. It is immutable.
type View struct {
	clusterNS string
	cluster   *contribution
	byNS      map[string]*contribution
	verdicts  map[ObjectKey]Verdict
	problems  []Problem
}

// contribution is what one namespace adds to a bundle, in a stable order.
type contribution struct {
	upstreams   []namedUpstream
	credentials map[string]config.Credential
	policies    map[string]string // "<ns>/<name>.cedar" -> text
	policyIDs   map[string]string // @id -> "<ns>/<name>.cedar", to find duplicates
	revocations []bundle.Revocation
}

type namedUpstream struct {
	key ObjectKey
	u   config.Upstream
}

type upstreamKey struct {
	host string
	port int
}

// maxMessage bounds a condition's message (the CRD allows 32 KiB; a status is read by people).
const maxMessage = 4096

// Compute validates every Policy against escrow's built-in schema and sorts every object into
// its namespace's contribution. clusterNS is escrow's own namespace, whose objects every
// sidecar receives. It is pure: the same objects give the same View, bundles and versions.
//
// Objects that cannot be served are left out and listed in Problems: a Policy that does not
// compile (its Verdict says why, with line and column), a Policy with an @id already used by
// one that a sidecar would receive with it, a Credential with a bad Secret reference, and a
// namespace's Upstream or Credential that collides with a cluster-wide one (escrow's own
// namespace wins: a tenant cannot redirect an operator's upstream or replace its credential).
// Within one namespace the object whose name sorts first wins a collision.
func Compute(objs Objects, clusterNS string) *View {
	v := &View{clusterNS: clusterNS, byNS: map[string]*contribution{}, verdicts: map[ObjectKey]Verdict{}}
	contrib := func(ns string) *contribution {
		c := v.byNS[ns]
		if c == nil {
			c = &contribution{credentials: map[string]config.Credential{}, policies: map[string]string{}, policyIDs: map[string]string{}}
			v.byNS[ns] = c
		}
		return c
	}
	v.cluster = contrib(clusterNS)

	// The cluster's namespace first, so that its objects claim names before any tenant's.
	order := func(a, b ObjectKey) int {
		switch {
		case a.Namespace == b.Namespace:
			return strings.Compare(a.Name, b.Name)
		case a.Namespace == clusterNS:
			return -1
		case b.Namespace == clusterNS:
			return 1
		}
		return strings.Compare(a.Namespace, b.Namespace)
	}

	pols := slices.Clone(objs.Policies)
	slices.SortFunc(pols, func(a, b v1alpha1.Policy) int { return order(keyOf(a.ObjectMeta), keyOf(b.ObjectMeta)) })
	for _, p := range pols {
		k := keyOf(p.ObjectMeta)
		file := PolicyFile(k)
		verdict := Verdict{Generation: p.Generation}
		ids, err := compilePolicy(file, p.Spec.Cedar)
		if err == nil {
			err = v.claimIDs(contrib(k.Namespace), file, ids)
			verdict.Reason = v1alpha1.ReasonDuplicateID
		} else {
			verdict.Reason = v1alpha1.ReasonInvalid
		}
		if err != nil {
			verdict.Message = truncate(err.Error(), maxMessage)
			v.problems = append(v.problems, Problem{Kind: v1alpha1.KindPolicy, Key: k, Err: verdict.Message})
		} else {
			verdict.Accepted, verdict.Reason = true, v1alpha1.ReasonValid
			verdict.Message = fmt.Sprintf("%d %s served as %s", len(ids), plural(len(ids), "policy", "policies"), file)
			contrib(k.Namespace).policies[file] = p.Spec.Cedar
		}
		v.verdicts[k] = verdict
	}

	ups := slices.Clone(objs.Upstreams)
	slices.SortFunc(ups, func(a, b v1alpha1.Upstream) int { return order(keyOf(a.ObjectMeta), keyOf(b.ObjectMeta)) })
	claimedUp := map[string]map[upstreamKey]ObjectKey{} // per namespace, the cluster's included
	for _, u := range ups {
		k := keyOf(u.ObjectMeta)
		uk := upstreamKey{strings.ToLower(u.Spec.Host), u.Spec.Port}
		if by, ok := v.upstreamClaim(claimedUp, k.Namespace, uk); ok {
			v.problems = append(v.problems, Problem{Kind: v1alpha1.KindUpstream, Key: k,
				Err: fmt.Sprintf("host %s port %d is already served by Upstream %s", u.Spec.Host, u.Spec.Port, by)})
			continue
		}
		if claimedUp[k.Namespace] == nil {
			claimedUp[k.Namespace] = map[upstreamKey]ObjectKey{}
		}
		claimedUp[k.Namespace][uk] = k
		c := contrib(k.Namespace)
		c.upstreams = append(c.upstreams, namedUpstream{k, u.Spec})
	}

	creds := slices.Clone(objs.Credentials)
	slices.SortFunc(creds, func(a, b v1alpha1.Credential) int { return order(keyOf(a.ObjectMeta), keyOf(b.ObjectMeta)) })
	for _, cr := range creds {
		k := keyOf(cr.ObjectMeta)
		if _, taken := v.cluster.credentials[k.Name]; taken && k.Namespace != clusterNS {
			v.problems = append(v.problems, Problem{Kind: v1alpha1.KindCredential, Key: k,
				Err: fmt.Sprintf("the name is taken by the cluster-wide Credential %s/%s", clusterNS, k.Name)})
			continue
		}
		cc, err := cr.Spec.Config()
		if err != nil {
			v.problems = append(v.problems, Problem{Kind: v1alpha1.KindCredential, Key: k, Err: err.Error()})
			continue
		}
		contrib(k.Namespace).credentials[k.Name] = cc
	}

	revs := slices.Clone(objs.Revocations)
	slices.SortFunc(revs, func(a, b v1alpha1.Revocation) int { return order(keyOf(a.ObjectMeta), keyOf(b.ObjectMeta)) })
	for _, r := range revs {
		k := keyOf(r.ObjectMeta)
		br := bundle.Revocation{Name: k.String(), SPIFFEIDs: r.Spec.SPIFFEIDs, SPIFFEIDPrefixes: r.Spec.SPIFFEIDPrefixes,
			Credentials: r.Spec.Credentials, Reason: r.Spec.Reason}
		if err := (bundle.Bundle{Revocations: []bundle.Revocation{br}}).Check(); err != nil {
			v.problems = append(v.problems, Problem{Kind: v1alpha1.KindRevocation, Key: k, Err: err.Error()})
			continue
		}
		c := contrib(k.Namespace)
		c.revocations = append(c.revocations, br)
	}
	return v
}

// upstreamClaim reports which Upstream already serves uk for sidecars of ns.
func (v *View) upstreamClaim(claimed map[string]map[upstreamKey]ObjectKey, ns string, uk upstreamKey) (ObjectKey, bool) {
	if by, ok := claimed[v.clusterNS][uk]; ok {
		return by, true
	}
	by, ok := claimed[ns][uk]
	return by, ok
}

// claimIDs records the @ids of file for c, or says which are taken by a policy that a sidecar
// would receive together with file's (its namespace's, or the cluster's).
func (v *View) claimIDs(c *contribution, file string, ids []idAt) error {
	var dups []string
	for _, id := range ids {
		by, ok := v.cluster.policyIDs[id.id]
		if !ok {
			by, ok = c.policyIDs[id.id]
		}
		if ok {
			dups = append(dups, fmt.Sprintf("%s:%d:%d: policy %q: duplicate policy @id: also in %s", file, id.line, id.col, id.id, by))
		}
	}
	if len(dups) > 0 {
		return errors.New(strings.Join(dups, "; "))
	}
	for _, id := range ids {
		c.policyIDs[id.id] = file
	}
	return nil
}

type idAt struct {
	id        string
	line, col int
}

// compilePolicy validates text exactly as a sidecar will (policy.Compile with the built-in
// schema) and returns its policies' @ids with their positions.
func compilePolicy(file, text string) ([]idAt, error) {
	if len(text) > bundle.MaxPolicyBytes {
		return nil, fmt.Errorf("%s: %d bytes, more than %d", file, len(text), bundle.MaxPolicyBytes)
	}
	if _, err := policy.Compile(policy.Source{Policies: map[string][]byte{file: []byte(text)}}); err != nil {
		var le *policy.LoadError
		if errors.As(err, &le) {
			msgs := make([]string, len(le.Problems))
			for i, p := range le.Problems {
				msgs[i] = p.Error()
			}
			return nil, errors.New(strings.Join(msgs, "; "))
		}
		return nil, err
	}
	list, err := cedar.NewPolicyListFromBytes(file, []byte(text))
	if err != nil {
		return nil, err // Compile parsed it: not reached
	}
	ids := make([]idAt, 0, len(list))
	for _, p := range list {
		pos := p.Position()
		ids = append(ids, idAt{string(p.Annotations()["id"]), pos.Line, pos.Column})
	}
	return ids, nil
}

// PolicyFile is the name a Policy has in a bundle (and in the messages about it).
func PolicyFile(k ObjectKey) string { return k.Namespace + "/" + k.Name + ".cedar" }

// Verdicts returns the verdict on every Policy.
func (v *View) Verdicts() map[ObjectKey]Verdict { return v.verdicts }

// Problems lists the objects left out of every bundle, in a stable order.
func (v *View) Problems() []Problem { return v.problems }

// Namespace returns the Kubernetes namespace of a SPIFFE ID of the shape
// spiffe://<td>/ns/<ns>/sa/<sa>, and false for any other ID.
func Namespace(spiffeID string) (string, bool) {
	rest, ok := strings.CutPrefix(spiffeID, "spiffe://")
	if !ok {
		return "", false
	}
	_, path, ok := strings.Cut(rest, "/")
	if !ok {
		return "", false
	}
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[1] == "" || parts[2] != "sa" || parts[3] == "" {
		return "", false
	}
	return parts[1], true
}

// BundleFor returns the bundle of the sidecar whose SPIFFE ID is spiffeID: the cluster-wide
// objects, plus its namespace's when the ID has the /ns/<ns>/sa/<sa> shape. Its Version is a
// hash of its content, so the same content always has the same version.
func (v *View) BundleFor(spiffeID string) bundle.Bundle {
	ns, ok := Namespace(spiffeID)
	if !ok {
		ns = v.clusterNS
	}
	return v.BundleForNamespace(ns)
}

// BundleForNamespace returns the bundle of the sidecars in namespace ns.
func (v *View) BundleForNamespace(ns string) bundle.Bundle {
	b, _ := v.NamespaceBundle(ns)
	return b
}

// NamespaceBundle returns the bundle of the sidecars in namespace ns, and the upstreams and
// credentials left out of it because the sidecar's config validation would refuse them (see
// validateBundle), each with the reason.
func (v *View) NamespaceBundle(ns string) (bundle.Bundle, []string) {
	parts := []*contribution{v.cluster}
	if c := v.byNS[ns]; c != nil && ns != v.clusterNS {
		parts = append(parts, c)
	}
	var b bundle.Bundle
	for _, c := range parts {
		for _, u := range c.upstreams {
			b.Upstreams = append(b.Upstreams, u.u)
		}
		for name, cr := range c.credentials {
			if b.Credentials == nil {
				b.Credentials = map[string]config.Credential{}
			}
			b.Credentials[name] = cr
		}
		for name, text := range c.policies {
			if b.Policies == nil {
				b.Policies = map[string]string{}
			}
			b.Policies[name] = text
		}
		b.Revocations = append(b.Revocations, c.revocations...)
	}
	b, dropped := validateBundle(b)
	b.Version = Version(b)
	return b, dropped
}

// Version is the content hash of b (its Version field ignored): 16 hex digits of the sha256 of
// its JSON form, whose maps encoding/json writes in key order.
func Version(b bundle.Bundle) string {
	b.Version = ""
	raw, err := json.Marshal(b)
	if err != nil {
		panic("controller: a bundle does not marshal: " + err.Error()) // its types always do
	}
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:8])
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n - len(" …")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + " …"
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
