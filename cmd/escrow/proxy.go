package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
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
	checkOnly := fs.Bool("check", false, "run every check a start runs (config, the files and variables it names, --log-level, the policies) without binding a port; report every problem and exit")
	if err := fs.parse(args); err != nil {
		return err
	}
	if *cfgPath == "" {
		fmt.Fprintln(stderr, "escrow proxy: --config is required")
		fs.Usage()
		return errUsage
	}
	cfg, n, err := preflight(*cfgPath, *logLevel)
	if err != nil {
		return err
	}
	if *checkOnly {
		fmt.Fprintf(stdout, "config ok: %d upstream(s), %d credential(s), %d policies\n", len(cfg.Upstreams), len(cfg.Credentials), n)
		return nil
	}
	log, err := newLogger(*logLevel, stderr)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	// Before any secret is read (Build reads the credentials and the CA key).
	if err := lockMemory(); err != nil {
		log.Warn("could not make the process non-dumpable; a process of the same user could read its memory", zap.Error(err))
	}

	deps := proxy.Deps{Logger: log, Stdout: stdout, Version: version, DrainTimeout: *drain}
	var xds xdsClient
	if cfg.XDS != nil {
		deps.ReadyChecks = map[string]proxy.ReadyCheck{"xds": xds.ready}
		deps.Broker = &xds.broker
	}
	sc, err := proxy.Build(ctx, cfg, deps)
	if err != nil {
		return err
	}
	// Starting up leaves a few MB of garbage behind (config, policy and schema parsing, the
	// CA, the trust bundle) and no GC has run yet: collect it and return the pages now, or the
	// idle proxy keeps them until the scavenger gets to them.
	debug.FreeOSMemory()
	log.Info("escrow proxy listening", zap.String("proxy", sc.ProxyAddr.String()), zap.String("admin", sc.AdminAddr.String()),
		zap.String("ca_dir", cfg.CADir), zap.String("policy_mode", string(cfg.Policy.Mode)))
	if cfg.XDS == nil {
		return sc.Serve(ctx)
	}
	// The control plane's bundles arrive beside serving: until the first is applied the
	// sidecar denies every request and /readyz says why (xds).
	xctx, stopXDS := context.WithCancel(ctx)
	xdone := make(chan error, 1)
	go func() {
		err := xds.run(xctx, cfg, sc, log.Named("xds"))
		if err != nil {
			// Said now, not at shutdown: until it is mended the sidecar serves nothing but
			// denials and /readyz names the xds check.
			log.Error("the control-plane subscription stopped; requests are denied until escrow restarts", zap.Error(err))
		}
		xdone <- err
	}()
	err = sc.Serve(ctx)
	stopXDS()
	if xerr := <-xdone; xerr != nil && err == nil {
		err = xerr
	}
	return err
}

// preflightError is every problem preflight found, printed one after the other.
type preflightError []error

func (e preflightError) Error() string {
	var b strings.Builder
	if len(e) > 1 {
		fmt.Fprintf(&b, "%d problems:\n", len(e))
	}
	for i, err := range e {
		if i > 0 {
			b.WriteString("\n")
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

func (e preflightError) Unwrap() []error { return e }

// preflight runs every check a start runs before it binds a port, and reports every problem at
// once (escrow proxy --check is exactly this): the config file (its keys and values, and what
// it names on this machine: files, environment variables, writable directories, addresses),
// the --log-level, and the policy directory compiled as the proxy loads it (validated against
// its schema, or escrow's built-in one).
// It returns the config and the number of policies.
func preflight(cfgPath, logLevel string) (*config.Config, int, error) {
	var errs preflightError
	if _, err := parseLevel(logLevel); err != nil {
		errs = append(errs, err)
	}
	cfg, err := config.Load(cfgPath)
	policyDir := ""
	if err != nil {
		errs = append(errs, err)
		// A config whose only problems are on this machine (a missing secret file, an unset
		// variable) still names its policy directory: check it too, so one run says it all.
		if data, rerr := os.ReadFile(cfgPath); rerr == nil {
			if pure, perr := config.Parse(data); perr == nil {
				policyDir = pure.Policy.Dir
			}
		}
	} else {
		policyDir = cfg.Policy.Dir
	}
	n := 0
	if policyDir != "" {
		if n, err = policy.ValidateDir(policyDir); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, 0, errs
	}
	return cfg, n, nil
}

func parseLevel(level string) (zapcore.Level, error) {
	var lvl zapcore.Level
	if err := lvl.Set(level); err != nil {
		return lvl, fmt.Errorf("--log-level: %q is not a level: want debug, info, warn or error", level)
	}
	return lvl, nil
}

func newLogger(level string, w io.Writer) (*zap.Logger, error) {
	lvl, err := parseLevel(level)
	if err != nil {
		return nil, err
	}
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(w), lvl)
	return zap.New(core).With(zap.String("log_type", "ops")), nil
}
