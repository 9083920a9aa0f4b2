package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/escrowproxy/escrow/controlplane/controller"
)

// cmdController runs the control plane: it watches escrow's resources in the cluster and
// serves each sidecar its bundle over ADS. It parses flags and wires the parts of
// controlplane/controller together.
func cmdController(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("controller", "escrow controller [--listen ADDR] [--admin ADDR] [--kubeconfig FILE] [--namespace NS] [flags]",
		`Watches escrow's Kubernetes resources (Policy, Upstream, Credential, Revocation of escrow.dev/v1alpha1)
and serves every connected sidecar its bundle over ADS (gRPC, mTLS): the objects of the sidecar's
namespace, taken from the SPIFFE ID of its X509-SVID, plus those of escrow's own namespace.
Every object's status has an Accepted condition: an invalid one is never served, and says why.
Brokered Credentials (spec.broker) are minted on the same listener for the sidecars they allow;
their Secrets, in escrow's namespace, are read from the API server and never leave the
controller. /healthz, /readyz and /metrics are on --admin.
SIGTERM or SIGINT stops it: open streams end and sidecars reconnect to another replica, keeping
their last good bundle meanwhile.

Its own identity is an X509-SVID from the SPIFFE Workload API (--spiffe-socket, or the
SPIFFE_ENDPOINT_SOCKET variable), or, for tests, from files (--svid-cert, --svid-key, --bundle;
not re-read).`, stdout, stderr)
	listen := fs.String("listen", ":15490", "address of the ADS gRPC server (mTLS)")
	admin := fs.String("admin", ":15491", "address of /healthz, /readyz and /metrics (plain HTTP)")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file; without it the in-cluster config is used")
	namespace := fs.String("namespace", os.Getenv("POD_NAMESPACE"), "escrow's own namespace, whose objects apply to every sidecar (default $POD_NAMESPACE)")
	socket := fs.String("spiffe-socket", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "SPIFFE Workload API address, unix:///path (default $SPIFFE_ENDPOINT_SOCKET)")
	svidCert := fs.String("svid-cert", "", "X509-SVID certificate chain (PEM) instead of the Workload API")
	svidKey := fs.String("svid-key", "", "X509-SVID private key (PEM), with --svid-cert")
	bundleFile := fs.String("bundle", "", "trust bundle (PEM CA certificates) the sidecars' SVIDs are verified against, with --svid-cert")
	trustDomain := fs.String("trust-domain", "", "trust domain whose SVIDs may connect (default: the controller's own)")
	coalesce := fs.Duration("coalesce", controller.DefaultCoalesce, "how long to wait after a change for more before pushing")
	drain := fs.Duration("drain-timeout", 10*time.Second, "on SIGTERM or SIGINT, how long in-flight admin requests may take")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	if err := fs.parse(args); err != nil {
		return err
	}
	bad := func(format string, a ...any) error {
		fmt.Fprintf(stderr, "escrow controller: "+format+"\n", a...)
		return errUsage
	}
	if fs.NArg() > 0 {
		return bad("unexpected arguments %q", fs.Args())
	}
	for name, addr := range map[string]string{"--listen": *listen, "--admin": *admin} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return bad("%s: %q is not host:port: %v", name, addr, err)
		}
	}
	if *namespace == "" {
		return bad("--namespace is required (or set POD_NAMESPACE)")
	}
	files := *svidCert != "" || *svidKey != "" || *bundleFile != ""
	switch {
	case files && (*svidCert == "" || *svidKey == "" || *bundleFile == ""):
		return bad("--svid-cert, --svid-key and --bundle go together")
	case !files && *socket == "":
		return bad("--spiffe-socket (or SPIFFE_ENDPOINT_SOCKET) is required, or --svid-cert, --svid-key and --bundle")
	}
	var td spiffeid.TrustDomain
	if *trustDomain != "" {
		var err error
		if td, err = spiffeid.TrustDomainFromString(*trustDomain); err != nil {
			return bad("--trust-domain: %v", err)
		}
	}
	if *coalesce <= 0 || *coalesce > time.Minute {
		return bad("--coalesce must be between 0s and 1m, got %v", *coalesce)
	}
	if *drain <= 0 {
		return bad("--drain-timeout must be positive")
	}
	var lvl zapcore.Level
	if err := lvl.Set(*logLevel); err != nil {
		return bad("--log-level: %v", err)
	}
	log := webhookLogger(lvl, stderr).Named("controller")
	defer func() { _ = log.Sync() }()
	// client-go logs through klog; make its lines ours (JSON, on stderr as given).
	klog.SetLogger(controller.Logr(log.Named("client-go")))

	restConf, err := kubeConfig(*kubeconfig)
	if err != nil {
		return err
	}
	restConf.UserAgent = "escrow-controller/" + version
	client, err := dynamic.NewForConfig(restConf)
	if err != nil {
		return fmt.Errorf("controller: kubernetes client: %w", err)
	}

	var svids x509svid.Source
	var bundles x509bundle.Source
	if files {
		svid, err := x509svid.Load(*svidCert, *svidKey)
		if err != nil {
			return fmt.Errorf("controller: --svid-cert/--svid-key: %w", err)
		}
		btd := td
		if btd.IsZero() {
			btd = svid.ID.TrustDomain()
		}
		b, err := x509bundle.Load(btd, *bundleFile)
		if err != nil {
			return fmt.Errorf("controller: --bundle: %w", err)
		}
		svids, bundles = svid, b
	} else {
		src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(*socket)))
		if err != nil {
			if ctx.Err() != nil {
				return nil // stopped while waiting for the first SVID
			}
			return fmt.Errorf("controller: SPIFFE Workload API %s: %w", *socket, err)
		}
		defer src.Close()
		svids, bundles = src, src
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := controller.NewMetrics(reg)
	// The broker holds the root secrets of brokered Credentials: it reads their Secrets (in
	// escrow's namespace only) from the API server when it mints, and writes them nowhere.
	brk, err := controller.NewBroker(controller.BrokerOptions{Client: client, Namespace: *namespace, Logger: log.Named("broker")})
	if err != nil {
		return err
	}
	srv, err := controller.NewServer(controller.ServerOptions{SVIDs: svids, Bundles: bundles, TrustDomain: td,
		Logger: log.Named("ads"), Metrics: metrics, Minter: brk})
	if err != nil {
		return err
	}
	// The broker first: a Revocation refuses mints before the sidecars hear of it.
	ctrl, err := controller.New(controller.Options{Client: client, Namespace: *namespace, Publisher: controller.Publishers{brk, srv},
		Logger: log, Metrics: metrics, Coalesce: *coalesce})
	if err != nil {
		return err
	}

	adsL, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("controller: --listen: %w", err)
	}
	adminL, err := net.Listen("tcp", *admin)
	if err != nil {
		adsL.Close()
		return fmt.Errorf("controller: --admin: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		var missing []string
		if !ctrl.Ready() {
			missing = append(missing, "the resources are not synced from the API server")
		}
		if !srv.Ready() {
			missing = append(missing, "no bundles computed")
		}
		if len(missing) > 0 {
			http.Error(w, "not ready: "+strings.Join(missing, "; "), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	adminSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	wg.Add(3)
	go func() { defer wg.Done(); errs <- srv.Serve(ctx, adsL) }()
	go func() { defer wg.Done(); errs <- ctrl.Run(ctx) }()
	go func() {
		defer wg.Done()
		if err := adminSrv.Serve(adminL); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errs <- fmt.Errorf("controller: admin: %w", err)
			return
		}
		errs <- nil
	}()
	log.Info("escrow controller listening", zap.String("addr", adsL.Addr().String()), zap.String("admin", adminL.Addr().String()),
		zap.String("namespace", *namespace), zap.String("version", version))

	var first error
	select {
	case <-ctx.Done():
	case first = <-errs: // a part failed: stop the others
	}
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), *drain)
	defer scancel()
	_ = adminSrv.Shutdown(sctx)
	wg.Wait()
	close(errs)
	for err := range errs {
		if first == nil {
			first = err
		}
	}
	log.Info("escrow controller stopped")
	return first
}

func kubeConfig(path string) (*rest.Config, error) {
	if path != "" {
		c, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			return nil, fmt.Errorf("controller: --kubeconfig: %w", err)
		}
		return c, nil
	}
	c, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("controller: no --kubeconfig and not in a cluster: %w", err)
	}
	return c, nil
}
