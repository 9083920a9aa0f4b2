// Package telemetry holds escrow's Prometheus collectors. Label values come from closed sets
// (decision, stable reason, reload result); never a host, path, identity or credential value, so
// cardinality stays bounded and nothing secret can reach a scrape.
package telemetry

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const namespace = "escrow"

// Metrics are the collectors the proxy updates. Build with New; the zero value is not usable.
type Metrics struct {
	Registry *prometheus.Registry

	Requests        *prometheus.CounterVec   // {decision, reason}
	RequestDuration *prometheus.HistogramVec // {decision}
	PolicyEval      prometheus.Histogram
	PolicyReloads   *prometheus.CounterVec // {result}
	TunnelsActive   prometheus.Gauge
	// CredentialLookups counts the proxy's credential lookups (served from the cache or not).
	CredentialLookups *prometheus.CounterVec // {result}
	// CredentialFetches counts calls to credential providers (token endpoints, files), which
	// the credential cache makes on a miss or a refresh; the credential manager reports them.
	CredentialFetches *prometheus.CounterVec // {provider, result}
	// CredentialExpiry is each credential's current token expiry (0: it does not expire).
	CredentialExpiry *prometheus.GaugeVec // {credential}
	Redactions       prometheus.Counter
	// MCPCalls counts the JSON-RPC calls decided on MCP servers (tool names are not labels:
	// an unbounded set).
	MCPCalls *prometheus.CounterVec // {decision, method}
	// IdentityUpdates counts the Workload API's X509-SVID updates by result: ok, error (the
	// agent unreachable; the held SVID serves until it expires), revoked (no identity issued).
	IdentityUpdates *prometheus.CounterVec // {result}
	// CredentialFetchDuration times calls to credential providers.
	CredentialFetchDuration *prometheus.HistogramVec // {provider}
}

// Options configure New.
type Options struct {
	// SVIDExpiry returns the current SVID's expiry, or zero when there is none (static
	// identity, or no SVID yet); exported as escrow_svid_expiry_timestamp_seconds.
	SVIDExpiry func() time.Time
	// Version is exported as escrow_build_info{version}.
	Version string
}

// New registers escrow's collectors plus the Go and process collectors on a fresh registry.
func New(o Options) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "requests_total",
			Help: "Requests (and tunnels) decided by escrow, by decision and stable reason.",
		}, []string{"decision", "reason"}),
		RequestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "request_duration_seconds",
			Help:                        "Time from request receipt to response headers (or tunnel close), by decision.",
			Buckets:                     []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
			NativeHistogramBucketFactor: 1.1, NativeHistogramMaxBucketNumber: 160,
			NativeHistogramMinResetDuration: time.Hour,
		}, []string{"decision"}),
		PolicyEval: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "policy_eval_duration_seconds",
			Help:                        "Time to evaluate the Cedar policy set for one request.",
			Buckets:                     []float64{1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2},
			NativeHistogramBucketFactor: 1.1, NativeHistogramMaxBucketNumber: 160,
			NativeHistogramMinResetDuration: time.Hour,
		}),
		PolicyReloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "policy_reloads_total",
			Help: "Policy set loads, by result (success, failure). A failure keeps the last good set.",
		}, []string{"result"}),
		TunnelsActive: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "tunnels_active",
			Help: "Connections currently relayed: CONNECT tunnels, intercepted TLS connections and upgraded (WebSocket) connections.",
		}),
		CredentialLookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "credential_lookups_total",
			Help: "Credential lookups by the proxy for requests (most are served from the cache), by result (ok, error).",
		}, []string{"result"}),
		CredentialFetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "credential_fetches_total",
			Help: "Credential provider fetches (a token endpoint call, a file read), by provider kind and result (success, error); cache hits are not fetches.",
		}, []string{"provider", "result"}),
		CredentialExpiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "credential_expiry_timestamp_seconds",
			Help: "Unix time at which the credential's last fetched token expires (0 for one that does not expire), by configured credential name.",
		}, []string{"credential"}),
		Redactions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "response_redactions_total",
			Help: "Occurrences of an injected credential that escrow replaced in upstream responses (headers, trailers, scanned bodies).",
		}),
		MCPCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "mcp_calls_total",
			Help: "JSON-RPC calls to MCP servers decided by escrow (tools/call, resources/read, prompts/get; invalid bodies as method \"invalid\"), by decision.",
		}, []string{"decision", "method"}),
	}
	m.IdentityUpdates = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "identity_updates_total",
		Help: "X509-SVID updates from the Workload API by result: ok, error (agent unreachable), revoked (no identity issued).",
	}, []string{"result"})
	m.CredentialFetchDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Name: "credential_fetch_duration_seconds",
		Help:    "Time of each call to a credential provider (a token endpoint, a file read), by provider kind.",
		Buckets: []float64{.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"provider"})
	reg.MustRegister(m.IdentityUpdates, m.CredentialFetchDuration)
	reg.MustRegister(m.Redactions, m.MCPCalls, m.Requests, m.RequestDuration, m.PolicyEval, m.PolicyReloads, m.TunnelsActive,
		m.CredentialLookups, m.CredentialFetches, m.CredentialExpiry,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if o.SVIDExpiry != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace, Name: "svid_expiry_timestamp_seconds",
			Help: "Unix time at which the current X.509-SVID expires (0 when none is held).",
		}, func() float64 {
			t := o.SVIDExpiry()
			if t.IsZero() {
				return 0
			}
			return float64(t.UnixNano()) / 1e9
		}))
	}
	if o.Version != "" {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace, Name: "build_info",
			Help:        "Always 1; the version label says which escrow build is running.",
			ConstLabels: prometheus.Labels{"version": o.Version},
		}, func() float64 { return 1 }))
	}
	// Pre-create the reload series so a dashboard sees zeros before the first event.
	m.PolicyReloads.WithLabelValues("success")
	m.PolicyReloads.WithLabelValues("failure")
	return m
}

// CredentialObserver feeds the credential metrics; it is the credential manager's Observer.
type CredentialObserver struct{ M *Metrics }

// Fetched counts one provider fetch.
func (o CredentialObserver) Fetched(provider string, ok bool, d time.Duration) {
	result := "success"
	if !ok {
		result = "error"
	}
	o.M.CredentialFetches.WithLabelValues(provider, result).Inc()
	o.M.CredentialFetchDuration.WithLabelValues(provider).Observe(d.Seconds())
}

// Expires records the expiry of a credential's newly fetched token.
func (o CredentialObserver) Expires(credential string, at time.Time) {
	v := 0.0
	if !at.IsZero() {
		v = float64(at.UnixNano()) / 1e9
	}
	o.M.CredentialExpiry.WithLabelValues(credential).Set(v)
}

// AuditQueue is what the audit metrics read (audit.Queue).
type AuditQueue interface {
	Backlog() int
	Dropped() uint64
}

// RegisterAuditQueue exports the audit queue's backlog and losses: a growing backlog is an audit
// output that does not keep up (requests are refused once it stalls).
func (m *Metrics) RegisterAuditQueue(q AuditQueue) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace, Name: "audit_backlog_records",
			Help: "Audit records waiting to be written to the audit output.",
		}, func() float64 { return float64(q.Backlog()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: namespace, Name: "audit_records_dropped_total",
			Help: "Audit records of refused requests lost because the audit queue was full (a served request's record is never dropped).",
		}, func() float64 { return float64(q.Dropped()) }),
	)
}

// Handler serves the registry in the Prometheus text or OpenMetrics format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry, EnableOpenMetrics: true})
}

// RegisterCredentialCache exports the number of tokens the credential cache holds.
func (m *Metrics) RegisterCredentialCache(entries func() int) {
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "credential_cache_entries",
		Help: "Tokens the credential cache holds (one per credential, identity and scope).",
	}, func() float64 { return float64(entries()) }))
}
