package controller

import (
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/policy"
)

const sys = "escrow-system"

func meta(ns, name string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Namespace: ns, Name: name, Generation: 1}
}

func pol(ns, name, text string) v1alpha1.Policy {
	return v1alpha1.Policy{ObjectMeta: meta(ns, name), Spec: v1alpha1.PolicySpec{Cedar: text}}
}

func up(ns, name, host string, port int) v1alpha1.Upstream {
	return v1alpha1.Upstream{ObjectMeta: meta(ns, name), Spec: config.Upstream{Host: host, Port: port}}
}

func static(ns, name, secret string) v1alpha1.Credential {
	return v1alpha1.Credential{ObjectMeta: meta(ns, name), Spec: v1alpha1.CredentialSpec{
		Static: &v1alpha1.StaticSpec{SecretRef: v1alpha1.SecretKeyRef{Name: secret, Key: "token"}}}}
}

func revoke(ns, name string, ids ...string) v1alpha1.Revocation {
	return v1alpha1.Revocation{ObjectMeta: meta(ns, name), Spec: v1alpha1.RevocationSpec{SPIFFEIDs: ids, Reason: "test"}}
}

const (
	allowGitHub = `@id("allow-github")
permit(principal, action == Action::"GET", resource == Host::"api.github.com");`
	allowAgentsRead = `@id("agents-read")
permit(principal in Namespace::"agents", action in Action::"read", resource);`
	// A typo'd context attribute on line 3, column 8: the schema has no "methd".
	typo = `@id("typo")
permit(principal, action, resource)
when { context.methd == "GET" };`
	agentsID = "spiffe://example.org/ns/agents/sa/coder"
	otherID  = "spiffe://example.org/ns/other/sa/coder"
)

func TestNamespace_FromKubernetesShapedIDsOnly(t *testing.T) {
	for id, want := range map[string]string{
		"spiffe://td/ns/agents/sa/coder": "agents",
		"spiffe://td/ns/a/sa/b":          "a",
		"spiffe://td/ns/agents/sa/":      "",
		"spiffe://td/ns//sa/x":           "",
		"spiffe://td/ns/agents":          "",
		"spiffe://td/ns/agents/sa/x/y":   "",
		"spiffe://td/workload/x":         "",
		"spiffe://td":                    "",
		"https://td/ns/agents/sa/coder":  "",
		"":                               "",
	} {
		got, ok := Namespace(id)
		if got != want || ok != (want != "") {
			t.Errorf("Namespace(%q) = %q, %v; want %q", id, got, ok, want)
		}
	}
}

func TestCompute_SidecarGetsItsNamespaceAndTheClusterWideObjects(t *testing.T) {
	v := Compute(Objects{
		Policies:    []v1alpha1.Policy{pol(sys, "base", allowGitHub), pol("agents", "read", allowAgentsRead)},
		Upstreams:   []v1alpha1.Upstream{up(sys, "github", "api.github.com", 0), up("agents", "openai", "api.openai.com", 0), up("other", "x", "x.example", 0)},
		Credentials: []v1alpha1.Credential{static(sys, "gh", "gh-token"), static("agents", "openai", "openai-key"), static("other", "x", "x")},
		Revocations: []v1alpha1.Revocation{revoke(sys, "all", "spiffe://example.org/ns/bad/sa/x"), revoke("agents", "mine", agentsID), revoke("other", "theirs", otherID)},
	}, sys)

	b := v.BundleFor(agentsID)
	if got := hosts(b); !slices.Equal(got, []string{"api.github.com", "api.openai.com"}) {
		t.Errorf("upstreams = %v", got)
	}
	if got := keys(b.Credentials); !slices.Equal(got, []string{"gh", "openai"}) {
		t.Errorf("credentials = %v", got)
	}
	if b.Credentials["openai"].Static.File != "/var/run/escrow-secrets/openai-key/token" {
		t.Errorf("openai = %+v", b.Credentials["openai"].Static)
	}
	if got := keys(b.Policies); !slices.Equal(got, []string{"agents/read.cedar", "escrow-system/base.cedar"}) {
		t.Errorf("policies = %v", got)
	}
	if b.Policies["escrow-system/base.cedar"] != allowGitHub {
		t.Errorf("policy text changed: %q", b.Policies["escrow-system/base.cedar"])
	}
	if got := revNames(b); !slices.Equal(got, []string{"escrow-system/all", "agents/mine"}) {
		t.Errorf("revocations = %v", got)
	}
	if err := b.Check(); err != nil {
		t.Fatal(err)
	}
	// It encodes and decodes as the sidecar reads it.
	tec, err := bundle.Encode(b)
	if err != nil {
		t.Fatal(err)
	}
	_ = tec

	// An ID without the Kubernetes shape, and the cluster's own namespace: only cluster-wide.
	for _, id := range []string{"spiffe://example.org/vm/builder", "spiffe://example.org/ns/" + sys + "/sa/escrow"} {
		b := v.BundleFor(id)
		if got := hosts(b); !slices.Equal(got, []string{"api.github.com"}) {
			t.Errorf("%s: upstreams = %v", id, got)
		}
		if got := revNames(b); !slices.Equal(got, []string{"escrow-system/all"}) {
			t.Errorf("%s: revocations = %v", id, got)
		}
	}
	// A namespace with nothing of its own.
	if got := keys(v.BundleFor("spiffe://example.org/ns/empty/sa/x").Policies); !slices.Equal(got, []string{"escrow-system/base.cedar"}) {
		t.Errorf("empty namespace: policies = %v", got)
	}
}

func TestCompute_TheSidecarCompilesWhatTheControllerServes(t *testing.T) {
	v := Compute(Objects{Policies: []v1alpha1.Policy{pol(sys, "base", allowGitHub), pol("agents", "read", allowAgentsRead)}}, sys)
	b := v.BundleFor(agentsID)
	src := policy.Source{Origin: "xds", Policies: map[string][]byte{}}
	for name, text := range b.Policies {
		src.Policies[name] = []byte(text)
	}
	set, err := policy.Compile(src)
	if err != nil {
		t.Fatal(err)
	}
	if set.Len() != 2 {
		t.Errorf("%d policies", set.Len())
	}
}

func TestCompute_InvalidPolicyIsLeftOutWithLineAndColumn(t *testing.T) {
	v := Compute(Objects{Policies: []v1alpha1.Policy{pol("agents", "typo", typo), pol("agents", "ok", allowAgentsRead),
		pol("agents", "garbage", "permit(principal,\n  action resource);")}}, sys)
	b := v.BundleFor(agentsID)
	if got := keys(b.Policies); !slices.Equal(got, []string{"agents/ok.cedar"}) {
		t.Fatalf("policies = %v", got)
	}
	vd := v.Verdicts()[ObjectRef{v1alpha1.KindPolicy, ObjectKey{"agents", "typo"}}]
	if vd.Accepted || vd.Reason != v1alpha1.ReasonInvalid || vd.Generation != 1 {
		t.Errorf("verdict = %+v", vd)
	}
	if !regexp.MustCompile(`^agents/typo\.cedar:3:\d+: policy "typo": .*methd`).MatchString(vd.Message) {
		t.Errorf("message = %q, want agents/typo.cedar:3:<col> naming methd", vd.Message)
	}
	vd = v.Verdicts()[ObjectRef{v1alpha1.KindPolicy, ObjectKey{"agents", "garbage"}}]
	if vd.Accepted || !strings.HasPrefix(vd.Message, "agents/garbage.cedar:2:") || !strings.Contains(vd.Message, "parse error") {
		t.Errorf("garbage verdict = %+v", vd)
	}
	vd = v.Verdicts()[ObjectRef{v1alpha1.KindPolicy, ObjectKey{"agents", "ok"}}]
	if !vd.Accepted || vd.Reason != v1alpha1.ReasonValid || vd.Message != "1 policy served as agents/ok.cedar" {
		t.Errorf("ok verdict = %+v", vd)
	}
	if len(v.Problems()) != 2 {
		t.Errorf("problems = %+v", v.Problems())
	}
}

func TestCompute_PolicyWithoutIDIsInvalid(t *testing.T) {
	v := Compute(Objects{Policies: []v1alpha1.Policy{pol("agents", "noid", `permit(principal, action, resource);`)}}, sys)
	if vd := v.Verdicts()[ObjectRef{v1alpha1.KindPolicy, ObjectKey{"agents", "noid"}}]; vd.Accepted || !strings.Contains(vd.Message, "@id") {
		t.Errorf("verdict = %+v", vd)
	}
}

func TestCompute_DuplicateIDsKeepTheClusterWideOrFirstNamedPolicy(t *testing.T) {
	same := func(id string) string {
		return "@id(\"" + id + "\")\npermit(principal, action, resource == Host::\"a.example\");"
	}
	v := Compute(Objects{Policies: []v1alpha1.Policy{
		pol("agents", "a", same("shared")),     // collides with the cluster's: loses
		pol(sys, "z", same("shared")),          // cluster-wide: wins although it sorts last
		pol("agents", "b", same("mine")),       // first in its namespace: wins
		pol("agents", "c", same("mine")),       // loses to agents/b
		pol("other", "c", same("mine")),        // another namespace: no collision
		pol(sys, "y", "\n\n"+same("sys-dup")),  // cluster-internal: y wins over zz
		pol(sys, "zz", "\n\n"+same("sys-dup")), // ...
	}}, sys)
	check := func(ns, name string, accepted bool, msg string) {
		t.Helper()
		vd := v.Verdicts()[ObjectRef{v1alpha1.KindPolicy, ObjectKey{ns, name}}]
		if vd.Accepted != accepted || (!accepted && (vd.Reason != v1alpha1.ReasonDuplicateID || !strings.Contains(vd.Message, msg))) {
			t.Errorf("%s/%s: %+v", ns, name, vd)
		}
	}
	check("agents", "a", false, `agents/a.cedar:1:1: policy "shared": duplicate policy @id: also in escrow-system/z.cedar`)
	check(sys, "z", true, "")
	check("agents", "b", true, "")
	check("agents", "c", false, "also in agents/b.cedar")
	check("other", "c", true, "")
	check(sys, "y", true, "")
	check(sys, "zz", false, `escrow-system/zz.cedar:3:1: policy "sys-dup"`)
	if got := keys(v.BundleFor(agentsID).Policies); !slices.Equal(got, []string{"agents/b.cedar", "escrow-system/y.cedar", "escrow-system/z.cedar"}) {
		t.Errorf("agents policies = %v", got)
	}
}

func TestCompute_ClusterWideUpstreamsAndCredentialsWinCollisions(t *testing.T) {
	v := Compute(Objects{
		Upstreams: []v1alpha1.Upstream{up("agents", "evil", "API.github.com", 0), up(sys, "gh", "api.github.com", 0),
			up("agents", "gh443", "api.github.com", 443), up("agents", "b", "x.example", 0), up("agents", "c", "x.example", 0)},
		Credentials: []v1alpha1.Credential{static("agents", "gh", "tenant-secret"), static(sys, "gh", "operator-secret")},
	}, sys)
	b := v.BundleFor(agentsID)
	if got := hosts(b); !slices.Equal(got, []string{"api.github.com", "x.example", "api.github.com:443"}) {
		t.Errorf("upstreams = %v", got)
	}
	if got := b.Credentials["gh"].Static.File; got != "/var/run/escrow-secrets/operator-secret/token" {
		t.Errorf("gh = %s", got)
	}
	var left []string
	for _, p := range v.Problems() {
		left = append(left, p.Kind+" "+p.Key.String())
	}
	slices.Sort(left)
	if want := []string{"Credential agents/gh", "Upstream agents/c", "Upstream agents/evil"}; !slices.Equal(left, want) {
		t.Errorf("problems = %v, want %v", left, want)
	}
}

func TestCompute_BadSecretReferenceIsLeftOut(t *testing.T) {
	v := Compute(Objects{Credentials: []v1alpha1.Credential{static("agents", "bad", "../etc"), static("agents", "ok", "s")}}, sys)
	if got := keys(v.BundleFor(agentsID).Credentials); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("credentials = %v", got)
	}
	if p := v.Problems(); len(p) != 1 || p[0].Key.Name != "bad" || !strings.Contains(p[0].Err, "Secret name") {
		t.Errorf("problems = %+v", p)
	}
}

func TestCompute_EmptyRevocationIsLeftOut(t *testing.T) {
	v := Compute(Objects{Revocations: []v1alpha1.Revocation{{ObjectMeta: meta("agents", "none")}, revoke("agents", "one", agentsID)}}, sys)
	if got := revNames(v.BundleFor(agentsID)); !slices.Equal(got, []string{"agents/one"}) {
		t.Errorf("revocations = %v", got)
	}
}

func TestCompute_VersionIsTheContentHash(t *testing.T) {
	objs := Objects{
		Policies:    []v1alpha1.Policy{pol(sys, "base", allowGitHub), pol("agents", "read", allowAgentsRead)},
		Upstreams:   []v1alpha1.Upstream{up(sys, "github", "api.github.com", 0), up("agents", "openai", "api.openai.com", 0)},
		Credentials: []v1alpha1.Credential{static(sys, "gh", "gh"), static("agents", "openai", "o")},
		Revocations: []v1alpha1.Revocation{revoke("agents", "r", agentsID)},
	}
	v1 := Compute(objs, sys).BundleFor(agentsID).Version

	// The same objects in another order, with other generations: the same version.
	shuffled := Objects{
		Policies:    []v1alpha1.Policy{objs.Policies[1], objs.Policies[0]},
		Upstreams:   []v1alpha1.Upstream{objs.Upstreams[1], objs.Upstreams[0]},
		Credentials: []v1alpha1.Credential{objs.Credentials[1], objs.Credentials[0]},
		Revocations: objs.Revocations,
	}
	shuffled.Policies[0].Generation = 7
	if v2 := Compute(shuffled, sys).BundleFor(agentsID).Version; v2 != v1 {
		t.Errorf("same content, versions %s and %s", v1, v2)
	}
	// Another namespace's change does not touch this sidecar's version.
	other := objs
	other.Upstreams = append(slices.Clone(objs.Upstreams), up("other", "x", "x.example", 0))
	if v2 := Compute(other, sys).BundleFor(agentsID).Version; v2 != v1 {
		t.Errorf("another namespace changed the version: %s -> %s", v1, v2)
	}
	// Any change of content changes it.
	changed := objs
	changed.Policies = slices.Clone(objs.Policies)
	changed.Policies[1].Spec.Cedar += "\n"
	if v2 := Compute(changed, sys).BundleFor(agentsID).Version; v2 == v1 {
		t.Error("changed policy text kept the version")
	}
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(v1) {
		t.Errorf("version %q", v1)
	}
	// The version in the bundle is the one Version computes.
	b := Compute(objs, sys).BundleFor(agentsID)
	if Version(b) != b.Version {
		t.Error("Version(b) != b.Version")
	}
}

func TestCompute_NothingServedIsAnEmptyBundle(t *testing.T) {
	b := Compute(Objects{}, sys).BundleFor(agentsID)
	if len(b.Upstreams)+len(b.Credentials)+len(b.Policies)+len(b.Revocations) != 0 || b.Version == "" {
		t.Errorf("bundle = %+v", b)
	}
}

func TestTruncate_KeepsUTF8Whole(t *testing.T) {
	s := strings.Repeat("é", 100)
	got := truncate(s, 51)
	if !strings.HasSuffix(got, " …") || len(got) > 51 || !utf8Valid(got) {
		t.Errorf("truncate = %q (%d bytes)", got, len(got))
	}
}

func utf8Valid(s string) bool { return strings.ToValidUTF8(s, "\uFFFD") == s }

func hosts(b bundle.Bundle) []string {
	var out []string
	for _, u := range b.Upstreams {
		h := u.Host
		if u.Port != 0 {
			h += ":" + itoa(u.Port)
		}
		out = append(out, h)
	}
	return out
}

func itoa(n int) string {
	var b []byte
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(b)
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func revNames(b bundle.Bundle) []string {
	var out []string
	for _, r := range b.Revocations {
		out = append(out, r.Name)
	}
	return out
}

func TestCompute_UpstreamsAndCredentialsTheSidecarWouldRefuseAreLeftOutOfTheBundle(t *testing.T) {
	badHeader := up("agents", "bad-header", "bad.example", 0)
	badHeader.Spec.Credential = "ok"
	badHeader.Spec.Inject = &config.Inject{Header: "Not A Header"}
	noCred := up("agents", "no-cred", "nocred.example", 0)
	noCred.Spec.Credential = "missing"
	viaBroken := up("agents", "via-broken", "broken.example", 0)
	viaBroken.Spec.Credential = "broken"
	good := up("agents", "good", "good.example", 0)
	good.Spec.Credential = "ok"
	broken := v1alpha1.Credential{ObjectMeta: meta("agents", "broken"), Spec: v1alpha1.CredentialSpec{
		OAuth2: &v1alpha1.OAuth2Spec{OAuth2: config.OAuth2{TokenURL: "not a url", ClientID: "c"}}}}
	// A cluster-wide upstream naming a credential each namespace defines for itself.
	perNS := up(sys, "openai", "api.openai.com", 0)
	perNS.Spec.Credential = "openai"

	v := Compute(Objects{
		Upstreams:   []v1alpha1.Upstream{badHeader, noCred, viaBroken, good, perNS},
		Credentials: []v1alpha1.Credential{static("agents", "ok", "s"), broken, static("agents", "openai", "o")},
		Revocations: []v1alpha1.Revocation{revoke(sys, "r", agentsID)},
	}, sys)
	b, dropped := v.NamespaceBundle("agents")
	if got := hosts(b); !slices.Equal(got, []string{"api.openai.com", "good.example"}) {
		t.Errorf("agents upstreams = %v", got)
	}
	if got := keys(b.Credentials); !slices.Equal(got, []string{"ok", "openai"}) {
		t.Errorf("agents credentials = %v", got)
	}
	if len(b.Revocations) != 1 {
		t.Error("the revocation must still be served")
	}
	joined := strings.Join(dropped, "\n")
	for _, want := range []string{"bad.example", "inject.header", "nocred.example", `no credential named "missing"`,
		"credential broken: credentials.broken.oauth2.token_url", "broken.example"} {
		if !strings.Contains(joined, want) {
			t.Errorf("dropped lacks %q:\n%s", want, joined)
		}
	}
	// What is served validates as the sidecar's config would.
	if errs := configErrors(b); len(errs) != 0 {
		t.Errorf("served bundle does not validate: %v", errs)
	}
	// Where the namespace has no openai credential, the cluster-wide upstream is left out there only.
	if got := hosts(v.BundleFor("spiffe://example.org/ns/other/sa/x")); len(got) != 0 {
		t.Errorf("other upstreams = %v", got)
	}
	// Validation does not change the View's objects (Validate fills defaults).
	b2, _ := v.NamespaceBundle("agents")
	if b2.Version != b.Version {
		t.Error("a second computation of the same bundle differs")
	}
}

// verdict returns the verdict on one object, failing when there is none.
func verdict(t *testing.T, v *View, kind, ns, name string) Verdict {
	t.Helper()
	vd, ok := v.Verdict(kind, ObjectKey{ns, name})
	if !ok {
		t.Fatalf("no verdict on %s %s/%s", kind, ns, name)
	}
	return vd
}

func wantVerdict(t *testing.T, v *View, kind, ns, name string, accepted bool, reason, msg string) {
	t.Helper()
	vd := verdict(t, v, kind, ns, name)
	if vd.Accepted != accepted || vd.Reason != reason || !strings.Contains(vd.Message, msg) || vd.Generation != 1 {
		t.Errorf("%s %s/%s: %+v; want accepted=%v reason=%s message containing %q", kind, ns, name, vd, accepted, reason, msg)
	}
}

func TestCompute_EveryUpstreamCredentialAndRevocationGetsAVerdictWithReasonAndKeyPath(t *testing.T) {
	badHeader := up("agents", "bad-header", "bad.example", 0)
	badHeader.Spec.Credential = "ok"
	badHeader.Spec.Inject = &config.Inject{Header: "Not A Header"}
	noCred := up("agents", "no-cred", "nocred.example", 0)
	noCred.Spec.Credential = "missing"
	viaBroken := up("agents", "via-broken", "broken.example", 0)
	viaBroken.Spec.Credential = "broken"
	good := up("agents", "good", "good.example", 0)
	good.Spec.Credential = "ok"
	broken := v1alpha1.Credential{ObjectMeta: meta("agents", "broken"), Spec: v1alpha1.CredentialSpec{
		OAuth2: &v1alpha1.OAuth2Spec{OAuth2: config.OAuth2{TokenURL: "not a url", ClientID: "c"}}}}
	prefix := revoke("agents", "bad-prefix")
	prefix.Spec.SPIFFEIDPrefixes = []string{"spiffe://"}

	v := Compute(Objects{
		Upstreams: []v1alpha1.Upstream{badHeader, noCred, viaBroken, good,
			up(sys, "gh", "api.github.com", 0), up("agents", "evil", "api.github.com", 0)},
		Credentials: []v1alpha1.Credential{static("agents", "ok", "s"), broken, static("agents", "bad-ref", "../etc"),
			static(sys, "shared", "s"), static("agents", "shared", "mine")},
		Revocations: []v1alpha1.Revocation{revoke("agents", "r", agentsID), {ObjectMeta: meta("agents", "none")}, prefix},
		Undecodable: []Undecodable{{Ref: ObjectRef{v1alpha1.KindUpstream, ObjectKey{"agents", "future"}}, Generation: 1,
			Err: `v1alpha1: json: unknown field "from_the_future"`}},
	}, sys)

	wantVerdict(t, v, v1alpha1.KindUpstream, "agents", "good", true, v1alpha1.ReasonValid, "served to the sidecars of namespace agents")
	wantVerdict(t, v, v1alpha1.KindUpstream, sys, "gh", true, v1alpha1.ReasonValid, "every namespace")
	wantVerdict(t, v, v1alpha1.KindUpstream, "agents", "bad-header", false, v1alpha1.ReasonInvalid, `spec.inject.header: want an HTTP header name, got "Not A Header"`)
	wantVerdict(t, v, v1alpha1.KindUpstream, "agents", "no-cred", false, v1alpha1.ReasonMissingCredential,
		`spec.credential: no Credential "missing" is served with it (none accepted in agents or escrow-system)`)
	wantVerdict(t, v, v1alpha1.KindUpstream, "agents", "via-broken", false, v1alpha1.ReasonMissingCredential,
		"spec.credential: Credential agents/broken is not served (see its status)")
	wantVerdict(t, v, v1alpha1.KindUpstream, "agents", "evil", false, v1alpha1.ReasonConflict,
		"spec.host: host api.github.com port 0 is already served by Upstream escrow-system/gh")
	wantVerdict(t, v, v1alpha1.KindUpstream, "agents", "future", false, v1alpha1.ReasonUndecodable, `unknown field "from_the_future"`)

	wantVerdict(t, v, v1alpha1.KindCredential, "agents", "ok", true, v1alpha1.ReasonValid, "namespace agents")
	wantVerdict(t, v, v1alpha1.KindCredential, "agents", "broken", false, v1alpha1.ReasonInvalid, "spec.oauth2.token_url: ")
	wantVerdict(t, v, v1alpha1.KindCredential, "agents", "bad-ref", false, v1alpha1.ReasonBadSecretRef,
		`spec.static.secret_ref: name "../etc" is not a Secret name`)
	wantVerdict(t, v, v1alpha1.KindCredential, "agents", "shared", false, v1alpha1.ReasonConflict,
		"metadata.name: the name is taken by the cluster-wide Credential escrow-system/shared")

	wantVerdict(t, v, v1alpha1.KindRevocation, "agents", "r", true, v1alpha1.ReasonValid, "namespace agents")
	wantVerdict(t, v, v1alpha1.KindRevocation, "agents", "none", false, v1alpha1.ReasonEmpty, "spec: names no spiffe_ids")
	wantVerdict(t, v, v1alpha1.KindRevocation, "agents", "bad-prefix", false, v1alpha1.ReasonInvalid,
		`spec.spiffe_id_prefixes: "spiffe://" is not a spiffe:// prefix`)

	// Problems are exactly the objects that are not Accepted, in a stable order.
	var got []string
	for _, p := range v.Problems() {
		got = append(got, p.Kind+" "+p.Key.String()+" "+p.Reason)
	}
	want := []string{
		"Credential agents/bad-ref BadSecretRef", "Credential agents/broken Invalid", "Credential agents/shared Conflict",
		"Revocation agents/bad-prefix Invalid", "Revocation agents/none Empty",
		"Upstream agents/bad-header Invalid", "Upstream agents/evil Conflict", "Upstream agents/future Undecodable",
		"Upstream agents/no-cred MissingCredential", "Upstream agents/via-broken MissingCredential",
	}
	if !slices.Equal(got, want) {
		t.Errorf("problems =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestCompute_ClusterWideUpstreamServedToSomeNamespacesIsPartiallyServed(t *testing.T) {
	perNS := up(sys, "openai", "api.openai.com", 0)
	perNS.Spec.Credential = "openai"
	// A cluster-wide upstream naming a cluster-wide credential is served everywhere.
	everywhere := up(sys, "github", "api.github.com", 0)
	everywhere.Spec.Credential = "gh"
	v := Compute(Objects{
		Upstreams:   []v1alpha1.Upstream{perNS, everywhere},
		Credentials: []v1alpha1.Credential{static("b-team", "openai", "o"), static("a-team", "openai", "o"), static(sys, "gh", "g")},
		Policies:    []v1alpha1.Policy{pol("c-team", "p", allowAgentsRead)}, // a namespace without openai
	}, sys)
	wantVerdict(t, v, v1alpha1.KindUpstream, sys, "openai", true, v1alpha1.ReasonPartiallyServed,
		`served only to the sidecars of namespaces a-team, b-team; left out of every other namespace's: spec.credential: no Credential "openai" is served with it (none accepted in escrow-system)`)
	wantVerdict(t, v, v1alpha1.KindUpstream, sys, "github", true, v1alpha1.ReasonValid, "every namespace")
	if len(v.Problems()) != 0 {
		t.Errorf("problems = %+v", v.Problems())
	}
	// Served where the credential is, and nowhere else.
	for ns, want := range map[string]bool{"a-team": true, "b-team": true, "c-team": false, "nowhere": false, sys: false} {
		if got := slices.Contains(hosts(v.BundleForNamespace(ns)), "api.openai.com"); got != want {
			t.Errorf("%s has api.openai.com: %v, want %v", ns, got, want)
		}
	}

	// No namespace defines it: left out of every bundle.
	v = Compute(Objects{Upstreams: []v1alpha1.Upstream{perNS}, Credentials: []v1alpha1.Credential{static("a-team", "other", "o")}}, sys)
	wantVerdict(t, v, v1alpha1.KindUpstream, sys, "openai", false, v1alpha1.ReasonMissingCredential, `no Credential "openai"`)
}

func TestCompute_ClusterWideUpstreamIsLeftOutWhereTheNamespacesCredentialIsInvalid(t *testing.T) {
	perNS := up(sys, "openai", "api.openai.com", 0)
	perNS.Spec.Credential = "openai"
	bad := v1alpha1.Credential{ObjectMeta: meta("b-team", "openai"), Spec: v1alpha1.CredentialSpec{
		OAuth2: &v1alpha1.OAuth2Spec{OAuth2: config.OAuth2{TokenURL: "not a url", ClientID: "c"}}}}
	v := Compute(Objects{Upstreams: []v1alpha1.Upstream{perNS},
		Credentials: []v1alpha1.Credential{static("a-team", "openai", "o"), bad}}, sys)
	wantVerdict(t, v, v1alpha1.KindUpstream, sys, "openai", true, v1alpha1.ReasonPartiallyServed,
		"served only to the sidecars of namespace a-team;")
	wantVerdict(t, v, v1alpha1.KindCredential, "b-team", "openai", false, v1alpha1.ReasonInvalid, "spec.oauth2.token_url")
}

func TestCompute_VerdictsAreTheSameForTheSameObjects(t *testing.T) {
	// Replicas must write the same status, or they would overwrite each other forever.
	perNS := up(sys, "openai", "api.openai.com", 0)
	perNS.Spec.Credential = "openai"
	objs := Objects{Upstreams: []v1alpha1.Upstream{perNS}}
	for _, ns := range []string{"n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10", "n11", "n12"} {
		objs.Credentials = append(objs.Credentials, static(ns, "openai", "o"))
	}
	first := Compute(objs, sys).Verdicts()
	for range 20 {
		slices.Reverse(objs.Credentials)
		if got := Compute(objs, sys).Verdicts(); !maps.Equal(got, first) {
			t.Fatalf("verdicts differ:\n%v\n%v", got, first)
		}
	}
	vd := first[ObjectRef{v1alpha1.KindUpstream, ObjectKey{sys, "openai"}}]
	if !strings.Contains(vd.Message, "namespaces n1, n10, n11, n12, n2, n3, n4, n5, n6, n7 and 2 more;") {
		t.Errorf("message = %q", vd.Message)
	}
}

func TestJudge_ClusterWideObjectLeftOutOfSomeTenantsNamesThem(t *testing.T) {
	// Nothing a tenant creates can make today's validation refuse a cluster-wide object that
	// escrow's namespace serves, but the verdict must still say so if a future check does.
	v := &View{clusterNS: sys}
	ref := ObjectRef{v1alpha1.KindUpstream, ObjectKey{sys, "u"}}
	d := drop{ref: ref, reason: v1alpha1.ReasonInvalid, msg: "spec.port: no"}
	vd := v.judge(ref, 3, []string{"a", "b", "c"}, map[string]map[ObjectRef]drop{"b": {ref: d}, "c": {ref: d}})
	if !vd.Accepted || vd.Reason != v1alpha1.ReasonPartiallyServed || vd.Generation != 3 ||
		vd.Message != "served to every namespace's sidecars except namespaces b, c: (b) spec.port: no" {
		t.Errorf("verdict = %+v", vd)
	}
}
