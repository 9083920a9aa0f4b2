package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"sort"
	"time"

	"go.uber.org/zap"
)

// ReadyCheck reports whether one dependency is ready; nil means ready.
type ReadyCheck func() error

// AdminHandler serves /healthz (the process is up), /readyz (every check passes: identity,
// policy, CA, ...) and /metrics. It never serves a secret.
func AdminHandler(metrics http.Handler, checks map[string]ReadyCheck) http.Handler {
	names := make([]string, 0, len(checks))
	for n := range checks {
		names = append(names, n)
	}
	sort.Strings(names)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		status := map[string]string{}
		ready := true
		for _, n := range names {
			if err := checks[n](); err != nil {
				status[n], ready = err.Error(), false
			} else {
				status[n] = "ok"
			}
		}
		w.Header().Set("Content-Type", "application/json")
		if !ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"ready": ready, "checks": status})
	})
	mux.Handle("GET /metrics", metrics)
	return mux
}

// ServeOptions run the proxy and admin listeners.
type ServeOptions struct {
	Listener net.Listener // the proxy listener (loopback)
	// UnixListener is a second proxy listener on a Unix socket (listen_unix); nil: none.
	UnixListener  net.Listener
	AdminListener net.Listener
	AdminHandler  http.Handler
	// DrainTimeout bounds graceful shutdown: in-flight requests and tunnels get this long to
	// finish after ctx ends, then they are closed.
	DrainTimeout time.Duration
	Logger       *zap.Logger
}

// Serve runs until ctx ends (SIGTERM in the binary), then stops accepting, drains in-flight
// requests and tunnels for up to DrainTimeout, and returns.
func (p *Proxy) Serve(ctx context.Context, o ServeOptions) error {
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	front := &http.Server{
		Handler:           p,
		ConnContext:       p.ConnContext,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          zap.NewStdLog(log.Named("listener")),
	}
	admin := &http.Server{Handler: o.AdminHandler, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = p.icpt.srv.Serve(p.icpt.ln) }() // intercepted connections; stopped by p.Shutdown
	errc := make(chan error, 3)
	go func() { errc <- front.Serve(recordingListener{Listener: o.Listener, p: p}) }()
	if o.UnixListener != nil {
		go func() { errc <- front.Serve(recordingListener{Listener: o.UnixListener, p: p}) }()
	}
	if o.AdminListener != nil {
		go func() { errc <- admin.Serve(o.AdminListener) }()
	}
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		if errors.Is(runErr, http.ErrServerClosed) {
			runErr = nil
		}
	}
	drain := o.DrainTimeout
	if drain <= 0 {
		drain = 15 * time.Second
	}
	log.Info("shutting down: draining in-flight requests", zap.Duration("timeout", drain))
	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	// Stop accepting and finish in-flight plain requests; Shutdown leaves the connections of
	// requests still running when the drain period ends open, so close them.
	if err := front.Shutdown(sctx); err != nil {
		_ = front.Close()
	}
	_ = p.Shutdown(sctx) // intercepted connections and tunnels
	_ = admin.Shutdown(sctx)
	log.Info("stopped")
	return runErr
}
