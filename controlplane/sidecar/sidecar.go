// Package sidecar is the sidecar's side of escrow's control plane: a subscriber that receives
// the controller's bundle over ADS (one ECDS TypedExtensionConfig, see controlplane/bundle),
// validates it with the sidecar's own config exactly as a file would be, hands it to the running
// sidecar, and acknowledges it; or refuses it (NACK, with the reason) and keeps the last good
// one. While the controller is unreachable the last good config stays in force and the stream
// is reopened with capped, jittered exponential backoff.
//
// It uses the raw ADS stream rather than go-control-plane's sotw client, which hides the
// response's version and nonce (needed in the ACK) and deadlocks when Ack or Nack races Fetch.
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/policy"
)

// TypeURL is the one xDS type the sidecar subscribes to (ECDS), as a wildcard.
const TypeURL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

// Defaults of the reconnection backoff.
const (
	DefaultInitialBackoff = 250 * time.Millisecond
	DefaultMaxBackoff     = config.DefaultXDSMaxBackoff
)

// Update is one validated bundle, merged with the sidecar's own config: a complete new value of
// what the control plane sets. Apply it whole (proxy.Sidecar.Update), or return an error.
type Update struct {
	// Version is the bundle's version (the controller's), as reported in /readyz and /metrics.
	Version string
	// Config is the sidecar's file config plus the pushed upstreams and credentials, parsed
	// and validated as a file.
	Config *config.Config
	// Policies is the sidecar's policy.dir plus the pushed policies, compiled as one set;
	// Source is what it was compiled from.
	Policies *policy.Set
	Source   policy.Source
	// Revocations are all those in force (none: every earlier one is lifted).
	Revocations []bundle.Revocation
}

// Options configure a Subscriber.
type Options struct {
	// Base is the sidecar's validated file config: its upstreams, credentials and policy.dir
	// are the base the pushed ones add to. Required.
	Base *config.Config
	// BasePolicies are the base policies (and the schema every set is validated against).
	// Nil: Base.Policy.Dir is read once by New, if set; otherwise none and the built-in schema.
	BasePolicies *policy.Source
	// Conn is the connection to the controller (gRPC over mTLS with the sidecar's SVID; the
	// caller makes it). It reconnects on its own; the subscriber reopens the stream on it.
	Conn grpc.ClientConnInterface
	// NodeID is sent as the xDS node id. The controller derives the node's identity from the
	// SVID; this is informative (the SVID's SPIFFE ID).
	NodeID string
	// Apply puts an update in force, atomically, or returns why it cannot (then it is
	// NACKed and the last good one stays). Required.
	Apply func(ctx context.Context, u Update) error
	// InitialBackoff and MaxBackoff bound the wait before reopening a broken stream
	// (DefaultInitialBackoff, Base.XDS.MaxBackoff or DefaultMaxBackoff).
	InitialBackoff, MaxBackoff time.Duration
	// Sleep waits d or until ctx ends (default: a timer). Tests make it instant or gated.
	Sleep func(ctx context.Context, d time.Duration) error
	// Rand returns a number in [0, 1) for jitter (default math/rand/v2).
	Rand func() float64
	// Now is the clock of the status timestamps (default time.Now).
	Now    func() time.Time
	Logger *zap.Logger
}

// Status is what the subscriber reports.
type Status struct {
	// Applied is the version in force ("" until the first bundle was applied).
	Applied string
	// AppliedAt is when it was applied.
	AppliedAt time.Time
	// LastNACK is the reason the last refused bundle was refused ("" if none was since the
	// last applied one), and NACKedVersion its version.
	LastNACK, NACKedVersion string
	// Connected reports an open stream to the controller.
	Connected bool
}

// Subscriber keeps the sidecar on the controller's bundle. Make it with New, run it with Run.
type Subscriber struct {
	o       Options
	basePol policy.Source
	log     *zap.Logger
	m       metrics

	mu      sync.Mutex
	st      Status
	applied bool          // a bundle was applied (its version may be "")
	changed chan struct{} // closed and replaced at every status change
}

type metrics struct {
	applied   *prometheus.GaugeVec
	updates   *prometheus.CounterVec
	connected prometheus.Gauge
}

// New checks the options, reads the base policies and registers the metrics.
func New(o Options) (*Subscriber, error) {
	switch {
	case o.Base == nil || !o.Base.Validated():
		return nil, errors.New("controlplane: Base must be a validated config")
	case o.Conn == nil:
		return nil, errors.New("controlplane: Conn is required")
	case o.Apply == nil:
		return nil, errors.New("controlplane: Apply is required")
	}
	if o.InitialBackoff <= 0 {
		o.InitialBackoff = DefaultInitialBackoff
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = DefaultMaxBackoff
		if o.Base.XDS != nil && o.Base.XDS.MaxBackoff > 0 {
			o.MaxBackoff = o.Base.XDS.MaxBackoff.D()
		}
	}
	if o.Sleep == nil {
		o.Sleep = sleep
	}
	if o.Rand == nil {
		o.Rand = rand.Float64
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	s := &Subscriber{o: o, log: o.Logger, changed: make(chan struct{})}
	switch {
	case o.BasePolicies != nil:
		s.basePol = *o.BasePolicies
	case o.Base.Policy.Dir != "":
		src, err := policy.ReadDir(o.Base.Policy.Dir)
		if err != nil {
			return nil, fmt.Errorf("controlplane: base policies: %w", err)
		}
		s.basePol = src
	}
	s.m = metrics{
		applied: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "escrow_xds_applied_info",
			Help: "1 for the version of the control plane's bundle in force (absent until one was applied).",
		}, []string{"version"}),
		updates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "escrow_xds_updates_total",
			Help: "Bundles received from the control plane, by result: ack (applied) or nack (refused; the last good one stays).",
		}, []string{"result"}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "escrow_xds_connected",
			Help: "1 while a stream to the control plane is open.",
		}),
	}
	s.m.updates.WithLabelValues("ack")
	s.m.updates.WithLabelValues("nack")
	return s, nil
}

// Register adds the subscriber's metrics to reg (the sidecar's registry, served on /metrics):
// escrow_xds_applied_info{version}, escrow_xds_updates_total{result} and escrow_xds_connected.
func (s *Subscriber) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{s.m.applied, s.m.updates, s.m.connected} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("controlplane: metrics: %w", err)
		}
	}
	return nil
}

// Changed returns a channel that is closed at the next change of Status.
func (s *Subscriber) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// notify wakes the waiters of Changed; the caller holds mu.
func (s *Subscriber) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Status returns the subscriber's current status.
func (s *Subscriber) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// Ready is a /readyz check: nil once a bundle was applied. A sidecar that never received its
// config is not ready (and denies every request: it has no policy set).
func (s *Subscriber) Ready() error {
	s.mu.Lock()
	st, applied := s.st, s.applied
	s.mu.Unlock()
	switch {
	case applied:
		return nil
	case st.LastNACK != "":
		return fmt.Errorf("no config from the control plane applied yet; version %q was refused: %s", st.NACKedVersion, st.LastNACK)
	case !st.Connected:
		return errors.New("no config from the control plane yet; not connected")
	}
	return errors.New("no config from the control plane yet")
}

// Run subscribes until ctx ends, reopening the stream with backoff whenever it breaks. It
// returns ctx's error.
func (s *Subscriber) Run(ctx context.Context) error {
	backoff := s.o.InitialBackoff
	for {
		received, err := s.stream(ctx)
		s.setConnected(false)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if received {
			backoff = s.o.InitialBackoff // the controller answered: start over
		}
		// Equal jitter: between half and all of the backoff, so a fleet whose controller
		// restarted does not reconnect in lockstep.
		wait := backoff/2 + time.Duration(s.o.Rand()*float64(backoff/2))
		s.log.Warn("control plane stream ended; keeping the last good config and reconnecting",
			zap.Error(err), zap.Duration("in", wait), zap.String("applied", s.Status().Applied))
		if err := s.o.Sleep(ctx, wait); err != nil {
			return err
		}
		backoff = min(backoff*2, s.o.MaxBackoff)
	}
}

// stream runs one ADS stream until it breaks: it subscribes, then applies (ACK) or refuses
// (NACK) each response in order. received reports whether any response arrived.
func (s *Subscriber) stream(ctx context.Context) (received bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// WaitForReady: while the controller is unreachable the stream waits for the connection
	// (which reconnects with gRPC's own backoff) instead of failing at once.
	st, err := discovery.NewAggregatedDiscoveryServiceClient(s.o.Conn).StreamAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return false, fmt.Errorf("controlplane: open stream: %w", err)
	}
	node := &core.Node{Id: s.o.NodeID, UserAgentName: "escrow"}
	// The first request carries the version in force, so a controller serving the same one
	// sends nothing new after a reconnection.
	if err := st.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: TypeURL, VersionInfo: s.Status().Applied}); err != nil {
		return false, fmt.Errorf("controlplane: subscribe: %w", err)
	}
	s.setConnected(true)
	for {
		resp, err := st.Recv()
		if err != nil {
			return received, fmt.Errorf("controlplane: receive: %w", err)
		}
		received = true
		req := &discovery.DiscoveryRequest{Node: node, TypeUrl: TypeURL, ResponseNonce: resp.GetNonce()}
		version, applyErr := s.handle(ctx, resp)
		if applyErr != nil {
			req.VersionInfo = s.Status().Applied // a NACK names the last good version
			req.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: reason(applyErr)}
		} else {
			req.VersionInfo = resp.GetVersionInfo()
		}
		s.record(version, applyErr)
		if err := st.Send(req); err != nil {
			return received, fmt.Errorf("controlplane: acknowledge: %w", err)
		}
	}
}

// handle decodes, merges, validates and applies one response; the version is the bundle's (or
// the response's, when the bundle cannot be read).
func (s *Subscriber) handle(ctx context.Context, resp *discovery.DiscoveryResponse) (string, error) {
	version := resp.GetVersionInfo()
	if resp.GetTypeUrl() != TypeURL {
		return version, fmt.Errorf("controlplane: type %q, want %q", resp.GetTypeUrl(), TypeURL)
	}
	b, err := bundle.Decode(resp.GetResources())
	if err != nil {
		return version, err
	}
	if b.Version != "" {
		version = b.Version
	}
	m, err := merge(s.o.Base, s.basePol, b)
	if err != nil {
		return version, err
	}
	u := Update{Version: version, Config: m.config, Policies: m.policies, Source: m.source, Revocations: b.Revocations}
	if u.Revocations == nil {
		u.Revocations = []bundle.Revocation{}
	}
	if err := s.o.Apply(ctx, u); err != nil {
		return version, fmt.Errorf("controlplane: apply: %w", err)
	}
	s.log.Info("control plane config applied", zap.String("version", version),
		zap.Int("upstreams", len(b.Upstreams)), zap.Strings("credentials", names(b.Credentials)),
		zap.Strings("policies", names(b.Policies)), zap.Int("revocations", len(b.Revocations)))
	return version, nil
}

func (s *Subscriber) record(version string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.st.LastNACK, s.st.NACKedVersion = reason(err), version
		s.m.updates.WithLabelValues("nack").Inc()
		s.notify()
		s.log.Error("control plane config refused; keeping the last good one",
			zap.String("version", version), zap.String("in_force", s.st.Applied), zap.Error(err))
		return
	}
	if s.applied && s.st.Applied != version {
		s.m.applied.DeleteLabelValues(s.st.Applied)
	}
	s.m.applied.WithLabelValues(version).Set(1)
	s.st.Applied, s.st.AppliedAt, s.st.LastNACK, s.st.NACKedVersion = version, s.o.Now(), "", ""
	s.applied = true
	s.m.updates.WithLabelValues("ack").Inc()
	s.notify()
}

func (s *Subscriber) setConnected(up bool) {
	s.mu.Lock()
	if s.st.Connected != up {
		s.st.Connected = up
		s.notify()
	}
	s.mu.Unlock()
	if up {
		s.m.connected.Set(1)
	} else {
		s.m.connected.Set(0)
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
