package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/escrowproxy/escrow/injector"
)

// cmdWebhook runs the Kubernetes mutating admission webhook that injects escrow into pods. It
// only parses flags; injector does the work.
func cmdWebhook(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("webhook", "escrow webhook --tls-cert FILE --tls-key FILE [--listen ADDR] [--config FILE] [flags]",
		"Runs the Kubernetes mutating admission webhook that adds the escrow sidecar to pods (docs/kubernetes.md).", stdout, stderr)
	listen := fs.String("listen", ":8443", "address to serve /mutate, /healthz, /readyz and /metrics on (TLS)")
	certFile := fs.String("tls-cert", "", "serving certificate chain (PEM), re-read when it changes; required")
	keyFile := fs.String("tls-key", "", "serving private key (PEM), re-read when it changes; required")
	cfgPath := fs.String("config", "", "injector config (YAML); without it every key has its default (docs/kubernetes.md)")
	drain := fs.Duration("drain-timeout", injector.DefaultDrainTimeout, "on SIGTERM or SIGINT, how long in-flight admission requests may take to finish")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	checkOnly := fs.Bool("check", false, "validate the config and the certificate, then exit")
	if err := fs.parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "escrow webhook: unexpected arguments %q\n", fs.Args())
		fs.Usage()
		return errUsage
	}
	if *certFile == "" || *keyFile == "" {
		fmt.Fprintln(stderr, "escrow webhook: --tls-cert and --tls-key are required")
		fs.Usage()
		return errUsage
	}
	if *drain <= 0 {
		fmt.Fprintln(stderr, "escrow webhook: --drain-timeout must be positive")
		return errUsage
	}
	var lvl zapcore.Level
	if err := lvl.Set(*logLevel); err != nil {
		fmt.Fprintf(stderr, "escrow webhook: --log-level: %v\n", err)
		return errUsage
	}

	cfg, err := injector.LoadConfig(*cfgPath, injector.Defaults{
		Image: defaultSidecarImage(version),
		// The chart passes the webhook's namespace through the downward API.
		Namespace: os.Getenv("POD_NAMESPACE"),
	})
	if err != nil {
		return err
	}
	inj, err := injector.New(injector.Options{Config: cfg, Version: version})
	if err != nil {
		return err
	}
	log := webhookLogger(lvl, stderr)
	defer func() { _ = log.Sync() }()
	// Before the serving key is read.
	if err := lockMemory(); err != nil {
		log.Warn("could not make the process non-dumpable; a process of the same user could read its memory", zap.Error(err))
	}
	addr := *listen
	if *checkOnly {
		addr = "127.0.0.1:0" // load the certificate without taking the real port
	}
	srv, err := injector.NewServer(injector.ServerOptions{
		Addr: addr, CertFile: *certFile, KeyFile: *keyFile,
		Injector: inj, Logger: log.Named("injector"), DrainTimeout: *drain,
	})
	if err != nil {
		return err
	}
	if *checkOnly {
		_ = srv.Close()
		fmt.Fprintf(stdout, "webhook config ok: sidecar image %s, skipping namespace %s\n", cfg.Image, cfg.Namespace)
		return nil
	}
	log.Info("escrow webhook listening", zap.String("addr", srv.Addr().String()),
		zap.String("image", cfg.Image), zap.String("namespace", cfg.Namespace), zap.String("version", version))
	return srv.Serve(ctx)
}

// defaultSidecarImage is the escrow image of the same version as this binary.
func defaultSidecarImage(v string) string {
	if v == "" || v == "dev" {
		return injector.DefaultImageRepo + ":latest"
	}
	return injector.DefaultImageRepo + ":" + v
}

// webhookLogger writes JSON lines to w, like the proxy's operational log.
func webhookLogger(lvl zapcore.Level, w io.Writer) *zap.Logger {
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(w), lvl)
	return zap.New(core).With(zap.String("log_type", "ops"))
}
