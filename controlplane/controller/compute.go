package controller

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
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
	// Undecodable are the objects that did not decode (fields this controller version does
	// not know): left out of every bundle, with a status that says so.
	Undecodable []Undecodable
}

// Undecodable is an object that did not decode, and why.
type Undecodable struct {
	Ref        ObjectRef
	Generation int64
	Err        string
}

// ObjectKey names one object.
type ObjectKey struct{ Namespace, Name string }

func (k ObjectKey) String() string { return k.Namespace + "/" + k.Name }

func keyOf(m metav1.ObjectMeta) ObjectKey { return ObjectKey{m.Namespace, m.Name} }

// ObjectRef names one object of one kind (v1alpha1.KindPolicy, ...).
type ObjectRef struct {
	Kind string
	ObjectKey
}

func (r ObjectRef) String() string { return r.Kind + " " + r.ObjectKey.String() }

func refOf(kind string, m metav1.ObjectMeta) ObjectRef { return ObjectRef{kind, keyOf(m)} }

// Verdict is what the controller decided about one object: its Accepted condition.
type Verdict struct {
	// Generation is the object's metadata.generation the verdict is about.
	Generation int64
	// Accepted: the object is in at least one namespace's bundle.
	Accepted bool
	// Reason is one of v1alpha1's Reason constants.
	Reason string
	// Message says exactly why, with the key path where there is one ("spec.credential: ...",
	// a Policy's "<ns>/<name>.cedar:line:col: ..."), or where the object is served.
	Message string
}

// Problem is an object that is left out of every bundle, and why (logged by the controller,
// counted in rejected_objects, and in the object's status).
type Problem struct {
	Kind   string
	Key    ObjectKey
	Reason string
	Err    string
}

// View is the result of Compute: every namespace's contribution and bundle, the verdict on
// every object, and the bundle of any sidecar. It is immutable.
type View struct {
	clusterNS string
	cluster   *contribution
	byNS      map[string]*contribution
	verdicts  map[ObjectRef]Verdict
	problems  []Problem
	// bundles holds the bundle of escrow's namespace (which every namespace without objects
	// of its own also gets) and of every namespace with objects.
	bundles map[string]nsBundle
	// broker holds the brokered Credentials (all in escrow's namespace), by name.
	broker map[string]Brokered
}

type nsBundle struct {
	b       bundle.Bundle
	dropped []string
	// brokered names, sorted, the brokered Credentials in b: each sidecar receives only those
	// its SPIFFE ID may use (see Audience).
	brokered []string
}

// contribution is what one namespace adds to a bundle, in a stable order.
type contribution struct {
	namespace   string
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

// Compute validates every Policy against escrow's built-in schema, sorts every object into
// its namespace's contribution, computes every namespace's bundle and decides every object's
// verdict. clusterNS is escrow's own namespace, whose objects every sidecar receives. It is
// pure: the same objects give the same View, bundles, versions and verdicts (so replicas
// write the same status).
//
// Objects that cannot be served are left out and listed in Problems: a Policy that does not
// compile (its Verdict says why, with line and column), a Policy with an @id already used by
// one that a sidecar would receive with it, a Credential with a bad Secret reference, a
// namespace's Upstream or Credential that collides with a cluster-wide one (escrow's own
// namespace wins: a tenant cannot redirect an operator's upstream or replace its credential),
// an object that does not decode, and an Upstream or Credential that the sidecar's config
// validation would refuse in every bundle it could be in (see validateBundle). Within one
// namespace the object whose name sorts first wins a collision.
//
// An object in at least one bundle is Accepted. Only a cluster-wide object can be in some
// bundles and not others (a cluster-wide Upstream naming a Credential that only some
// namespaces define): it is Accepted with reason PartiallyServed, and the message names the
// namespaces it is served to (or left out of) and why.
func Compute(objs Objects, clusterNS string) *View {
	v := &View{clusterNS: clusterNS, byNS: map[string]*contribution{}, verdicts: map[ObjectRef]Verdict{}, broker: map[string]Brokered{}}
	contrib := func(ns string) *contribution {
		c := v.byNS[ns]
		if c == nil {
			c = &contribution{namespace: ns, credentials: map[string]config.Credential{}, policies: map[string]string{}, policyIDs: map[string]string{}}
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
		contrib(k.Namespace)
		ids, err := compilePolicy(file, p.Spec.Cedar)
		if err == nil {
			err = v.claimIDs(contrib(k.Namespace), file, ids)
			verdict.Reason = v1alpha1.ReasonDuplicateID
		} else {
			verdict.Reason = v1alpha1.ReasonInvalid
		}
		if err != nil {
			verdict.Message = truncate(err.Error(), maxMessage)
		} else {
			verdict.Accepted, verdict.Reason = true, v1alpha1.ReasonValid
			verdict.Message = fmt.Sprintf("%d %s served as %s", len(ids), plural(len(ids), "policy", "policies"), file)
			contrib(k.Namespace).policies[file] = p.Spec.Cedar
		}
		v.verdicts[ObjectRef{v1alpha1.KindPolicy, k}] = verdict
	}

	ups := slices.Clone(objs.Upstreams)
	slices.SortFunc(ups, func(a, b v1alpha1.Upstream) int { return order(keyOf(a.ObjectMeta), keyOf(b.ObjectMeta)) })
	claimedUp := map[string]map[upstreamKey]ObjectKey{} // per namespace, the cluster's included
	admitted := map[ObjectRef]int64{}                   // upstreams and credentials, by generation
	upCred := map[ObjectRef]string{}                    // the credential each admitted upstream names
	for _, u := range ups {
		k := keyOf(u.ObjectMeta)
		uk := upstreamKey{strings.ToLower(u.Spec.Host), u.Spec.Port}
		if by, ok := v.upstreamClaim(claimedUp, k.Namespace, uk); ok {
			v.reject(refOf(v1alpha1.KindUpstream, u.ObjectMeta), u.Generation, v1alpha1.ReasonConflict,
				fmt.Sprintf("spec.host: host %s port %d is already served by Upstream %s", u.Spec.Host, u.Spec.Port, by))
			continue
		}
		admitted[refOf(v1alpha1.KindUpstream, u.ObjectMeta)] = u.Generation
		upCred[refOf(v1alpha1.KindUpstream, u.ObjectMeta)] = u.Spec.Credential
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
		ref := refOf(v1alpha1.KindCredential, cr.ObjectMeta)
		if _, taken := v.cluster.credentials[k.Name]; taken && k.Namespace != clusterNS {
			v.reject(ref, cr.Generation, v1alpha1.ReasonConflict,
				fmt.Sprintf("metadata.name: the name is taken by the cluster-wide Credential %s/%s", clusterNS, k.Name))
			continue
		}
		cc, err := cr.Spec.Config()
		if err != nil {
			reason, msg := credentialSpecProblem(err)
			v.reject(ref, cr.Generation, reason, msg)
			continue
		}
		if bs := cr.Spec.Broker; bs != nil {
			b, reason, msg := v.brokered(k, cc, *bs)
			if reason != "" {
				v.reject(ref, cr.Generation, reason, msg)
				continue
			}
			v.broker[k.Name] = b
			// Sidecars get the kind alone: the provider, its Secret reference and the allowed
			// workloads stay here.
			cc = config.Credential{Broker: &config.Broker{Revision: b.revision()}}
		}
		admitted[ref] = cr.Generation
		contrib(k.Namespace).credentials[k.Name] = cc
	}

	revs := slices.Clone(objs.Revocations)
	slices.SortFunc(revs, func(a, b v1alpha1.Revocation) int { return order(keyOf(a.ObjectMeta), keyOf(b.ObjectMeta)) })
	for _, r := range revs {
		k := keyOf(r.ObjectMeta)
		ref := refOf(v1alpha1.KindRevocation, r.ObjectMeta)
		br := bundle.Revocation{Name: k.String(), SPIFFEIDs: r.Spec.SPIFFEIDs, SPIFFEIDPrefixes: r.Spec.SPIFFEIDPrefixes,
			Credentials: r.Spec.Credentials, Reason: r.Spec.Reason}
		if len(br.SPIFFEIDs)+len(br.SPIFFEIDPrefixes)+len(br.Credentials) == 0 {
			v.reject(ref, r.Generation, v1alpha1.ReasonEmpty, "spec: names no spiffe_ids, spiffe_id_prefixes or credentials")
			continue
		}
		if err := (bundle.Bundle{Revocations: []bundle.Revocation{br}}).Check(); err != nil {
			msg := strings.ReplaceAll(strings.TrimPrefix(err.Error(), "bundle: "), "revocations[0]", "spec")
			v.reject(ref, r.Generation, v1alpha1.ReasonInvalid, msg)
			continue
		}
		c := contrib(k.Namespace)
		c.revocations = append(c.revocations, br)
		v.verdicts[ref] = Verdict{Generation: r.Generation, Accepted: true, Reason: v1alpha1.ReasonValid, Message: v.servedTo(k.Namespace)}
	}

	for _, u := range objs.Undecodable {
		v.reject(u.Ref, u.Generation, v1alpha1.ReasonUndecodable, "this controller version cannot read it: "+u.Err)
	}

	v.bundles = map[string]nsBundle{}
	drops := map[string]map[ObjectRef]drop{}
	for ns := range v.byNS {
		b, dropped := v.build(ns)
		nb := nsBundle{b: b, dropped: logLines(dropped)}
		for name, c := range b.Credentials {
			if _, ok := v.broker[name]; ok && c.Broker != nil {
				nb.brokered = append(nb.brokered, name)
			}
		}
		slices.Sort(nb.brokered)
		v.bundles[ns] = nb
		drops[ns] = map[ObjectRef]drop{}
		for _, d := range dropped {
			drops[ns][d.ref] = d
		}
	}
	tenants := slices.Sorted(maps.Keys(v.byNS))
	tenants = slices.DeleteFunc(tenants, func(ns string) bool { return ns == clusterNS })
	for ref, gen := range admitted {
		vd := v.judge(ref, gen, tenants, drops)
		// Only the sidecars a brokered Credential allows receive it, and the Upstreams naming it.
		cred := upCred[ref]
		if ref.Kind == v1alpha1.KindCredential {
			cred = ref.Name
		}
		if _, ok := v.broker[cred]; ok && vd.Accepted && (ref.Kind == v1alpha1.KindUpstream || ref.Namespace == clusterNS) {
			vd.Message = truncate(vd.Message+fmt.Sprintf("; only to those Credential %s/%s's spec.broker allows", clusterNS, cred), maxMessage)
		}
		v.verdicts[ref] = vd
	}

	for ref, vd := range v.verdicts {
		if !vd.Accepted {
			v.problems = append(v.problems, Problem{Kind: ref.Kind, Key: ref.ObjectKey, Reason: vd.Reason, Err: vd.Message})
		}
	}
	slices.SortFunc(v.problems, func(a, b Problem) int {
		return cmp.Or(strings.Compare(a.Kind, b.Kind), strings.Compare(a.Key.Namespace, b.Key.Namespace), strings.Compare(a.Key.Name, b.Key.Name))
	})
	return v
}

// reject records that ref is left out of every bundle.
func (v *View) reject(ref ObjectRef, gen int64, reason, msg string) {
	v.verdicts[ref] = Verdict{Generation: gen, Reason: reason, Message: truncate(msg, maxMessage)}
}

// servedTo says which sidecars receive an object of namespace ns.
func (v *View) servedTo(ns string) string {
	if ns == v.clusterNS {
		return "served to every namespace's sidecars (cluster-wide)"
	}
	return "served to the sidecars of namespace " + ns
}

// judge decides the verdict on an admitted Upstream or Credential from the bundles it could be
// in: its namespace's, or, for a cluster-wide one, escrow's namespace's (which stands for every
// namespace without objects of its own) and each tenant namespace's.
func (v *View) judge(ref ObjectRef, gen int64, tenants []string, drops map[string]map[ObjectRef]drop) Verdict {
	vd := Verdict{Generation: gen}
	if ref.Namespace != v.clusterNS {
		if d, ok := drops[ref.Namespace][ref]; ok {
			vd.Reason, vd.Message = d.reason, truncate(d.msg, maxMessage)
			return vd
		}
		vd.Accepted, vd.Reason, vd.Message = true, v1alpha1.ReasonValid, v.servedTo(ref.Namespace)
		return vd
	}
	home, leftOutHome := drops[v.clusterNS][ref]
	var in, out []string
	var first drop
	for _, ns := range tenants {
		d, dropped := drops[ns][ref]
		if dropped && !leftOutHome {
			if len(out) == 0 {
				first = d
			}
			out = append(out, ns)
		} else if !dropped && leftOutHome {
			in = append(in, ns)
		}
	}
	switch {
	case !leftOutHome && len(out) == 0:
		vd.Accepted, vd.Reason, vd.Message = true, v1alpha1.ReasonValid, v.servedTo(ref.Namespace)
	case !leftOutHome:
		vd.Accepted, vd.Reason = true, v1alpha1.ReasonPartiallyServed
		vd.Message = fmt.Sprintf("served to every namespace's sidecars except %s %s: (%s) %s",
			plural(len(out), "namespace", "namespaces"), list(out), out[0], first.msg)
	case len(in) > 0:
		vd.Accepted, vd.Reason = true, v1alpha1.ReasonPartiallyServed
		vd.Message = fmt.Sprintf("served only to the sidecars of %s %s; left out of every other namespace's: %s",
			plural(len(in), "namespace", "namespaces"), list(in), home.msg)
	default:
		vd.Reason, vd.Message = home.reason, home.msg
	}
	vd.Message = truncate(vd.Message, maxMessage)
	return vd
}

// list names up to 10 namespaces, then how many more.
func list(names []string) string {
	const most = 10
	if len(names) <= most {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:most], ", "), len(names)-most)
}

// credentialSpecProblem is the reason and message of a Credential whose spec is not a config
// entry (v1alpha1.SpecError), with key paths below spec.
func credentialSpecProblem(err error) (string, string) {
	var se *v1alpha1.SpecError
	if !errors.As(err, &se) {
		return v1alpha1.ReasonInvalid, err.Error()
	}
	reason := v1alpha1.ReasonInvalid
	msgs := make([]string, len(se.Problems))
	for i, p := range se.Problems {
		if p.BadRef {
			reason = v1alpha1.ReasonBadSecretRef
		}
		msgs[i] = "spec." + p.Path + ": " + p.Msg
	}
	return reason, strings.Join(msgs, "; ")
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

// Verdicts returns the verdict on every object.
func (v *View) Verdicts() map[ObjectRef]Verdict { return v.verdicts }

// Verdict returns the verdict on one object.
func (v *View) Verdict(kind string, k ObjectKey) (Verdict, bool) {
	vd, ok := v.verdicts[ObjectRef{kind, k}]
	return vd, ok
}

// Brokered returns the brokered Credentials by name (not to be modified).
func (v *View) Brokered() map[string]Brokered { return v.broker }

// Revocations returns the Revocations of namespace ns that are served (not to be modified).
func (v *View) Revocations(ns string) []bundle.Revocation {
	if c := v.byNS[ns]; c != nil {
		return c.revocations
	}
	return nil
}

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
// objects, plus its namespace's when the ID has the /ns/<ns>/sa/<sa> shape, minus the
// brokered Credentials the ID may not use and the Upstreams that name them (see Audience).
// Its Version is a hash of its content, so the same content always has the same version.
func (v *View) BundleFor(spiffeID string) bundle.Bundle {
	b, _ := v.AudienceBundle(v.AudienceOf(spiffeID))
	return b
}

// Audience is what a sidecar's bundle depends on: its namespace, and which of the brokered
// Credentials in that namespace's bundle its SPIFFE ID may use. Sidecars of one Audience
// receive the same bundle, so the ADS server keeps one snapshot per Audience, not one per
// sidecar. It is comparable (a map key).
type Audience struct {
	// Namespace is the sidecar's namespace, or escrow's for an ID without the
	// /ns/<ns>/sa/<sa> shape.
	Namespace string
	// Brokered names, sorted and comma-separated, the brokered Credentials of the namespace's
	// bundle that the sidecar may use (a Kubernetes name has no comma).
	Brokered string
}

// AudienceOf returns the Audience of the sidecar whose SPIFFE ID is spiffeID.
func (v *View) AudienceOf(spiffeID string) Audience {
	ns, ok := Namespace(spiffeID)
	if !ok {
		ns = v.clusterNS
	}
	a := Audience{Namespace: ns}
	var allowed []string
	for _, name := range v.namespaceBundle(ns).brokered {
		if v.broker[name].Allows(spiffeID) {
			allowed = append(allowed, name)
		}
	}
	a.Brokered = strings.Join(allowed, ",")
	return a
}

// AudienceBundle returns the bundle of the sidecars of Audience a: their namespace's bundle
// without the brokered Credentials a does not name, nor the Upstreams that name those (such
// an Upstream's host is unknown to these sidecars: a Credential they may not use is never
// sent to them, least privilege, and a credential they could never fetch would keep them
// from being ready). It returns, as NamespaceBundle does, what validation left out of the
// namespace's bundle.
func (v *View) AudienceBundle(a Audience) (bundle.Bundle, []string) {
	nb := v.namespaceBundle(a.Namespace)
	allowed := strings.Split(a.Brokered, ",")
	var denied []string
	for _, name := range nb.brokered {
		if !slices.Contains(allowed, name) {
			denied = append(denied, name)
		}
	}
	if len(denied) == 0 {
		return nb.b, nb.dropped
	}
	b := nb.b // Policies and Revocations are shared, as in every bundle of this View
	b.Credentials = maps.Clone(b.Credentials)
	for _, name := range denied {
		delete(b.Credentials, name)
	}
	if len(b.Credentials) == 0 {
		b.Credentials = nil
	}
	b.Upstreams = slices.DeleteFunc(slices.Clone(b.Upstreams), func(u config.Upstream) bool {
		return slices.Contains(denied, u.Credential)
	})
	if len(b.Upstreams) == 0 {
		b.Upstreams = nil
	}
	b.Version = Version(b)
	return b, nb.dropped
}

// BundleForNamespace returns the bundle of namespace ns (see NamespaceBundle).
func (v *View) BundleForNamespace(ns string) bundle.Bundle {
	b, _ := v.NamespaceBundle(ns)
	return b
}

// NamespaceBundle returns the bundle of namespace ns, with every brokered Credential (the
// bundle of a sidecar that may use them all: AudienceBundle serves each sidecar its part),
// and the upstreams and credentials left out of it because the sidecar's config validation
// would refuse them (see validateBundle), each with the reason.
func (v *View) NamespaceBundle(ns string) (bundle.Bundle, []string) {
	nb := v.namespaceBundle(ns)
	return nb.b, nb.dropped
}

func (v *View) namespaceBundle(ns string) nsBundle {
	nb, ok := v.bundles[ns]
	if !ok { // no objects of its own: the cluster-wide ones alone
		nb = v.bundles[v.clusterNS]
	}
	return nb
}

// build computes namespace ns's bundle, and what validation left out of it.
func (v *View) build(ns string) (bundle.Bundle, []drop) {
	parts := []*contribution{v.cluster}
	if c := v.byNS[ns]; c != nil && ns != v.clusterNS {
		parts = append(parts, c)
	}
	var b bundle.Bundle
	var origin origins
	origin.credentials = map[string]ObjectRef{}
	for _, c := range parts {
		for _, u := range c.upstreams {
			b.Upstreams = append(b.Upstreams, u.u)
			origin.upstreams = append(origin.upstreams, ObjectRef{v1alpha1.KindUpstream, u.key})
		}
		for name, cr := range c.credentials {
			if b.Credentials == nil {
				b.Credentials = map[string]config.Credential{}
			}
			b.Credentials[name] = cr
			origin.credentials[name] = ObjectRef{v1alpha1.KindCredential, ObjectKey{c.namespace, name}}
		}
		for name, text := range c.policies {
			if b.Policies == nil {
				b.Policies = map[string]string{}
			}
			b.Policies[name] = text
		}
		b.Revocations = append(b.Revocations, c.revocations...)
	}
	where := v.clusterNS
	if ns != v.clusterNS {
		where = ns + " or " + v.clusterNS
	}
	b, dropped := validateBundle(b, origin, where)
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

// Brokered is one brokered Credential as the controller serves it: the provider's config (its
// Secret references as the SecretsDir paths a sidecar would read; the controller serves those
// paths from the API server) and the workloads that may have its token minted.
type Brokered struct {
	Config           config.Credential
	SPIFFEIDs        []string
	SPIFFEIDPrefixes []string
}

// Allows reports whether the workload id may have the token minted: it is one of SPIFFEIDs,
// or below one of SPIFFEIDPrefixes at a path-segment boundary (as a Revocation's prefixes).
func (b Brokered) Allows(id string) bool {
	return bundle.Revocation{SPIFFEIDs: b.SPIFFEIDs, SPIFFEIDPrefixes: b.SPIFFEIDPrefixes}.Covers(id)
}

// revision is what sidecars receive as broker.revision: a hash of the provider's config, so
// that a changed Credential makes them drop the token minted under the old one.
func (b Brokered) revision() string {
	raw, err := json.Marshal(b.Config)
	if err != nil {
		panic("controller: a credential does not marshal: " + err.Error()) // its types always do
	}
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:8])
}

// brokered checks a Credential with broker: it is cluster-wide (a tenant's Credential cannot
// make the controller hold its secret and mint for others), its provider has a root secret
// the controller can keep (github_app's private key, oauth2's client secret: the others use
// the pod's own JWT-SVID, which the controller does not have), at least one workload may use
// it, and the provider's config is one a sidecar would accept (no sidecar checks it now). It
// returns the reason and message of a refusal, or "".
func (v *View) brokered(k ObjectKey, cc config.Credential, bs v1alpha1.BrokerSpec) (Brokered, string, string) {
	b := Brokered{Config: cc, SPIFFEIDs: bs.SPIFFEIDs, SPIFFEIDPrefixes: bs.SPIFFEIDPrefixes}
	switch {
	case k.Namespace != v.clusterNS:
		return b, v1alpha1.ReasonNotBrokerable, fmt.Sprintf("spec.broker: only a cluster-wide Credential (namespace %s) is brokered", v.clusterNS)
	case cc.GitHubApp != nil:
	case cc.OAuth2 != nil && cc.OAuth2.ClientSecretFile != "":
	default:
		return b, v1alpha1.ReasonNotBrokerable, fmt.Sprintf("spec.broker: a %s credential has no root secret to keep: brokering is for github_app, and oauth2 with client_secret_ref", cc.Provider())
	}
	if len(bs.SPIFFEIDs)+len(bs.SPIFFEIDPrefixes) == 0 {
		return b, v1alpha1.ReasonInvalid, "spec.broker: names no spiffe_ids or spiffe_id_prefixes"
	}
	for _, p := range bs.SPIFFEIDPrefixes {
		if !strings.HasPrefix(p, "spiffe://") || len(strings.TrimSuffix(p, "/")) <= len("spiffe://") {
			return b, v1alpha1.ReasonInvalid, fmt.Sprintf("spec.broker.spiffe_id_prefixes: %q is not a spiffe:// prefix with a trust domain", p)
		}
	}
	if errs := configErrors(bundle.Bundle{Credentials: map[string]config.Credential{k.Name: cc}}); len(errs) > 0 {
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = "spec." + strings.TrimPrefix(e.Path, "credentials."+k.Name+".") + ": " + e.Msg
		}
		return b, v1alpha1.ReasonInvalid, strings.Join(msgs, "; ")
	}
	return b, "", ""
}
