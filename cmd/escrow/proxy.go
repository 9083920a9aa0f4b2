package main

import (
	"context"
	"fmt"
	"io"
	"runtime/debug"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/proxy"
)

func cmdProxy(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("proxy", "escrow proxy --config FILE [flags]",
		"Runs the egress proxy (the sidecar). The config's keys are in docs/config.md.", stdout, stderr)
	cfgPath := fs.String("config", "", "path to the config file (YAML); required")
	drain := fs.Duration("drain-timeout", 15*time.Second, "on SIGTERM or SIGINT, how long in-flight requests and tunnels may take to finish (a second signal stops at once)")
	logLevel := fs.String("log-level", "info", "log level for operational logs: debug, info, warn, error (audit records are always written)")
	checkOnly := fs.Bool("check", false, "validate the config and policies, then exit")
	if err := fs.parse(args); err != nil {
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

	sc, err := proxy.Build(ctx, cfg, proxy.Deps{Logger: log, Stdout: stdout, Version: version, DrainTimeout: *drain})
	if err != nil {
		return err
	}
	// Starting up leaves a few MB of garbage behind (config, policy and schema parsing, the
	// CA, the trust bundle) and no GC has run yet: collect it and return the pages now, or the
	// idle proxy keeps them until the scavenger gets to them.
	debug.FreeOSMemory()
	log.Info("escrow proxy listening", zap.String("proxy", sc.ProxyAddr.String()), zap.String("admin", sc.AdminAddr.String()),
		zap.String("ca_dir", cfg.CADir), zap.String("policy_mode", string(cfg.Policy.Mode)))
	return sc.Serve(ctx)
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
