package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"reflect"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/proxy/ca"
	"github.com/escrowproxy/escrow/proxy/egress"
	"github.com/escrowproxy/escrow/telemetry"
)

// IdentitySource is what the sidecar needs of an identity source: attest.Static and attest.SPIFFE
// are two.
type IdentitySource interface {
	Identifier
	Ready() bool
	Close() error
}

// Deps are optional overrides of what Build makes from the config. The zero value is production:
// the binary passes only Logger, Stdout and Version; tests and the demo override more.
type Deps struct {
	// Identity replaces the source the config names (identity.static or identity.spiffe).
	Identity IdentitySource
	// Providers replace the providers of the named credentials (other names come from config).
	Providers map[string]credential.Provider
	// CredentialOptions tune the credential cache (Now and Logger are filled in when zero).
	CredentialOptions credential.Options
	// Policies, when set, is the initial policy set instead of reading policy.dir, which is then
	// not watched (the control plane and tests hand policies over as bytes).
	Policies *policy.Source
	// Resolver and Dial are the egress dialer's (nil: the system resolver and net.Dialer).
	Resolver egress.Resolver
	Dial     func(ctx context.Context, network, addr string) (net.Conn, error)
	// Now is the clock of the proxy, the policy engine, the credential cache and the CA.
	Now func() time.Time
	// Audit receives the records. Default: JSON lines on Stdout, batched per audit.flush_interval
	// and flushed when the sidecar stops.
	Audit audit.Sink
	// Stdout is where the default audit sink writes (default os.Stdout).
	Stdout io.Writer
	// Logger receives operational logs (default: none).
	Logger *zap.Logger
	// Listener and AdminListener replace listening on config listen and admin.
	Listener, AdminListener net.Listener
	// Version is reported in escrow_build_info.
	Version string
	// DrainTimeout bounds the graceful stop (default 15s).
	DrainTimeout time.Duration
	// Inspectors returns the request inspector of an upstream entry, or nil (the default).
	Inspectors func(config.Upstream) Inspector
	// WrapLeaves wraps the pod CA as the proxy sees it (tests count or fail leaf minting).
	WrapLeaves func(LeafSource) LeafSource
	// SystemRoots is the PEM put before the pod CA in the trust bundle (default: the system's).
	SystemRoots func() ([]byte, error)
	// AuditStallAfter is how long one write of the default audit sink may block before requests
	// are refused with audit_unavailable (default 2s).
	AuditStallAfter time.Duration
	// Broker mints the tokens of brokered credentials (broker: {}): the control-plane
	// connection's client. Nil: a config with one fails to build.
	Broker credential.Broker
	// ReadyChecks are more /readyz checks by name (the control-plane subscriber's "xds": not
	// ready until the first config was applied). They cannot replace the built-in ones.
	ReadyChecks map[string]ReadyCheck
}

// auditStopTimeout bounds how long a stop waits for queued audit records to be written.
const auditStopTimeout = 10 * time.Second

// Sidecar is escrow's whole per-pod proxy built from one config: identity, policy engine,
// credential cache, pod CA, metrics, audit sink, listeners and the proxy itself. Build makes it,
// Serve runs it until its context ends, Update changes what can change while it runs.
type Sidecar struct {
	// ProxyAddr and AdminAddr are where the listeners are bound (useful with port 0).
	ProxyAddr, AdminAddr netip.AddrPort
	// unixLn is the proxy listener on listen_unix; nil without it.
	unixLn net.Listener
	// CAPEM is the pod CA certificate the agent must trust.
	CAPEM []byte
	// Metrics are the sidecar's collectors (its /metrics).
	Metrics *telemetry.Metrics

	proxy   *Proxy
	engine  *policy.Engine
	creds   *credential.Manager
	ident   IdentitySource
	admin   http.Handler
	ln      net.Listener
	adminLn net.Listener
	log     *zap.Logger
	drain   time.Duration
	credDep credential.Deps
	watch   bool // policies come from policy.dir: Serve watches it (neither can change)
	polDir  string
	polPoll time.Duration

	mu        sync.Mutex // serialises updates
	cfg       *config.Config
	providers map[string]credential.Provider // by name, with the config each was made from
	provCfg   map[string]config.Credential
	override  map[string]credential.Provider
	revoked   *revocations // the revocations in force, as in the proxy's state

	closers   []func() error // run in reverse order by Serve (or Close), once
	closeOnce sync.Once
	closeErr  error
}

// Build makes a Sidecar from a validated config. It opens the listeners (so a port conflict is
// an error here, not later), loads the policy set, starts the identity source, makes the pod CA,
// fetches every credential once (a failure is logged, not fatal: requests needing it are denied
// until it works and /readyz says so), and only then, when nothing else can fail, writes the CA
// files (ca_key_dir, and the trust bundle in ca_dir): a start that fails changes no file. It
// serves nothing until Serve. On error everything it opened is closed again.
func Build(ctx context.Context, cfg *config.Config, d Deps) (_ *Sidecar, err error) {
	if !cfg.Validated() {
		return nil, errors.New("proxy: the config was not validated (use config.Parse or config.Load)")
	}
	log := d.Logger
	if log == nil {
		log = zap.NewNop()
	}
	now := d.Now
	if now == nil {
		now = time.Now
	}
	s := &Sidecar{log: log, drain: d.DrainTimeout, cfg: cfg, override: d.Providers,
		polDir: cfg.Policy.Dir, polPoll: cfg.Policy.ReloadInterval.D()}
	defer func() {
		if err != nil {
			_ = s.Close()
		}
	}()

	// attest: who this workload is. The metrics exist first: the Workload API's first update can
	// arrive while the source is being built. The SVID expiry gauge exists only for identities
	// that expire (SPIFFE); it reads the source once it is there.
	var expiring interface{ ExpiresAt() time.Time }
	var svidExpiry func() time.Time
	if _, ok := d.Identity.(interface{ ExpiresAt() time.Time }); ok || d.Identity == nil && cfg.Identity.SPIFFE != nil {
		svidExpiry = func() time.Time {
			if expiring == nil {
				return time.Time{}
			}
			return expiring.ExpiresAt()
		}
	}
	s.Metrics = telemetry.New(telemetry.Options{SVIDExpiry: svidExpiry, Version: d.Version})
	id := d.Identity
	if id == nil {
		switch {
		case cfg.Identity.Static != "":
			st, err := attest.NewStatic(cfg.Identity.Static)
			if err != nil {
				return nil, err
			}
			id = st
			log.Warn("using a static identity: requests are recorded as attested=false", zap.String("spiffe_id", cfg.Identity.Static))
		default:
			updates := s.Metrics.IdentityUpdates
			sp, err := attest.NewSPIFFE(ctx, attest.SPIFFEOptions{
				Addr: cfg.Identity.SPIFFE.Socket, Logger: log.Named("attest"),
				OnUpdateResult: func(r attest.UpdateResult) { updates.WithLabelValues(string(r)).Inc() },
			})
			if err != nil {
				return nil, err
			}
			id = sp
		}
	}
	s.ident = id
	s.closers = append(s.closers, id.Close)
	expiring, _ = id.(interface{ ExpiresAt() time.Time })

	// policy: the set in force, reloads counted.
	s.engine = policy.NewEngine(policy.Options{
		Logger: log.Named("policy"), Now: now,
		OnReload: func(result string, _ error) { s.Metrics.PolicyReloads.WithLabelValues(result).Inc() },
	})
	switch {
	case d.Policies != nil:
		err = s.engine.Load(*d.Policies)
	case cfg.XDS != nil:
		// The control plane sends the policy set (policy.dir, if any, is its base, read by the
		// subscriber): until the first update arrives there is none, so every request is denied
		// (policy_unavailable) and /readyz says not ready.
	default:
		err, s.watch = s.engine.LoadDir(cfg.Policy.Dir), true
	}
	if err != nil {
		return nil, err
	}

	// The listeners before the proxy, so the egress rules know escrow's own addresses.
	if s.ln = d.Listener; s.ln == nil {
		if s.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
			return nil, fmt.Errorf("proxy: listen: %w", err)
		}
	}
	s.closers = append(s.closers, ignoreClosed(s.ln.Close))
	if s.adminLn = d.AdminListener; s.adminLn == nil {
		if s.adminLn, err = net.Listen("tcp", cfg.Admin); err != nil {
			return nil, fmt.Errorf("proxy: admin: %w", err)
		}
	}
	s.closers = append(s.closers, ignoreClosed(s.adminLn.Close))
	if cfg.ListenUnix != "" {
		if s.unixLn, err = listenUnix(cfg.ListenUnix); err != nil {
			return nil, err
		}
		s.closers = append(s.closers, ignoreClosed(s.unixLn.Close))
	}
	s.ProxyAddr = s.ln.Addr().(*net.TCPAddr).AddrPort()
	s.AdminAddr = s.adminLn.Addr().(*net.TCPAddr).AddrPort()
	// The config checked the addresses as written; this checks what was bound (a name such as
	// localhost can resolve to anything).
	if err := boundLoopback("listen", s.ProxyAddr, cfg.UnsafeAllowNonLoopbackListen, "unsafe_allow_non_loopback_listen"); err != nil {
		return nil, err
	}
	if err := boundLoopback("admin", s.AdminAddr, cfg.UnsafeAllowNonLoopbackAdmin, "unsafe_allow_non_loopback_admin"); err != nil {
		return nil, err
	}

	// The pod CA (reused from ca_key_dir when it holds a valid one). Its files (ca_key_dir, and
	// the trust bundle in ca_dir) are written at the very end, once nothing can fail: a start
	// that fails must not replace the CA of an escrow still running with the same directories.
	podCA, reused, saveCA, err := ca.Prepare(ca.Options{LeafTTL: cfg.LeafTTL.D(), Name: "escrow pod CA " + hostname(), Now: d.Now}, cfg.CAKeyDir)
	if err != nil {
		return nil, err
	}
	systemRoots := d.SystemRoots
	if systemRoots == nil {
		systemRoots = ca.SystemRootsPEM
	}
	roots, err := systemRoots()
	if err != nil {
		log.Warn("system roots not found; the trust bundle holds only the pod CA", zap.Error(err))
	}
	s.CAPEM = podCA.CertPEM()
	var leaves LeafSource = podCA
	if d.WrapLeaves != nil {
		leaves = d.WrapLeaves(podCA)
	}

	// credential: one provider per configured name, through the one switch in credential.
	var px *Proxy // the providers' HTTP client dials through the proxy's egress rules
	providerTransport := &http.Transport{
		Proxy: nil, // never the environment's HTTP(S)_PROXY
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return px.Dial()(ctx, network, addr)
		},
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     90 * time.Second,
	}
	s.closers = append(s.closers, func() error { providerTransport.CloseIdleConnections(); return nil })
	s.credDep = credential.Deps{
		HTTPClient: &http.Client{Transport: providerTransport, Timeout: 30 * time.Second},
		LookupEnv:  os.LookupEnv, Now: now, Logger: log.Named("credential"), Broker: d.Broker,
	}
	if j, ok := id.(credential.JWTSource); ok {
		s.credDep.JWT = j
	}
	providers, provCfg, err := s.buildProviders(cfg, nil, nil)
	if err != nil {
		return nil, err
	}
	s.providers, s.provCfg = providers, provCfg
	co := d.CredentialOptions
	if co.Now == nil {
		co.Now = now
	}
	if co.Logger == nil {
		co.Logger = log.Named("credential")
	}
	if co.Observer == nil {
		co.Observer = telemetry.CredentialObserver{M: s.Metrics}
	}
	s.creds = credential.NewManager(providers, co)
	s.Metrics.RegisterCredentialCache(s.creds.Len)
	// On stop, tokens that can be revoked at their issuer (GitHub installation tokens, Vault
	// leases) are; this closer runs before the providers' transport is closed.
	s.closers = append(s.closers, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return s.creds.Close(ctx)
	})

	// The audit sink, stopped (flushed) after the drain so no record is lost. Records go through
	// a bounded queue: a stalled output makes requests fail closed (audit_unavailable) and
	// /readyz false, instead of freezing every request.
	sink := d.Audit
	var auditQ *audit.Queue
	if sink == nil {
		out := d.Stdout
		if out == nil {
			out = os.Stdout
		}
		bs := audit.NewBufferedZapSink(out, cfg.Audit.FlushEvery(), nil)
		auditQ = audit.NewQueue(bs, audit.QueueOptions{StallAfter: d.AuditStallAfter})
		sink = auditQ
		s.Metrics.RegisterAuditQueue(auditQ)
		s.closers = append(s.closers, func() error {
			// The records of the drained requests are queued: write them, for a bounded time
			// (the output may be the stalled one), then flush.
			ctx, cancel := context.WithTimeout(context.Background(), auditStopTimeout)
			defer cancel()
			if err := auditQ.Close(ctx); err != nil {
				log.Error("audit records could not be written", zap.Error(err))
				return nil
			}
			// A failed write is logged, not fatal: it is too late to do anything else about it.
			if err := bs.Stop(); err != nil {
				log.Error("writing audit records failed", zap.Error(err))
			}
			return nil
		})
	}

	// delegation: whom the caller acts for, from the token it presents (config delegation).
	var (
		deleg      DelegationVerifier
		delegReady func() error
	)
	if cfg.Delegation != nil {
		do := attest.DelegationOptions{HTTPClient: s.credDep.HTTPClient, Now: now}
		if sp, ok := id.(*attest.SPIFFE); ok {
			do.JWTBundles = sp.JWTBundles()
		}
		v, err := attest.NewDelegationVerifier(*cfg.Delegation, do)
		if err != nil {
			return nil, err
		}
		deleg, delegReady = v, v.Ready
	}

	// attest: the calling process of each connection, from the kernel (identity.process).
	var callers CallerFinder
	if cfg.Identity.Process {
		callers = attest.NewProcessFinder(attest.ProcessFinderOptions{})
	}

	// proxy: the pipeline itself.
	px, err = New(Options{
		Delegation: deleg, Callers: callers,
		Config: cfg, Identity: id, Policy: s.engine, Credentials: s.creds, CA: leaves,
		Audit: sink, Metrics: s.Metrics, Logger: log.Named("proxy"),
		Resolver: d.Resolver, Dial: d.Dial, Self: []netip.AddrPort{s.ProxyAddr, s.AdminAddr},
		Now: now, Inspectors: d.Inspectors,
	})
	if err != nil {
		return nil, err
	}
	s.proxy = px
	// Warm what the first requests will reuse: the shared credentials, and the per-caller ones
	// for this workload's identity, which every request is made as (if it is known already;
	// otherwise the first request fetches them).
	var warm credential.WarmOptions
	if who, err := id.Identify(ctx, attest.Peer{}); err == nil {
		warm.Subject = who.SPIFFEID
	}
	if err := s.creds.Warm(ctx, warm); err != nil {
		log.Warn("some credentials are not available yet", zap.Error(err))
	}
	checks := map[string]ReadyCheck{
		"identity": func() error {
			if !id.Ready() {
				return errors.New("no valid SVID yet")
			}
			return nil
		},
		"policy": func() error {
			if !s.engine.Ready() {
				return errors.New("no policy set loaded")
			}
			return nil
		},
		"ca": func() error { return nil }, // the CA exists before the listeners serve
	}
	if auditQ != nil {
		checks["audit"] = auditQ.Healthy
	}
	checks["credentials"] = s.credentialsReady
	if delegReady != nil {
		// Until the keys that check delegation tokens are held, a presented token gets 503.
		checks["delegation"] = delegReady
	}
	for name, c := range d.ReadyChecks {
		if _, builtin := checks[name]; builtin {
			return nil, fmt.Errorf("proxy: ready check %q is built in", name)
		}
		checks[name] = c
	}
	s.admin = AdminHandler(s.Metrics.Handler(), checks)

	// Last, the trust files: everything that can fail has succeeded.
	if err := saveCA(); err != nil {
		return nil, err
	}
	if reused {
		log.Info("reusing the pod CA kept in ca_key_dir", zap.String("ca_key_dir", cfg.CAKeyDir))
	}
	if err := ca.WriteFiles(cfg.CADir, podCA.CertPEM(), roots); err != nil {
		return nil, err
	}
	return s, nil
}

// credentialsReady reports the shared credentials (static secrets: one value for every caller)
// that cannot be fetched, by name, with the credential package's error (which never carries a
// secret). The cache answers at once for a working one; a failing one is retried no more often
// than the cache's failure backoff allows. Per-caller credentials are minted for a caller's
// identity and are not checked here: their failures show as credential_unavailable denials.
func (s *Sidecar) credentialsReady() error {
	s.mu.Lock()
	var names []string
	for n, p := range s.providers {
		if _, revoked := s.revoked.credential(n); revoked {
			continue // not served while revoked: nothing to check (and a Get must not mint it)
		}
		if sh, ok := p.(credential.Shared); ok && sh.Shared() {
			names = append(names, n)
		}
	}
	s.mu.Unlock()
	sort.Strings(names)
	var errs []error
	for _, n := range names {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := s.creds.Get(ctx, credential.Request{Name: n})
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: not available: %w", n, err))
		}
	}
	return errors.Join(errs...)
}

// buildProviders makes the provider of every configured credential, reusing prev's for a name
// whose config did not change (so its cached tokens survive an update). Overrides win.
func (s *Sidecar) buildProviders(cfg *config.Config, prev map[string]credential.Provider, prevCfg map[string]config.Credential) (map[string]credential.Provider, map[string]config.Credential, error) {
	out := make(map[string]credential.Provider, len(cfg.Credentials))
	cfgs := make(map[string]config.Credential, len(cfg.Credentials))
	var errs []error
	for name, c := range cfg.Credentials {
		cfgs[name] = c
		if p, ok := s.override[name]; ok {
			out[name] = p
			continue
		}
		if old, ok := prevCfg[name]; ok && reflect.DeepEqual(old, c) && prev[name] != nil {
			out[name] = prev[name]
			continue
		}
		p, err := credential.NewProvider(name, c, s.credDep)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out[name] = p
	}
	if err := errors.Join(errs...); err != nil {
		return nil, nil, err
	}
	return out, cfgs, nil
}

// Proxy returns the request pipeline (for tests that drive it directly).
func (s *Sidecar) Proxy() *Proxy { return s.proxy }

// Identity is the identity source the sidecar runs on (the control-plane client takes its
// X509-SVID from it).
func (s *Sidecar) Identity() IdentitySource { return s.ident }

// Admin returns the /healthz, /readyz and /metrics handler.
func (s *Sidecar) Admin() http.Handler { return s.admin }

// Serve runs the sidecar until ctx ends (SIGTERM in the binary), then drains in-flight requests
// and tunnels for up to DrainTimeout, flushes the audit records and closes everything Build
// opened. It returns the listeners' error, if any.
func (s *Sidecar) Serve(ctx context.Context) error {
	if s.watch {
		wctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { s.engine.Watch(wctx, s.polDir, s.polPoll) })
		defer func() { cancel(); wg.Wait() }()
	}
	err := s.proxy.Serve(ctx, ServeOptions{Listener: s.ln, UnixListener: s.unixLn, AdminListener: s.adminLn, AdminHandler: s.admin,
		DrainTimeout: s.drain, Logger: s.log})
	return errors.Join(err, s.Close())
}

// Close releases what Build opened (listeners, identity source, audit sink), in reverse order,
// once. Serve calls it; call it only for a Sidecar that is not served.
func (s *Sidecar) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		for i := len(s.closers) - 1; i >= 0; i-- {
			errs = append(errs, s.closers[i]())
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// Update is a complete new value of what may change while the sidecar runs.
type Update struct {
	// Config, when set, replaces upstreams, credentials, egress rules and the policy mode. It
	// must be validated. Every other key must equal the running config's: those need a restart.
	Config *config.Config
	// Policies, when set, replaces the policy set.
	Policies *policy.Source
	// PolicySet, when set, replaces the policy set with one already compiled (the control-plane
	// subscriber compiles a set to validate it before it acknowledges it). At most one of
	// Policies and PolicySet.
	PolicySet *policy.Set
	// Revocations, when set, replaces the revocations in force (an empty list lifts them all).
	// From then on the identities they cover are denied (403 revoked) and the credentials they
	// name are neither served nor minted; the tokens cached for either are dropped at once and
	// revoked at their issuer where the provider can.
	Revocations *[]Revocation
}

// Update is the one path by which a running sidecar changes: file reloads and the control
// plane both use it. Everything is built and checked first; only when all of it is good are
// the credentials, the routes, the revocations and the policy set swapped in (each
// atomically), so a request never sees half of an update and a bad update changes nothing.
func (s *Sidecar) Update(ctx context.Context, u Update) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var (
		set       = u.PolicySet
		st        *state
		providers = s.providers
		provCfg   = s.provCfg
		revoked   = s.revoked
		err       error
	)
	if u.Policies != nil && u.PolicySet != nil {
		return errors.New("proxy: update: set at most one of Policies and PolicySet")
	}
	if u.Policies != nil {
		if set, err = policy.Compile(*u.Policies); err != nil {
			return err
		}
	}
	if u.Revocations != nil {
		if revoked, err = compileRevocations(*u.Revocations); err != nil {
			return err
		}
	}
	if u.Config != nil {
		if !u.Config.Validated() {
			return errors.New("proxy: update: the config was not validated")
		}
		if err := restartOnly(s.cfg, u.Config); err != nil {
			return err
		}
		providers, provCfg, err = s.buildProviders(u.Config, s.providers, s.provCfg)
		if err != nil {
			return err
		}
	}
	if u.Config != nil || u.Revocations != nil {
		s.proxy.updateMu.Lock()
		defer s.proxy.updateMu.Unlock()
		prev := s.proxy.state.Load()
		if u.Config != nil {
			if st, err = s.proxy.buildState(u.Config, prev); err != nil {
				return err
			}
		} else {
			next := *prev
			st = &next
		}
		st.revoked = revoked
	}
	// Everything is built: swap. Credentials first, so a new route never looks up a name the
	// manager does not know yet. A revoked credential is left out of the manager: its cached
	// tokens are dropped (and revoked upstream) and nothing can mint it until the revocation
	// is lifted, when it starts again empty.
	if st != nil {
		s.creds.Update(withoutRevoked(providers, revoked))
		prev := s.proxy.state.Swap(st)
		prev.routes.closeIdle(st.routes)
		s.cfg, s.providers, s.provCfg, s.revoked = cfgOr(u.Config, s.cfg), providers, provCfg, revoked
		// Tokens minted for a revoked identity, of every credential, are dropped now. The state
		// is swapped first: a request that fetches after this sees the revocation and drops
		// what it fetched (Proxy.revokedSince).
		for _, id := range s.proxy.subjects.covered(revoked) {
			if n := s.creds.ForgetSubject(id); n > 0 {
				s.log.Info("dropped the cached credentials of a revoked identity", zap.String("spiffe_id", id), zap.Int("tokens", n))
			}
		}
		// Tunnels and WebSockets already open for a revoked identity are closed: a
		// revocation does not wait for the agent to hang up.
		if revoked != nil {
			if n := s.proxy.conns.closeWhere(func(id string) bool { _, ok := revoked.identity(id); return ok }); n > 0 {
				s.log.Info("closed the open connections of revoked identities", zap.Int("connections", n))
			}
		}
	}
	if set != nil {
		s.engine.Install(set)
	}
	return nil
}

func cfgOr(c, def *config.Config) *config.Config {
	if c != nil {
		return c
	}
	return def
}

// withoutRevoked is providers without the credentials r revokes.
func withoutRevoked(providers map[string]credential.Provider, r *revocations) map[string]credential.Provider {
	if r == nil || len(r.creds) == 0 {
		return providers
	}
	out := make(map[string]credential.Provider, len(providers))
	for n, p := range providers {
		if _, revoked := r.creds[n]; !revoked {
			out[n] = p
		}
	}
	return out
}

// restartOnly reports the keys that differ between the running config and next but cannot
// change without a restart, by key path.
func restartOnly(cur, next *config.Config) error {
	var errs config.Errors
	for _, k := range []struct {
		path string
		a, b any
	}{
		{"listen", cur.Listen, next.Listen},
		{"admin", cur.Admin, next.Admin},
		{"unsafe_allow_non_loopback_listen", cur.UnsafeAllowNonLoopbackListen, next.UnsafeAllowNonLoopbackListen},
		{"unsafe_allow_non_loopback_admin", cur.UnsafeAllowNonLoopbackAdmin, next.UnsafeAllowNonLoopbackAdmin},
		{"identity", cur.Identity, next.Identity},
		{"delegation", cur.Delegation, next.Delegation},
		{"xds", cur.XDS, next.XDS},
		{"ca_dir", cur.CADir, next.CADir},
		{"ca_key_dir", cur.CAKeyDir, next.CAKeyDir},
		{"leaf_ttl", cur.LeafTTL, next.LeafTTL},
		{"policy.dir", cur.Policy.Dir, next.Policy.Dir},
		{"policy.reload_interval", cur.Policy.ReloadInterval, next.Policy.ReloadInterval},
		{"audit", cur.Audit.FlushEvery(), next.Audit.FlushEvery()},
	} {
		if !reflect.DeepEqual(k.a, k.b) {
			errs = append(errs, config.FieldError{Path: k.path, Msg: "cannot change while escrow runs; restart it"})
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// boundLoopback refuses a listener bound to a non-loopback address unless allowed.
func boundLoopback(key string, a netip.AddrPort, allowed bool, unsafeKey string) error {
	if allowed || a.Addr().Unmap().IsLoopback() {
		return nil
	}
	return fmt.Errorf("proxy: %s is bound to %s, not a loopback address (set %s to allow it)", key, a, unsafeKey)
}

// ignoreClosed treats closing an already closed listener as success (Serve's shutdown closes
// the listeners first).
func ignoreClosed(f func() error) func() error {
	return func() error {
		if err := f(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	}
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "unknown"
	}
	return h
}

// The SPIFFE source is the JWT-SVID source of credential providers (client assertions, token
// exchange, STS web identity): credential declares the interface, attest satisfies it.
var _ credential.JWTSource = (*attest.SPIFFE)(nil)

// listenUnix listens on the Unix socket path of listen_unix. A socket file left by an escrow
// that is gone is replaced; one that still answers is in use, and is left alone (a second
// instance must not take a running one's socket away). The socket is world-writable: who may
// reach it is decided by its directory (a pod-local volume), and each caller is identified by
// SO_PEERCRED for policy.
func listenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("proxy: listen_unix: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			_ = c.Close()
			return nil, fmt.Errorf("proxy: listen_unix: %s is in use by a running process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("proxy: listen_unix: remove the stale socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("proxy: listen_unix: %w", err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("proxy: listen_unix: %w", err)
	}
	return ln, nil
}
