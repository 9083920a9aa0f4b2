package controller

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/bundle"
)

const (
	reviewerID = "spiffe://example.org/ns/agents/sa/reviewer"
	writerID   = "spiffe://example.org/ns/agents/sa/writer"
)

// brokeredObjects: a brokered github Credential that agentsID alone may use, a tenant
// Upstream naming it, and an Upstream and Policy every sidecar of agents receives.
func brokeredObjects(f *brokerFixture, ids ...string) Objects {
	gh := f.githubCred(sys, "github", ids...)
	ghUp := up("agents", "github", "api.github.com", 0)
	ghUp.Spec.Credential = "github"
	return Objects{
		Credentials: []v1alpha1.Credential{gh, static("agents", "openai", "openai-key")},
		Upstreams:   []v1alpha1.Upstream{ghUp, withCred(up("agents", "openai", "api.openai.com", 0), "openai")},
		Policies:    []v1alpha1.Policy{pol(sys, "base", allowGitHub)},
	}
}

func withCred(u v1alpha1.Upstream, cred string) v1alpha1.Upstream {
	u.Spec.Credential = cred
	return u
}

func TestView_ABrokeredCredentialAndItsUpstreamsReachOnlyTheSidecarsItAllows(t *testing.T) {
	f := newBrokerFixture(t)
	v := Compute(brokeredObjects(f, agentsID), sys)

	allowed := v.BundleFor(agentsID)
	if _, ok := allowed.Credentials["github"]; !ok || !slices.Equal(hosts(allowed), []string{"api.github.com", "api.openai.com"}) {
		t.Fatalf("the allowed sidecar's bundle: credentials %v, upstreams %v", keys(allowed.Credentials), hosts(allowed))
	}
	if ns := v.BundleForNamespace("agents"); allowed.Version != ns.Version {
		t.Errorf("a sidecar allowed every brokered Credential has version %s, its namespace's bundle %s", allowed.Version, ns.Version)
	}

	denied := v.BundleFor(reviewerID)
	if _, ok := denied.Credentials["github"]; ok || !slices.Equal(keys(denied.Credentials), []string{"openai"}) {
		t.Errorf("a sidecar not allowed receives credentials %v", keys(denied.Credentials))
	}
	if !slices.Equal(hosts(denied), []string{"api.openai.com"}) {
		t.Errorf("a sidecar not allowed receives upstreams %v; want the brokered Credential's left out", hosts(denied))
	}
	if !slices.Equal(keys(denied.Policies), keys(allowed.Policies)) {
		t.Errorf("policies %v, want %v", keys(denied.Policies), keys(allowed.Policies))
	}
	if denied.Version == allowed.Version || denied.Version != Version(denied) {
		t.Errorf("versions: allowed %s, not allowed %s (content hash %s)", allowed.Version, denied.Version, Version(denied))
	}
	// What a sidecar receives is a bundle it accepts.
	if errs := configErrors(denied); len(errs) != 0 {
		t.Errorf("the not-allowed sidecar's bundle does not validate: %v", errs)
	}

	// Two sidecars not allowed: one Audience, one bundle.
	if a, b := v.AudienceOf(reviewerID), v.AudienceOf(writerID); a != b {
		t.Errorf("audiences %+v and %+v", a, b)
	}
	if w := v.BundleFor(writerID); w.Version != denied.Version {
		t.Errorf("two sidecars not allowed: versions %s and %s", denied.Version, w.Version)
	}
	if a, b := v.AudienceOf(agentsID), v.AudienceOf(reviewerID); a == b || a.Namespace != "agents" || a.Brokered != "github" || b.Brokered != "" {
		t.Errorf("audiences: allowed %+v, not allowed %+v", a, b)
	}

	// The statuses say who receives them.
	for _, ref := range []ObjectRef{{v1alpha1.KindCredential, ObjectKey{sys, "github"}}, {v1alpha1.KindUpstream, ObjectKey{"agents", "github"}}} {
		if vd := v.verdicts[ref]; !vd.Accepted || vd.Reason != v1alpha1.ReasonValid || !strings.Contains(vd.Message, "only to those Credential escrow-system/github's spec.broker allows") {
			t.Errorf("%s: %+v", ref, vd)
		}
	}
	if vd := v.verdicts[ObjectRef{v1alpha1.KindUpstream, ObjectKey{"agents", "openai"}}]; vd.Message != "served to the sidecars of namespace agents" {
		t.Errorf("agents/openai: %+v", vd)
	}
}

func TestView_ABrokeredCredentialsPrefixesAllowAtAPathSegmentBoundary(t *testing.T) {
	f := newBrokerFixture(t)
	gh := f.githubCred(sys, "github")
	gh.Spec.Broker = &v1alpha1.BrokerSpec{SPIFFEIDPrefixes: []string{"spiffe://example.org/ns/team"}}
	cluster := withCred(up(sys, "github", "api.github.com", 0), "github")
	v := Compute(Objects{Credentials: []v1alpha1.Credential{gh}, Upstreams: []v1alpha1.Upstream{cluster}}, sys)

	for id, want := range map[string]bool{
		"spiffe://example.org/ns/team/sa/a":   true,
		"spiffe://example.org/ns/team/sa/b":   true,
		"spiffe://example.org/ns/team-2/sa/a": false,
		agentsID:                              false,
		"spiffe://example.org/workload/x":     false, // cluster-wide objects only, brokered ones not
	} {
		b := v.BundleFor(id)
		_, got := b.Credentials["github"]
		if got != want || slices.Contains(hosts(b), "api.github.com") != want {
			t.Errorf("%s: credentials %v, upstreams %v; want the brokered ones %v", id, keys(b.Credentials), hosts(b), want)
		}
	}
	if a, b := v.BundleFor("spiffe://example.org/ns/team/sa/a"), v.BundleFor("spiffe://example.org/ns/team-2/sa/a"); a.Version == b.Version {
		t.Errorf("allowed and not allowed share version %s", a.Version)
	}
}

func TestServer_ServesEachSidecarOnlyTheBrokeredCredentialsItMayUse(t *testing.T) {
	f := newBrokerFixture(t)
	ts := startServer(t)
	ts.Update(Compute(brokeredObjects(f, agentsID), sys))
	coder, reviewer, writer := ts.dial(t, agentsID, agentsID), ts.dial(t, reviewerID, reviewerID), ts.dial(t, writerID, writerID)

	rc, bc := recv(t, coder)
	rr, br := recv(t, reviewer)
	rw, bw := recv(t, writer)
	if _, ok := bc.Credentials["github"]; !ok || !slices.Contains(hosts(bc), "api.github.com") {
		t.Fatalf("the allowed sidecar: credentials %v, upstreams %v", keys(bc.Credentials), hosts(bc))
	}
	for name, b := range map[string]bundle.Bundle{"reviewer": br, "writer": bw} {
		if _, ok := b.Credentials["github"]; ok || slices.Contains(hosts(b), "api.github.com") || !slices.Contains(hosts(b), "api.openai.com") {
			t.Errorf("%s (not allowed): credentials %v, upstreams %v", name, keys(b.Credentials), hosts(b))
		}
	}
	if rr.GetVersionInfo() != rw.GetVersionInfo() || rr.GetVersionInfo() == rc.GetVersionInfo() {
		t.Errorf("versions: allowed %s, not allowed %s and %s", rc.GetVersionInfo(), rr.GetVersionInfo(), rw.GetVersionInfo())
	}
	// The two not allowed share one snapshot (one encoding), not one each.
	sr, err := ts.cache.GetSnapshot(reviewerID)
	if err != nil {
		t.Fatal(err)
	}
	sw, _ := ts.cache.GetSnapshot(writerID)
	sc, _ := ts.cache.GetSnapshot(agentsID)
	if sr != sw || sr == sc {
		t.Errorf("snapshots: reviewer %p, writer %p, coder %p; want the first two shared", sr, sw, sc)
	}
	ts.mu.Lock()
	snaps := len(ts.snaps)
	ts.mu.Unlock()
	if snaps != 2 {
		t.Errorf("%d snapshots for three sidecars of two audiences", snaps)
	}
	if n := testutil.CollectAndCount(ts.metrics.BundleVersion); n != 2 {
		t.Errorf("%d bundle_version_info series; want one per audience", n)
	}
	for _, err := range []error{coder.ACK(rc), reviewer.ACK(rr), writer.ACK(rw)} {
		if err != nil {
			t.Fatal(err)
		}
	}

	// The reviewer joins the allow list: pushed the Credential and its Upstream; the others'
	// bundles did not change (the revision follows the provider's config, not the list), so
	// nothing is pushed to them.
	ts.Update(Compute(brokeredObjects(f, agentsID, reviewerID), sys))
	r2, b2 := recv(t, reviewer)
	if _, ok := b2.Credentials["github"]; !ok || !slices.Contains(hosts(b2), "api.github.com") || r2.GetVersionInfo() != rc.GetVersionInfo() {
		t.Errorf("the reviewer once allowed: version %s (the coder's %s), credentials %v, upstreams %v",
			r2.GetVersionInfo(), rc.GetVersionInfo(), keys(b2.Credentials), hosts(b2))
	}
	if err := reviewer.ACK(r2); err != nil {
		t.Fatal(err)
	}
	noRecv(t, coder, 300*time.Millisecond)
	noRecv(t, writer, 100*time.Millisecond)

	// And leaves it again: pushed the bundle without them.
	ts.Update(Compute(brokeredObjects(f, agentsID), sys))
	r3, b3 := recv(t, reviewer)
	if _, ok := b3.Credentials["github"]; ok || slices.Contains(hosts(b3), "api.github.com") || r3.GetVersionInfo() != rr.GetVersionInfo() {
		t.Errorf("the reviewer removed from the list: version %s, credentials %v, upstreams %v", r3.GetVersionInfo(), keys(b3.Credentials), hosts(b3))
	}
}
