package controller

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	xds "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/escrowproxy/escrow/controlplane/broker"
	"github.com/escrowproxy/escrow/controlplane/bundle"
)

// ServerOptions configure the ADS server.
type ServerOptions struct {
	// SVIDs is the controller's own X509-SVID and Bundles the trust bundles sidecars are
	// verified against (a workloadapi.X509Source is both; files for tests).
	SVIDs   x509svid.Source
	Bundles x509bundle.Source
	// TrustDomain is the sidecars' trust domain: only its members may connect. Zero: the
	// controller's own SVID's trust domain.
	TrustDomain spiffeid.TrustDomain
	Logger      *zap.Logger
	Metrics     *Metrics
	// Now is the clock of the push latency; time.Now when nil.
	Now func() time.Time
	// Minter, when set, serves credential brokering (controlplane/broker) on the same gRPC
	// server: same listener, same mTLS, the caller the SPIFFE ID of its verified certificate.
	Minter broker.Minter
}

// Server serves each connected sidecar its bundle over ADS (state of the world, one
// TypedExtensionConfig resource named bundle.ResourceName). A sidecar is identified by the
// SPIFFE ID of the X509-SVID it presents; the node id it sends must be that ID, so the
// snapshot cache, which is keyed by node id, cannot be made to serve another identity's bundle.
type Server struct {
	cache   cache.SnapshotCache
	xds     xds.Server
	grpc    *grpc.Server
	log     *zap.Logger
	metrics *Metrics
	now     func() time.Time

	mu      sync.Mutex
	view    *View
	streams map[int64]*streamState
	nodes   map[string]*nodeState
	// snaps holds the snapshot of each Audience's current bundle: immutable, so every sidecar
	// of a namespace that may use the same brokered Credentials shares one (one encoding, one
	// copy of the policy text).
	snaps map[Audience]*cache.Snapshot
	// warned holds the namespaces whose left-out objects were logged for the current view.
	warned map[string]bool
}

type streamState struct {
	peer       string // the SPIFFE ID of the client certificate
	registered bool   // counted in nodes[peer] (after its first valid request)
	// sentNonce and sentVersion are those of the last response on the stream: a NACK answers
	// that nonce, and names only the version it kept, not the one it rejected.
	sentNonce, sentVersion string
}

type nodeState struct {
	streams int       // open streams of this node id (pods sharing a service account share it)
	version string    // the version set for it
	setAt   time.Time // when version was set
	acked   bool      // an ACK of version was seen (push latency observed)
}

// NewServer builds the server; Serve runs it.
func NewServer(o ServerOptions) (*Server, error) {
	if o.SVIDs == nil || o.Bundles == nil {
		return nil, errors.New("controller: the server needs an X509-SVID source and a bundle source")
	}
	td := o.TrustDomain
	if td.IsZero() {
		svid, err := o.SVIDs.GetX509SVID()
		if err != nil {
			return nil, fmt.Errorf("controller: own X509-SVID: %w", err)
		}
		td = svid.ID.TrustDomain()
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics(nil)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	s := &Server{log: o.Logger, metrics: o.Metrics, now: o.Now,
		streams: map[int64]*streamState{}, nodes: map[string]*nodeState{}}
	s.cache = cache.NewSnapshotCache(true, cache.IDHash{}, xdsLogger{o.Logger.Named("xds").Sugar()})
	s.xds = xds.NewServer(context.Background(), s.cache, xds.CallbackFuncs{
		StreamOpenFunc:     s.onStreamOpen,
		StreamClosedFunc:   s.onStreamClosed,
		StreamRequestFunc:  s.onStreamRequest,
		StreamResponseFunc: s.onStreamResponse,
		DeltaStreamOpenFunc: func(context.Context, int64, string) error {
			s.metrics.Refused.WithLabelValues("delta").Inc()
			return status.Error(codes.Unimplemented, "escrow serves state-of-the-world ADS only")
		},
	})
	tlsConf := tlsconfig.MTLSServerConfig(o.SVIDs, o.Bundles, tlsconfig.AuthorizeMemberOf(td))
	tlsConf.MinVersion = tls.VersionTLS13
	s.grpc = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsConf)),
		// Find dead sidecars (a node that vanished without closing its stream) within a minute.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 20 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	discovery.RegisterAggregatedDiscoveryServiceServer(s.grpc, s.xds)
	if o.Minter != nil {
		bs, err := broker.NewServer(broker.ServerOptions{Minter: o.Minter, Logger: o.Logger.Named("broker"),
			Observe: func(cred string, r broker.Result) { s.metrics.BrokerMints.WithLabelValues(cred, string(r)).Inc() }})
		if err != nil {
			return nil, err
		}
		bs.Register(s.grpc)
	}
	return s, nil
}

// Serve serves ADS on l until ctx ends, then stops gracefully (open streams are closed; their
// sidecars reconnect to another replica and keep their last good bundle meanwhile).
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			// ADS streams never end by themselves: GracefulStop would wait forever.
			s.grpc.Stop()
		case <-done:
		}
	}()
	if err := s.grpc.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("controller: ads: %w", err)
	}
	return nil
}

// Update makes v the state served: every connected sidecar whose bundle changed gets the new
// one (the same content has the same version, so nothing else is pushed).
func (s *Server) Update(v *View) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.view = v
	s.snaps = map[Audience]*cache.Snapshot{}
	s.warned = map[string]bool{}
	s.metrics.BundleVersion.Reset()
	for id, n := range s.nodes {
		s.set(id, n)
	}
}

// Ready reports whether a state has been set with Update.
func (s *Server) Ready() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.view != nil
}

// set puts the current bundle of node id (its Audience's) in the snapshot cache for it,
// unless it has it already (s.mu held, s.view set). The cache answers open watches whose
// version differs at once; its channels are buffered, so this does not block.
func (s *Server) set(id string, n *nodeState) {
	a := s.view.AudienceOf(id)
	snap, err := s.snapshot(a)
	if err != nil {
		s.log.Error("encoding a namespace's bundle", zap.String("namespace", a.Namespace), zap.Error(err))
		return
	}
	version := snap.GetVersion(resource.ExtensionConfigType)
	s.metrics.BundleVersion.WithLabelValues(a.Namespace, version).Set(1)
	if version == n.version {
		return
	}
	if err := s.cache.SetSnapshot(context.Background(), id, snap); err != nil {
		s.log.Error("setting a sidecar's bundle", zap.String("node", id), zap.Error(err))
		return
	}
	n.version, n.setAt, n.acked = version, s.now(), false
}

// snapshot returns the snapshot of a's bundle in the current view (s.mu held).
func (s *Server) snapshot(a Audience) (*cache.Snapshot, error) {
	if snap := s.snaps[a]; snap != nil {
		return snap, nil
	}
	b, dropped := s.view.AudienceBundle(a)
	if !s.warned[a.Namespace] {
		s.warned[a.Namespace] = true
		for _, why := range dropped {
			s.log.Warn("left out of a namespace's bundle: its sidecars would refuse it", zap.String("namespace", a.Namespace), zap.String("why", why))
		}
	}
	tec, err := bundle.Encode(b)
	if err != nil {
		return nil, err
	}
	snap, err := cache.NewSnapshot(b.Version, map[resource.Type][]cachetypes.Resource{resource.ExtensionConfigType: {tec}})
	if err != nil {
		return nil, err
	}
	s.snaps[a] = snap
	return snap, nil
}

func (s *Server) onStreamOpen(ctx context.Context, id int64, _ string) error {
	pid, err := peerID(ctx)
	if err != nil {
		s.metrics.Refused.WithLabelValues("no_svid").Inc()
		s.log.Warn("refused an ADS stream without an X509-SVID", zap.Int64("stream", id), zap.Error(err))
		return status.Error(codes.Unauthenticated, "an X509-SVID is required")
	}
	s.mu.Lock()
	s.streams[id] = &streamState{peer: pid.String()}
	s.mu.Unlock()
	return nil
}

func (s *Server) onStreamRequest(id int64, req *discovery.DiscoveryRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	if st == nil {
		return status.Error(codes.Internal, "unknown stream")
	}
	if got := req.GetNode().GetId(); got != st.peer {
		s.metrics.Refused.WithLabelValues("node_id_mismatch").Inc()
		s.log.Warn("refused an ADS stream whose node id is not its SVID's SPIFFE ID",
			zap.Int64("stream", id), zap.String("svid", st.peer), zap.String("node_id", got))
		return status.Errorf(codes.PermissionDenied, "node id %q is not the SPIFFE ID of the client certificate (%s)", got, st.peer)
	}
	if req.GetTypeUrl() != resource.ExtensionConfigType {
		s.metrics.Refused.WithLabelValues("type_url").Inc()
		return status.Errorf(codes.InvalidArgument, "escrow serves only %s", resource.ExtensionConfigType)
	}
	n := s.nodes[st.peer]
	if !st.registered {
		st.registered = true
		s.metrics.Connected.Inc()
		if n == nil {
			n = &nodeState{}
			s.nodes[st.peer] = n
			if s.view != nil {
				s.set(st.peer, n)
			}
		}
		n.streams++
		s.log.Debug("sidecar connected", zap.Int64("stream", id), zap.String("node", st.peer))
	}
	switch {
	case req.GetErrorDetail() != nil:
		// The snapshot cache answers a request whose version differs from the current one at
		// once, so the rejected version would go straight back, be rejected again, and so on,
		// hundreds of times a second. Recording the rejected version as the one the sidecar
		// has makes the cache hold the request until a new version is set (which it then
		// sends). The version the sidecar kept is what it serves meanwhile.
		kept, rejected := req.GetVersionInfo(), n.version
		if req.GetResponseNonce() != "" && req.GetResponseNonce() == st.sentNonce {
			rejected = st.sentVersion
			req.VersionInfo = rejected
		}
		msg := req.GetErrorDetail().GetMessage()
		s.metrics.NACKs.WithLabelValues(NACKClass(msg)).Inc()
		s.log.Warn("a sidecar rejected its bundle (NACK)", zap.String("node", st.peer),
			zap.String("kept_version", kept), zap.String("rejected_version", rejected),
			zap.String("reason_class", NACKClass(msg)), zap.String("message", truncate(msg, maxMessage)))
	case req.GetResponseNonce() != "" && req.GetVersionInfo() == n.version && !n.acked:
		n.acked = true
		s.metrics.PushLatency.Observe(s.now().Sub(n.setAt).Seconds())
	}
	return nil
}

func (s *Server) onStreamResponse(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
	s.metrics.Pushes.Inc()
	s.mu.Lock()
	if st := s.streams[id]; st != nil {
		st.sentNonce, st.sentVersion = resp.GetNonce(), resp.GetVersionInfo()
	}
	s.mu.Unlock()
}

func (s *Server) onStreamClosed(id int64, _ *core.Node) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	delete(s.streams, id)
	if st == nil || !st.registered {
		return
	}
	s.metrics.Connected.Dec()
	if n := s.nodes[st.peer]; n != nil {
		if n.streams--; n.streams <= 0 {
			delete(s.nodes, st.peer)
			s.cache.ClearSnapshot(st.peer)
		}
	}
}

// peerID is the SPIFFE ID of the client certificate of the stream's connection, which the
// TLS handshake verified against the trust bundle (the broker identifies its callers alike).
func peerID(ctx context.Context) (spiffeid.ID, error) { return broker.PeerID(ctx) }

// xdsLogger is go-control-plane's logger on zap; its chatter is debug level.
type xdsLogger struct{ s *zap.SugaredLogger }

func (l xdsLogger) Debugf(f string, a ...any) { l.s.Debugf(f, a...) }
func (l xdsLogger) Infof(f string, a ...any)  { l.s.Debugf(f, a...) }
func (l xdsLogger) Warnf(f string, a ...any)  { l.s.Warnf(f, a...) }
func (l xdsLogger) Errorf(f string, a ...any) { l.s.Errorf(f, a...) }
