package controller

import (
	"context"
	"errors"
	"fmt"
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

// Publisher receives every new View (the ADS Server).
type Publisher interface{ Update(*View) }

// Options configure a Controller.
type Options struct {
	// Client reads and watches escrow's resources and writes Policy status.
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
// recomputes the View after each burst of changes, publishes it, and writes each Policy's
// Accepted condition. It is stateless: several replicas compute the same View from the API
// server and write the same status.
type Controller struct {
	o         Options
	factory   dynamicinformer.DynamicSharedInformerFactory
	informers map[schema.GroupVersionResource]cache.SharedIndexInformer
	trigger   chan struct{}
	ready     atomic.Bool
}

var kinds = []schema.GroupVersionResource{v1alpha1.PolicyResource, v1alpha1.UpstreamResource,
	v1alpha1.CredentialResource, v1alpha1.RevocationResource}

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
		_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { c.poke() },
			UpdateFunc: func(oldObj, newObj any) {
				// A status write (ours) changes neither the spec nor the generation.
				if gvr == v1alpha1.PolicyResource && generation(oldObj) == generation(newObj) {
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
// Policy statuses that changed.
func (c *Controller) recompute(ctx context.Context) {
	c.o.Metrics.Rejected.Reset()
	for _, k := range []string{v1alpha1.KindPolicy, v1alpha1.KindUpstream, v1alpha1.KindCredential, v1alpha1.KindRevocation} {
		c.o.Metrics.Rejected.WithLabelValues(k).Set(0)
	}
	var objs Objects
	policies := map[ObjectKey]*unstructured.Unstructured{}
	decodeAll(c, v1alpha1.PolicyResource, &objs.Policies, func(p *v1alpha1.Policy, u *unstructured.Unstructured) {
		policies[keyOf(p.ObjectMeta)] = u
	})
	decodeAll(c, v1alpha1.UpstreamResource, &objs.Upstreams, nil)
	decodeAll(c, v1alpha1.CredentialResource, &objs.Credentials, nil)
	decodeAll(c, v1alpha1.RevocationResource, &objs.Revocations, nil)

	view := Compute(objs, c.o.Namespace)
	c.o.Metrics.Computes.Inc()
	c.o.Publisher.Update(view)

	for _, p := range view.Problems() {
		c.o.Metrics.Rejected.WithLabelValues(p.Kind).Inc()
		c.o.Logger.Warn("object left out of every bundle", zap.String("kind", p.Kind),
			zap.String("object", p.Key.String()), zap.String("why", p.Err))
	}
	for k, v := range view.Verdicts() {
		if u := policies[k]; u != nil {
			c.writeStatus(ctx, u, v)
		}
	}
}

// decodeAll decodes every cached object of gvr into out; one that does not decode is left out
// and logged (a newer CRD than this controller knows).
func decodeAll[T any](c *Controller, gvr schema.GroupVersionResource, out *[]T, each func(*T, *unstructured.Unstructured)) {
	for _, obj := range c.informers[gvr].GetStore().List() {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		t, err := v1alpha1.Decode[T](u.Object)
		if err != nil {
			c.o.Metrics.Rejected.WithLabelValues(u.GetKind()).Inc()
			c.o.Logger.Warn("object does not decode; left out of every bundle", zap.String("resource", gvr.Resource),
				zap.String("object", u.GetNamespace()+"/"+u.GetName()), zap.Error(err))
			continue
		}
		*out = append(*out, *t)
		if each != nil {
			each(t, u)
		}
	}
}

// writeStatus sets the Policy's Accepted condition to v unless it already says so. A
// conflict means the object changed meanwhile: its watch event brings a new recompute.
func (c *Controller) writeStatus(ctx context.Context, u *unstructured.Unstructured, v Verdict) {
	p, err := v1alpha1.Decode[v1alpha1.Policy](u.Object)
	if err != nil {
		return
	}
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
	st, err := v1alpha1.Encode(v1alpha1.PolicyStatus{ObservedGeneration: v.Generation, Conditions: conds})
	if err != nil {
		c.o.Logger.Error("policy status", zap.Error(err))
		return
	}
	obj := u.DeepCopy()
	obj.Object["status"] = st
	_, err = c.o.Client.Resource(v1alpha1.PolicyResource).Namespace(u.GetNamespace()).UpdateStatus(ctx, obj, metav1.UpdateOptions{})
	switch {
	case err == nil:
		c.o.Metrics.StatusWrites.WithLabelValues("ok").Inc()
	case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
		c.o.Metrics.StatusWrites.WithLabelValues("conflict").Inc()
	default:
		c.o.Metrics.StatusWrites.WithLabelValues("error").Inc()
		c.o.Logger.Warn("writing a Policy's status; retrying", zap.String("policy", u.GetNamespace()+"/"+u.GetName()), zap.Error(err))
		time.AfterFunc(statusRetry, c.poke)
	}
}
