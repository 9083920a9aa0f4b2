package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/escrowproxy/escrow/attest"
	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/proxy"
	"github.com/escrowproxy/escrow/proxy/ca"
	"github.com/escrowproxy/escrow/telemetry"
)

func cmdProxy(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("proxy", "escrow proxy --config FILE [flags]", stderr)
	cfgPath := fs.String("config", "", "path to the config file (YAML); required")
	drain := fs.Duration("drain-timeout", 15*time.Second, "on SIGTERM, how long in-flight requests and tunnels may take to finish")
	logLevel := fs.String("log-level", "info", "log level for operational logs: debug, info, warn, error (audit records are always written)")
	checkOnly := fs.Bool("check", false, "validate the config and policies, then exit")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *cfgPath == "" {
		fmt.Fprintln(stderr, "escrow proxy: --config is required")
		fs.Usage()
		return errUsage
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	if *checkOnly {
		n, err := policy.ValidateDir(cfg.Policy.Dir)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "config ok: %d upstream(s), %d credential(s), %d policies\n", len(cfg.Upstreams), len(cfg.Credentials), n)
		return nil
	}
	log, err := newLogger(*logLevel, stderr)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	// Records are batched into few writes (audit.flush_interval). Every record is written by
	// the time rt.Wait returns (requests and tunnels drained), so stopping the sink after it
	// loses none on a graceful shutdown.
	sink := audit.NewBufferedZapSink(stdout, cfg.Audit.FlushEvery(), nil)
	defer func() {
		if err := sink.Stop(); err != nil {
			log.Error("writing audit records failed", zap.Error(err))
		}
	}()

	rt, err := start(ctx, startOptions{Config: cfg, Logger: log, Audit: sink, DrainTimeout: *drain})
	if err != nil {
		return err
	}
	// Starting up leaves a few MB of garbage behind (config, policy and schema parsing, the
	// CA, the trust bundle) and no GC has run yet: collect it and return the pages now, or the
	// idle proxy keeps them until the scavenger gets to them.
	debug.FreeOSMemory()
	log.Info("escrow proxy listening", zap.String("proxy", rt.ProxyAddr.String()), zap.String("admin", rt.AdminAddr.String()),
		zap.String("ca_dir", cfg.CADir), zap.String("policy_mode", cfg.Policy.Mode))
	return rt.Wait()
}

func newLogger(level string, w io.Writer) (*zap.Logger, error) {
	var lvl zapcore.Level
	if err := lvl.Set(level); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(w), lvl)
	return zap.New(core).With(zap.String("log_type", "ops")), nil
}

type startOptions struct {
	Config *config.Config
	Logger *zap.Logger
	Audit  audit.Sink
	// DrainTimeout bounds graceful shutdown once ctx ends.
	DrainTimeout time.Duration
}

// running is a started proxy.
type running struct {
	ProxyAddr, AdminAddr netip.AddrPort
	CAPEM                []byte
	Metrics              *telemetry.Metrics
	done                 chan error
}

// Wait blocks until the context given to start ends and the proxy has drained and stopped.
func (r *running) Wait() error { return <-r.done }

// start wires config → identity, policy, credentials, CA, metrics → proxy and starts serving.
func start(ctx context.Context, o startOptions) (*running, error) {
	cfg, log := o.Config, o.Logger

	// Identity.
	var (
		id         attest.Source
		svidExpiry func() time.Time
		err        error
	)
	switch {
	case cfg.Identity.Static != "":
		id, err = attest.NewStatic(cfg.Identity.Static)
		log.Warn("using a static identity: requests are recorded as attested=false", zap.String("spiffe_id", cfg.Identity.Static))
	default:
		var s *attest.SPIFFE
		s, err = attest.NewSPIFFE(ctx, attest.SPIFFEOptions{Addr: cfg.Identity.SPIFFE.Socket, Logger: log.Named("attest")})
		if s != nil {
			id, svidExpiry = s, s.ExpiresAt
		}
	}
	if err != nil {
		return nil, err
	}

	// Metrics, then policy (its reloads are counted).
	metrics := telemetry.New(telemetry.Options{SVIDExpiry: svidExpiry, Version: version})
	engine := policy.NewEngine(policy.Options{
		Mode:   policy.Mode(cfg.Policy.Mode),
		Logger: log.Named("policy"),
		OnReload: func(result string, err error) {
			metrics.PolicyReloads.WithLabelValues(result).Inc()
		},
	})
	if err := engine.LoadDir(cfg.Policy.Dir); err != nil {
		_ = id.Close()
		return nil, err
	}
	go engine.Watch(ctx, cfg.Policy.Dir, cfg.Policy.ReloadInterval.D())

	// Credentials.
	providers := map[string]credential.Provider{}
	for name, c := range cfg.Credentials {
		switch {
		case c.Static != nil && c.Static.File != "":
			providers[name] = credential.StaticFile(c.Static.File)
		case c.Static != nil && c.Static.Env != "":
			providers[name] = credential.StaticEnv(c.Static.Env)
		}
	}
	creds := credential.NewManager(providers, credential.Options{Logger: log.Named("credential")})
	if err := creds.Warm(ctx); err != nil {
		// Not fatal: requests needing it are denied with credential_unavailable until it works.
		log.Warn("some credentials are not available yet", zap.Error(err))
	}

	// The per-pod CA and the trust bundle the agent reads.
	podCA, err := ca.New(ca.Options{LeafTTL: cfg.LeafTTL.D(), Name: "escrow pod CA " + hostname()})
	if err != nil {
		_ = id.Close()
		return nil, err
	}
	roots, err := ca.SystemRootsPEM()
	if err != nil {
		log.Warn("system roots not found; the trust bundle holds only the pod CA", zap.Error(err))
	}
	if err := ca.WriteFiles(cfg.CADir, podCA.CertPEM(), roots); err != nil {
		_ = id.Close()
		return nil, err
	}

	// Listeners first, so the egress rules know escrow's own addresses.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		_ = id.Close()
		return nil, fmt.Errorf("listen: %w", err)
	}
	adminLn, err := net.Listen("tcp", cfg.Admin)
	if err != nil {
		_ = ln.Close()
		_ = id.Close()
		return nil, fmt.Errorf("admin: %w", err)
	}
	proxyAddr := ln.Addr().(*net.TCPAddr).AddrPort()
	adminAddr := adminLn.Addr().(*net.TCPAddr).AddrPort()

	p, err := proxy.New(proxy.Options{
		Config: cfg, Identity: id, Policy: engine, Credentials: creds, CA: podCA,
		Audit: o.Audit, Metrics: metrics, Logger: log.Named("proxy"),
		Self: []netip.AddrPort{proxyAddr, adminAddr},
	})
	if err != nil {
		_ = ln.Close()
		_ = adminLn.Close()
		_ = id.Close()
		return nil, err
	}
	admin := proxy.AdminHandler(metrics.Handler(), map[string]proxy.ReadyCheck{
		"identity": func() error {
			if !id.Ready() {
				return errors.New("no valid SVID yet")
			}
			return nil
		},
		"policy": func() error {
			if !engine.Ready() {
				return errors.New("no policy set loaded")
			}
			return nil
		},
		"ca": func() error { return nil }, // the CA exists before the listeners open
	})
	done := make(chan error, 1)
	go func() {
		done <- p.Serve(ctx, proxy.ServeOptions{Listener: ln, AdminListener: adminLn, AdminHandler: admin,
			DrainTimeout: o.DrainTimeout, Logger: log})
		_ = id.Close()
	}()
	return &running{
		ProxyAddr: proxyAddr, AdminAddr: adminAddr, CAPEM: podCA.CertPEM(), Metrics: metrics,
		done: done,
	}, nil
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "unknown"
	}
	return h
}
