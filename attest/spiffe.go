package attest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SPIFFEOptions configures NewSPIFFE.
type SPIFFEOptions struct {
	// Addr is the Workload API address, unix:///path/to/agent.sock or tcp://ip:port.
	// Empty means the environment variable SPIFFE_ENDPOINT_SOCKET.
	Addr string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger receives watch errors and SVID rotations (never key material or tokens);
	// nil means no logging.
	Logger *zap.Logger
	// OnUpdate, if set, is called with the leaf's NotAfter every time a new X509-SVID arrives
	// (e.g. to set an expiry gauge). It runs on the watch goroutine and must not block.
	OnUpdate func(expiresAt time.Time)
	// OnUpdateResult, if set, is called with the outcome of every message or failure of the
	// Workload API's X509-SVID stream (e.g. to count escrow_identity_updates_total{result}),
	// before OnUpdate for the same event. It runs on the watch goroutine and must not block.
	OnUpdateResult func(UpdateResult)
	// Reconnect bounds the waits between attempts to reach the Workload API again after it
	// went away (a SPIRE agent restart, a socket not there yet). Zero fields take the defaults
	// (DefaultReconnectInitial, DefaultReconnectMax).
	Reconnect ReconnectBackoff
}

// ReconnectBackoff is an exponential backoff with jitter for reaching the Workload API again:
// the first wait is about Initial, each further failure multiplies it by 1.6 up to Max, and
// every wait is spread by ±20% so that the sidecars of a node do not all reach a restarted
// agent in the same instant (gRPC's connection-backoff multiplier and jitter). It governs both
// layers that wait: the gRPC channel's reconnects to the socket and the watches' retries
// after a stream failed. A success starts over at Initial.
type ReconnectBackoff struct {
	// Initial is the wait after the first failure. Zero means DefaultReconnectInitial.
	Initial time.Duration
	// Max caps the wait (before jitter). Zero means DefaultReconnectMax.
	Max time.Duration
}

// Defaults for ReconnectBackoff. go-spiffe's own backoff grows by a second per failure up to
// 30 s and gRPC's connection backoff to 120 s, so after an agent restart a sidecar could go on
// denying requests (once its SVID expired) and stay not ready for tens of seconds after the
// agent was back. The agent is node-local: a failed attempt is a refused connect on a unix
// socket, microseconds of work on both sides, so retrying about once a second during an
// outage costs nothing measurable even for every pod on a node, while each second of wait
// after the agent is back can be a second of denied requests.
//
// The two layers add up: while the channel waits out its backoff, go-spiffe's retries fail
// without trying the socket, and once the channel is connected the watch still waits out its
// own. So a restarted agent is seen after one channel wait plus at most one watch wait: about
// 1 s typically, at most 2×1.2 s with the defaults. A 1 s cap per layer keeps that worst case
// within a couple of seconds.
const (
	DefaultReconnectInitial = 200 * time.Millisecond
	DefaultReconnectMax     = time.Second
)

const (
	reconnectMultiplier = 1.6
	reconnectJitter     = 0.2
	// reconnectConnectTimeout is how long one connection attempt may take (gRPC's
	// MinConnectTimeout; its documented default).
	reconnectConnectTimeout = 20 * time.Second
)

func (b ReconnectBackoff) withDefaults() (ReconnectBackoff, error) {
	if b.Initial < 0 || b.Max < 0 {
		return b, fmt.Errorf("attest: reconnect backoff: initial (%s) and max (%s) must not be negative", b.Initial, b.Max)
	}
	// A field left zero gives way to the one set: Max 100ms alone means Initial 100ms, and
	// Initial 5s alone means Max 5s.
	switch {
	case b.Initial == 0 && b.Max == 0:
		b.Initial, b.Max = DefaultReconnectInitial, DefaultReconnectMax
	case b.Initial == 0:
		b.Initial = min(DefaultReconnectInitial, b.Max)
	case b.Max == 0:
		b.Max = max(DefaultReconnectMax, b.Initial)
	}
	if b.Initial > b.Max {
		return b, fmt.Errorf("attest: reconnect backoff: initial (%s) is greater than max (%s)", b.Initial, b.Max)
	}
	return b, nil
}

// reconnectStrategy is a validated ReconnectBackoff as go-spiffe's workloadapi.BackoffStrategy
// (it asks for one backoff per watch).
type reconnectStrategy struct{ cfg ReconnectBackoff }

func (s reconnectStrategy) NewBackoff() workloadapi.Backoff { return &reconnectBackoff{cfg: s.cfg} }

// grpc is the same backoff for the gRPC channel's reconnects.
func (s reconnectStrategy) grpc() grpc.ConnectParams {
	b := s.cfg
	return grpc.ConnectParams{
		Backoff: backoff.Config{
			BaseDelay:  b.Initial,
			Multiplier: reconnectMultiplier,
			Jitter:     reconnectJitter,
			MaxDelay:   b.Max,
		},
		MinConnectTimeout: reconnectConnectTimeout,
	}
}

// reconnectBackoff is one sequence of waits. It implements workloadapi.Backoff; like
// go-spiffe's own, it is used by one goroutine at a time.
type reconnectBackoff struct {
	cfg  ReconnectBackoff
	next time.Duration // the next wait before jitter; 0 means Initial
}

func (b *reconnectBackoff) Next() time.Duration {
	d := b.next
	if d == 0 {
		d = b.cfg.Initial
	}
	b.next = min(time.Duration(float64(d)*reconnectMultiplier), b.cfg.Max)
	// ±jitter, uniformly.
	return time.Duration(float64(d) * (1 + reconnectJitter*(2*rand.Float64()-1)))
}

func (b *reconnectBackoff) Reset() { b.next = 0 }

// UpdateResult is the outcome of one event on the Workload API's X509-SVID stream. Its values
// are stable: they are metric label values.
type UpdateResult string

const (
	// UpdateOK: an X509-SVID arrived (the first, a rotation, or one after an outage).
	UpdateOK UpdateResult = "ok"
	// UpdateError: the stream failed (e.g. the agent is unreachable). The SVID held keeps
	// serving until its NotAfter while the watch reconnects.
	UpdateError UpdateResult = "error"
	// UpdateRevoked: the Workload API said the workload has no identity (no identity issued,
	// or an update without a usable SVID). The SVID held is dropped at once.
	UpdateRevoked UpdateResult = "revoked"
)

// SPIFFE is a Source that follows the SPIFFE Workload API. It holds the SPIFFE ID and expiry
// of the current default X509-SVID (never its private key) and replaces them on every update
// the Workload API streams, so rotation is followed. It also fetches JWT-SVIDs (JWTSVID).
//
// If the Workload API goes away, the last SVID keeps serving until its NotAfter and no longer;
// the watch keeps reconnecting in the meantime, with a short backoff (SPIFFEOptions.Reconnect).
type SPIFFE struct {
	now      func() time.Time
	log      *zap.Logger
	onUpdate func(time.Time)
	onResult func(UpdateResult)
	retry    reconnectStrategy

	client *workloadapi.Client
	ctx    context.Context // lives until Close (or the ctx given to NewSPIFFE ends)
	cancel context.CancelFunc
	done   chan struct{} // closed when the watch goroutine has returned

	cur       atomic.Pointer[svidState]
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error

	// Touched only by the X509-SVID watch goroutine (go-spiffe calls the watcher on it).
	x509Updates  uint64    // X509-SVID updates received, ever
	x509Failures int       // stream failures since the last update
	x509Since    time.Time // when the first of those failures happened

	jwtMu    sync.Mutex
	jwtCache map[string]jwtEntry // by audience
	jwtGroup singleflight.Group

	bundleMu   sync.Mutex
	bundleDone chan struct{} // nil until JWTBundles starts the bundle watch; closed when it ends
	bundles    atomic.Pointer[jwtbundle.Set]
	// Touched only by the bundle watch goroutine.
	bundleUpdates  uint64
	bundleFailures int
}

var _ Source = (*SPIFFE)(nil)

// svidState is what Identify needs from the current X509-SVID. It is immutable once stored.
type svidState struct {
	id       string
	td       string
	notAfter time.Time
	closed   bool
	// svid and bundles are the whole X509 context, for mTLS clients of escrow's own (the
	// control-plane connection): X509Source.
	svid    *x509svid.SVID
	bundles *x509bundle.Set
}

// closedState replaces the current SVID on Close: a closed source identifies nobody.
var closedState = &svidState{closed: true}

var (
	errNoSVID = fmt.Errorf("%w: no SVID yet", ErrUnavailable)
	errClosed = fmt.Errorf("%w: identity source closed", ErrUnavailable)
)

// NewSPIFFE connects to the Workload API and starts watching X509-SVIDs in the background. It
// does not wait for the first SVID: until it arrives Ready is false and Identify fails with
// ErrUnavailable. It fails only when the address is missing or malformed.
//
// The watch runs until Close is called or ctx is done, whichever comes first.
func NewSPIFFE(ctx context.Context, opts SPIFFEOptions) (*SPIFFE, error) {
	addr := opts.Addr
	if addr == "" {
		addr = os.Getenv(workloadapi.SocketEnv)
		if addr == "" {
			return nil, fmt.Errorf("attest: no SPIFFE Workload API address: set the socket address "+
				"in the config (e.g. unix:///run/spire/sockets/agent.sock) or the %s environment variable",
				workloadapi.SocketEnv)
		}
	}
	if err := workloadapi.ValidateAddress(addr); err != nil {
		return nil, fmt.Errorf("attest: SPIFFE Workload API address %q: %w", addr, err)
	}
	retry, err := opts.Reconnect.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &SPIFFE{
		now:      opts.Now,
		log:      opts.Logger,
		onUpdate: opts.OnUpdate,
		onResult: opts.OnUpdateResult,
		retry:    reconnectStrategy{retry},
		done:     make(chan struct{}),
		jwtCache: make(map[string]jwtEntry),
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	s.log = s.log.With(zap.String("workload_api", addr))

	s.ctx, s.cancel = context.WithCancel(ctx)
	// workloadapi.New does not block: gRPC connects lazily, and the watch below reconnects.
	// Both layers that wait for a lost agent use the same short backoff (see
	// ReconnectBackoff): go-spiffe's watch retries, and the gRPC channel's reconnects, during
	// whose backoff go-spiffe's retries fail at once without trying the socket.
	client, err := workloadapi.New(s.ctx,
		workloadapi.WithAddr(addr),
		workloadapi.WithLogger(spiffeLogger{s.log.Sugar()}),
		workloadapi.WithBackoffStrategy(s.retry),
		workloadapi.WithDialOptions(grpc.WithConnectParams(s.retry.grpc())))
	if err != nil {
		s.cancel()
		return nil, fmt.Errorf("attest: SPIFFE Workload API client: %w", err)
	}
	s.client = client
	go s.watch()
	return s, nil
}

func (s *SPIFFE) watch() {
	defer close(s.done)
	w := x509Watcher{s}
	retry := s.retry.NewBackoff()
	for {
		updates := s.x509Updates
		err := s.client.WatchX509Context(s.ctx, w)
		if s.ctx.Err() != nil {
			return
		}
		// go-spiffe stops watching for good on InvalidArgument; keep trying, since an
		// identity source that gave up would fail every request until a restart. With the
		// same backoff as every other retry: a fixed long wait here would be the slowest
		// path back after an agent restart.
		if s.x509Updates != updates {
			retry.Reset()
		}
		if !s.sleep(retry.Next(), "SPIFFE Workload API watch stopped; restarting", err) {
			return
		}
	}
}

// sleep logs why a watch restarts and waits d, or until the source closes (then false).
func (s *SPIFFE) sleep(d time.Duration, msg string, err error) bool {
	s.log.Error(msg, zap.Error(err), zap.Duration("retry_in", d))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

type x509Watcher struct{ s *SPIFFE }

func (w x509Watcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	s := w.s
	if len(c.SVIDs) == 0 || len(c.SVIDs[0].Certificates) == 0 {
		// go-spiffe does not deliver such updates; guard anyway.
		s.log.Warn("SPIFFE Workload API update without an X509-SVID; ignored")
		return
	}
	svid := c.DefaultSVID()
	st := &svidState{
		id:       svid.ID.String(),
		td:       svid.ID.TrustDomain().Name(),
		notAfter: svid.Certificates[0].NotAfter,
		svid:     svid,
		bundles:  c.Bundles,
	}
	if s.closed.Load() {
		return
	}
	prev := s.cur.Swap(st)
	fields := []zap.Field{zap.String("spiffe_id", st.id), zap.Time("expires_at", st.notAfter)}
	s.x509Updates++
	if s.x509Failures > 0 {
		s.log.Info("SPIFFE Workload API watch recovered", zap.Int("failed_attempts", s.x509Failures),
			zap.Duration("outage", s.now().Sub(s.x509Since)))
		s.x509Failures = 0
	}
	switch {
	case !s.now().Before(st.notAfter):
		s.log.Warn("received an X509-SVID that has already expired", fields...)
	case prev == nil || prev.id != st.id:
		s.log.Info("X509-SVID received", fields...)
	default:
		s.log.Debug("X509-SVID rotated", fields...)
	}
	// The result is reported before OnUpdate so that whoever waits on OnUpdate (a readiness
	// gate, a test) already sees it counted.
	s.result(UpdateOK)
	if s.onUpdate != nil {
		s.onUpdate(st.notAfter)
	}
}

func (s *SPIFFE) result(r UpdateResult) {
	if s.onResult != nil {
		s.onResult(r)
	}
}

func (w x509Watcher) OnX509ContextWatchError(err error) {
	s := w.s
	if s.ctx.Err() != nil || status.Code(err) == codes.Canceled {
		return // closing
	}
	fields := []zap.Field{zap.Error(err)}
	st := s.cur.Load()
	if st != nil && !st.closed {
		fields = append(fields, zap.String("spiffe_id", st.id), zap.Time("svid_expires_at", st.notAfter))
	}
	// Two answers from the Workload API withdraw the identity, and then the SVID held is not
	// served until it expires but dropped now:
	//   - PermissionDenied ("no identity issued"): SPIRE ends the stream this way when the
	//     workload's registration entries were removed;
	//   - a response go-spiffe could not use (not a gRPC status, e.g. "no SVIDs in response"):
	//     the agent is there and answering, and its answer lists no valid SVID for us.
	// An unreachable agent (Unavailable and other transport failures) is not a revocation: the
	// SVID serves until its NotAfter while the watch reconnects.
	_, isStatus := status.FromError(err)
	if status.Code(err) == codes.PermissionDenied || !isStatus {
		s.result(UpdateRevoked)
		if st != nil && !st.closed && s.cur.CompareAndSwap(st, nil) {
			s.log.Warn("SPIFFE Workload API issued no identity: SVID dropped, requests are denied until a new one arrives", fields...)
			if s.onUpdate != nil {
				s.onUpdate(time.Time{})
			}
			return
		}
		s.log.Warn("SPIFFE Workload API issued no identity", fields...)
		return
	}
	s.result(UpdateError)
	// Retries come every few seconds while the agent is away: the first failure of an outage
	// is a warning, the rest are debug lines, and the recovery is logged with their count.
	s.x509Failures++
	if s.x509Failures == 1 {
		s.x509Since = s.now()
		s.log.Warn("SPIFFE Workload API watch failed; retrying", fields...)
		return
	}
	s.log.Debug("SPIFFE Workload API watch failed; retrying",
		append(fields, zap.Int("failed_attempts", s.x509Failures))...)
}

// Identify returns the identity of the current X509-SVID. It fails with an error wrapping
// ErrUnavailable if no SVID has arrived yet, the SVID has expired (Now() >= NotAfter), or the
// source is closed. ctx and peer are not used. It is a single atomic load and does not allocate.
func (s *SPIFFE) Identify(_ context.Context, _ Peer) (Identity, error) {
	st := s.cur.Load()
	switch {
	case st == nil:
		return Identity{}, errNoSVID
	case st.closed:
		return Identity{}, errClosed
	case !s.now().Before(st.notAfter):
		return Identity{}, fmt.Errorf("%w: SVID expired at %s", ErrUnavailable,
			st.notAfter.UTC().Format(time.RFC3339))
	}
	return Identity{
		SPIFFEID:    st.id,
		TrustDomain: st.td,
		Attested:    true,
		Source:      SourceSPIFFE,
		ExpiresAt:   st.notAfter,
	}, nil
}

// Ready reports whether an unexpired X509-SVID is held.
func (s *SPIFFE) Ready() bool {
	st := s.cur.Load()
	return st != nil && !st.closed && s.now().Before(st.notAfter)
}

// ExpiresAt returns the NotAfter of the current X509-SVID's leaf (which may be in the past),
// or the zero time if none has arrived or the source is closed.
func (s *SPIFFE) ExpiresAt() time.Time {
	st := s.cur.Load()
	if st == nil || st.closed {
		return time.Time{}
	}
	return st.notAfter
}

// Close stops the watch, waits for it to end and closes the Workload API client. After Close,
// Identify and JWTSVID fail with ErrUnavailable. It is safe to call more than once.
func (s *SPIFFE) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		s.cancel()
		<-s.done
		s.bundleMu.Lock()
		bundleDone := s.bundleDone
		s.bundleMu.Unlock()
		if bundleDone != nil {
			<-bundleDone
		}
		s.cur.Store(closedState)
		s.jwtMu.Lock()
		clear(s.jwtCache)
		s.jwtMu.Unlock()
		if err := s.client.Close(); err != nil {
			s.closeErr = fmt.Errorf("attest: close SPIFFE Workload API client: %w", err)
		}
	})
	return s.closeErr
}

// JWTBundles returns the JWT bundles the Workload API streams (the trust domain's JWT signing
// keys and those of federated trust domains), for verifying other workloads' JWT-SVIDs (a
// delegation verifier's spiffe issuer). The first call starts watching them; until the first
// bundles arrive, and after Close, lookups fail with ErrUnavailable. The bundles are replaced
// on every update, so key rotation is followed.
func (s *SPIFFE) JWTBundles() jwtbundle.Source {
	s.bundleMu.Lock()
	defer s.bundleMu.Unlock()
	if s.bundleDone == nil && s.ctx.Err() == nil {
		s.bundleDone = make(chan struct{})
		go s.watchBundles()
	}
	return spiffeJWTBundles{s}
}

func (s *SPIFFE) watchBundles() {
	defer close(s.bundleDone)
	retry := s.retry.NewBackoff()
	for {
		updates := s.bundleUpdates
		err := s.client.WatchJWTBundles(s.ctx, jwtBundleWatcher{s})
		if s.ctx.Err() != nil {
			return
		}
		if s.bundleUpdates != updates {
			retry.Reset()
		}
		if !s.sleep(retry.Next(), "SPIFFE Workload API JWT bundle watch stopped; restarting", err) {
			return
		}
	}
}

type jwtBundleWatcher struct{ s *SPIFFE }

func (w jwtBundleWatcher) OnJWTBundlesUpdate(set *jwtbundle.Set) {
	if w.s.closed.Load() {
		return
	}
	w.s.bundles.Store(set)
	w.s.bundleUpdates++
	w.s.bundleFailures = 0
	w.s.log.Debug("JWT bundles received", zap.Int("trust_domains", set.Len()))
}

func (w jwtBundleWatcher) OnJWTBundlesWatchError(err error) {
	if w.s.ctx.Err() != nil || status.Code(err) == codes.Canceled {
		return
	}
	// The bundles held stay in use: keys are public and rotate slowly, and the JWT-SVIDs they
	// verify carry their own expiry. One warning per outage, as for the X509-SVID watch.
	w.s.bundleFailures++
	if w.s.bundleFailures == 1 {
		w.s.log.Warn("SPIFFE Workload API JWT bundle watch failed; retrying", zap.Error(err))
		return
	}
	w.s.log.Debug("SPIFFE Workload API JWT bundle watch failed; retrying", zap.Error(err),
		zap.Int("failed_attempts", w.s.bundleFailures))
}

// X509Source is the X509-SVID and the X.509 bundles the source holds, for escrow's own mTLS
// connections (to the control plane): go-spiffe's tlsconfig takes it as both sources. It
// always answers from the latest update; no SVID yet, an expired one, or a closed source is an
// error wrapping ErrUnavailable, so a handshake then fails closed.
func (s *SPIFFE) X509Source() interface {
	x509svid.Source
	x509bundle.Source
} {
	return spiffeX509{s}
}

type spiffeX509 struct{ s *SPIFFE }

func (x spiffeX509) current() (*svidState, error) {
	st := x.s.cur.Load()
	switch {
	case st == nil || st.svid == nil:
		return nil, errNoSVID
	case st.closed:
		return nil, errClosed
	case !x.s.now().Before(st.notAfter):
		return nil, fmt.Errorf("%w: SVID expired at %s", ErrUnavailable, st.notAfter.UTC().Format(time.RFC3339))
	}
	return st, nil
}

// GetX509SVID implements x509svid.Source.
func (x spiffeX509) GetX509SVID() (*x509svid.SVID, error) {
	st, err := x.current()
	if err != nil {
		return nil, err
	}
	return st.svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (x spiffeX509) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	st, err := x.current()
	if err != nil {
		return nil, err
	}
	if st.bundles == nil {
		return nil, fmt.Errorf("attest: no X.509 bundle for trust domain %q", td)
	}
	b, err := st.bundles.GetX509BundleForTrustDomain(td)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	return b, nil
}

type spiffeJWTBundles struct{ s *SPIFFE }

// held reports whether the Workload API has sent JWT bundles (DelegationVerifier.Ready).
func (b spiffeJWTBundles) held() bool { return !b.s.closed.Load() && b.s.bundles.Load() != nil }

// GetJWTBundleForTrustDomain implements jwtbundle.Source.
func (b spiffeJWTBundles) GetJWTBundleForTrustDomain(td spiffeid.TrustDomain) (*jwtbundle.Bundle, error) {
	if b.s.closed.Load() {
		return nil, errClosed
	}
	set := b.s.bundles.Load()
	if set == nil {
		return nil, fmt.Errorf("%w: no JWT bundles from the Workload API yet", ErrUnavailable)
	}
	bundle, err := set.GetJWTBundleForTrustDomain(td)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	return bundle, nil
}

// spiffeLogger routes go-spiffe's own log lines to zap at debug level: every error it logs is
// also handed to the watcher, which logs it once at the right level.
type spiffeLogger struct{ l *zap.SugaredLogger }

func (l spiffeLogger) Debugf(format string, args ...any) { l.l.Debugf(format, args...) }
func (l spiffeLogger) Infof(format string, args ...any)  { l.l.Debugf(format, args...) }
func (l spiffeLogger) Warnf(format string, args ...any)  { l.l.Debugf(format, args...) }
func (l spiffeLogger) Errorf(format string, args ...any) { l.l.Debugf(format, args...) }
