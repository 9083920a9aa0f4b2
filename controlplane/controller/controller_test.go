package controller

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"

	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
)

// publisher records the Views it gets.
type publisher struct {
	mu    sync.Mutex
	views []*View
	ch    chan struct{}
}

func (p *publisher) Update(v *View) {
	p.mu.Lock()
	p.views = append(p.views, v)
	p.mu.Unlock()
	select {
	case p.ch <- struct{}{}:
	default:
	}
}

func (p *publisher) last() *View {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.views) == 0 {
		return nil
	}
	return p.views[len(p.views)-1]
}

func (p *publisher) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.views)
}

func object(t *testing.T, kind string, v any) *unstructured.Unstructured {
	t.Helper()
	m, err := v1alpha1.Encode(v)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(v1alpha1.GroupVersion.String())
	u.SetKind(kind)
	return u
}

func fakeClient(t *testing.T, objs ...runtime.Object) *dynamicfake.FakeDynamicClient {
	t.Helper()
	return dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{
		v1alpha1.PolicyResource: "PolicyList", v1alpha1.UpstreamResource: "UpstreamList",
		v1alpha1.CredentialResource: "CredentialList", v1alpha1.RevocationResource: "RevocationList",
	}, objs...)
}

func startController(t *testing.T, client *dynamicfake.FakeDynamicClient) (*Controller, *publisher, *Metrics) {
	t.Helper()
	pub := &publisher{ch: make(chan struct{}, 1)}
	m := NewMetrics(prometheus.NewRegistry())
	c, err := New(Options{Client: client, Namespace: sys, Publisher: pub, Metrics: m, Coalesce: 10 * time.Millisecond,
		Now: func() time.Time { return time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	waitFor(t, "ready", c.Ready)
	return c, pub, m
}

func policyStatus(t *testing.T, client *dynamicfake.FakeDynamicClient, ns, name string) (v1alpha1.PolicyStatus, bool) {
	t.Helper()
	u, err := client.Resource(v1alpha1.PolicyResource).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := v1alpha1.Decode[v1alpha1.Policy](u.Object)
	if err != nil {
		t.Fatal(err)
	}
	return p.Status, len(p.Status.Conditions) > 0
}

func TestController_PublishesTheObjectsAndWritesPolicyStatus(t *testing.T) {
	good, bad := pol("agents", "good", allowAgentsRead), pol("agents", "bad", typo)
	client := fakeClient(t,
		object(t, v1alpha1.KindPolicy, &good), object(t, v1alpha1.KindPolicy, &bad),
		object(t, v1alpha1.KindUpstream, ptr(up("agents", "openai", "api.openai.com", 0))))
	_, pub, m := startController(t, client)

	b := pub.last().BundleFor(agentsID)
	if got := keys(b.Policies); len(got) != 1 || got[0] != "agents/good.cedar" {
		t.Fatalf("policies = %v", got)
	}
	if got := hosts(b); len(got) != 1 || got[0] != "api.openai.com" {
		t.Fatalf("upstreams = %v", got)
	}
	var st v1alpha1.PolicyStatus
	waitFor(t, "bad's status", func() bool { var ok bool; st, ok = policyStatus(t, client, "agents", "bad"); return ok })
	cd := st.Conditions[0]
	if cd.Type != v1alpha1.ConditionAccepted || cd.Status != metav1.ConditionFalse || cd.Reason != v1alpha1.ReasonInvalid ||
		cd.ObservedGeneration != 1 || cd.Message == "" || st.ObservedGeneration != 1 {
		t.Errorf("bad status = %+v", st)
	}
	waitFor(t, "good's status", func() bool { var ok bool; st, ok = policyStatus(t, client, "agents", "good"); return ok })
	if cd := st.Conditions[0]; cd.Status != metav1.ConditionTrue || cd.Reason != v1alpha1.ReasonValid ||
		!cd.LastTransitionTime.Time.Equal(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Errorf("good status = %+v", st)
	}
	if got := testutil.ToFloat64(m.Rejected.WithLabelValues(v1alpha1.KindPolicy)); got != 1 {
		t.Errorf("rejected{Policy} = %v", got)
	}
}

func TestController_RecomputesOnceForABurstOfChanges(t *testing.T) {
	client := fakeClient(t)
	_, pub, m := startController(t, client)
	before := pub.count()
	ctx := context.Background()
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		r := revoke("agents", name, agentsID)
		if _, err := client.Resource(v1alpha1.RevocationResource).Namespace("agents").Create(ctx, object(t, v1alpha1.KindRevocation, &r), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "five revocations", func() bool {
		v := pub.last()
		return v != nil && len(v.BundleFor(agentsID).Revocations) == 5
	})
	if n := pub.count() - before; n > 2 {
		t.Errorf("%d recomputes for one burst of 5 creates", n)
	}
	// Deleting one is seen too.
	if err := client.Resource(v1alpha1.RevocationResource).Namespace("agents").Delete(ctx, "c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "four revocations", func() bool { return len(pub.last().BundleFor(agentsID).Revocations) == 4 })
	_ = m
}

func TestController_ObjectThatDoesNotDecodeIsLeftOut(t *testing.T) {
	u := object(t, v1alpha1.KindUpstream, ptr(up("agents", "new", "new.example", 0)))
	u.Object["spec"].(map[string]any)["from_the_future"] = true
	client := fakeClient(t, u, object(t, v1alpha1.KindUpstream, ptr(up("agents", "old", "old.example", 0))))
	_, pub, m := startController(t, client)
	if got := hosts(pub.last().BundleFor(agentsID)); len(got) != 1 || got[0] != "old.example" {
		t.Errorf("upstreams = %v", got)
	}
	if got := testutil.ToFloat64(m.Rejected.WithLabelValues(v1alpha1.KindUpstream)); got != 1 {
		t.Errorf("rejected{Upstream} = %v", got)
	}
	cd := waitForCondition(t, client, v1alpha1.UpstreamResource, "agents", "new")
	if cd.Status != metav1.ConditionFalse || cd.Reason != v1alpha1.ReasonUndecodable || !strings.Contains(cd.Message, "from_the_future") {
		t.Errorf("new's condition = %+v", cd)
	}
}

// accepted returns the object's Accepted condition, if it has one.
func accepted(t *testing.T, client *dynamicfake.FakeDynamicClient, gvr schema.GroupVersionResource, ns, name string) (metav1.Condition, int64, bool) {
	t.Helper()
	u, err := client.Resource(gvr).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st := currentStatus(u)
	for _, cd := range st.Conditions {
		if cd.Type == v1alpha1.ConditionAccepted {
			return cd, st.ObservedGeneration, true
		}
	}
	return metav1.Condition{}, 0, false
}

func waitForCondition(t *testing.T, client *dynamicfake.FakeDynamicClient, gvr schema.GroupVersionResource, ns, name string) metav1.Condition {
	t.Helper()
	var cd metav1.Condition
	waitFor(t, gvr.Resource+" "+ns+"/"+name+" status", func() bool {
		var ok bool
		cd, _, ok = accepted(t, client, gvr, ns, name)
		return ok
	})
	return cd
}

// statusWrites counts the UpdateStatus calls the controller made.
func statusWrites(client *dynamicfake.FakeDynamicClient) int {
	n := 0
	for _, a := range client.Actions() {
		if a.GetVerb() == "update" && a.GetSubresource() == "status" {
			n++
		}
	}
	return n
}

func create(t *testing.T, client *dynamicfake.FakeDynamicClient, gvr schema.GroupVersionResource, u *unstructured.Unstructured) {
	t.Helper()
	if _, err := client.Resource(gvr).Namespace(u.GetNamespace()).Create(context.Background(), u, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestController_WritesTheStatusOfUpstreamsCredentialsAndRevocations(t *testing.T) {
	api := up("agents", "api", "api.example.com", 0)
	api.Spec.Credential = "api-key"
	client := fakeClient(t,
		object(t, v1alpha1.KindUpstream, &api),
		object(t, v1alpha1.KindCredential, ptr(static("agents", "bad-ref", "../etc"))),
		object(t, v1alpha1.KindRevocation, ptr(revoke("agents", "stop", agentsID))))
	_, pub, m := startController(t, client)

	cd := waitForCondition(t, client, v1alpha1.UpstreamResource, "agents", "api")
	if cd.Status != metav1.ConditionFalse || cd.Reason != v1alpha1.ReasonMissingCredential || cd.ObservedGeneration != 1 ||
		cd.Message != `spec.credential: no Credential "api-key" is served with it (none accepted in agents or escrow-system)` {
		t.Errorf("api = %+v", cd)
	}
	cd = waitForCondition(t, client, v1alpha1.CredentialResource, "agents", "bad-ref")
	if cd.Status != metav1.ConditionFalse || cd.Reason != v1alpha1.ReasonBadSecretRef || !strings.HasPrefix(cd.Message, "spec.static.secret_ref: ") {
		t.Errorf("bad-ref = %+v", cd)
	}
	cd = waitForCondition(t, client, v1alpha1.RevocationResource, "agents", "stop")
	if cd.Status != metav1.ConditionTrue || cd.Reason != v1alpha1.ReasonValid {
		t.Errorf("stop = %+v", cd)
	}
	if got := testutil.ToFloat64(m.Rejected.WithLabelValues(v1alpha1.KindUpstream)); got != 1 {
		t.Errorf("rejected{Upstream} = %v", got)
	}

	// The Credential appears: the Upstream is served and Accepted.
	create(t, client, v1alpha1.CredentialResource, object(t, v1alpha1.KindCredential, ptr(static("agents", "api-key", "api"))))
	waitFor(t, "api accepted", func() bool {
		cd, _, _ = accepted(t, client, v1alpha1.UpstreamResource, "agents", "api")
		return cd.Status == metav1.ConditionTrue
	})
	if cd.Reason != v1alpha1.ReasonValid || cd.Message != "served to the sidecars of namespace agents" {
		t.Errorf("api = %+v", cd)
	}
	if got := hosts(pub.last().BundleFor(agentsID)); !slices.Equal(got, []string{"api.example.com"}) {
		t.Errorf("upstreams = %v", got)
	}
	if got := testutil.ToFloat64(m.Rejected.WithLabelValues(v1alpha1.KindUpstream)); got != 0 {
		t.Errorf("rejected{Upstream} = %v", got)
	}
}

func TestController_ComputesTheObjectsPresentAtStartOnce(t *testing.T) {
	client := fakeClient(t,
		object(t, v1alpha1.KindPolicy, ptr(pol("agents", "good", allowAgentsRead))),
		object(t, v1alpha1.KindUpstream, ptr(up("agents", "u", "u.example", 0))),
		object(t, v1alpha1.KindCredential, ptr(static("agents", "c", "s"))),
		object(t, v1alpha1.KindRevocation, ptr(revoke("agents", "r", agentsID))))
	_, _, m := startController(t, client)
	// The initial list's add events arrived before the first compute, which already has them:
	// they must not cause a second one once the coalescing window (10 ms here) has passed.
	time.Sleep(200 * time.Millisecond)
	if got := testutil.ToFloat64(m.Computes); got != 1 {
		t.Errorf("%v computes for the objects present at start, want 1", got)
	}
}

func TestController_WritesAStatusOnlyWhenItChanges(t *testing.T) {
	good, bad := pol("agents", "good", allowAgentsRead), pol("agents", "bad", typo)
	client := fakeClient(t,
		object(t, v1alpha1.KindPolicy, &good), object(t, v1alpha1.KindPolicy, &bad),
		object(t, v1alpha1.KindUpstream, ptr(up("agents", "u", "u.example", 0))),
		object(t, v1alpha1.KindCredential, ptr(static("agents", "c", "s"))),
		object(t, v1alpha1.KindRevocation, ptr(revoke("agents", "r", agentsID))))
	_, pub, m := startController(t, client)
	for gvr, name := range map[schema.GroupVersionResource]string{v1alpha1.PolicyResource: "bad", v1alpha1.UpstreamResource: "u",
		v1alpha1.CredentialResource: "c", v1alpha1.RevocationResource: "r"} {
		waitForCondition(t, client, gvr, "agents", name)
	}
	waitForCondition(t, client, v1alpha1.PolicyResource, "agents", "good")
	if n := statusWrites(client); n != 5 {
		t.Fatalf("%d status writes for 5 objects", n)
	}

	// Each write came back as a watch event; none of them recomputed (the generation is the
	// same). Another namespace's object does recompute: only its own status is written.
	computes := testutil.ToFloat64(m.Computes)
	create(t, client, v1alpha1.RevocationResource, object(t, v1alpha1.KindRevocation, ptr(revoke("other", "r2", otherID))))
	waitForCondition(t, client, v1alpha1.RevocationResource, "other", "r2")
	waitFor(t, "the recompute published", func() bool { return len(pub.last().BundleFor(otherID).Revocations) == 1 })
	if n := statusWrites(client); n != 6 {
		t.Errorf("%d status writes after one new object, want 6", n)
	}
	if got := testutil.ToFloat64(m.Computes) - computes; got != 1 {
		t.Errorf("%v recomputes for one new object (status writes must not trigger any)", got)
	}
	if got := testutil.ToFloat64(m.StatusWrites.WithLabelValues("ok")); got != 6 {
		t.Errorf("status_writes_total{ok} = %v", got)
	}
}

func TestController_StatusFieldsItDoesNotKnowDoNotMakeAnObjectUnreadable(t *testing.T) {
	// A newer replica may write status fields this one does not know; the spec is what counts.
	u := object(t, v1alpha1.KindUpstream, ptr(up("agents", "u", "u.example", 0)))
	u.Object["status"] = map[string]any{"observedGeneration": int64(1), "fromTheFuture": "x",
		"conditions": []any{map[string]any{"type": "Accepted", "status": "True", "reason": "Valid",
			"message": "served to the sidecars of namespace agents", "observedGeneration": int64(1),
			"lastTransitionTime": "2026-01-01T00:00:00Z"}}}
	client := fakeClient(t, u)
	_, pub, _ := startController(t, client)
	if got := hosts(pub.last().BundleFor(agentsID)); !slices.Equal(got, []string{"u.example"}) {
		t.Errorf("upstreams = %v", got)
	}
	if n := statusWrites(client); n != 0 {
		t.Errorf("%d status writes for an object whose status already says it", n)
	}
}

func ptr[T any](v T) *T { return &v }
