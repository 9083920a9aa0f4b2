package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
)

// DefaultCoalesce is how long the controller waits after a change for more before it
// recomputes: a burst (kubectl apply -f dir/) becomes one push.
const DefaultCoalesce = 100 * time.Millisecond

// statusRetry is when a status write that failed (not a conflict) is tried again.
const statusRetry = 5 * time.Second

// Publisher receives every new View (the ADS Server, the Broker).
type Publisher interface{ Update(*View) }

// Publishers hands each View to every one of them, in order.
type Publishers []Publisher

// Update implements Publisher.
func (ps Publishers) Update(v *View) {
	for _, p := range ps {
		p.Update(v)
	}
}

// Options configure a Controller.
type Options struct {
	// Client reads and watches escrow's resources and writes their status.
	Client dynamic.Interface
	// Namespace is escrow's own namespace: its objects apply cluster-wide.
	Namespace string
	// Publisher gets each View.
	Publisher Publisher
	Logger    *zap.Logger
	Metrics   *Metrics
	// Coalesce is DefaultCoalesce when zero.
	Coalesce time.Duration
	// Now stamps status conditions; time.Now when nil.
	Now func() time.Time
}

// Controller watches Policy, Upstream, Credential and Revocation objects in every namespace,
// recomputes the View after each burst of changes, publishes it, and writes each object's
// Accepted condition where it changed. It is stateless: several replicas compute the same View
// from the API server and write the same status (the second write finds it written and makes
// none).
type Controller struct {
	o         Options
	factory   dynamicinformer.DynamicSharedInformerFactory
	informers map[schema.GroupVersionResource]cache.SharedIndexInformer
	handlers  []cache.ResourceEventHandlerRegistration // synced once the initial list reached them
	trigger   chan struct{}
	ready     atomic.Bool
}

var kinds = []schema.GroupVersionResource{v1alpha1.PolicyResource, v1alpha1.UpstreamResource,
	v1alpha1.CredentialResource, v1alpha1.RevocationResource}

// kindOf is the kind of each resource.
var kindOf = map[schema.GroupVersionResource]string{
	v1alpha1.PolicyResource: v1alpha1.KindPolicy, v1alpha1.UpstreamResource: v1alpha1.KindUpstream,
	v1alpha1.CredentialResource: v1alpha1.KindCredential, v1alpha1.RevocationResource: v1alpha1.KindRevocation,
}

// resourceOf is the resource of each kind.
var resourceOf = map[string]schema.GroupVersionResource{
	v1alpha1.KindPolicy: v1alpha1.PolicyResource, v1alpha1.KindUpstream: v1alpha1.UpstreamResource,
	v1alpha1.KindCredential: v1alpha1.CredentialResource, v1alpha1.KindRevocation: v1alpha1.RevocationResource,
}

// New builds a Controller; Run starts it.
func New(o Options) (*Controller, error) {
	if o.Client == nil || o.Publisher == nil || o.Namespace == "" {
		return nil, errors.New("controller: a client, a publisher and escrow's namespace are required")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics(nil)
	}
	if o.Coalesce <= 0 {
		o.Coalesce = DefaultCoalesce
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	c := &Controller{o: o, trigger: make(chan struct{}, 1), informers: map[schema.GroupVersionResource]cache.SharedIndexInformer{}}
	c.factory = dynamicinformer.NewFilteredDynamicSharedInformerFactory(o.Client, 0, metav1.NamespaceAll, nil)
	for _, gvr := range kinds {
		inf := c.factory.ForResource(gvr).Informer()
		reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { c.poke() },
			UpdateFunc: func(oldObj, newObj any) {
				// A status write (ours, or another replica's) or a metadata change leaves the
				// generation as it was, and nothing the View is computed from changes.
				if generation(oldObj) == generation(newObj) {
					return
				}
				c.poke()
			},
			DeleteFunc: func(any) { c.poke() },
		})
		if err != nil {
			return nil, fmt.Errorf("controller: %w", err)
		}
		c.informers[gvr] = inf
		c.handlers = append(c.handlers, reg)
	}
	return c, nil
}

func generation(obj any) int64 {
	if u, ok := obj.(*unstructured.Unstructured); ok {
		return u.GetGeneration()
	}
	return -1
}

func (c *Controller) poke() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// Ready reports whether the informers have synced and the first View was published.
func (c *Controller) Ready() bool { return c.ready.Load() }

// Run watches until ctx ends. It returns an error only if the caches never sync (the CRDs
// are not installed, or the controller may not list them).
func (c *Controller) Run(ctx context.Context) error {
	c.factory.Start(ctx.Done())
	defer c.factory.Shutdown()
	for gvr, inf := range c.informers {
		if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("controller: the %s informer did not sync", gvr.Resource)
		}
	}
	// The first View is computed from the synced caches, so the pokes of the initial list
	// (delivered to the handlers by now) are already in it: drop them, or they would recompute
	// the same View once more. A change from here on pokes again.
	if !cache.WaitForCacheSync(ctx.Done(), func() bool {
		return !slices.ContainsFunc(c.handlers, func(r cache.ResourceEventHandlerRegistration) bool { return !r.HasSynced() })
	}) {
		return nil
	}
	select {
	case <-c.trigger:
	default:
	}
	c.recompute(ctx)
	c.ready.Store(true)
	c.o.Logger.Info("controller synced", zap.String("namespace", c.o.Namespace))
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.trigger:
		}
		// Let the burst finish, then take everything it changed at once.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(c.o.Coalesce):
		}
		select {
		case <-c.trigger:
		default:
		}
		c.recompute(ctx)
	}
}

// recompute reads the informers' caches, computes the View, publishes it and writes the
// statuses that changed.
func (c *Controller) recompute(ctx context.Context) {
	var objs Objects
	cached := map[ObjectRef]*unstructured.Unstructured{}
	decodeAll(c, v1alpha1.PolicyResource, &objs, &objs.Policies, cached)
	decodeAll(c, v1alpha1.UpstreamResource, &objs, &objs.Upstreams, cached)
	decodeAll(c, v1alpha1.CredentialResource, &objs, &objs.Credentials, cached)
	decodeAll(c, v1alpha1.RevocationResource, &objs, &objs.Revocations, cached)

	view := Compute(objs, c.o.Namespace)
	c.o.Metrics.Computes.Inc()
	c.o.Publisher.Update(view)

	rejected := map[string]int{v1alpha1.KindPolicy: 0, v1alpha1.KindUpstream: 0, v1alpha1.KindCredential: 0, v1alpha1.KindRevocation: 0}
	for _, p := range view.Problems() {
		rejected[p.Kind]++
		c.o.Logger.Warn("object left out of every bundle", zap.String("kind", p.Kind),
			zap.String("object", p.Key.String()), zap.String("reason", p.Reason), zap.String("why", p.Err))
	}
	for k, n := range rejected {
		c.o.Metrics.Rejected.WithLabelValues(k).Set(float64(n))
	}
	for ref, v := range view.Verdicts() {
		if u := cached[ref]; u != nil {
			c.writeStatus(ctx, ref, u, v)
		}
	}
}

// decodeAll decodes every cached object of gvr into out and records it in cached. One that
// does not decode (a newer CRD than this controller knows) goes to objs.Undecodable. The status
// is not decoded with the rest: it is the controller's output, not its input, and a field a
// newer replica writes there must not make the object unreadable to this one.
func decodeAll[T any](c *Controller, gvr schema.GroupVersionResource, objs *Objects, out *[]T, cached map[ObjectRef]*unstructured.Unstructured) {
	kind := kindOf[gvr]
	for _, obj := range c.informers[gvr].GetStore().List() {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		ref := ObjectRef{kind, ObjectKey{u.GetNamespace(), u.GetName()}}
		cached[ref] = u
		content := make(map[string]any, len(u.Object))
		for k, v := range u.Object {
			if k != "status" {
				content[k] = v
			}
		}
		t, err := v1alpha1.Decode[T](content)
		if err != nil {
			objs.Undecodable = append(objs.Undecodable, Undecodable{Ref: ref, Generation: u.GetGeneration(), Err: err.Error()})
			continue
		}
		*out = append(*out, *t)
	}
}

// currentStatus reads an object's status leniently (unknown fields ignored): only the
// Accepted condition and the observed generation matter here.
func currentStatus(u *unstructured.Unstructured) v1alpha1.Status {
	var st v1alpha1.Status
	if raw, ok := u.Object["status"]; ok {
		if b, err := json.Marshal(raw); err == nil {
			_ = json.Unmarshal(b, &st)
		}
	}
	return st
}

// writeStatus sets the object's Accepted condition to v unless it already says so: a
// recompute that changes nothing about an object writes nothing to it. A conflict means the
// object changed meanwhile: its watch event brings a new recompute.
func (c *Controller) writeStatus(ctx context.Context, ref ObjectRef, u *unstructured.Unstructured, v Verdict) {
	p := struct{ Status v1alpha1.Status }{currentStatus(u)}
	want := metav1.Condition{Type: v1alpha1.ConditionAccepted, Status: metav1.ConditionFalse, Reason: v.Reason,
		Message: v.Message, ObservedGeneration: v.Generation}
	if v.Accepted {
		want.Status = metav1.ConditionTrue
	}
	var have *metav1.Condition
	for i := range p.Status.Conditions {
		if p.Status.Conditions[i].Type == v1alpha1.ConditionAccepted {
			have = &p.Status.Conditions[i]
		}
	}
	if have != nil && have.Status == want.Status && have.Reason == want.Reason && have.Message == want.Message &&
		have.ObservedGeneration == want.ObservedGeneration && p.Status.ObservedGeneration == v.Generation {
		return
	}
	want.LastTransitionTime = metav1.NewTime(c.o.Now().UTC().Truncate(time.Second))
	if have != nil && have.Status == want.Status {
		want.LastTransitionTime = have.LastTransitionTime
	}
	conds := []metav1.Condition{want}
	for _, cd := range p.Status.Conditions {
		if cd.Type != v1alpha1.ConditionAccepted {
			conds = append(conds, cd)
		}
	}
	st, err := v1alpha1.Encode(v1alpha1.Status{ObservedGeneration: v.Generation, Conditions: conds})
	if err != nil {
		c.o.Logger.Error("status", zap.String("object", ref.String()), zap.Error(err))
		return
	}
	obj := u.DeepCopy()
	obj.Object["status"] = st
	_, err = c.o.Client.Resource(resourceOf[ref.Kind]).Namespace(u.GetNamespace()).UpdateStatus(ctx, obj, metav1.UpdateOptions{})
	switch {
	case err == nil:
		c.o.Metrics.StatusWrites.WithLabelValues("ok").Inc()
	case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
		c.o.Metrics.StatusWrites.WithLabelValues("conflict").Inc()
	default:
		c.o.Metrics.StatusWrites.WithLabelValues("error").Inc()
		c.o.Logger.Warn("writing an object's status; retrying", zap.String("object", ref.String()), zap.Error(err))
		time.AfterFunc(statusRetry, c.poke)
	}
}
