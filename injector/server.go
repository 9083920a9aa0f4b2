package injector

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Server defaults.
const (
	// DefaultMaxBodyBytes bounds an AdmissionReview body. An object in etcd is at most 1.5 MiB
	// and a CREATE review carries one object, so 8 MiB is generous.
	DefaultMaxBodyBytes = 8 << 20
	// DefaultDrainTimeout bounds Serve's graceful shutdown.
	DefaultDrainTimeout = 10 * time.Second
)

// ServerOptions configures NewServer.
type ServerOptions struct {
	// Addr is the TCP address to listen on (host:port; port 0 picks one).
	Addr string
	// CertFile and KeyFile are the serving certificate (PEM chain) and key, re-read when either
	// file changes.
	CertFile, KeyFile string
	// Injector decides and patches.
	Injector *Injector
	// Logger receives one line per admission request and the server's own errors; nil: none.
	Logger *zap.Logger
	// Now is the clock for the latency histogram; nil means time.Now.
	Now func() time.Time
	// DrainTimeout bounds the graceful shutdown once Serve's context ends; zero means
	// DefaultDrainTimeout.
	DrainTimeout time.Duration
	// MaxBodyBytes bounds a request body; zero means DefaultMaxBodyBytes.
	MaxBodyBytes int64
}

// Server serves /mutate, /healthz, /readyz and /metrics on one TLS listener.
type Server struct {
	o        ServerOptions
	ln       net.Listener
	certs    *certReloader
	metrics  *metrics
	registry *prometheus.Registry
	draining atomic.Bool
	inflight atomic.Int64 // /mutate requests being handled (tests observe the drain with it)
	handler  http.Handler
}

// NewServer loads the certificate (so that a bad one fails at start) and binds the listener.
func NewServer(o ServerOptions) (*Server, error) {
	if o.Injector == nil {
		return nil, errors.New("injector: no Injector")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = DefaultDrainTimeout
	}
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = DefaultMaxBodyBytes
	}
	certs, err := newCertReloader(o.CertFile, o.KeyFile, o.Logger)
	if err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s := &Server{o: o, certs: certs, metrics: newMetrics(reg), registry: reg}
	mux := http.NewServeMux()
	mux.HandleFunc("/mutate", s.mutate)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if s.draining.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	s.handler = mux
	ln, err := net.Listen("tcp", o.Addr)
	if err != nil {
		return nil, fmt.Errorf("injector: listen: %w", err)
	}
	s.ln = ln
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close releases the listener of a server that will not Serve (e.g. after a config check).
func (s *Server) Close() error { return s.ln.Close() }

// Registry is the server's own metrics registry (not the global one).
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// Handler is the server's HTTP handler, without TLS (for tests and embedding).
func (s *Server) Handler() http.Handler { return s.handler }

// Serve serves until ctx ends, then stops accepting, lets in-flight requests finish for up to
// DrainTimeout and returns. It returns nil after a graceful drain.
func (s *Server) Serve(ctx context.Context) error {
	srv := &http.Server{
		Handler: s.handler,
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS12,
			GetCertificate: s.certs.GetCertificate,
		},
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          zap.NewStdLog(s.o.Logger.Named("http")),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(s.ln, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("injector: serve: %w", err)
	case <-ctx.Done():
	}
	s.draining.Store(true)
	sctx, cancel := context.WithTimeout(context.Background(), s.o.DrainTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	<-errc // http.ErrServerClosed
	if err != nil {
		srv.Close()
		return fmt.Errorf("injector: drain: %w", err)
	}
	return nil
}

func (s *Server) activeMutations() int64 { return s.inflight.Load() }

func (s *Server) mutate(w http.ResponseWriter, r *http.Request) {
	s.inflight.Add(1)
	defer s.inflight.Add(-1)
	start := s.o.Now()
	result, d := s.serveMutate(w, r)
	s.metrics.observe(result, s.o.Now().Sub(start))
	fields := []zap.Field{zap.String("result", string(result))}
	if d.Reason != "" {
		fields = append(fields, zap.String("reason", d.Reason))
	}
	if d.Namespace != "" || d.Name != "" {
		fields = append(fields, zap.String("namespace", d.Namespace), zap.String("name", d.Name))
	}
	s.o.Logger.Info("admission", fields...)
}

func (s *Server) serveMutate(w http.ResponseWriter, r *http.Request) (Result, Decision) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "injector: POST an AdmissionReview", http.StatusMethodNotAllowed)
		return ResultError, Decision{Reason: "method " + r.Method}
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			http.Error(w, "injector: want Content-Type application/json, got "+ct, http.StatusUnsupportedMediaType)
			return ResultError, Decision{Reason: "content type " + ct}
		}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.o.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			http.Error(w, fmt.Sprintf("injector: body over %d bytes", s.o.MaxBodyBytes), http.StatusRequestEntityTooLarge)
			return ResultError, Decision{Reason: "body too large"}
		}
		http.Error(w, "injector: read body: "+err.Error(), http.StatusBadRequest)
		return ResultError, Decision{Reason: "read body: " + err.Error()}
	}
	out, d, err := s.o.Injector.review(body)
	if err != nil {
		var re *reviewError
		if errors.As(err, &re) {
			http.Error(w, re.msg, re.status)
			return ResultError, Decision{Reason: re.msg}
		}
		http.Error(w, "injector: internal error", http.StatusInternalServerError)
		return ResultError, Decision{Reason: err.Error()}
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(out)
	return d.Result, d
}

// certReloader serves the certificate from files and re-reads them when either changes (size,
// modification time or identity, as seen by stat; Kubernetes updates a mounted Secret by
// swapping a symlink, which stat follows). A pair that does not load (e.g. the key was replaced
// before the certificate) keeps the last good certificate and is retried at the next handshake.
type certReloader struct {
	certFile, keyFile string
	log               *zap.Logger

	mu    sync.Mutex
	cert  *tls.Certificate
	stamp [2]fileStamp
}

type fileStamp struct {
	size  int64
	mtime time.Time
	ino   os.FileInfo
}

func (a fileStamp) same(b fileStamp) bool {
	return a.size == b.size && a.mtime.Equal(b.mtime) && a.ino != nil && b.ino != nil && os.SameFile(a.ino, b.ino)
}

func stamp(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{size: fi.Size(), mtime: fi.ModTime(), ino: fi}, nil
}

func newCertReloader(certFile, keyFile string, log *zap.Logger) (*certReloader, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("injector: a TLS certificate and key file are required")
	}
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := r.reload(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *certReloader) reload() error {
	cs, err := stamp(r.certFile)
	if err != nil {
		return fmt.Errorf("injector: TLS certificate: %w", err)
	}
	ks, err := stamp(r.keyFile)
	if err != nil {
		return fmt.Errorf("injector: TLS key: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("injector: TLS certificate and key: %w", err)
	}
	r.cert, r.stamp = &cert, [2]fileStamp{cs, ks}
	return nil
}

// GetCertificate is tls.Config.GetCertificate.
func (r *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	cs, err1 := stamp(r.certFile)
	ks, err2 := stamp(r.keyFile)
	if err1 == nil && err2 == nil && (!cs.same(r.stamp[0]) || !ks.same(r.stamp[1])) {
		if err := r.reload(); err != nil {
			r.log.Warn("new TLS certificate not loaded; serving the previous one", zap.Error(err))
		} else {
			r.log.Info("TLS certificate reloaded", zap.Time("not_after", r.cert.Leaf.NotAfter))
		}
	}
	return r.cert, nil
}

// metrics are the injector's collectors, on the server's own registry.
type metrics struct {
	requests *prometheus.CounterVec
	duration prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "escrow_injector_requests_total",
			Help: "Admission requests by result: injected, skipped (not for escrow, already injected, not a pod CREATE), denied (bad annotations, conflicts), error (malformed request or internal failure).",
		}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "escrow_injector_request_duration_seconds",
			Help:    "Time to answer one admission request, from the request's arrival to the answer's write.",
			Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1},
		}),
	}
	reg.MustRegister(m.requests, m.duration)
	for _, r := range []Result{ResultInjected, ResultSkipped, ResultDenied, ResultError} {
		m.requests.WithLabelValues(string(r)) // present at zero, so rate() and alerts see them
	}
	return m
}

func (m *metrics) observe(r Result, d time.Duration) {
	m.requests.WithLabelValues(string(r)).Inc()
	m.duration.Observe(d.Seconds())
}
