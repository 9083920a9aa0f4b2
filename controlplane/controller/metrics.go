package controller

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the controller's Prometheus collectors. Every label has a bounded set of values:
// reason classes, kinds, and the namespaces of connected sidecars.
type Metrics struct {
	// Connected is the number of open ADS streams that passed the identity check.
	Connected prometheus.Gauge
	// Pushes counts responses sent to sidecars.
	Pushes prometheus.Counter
	// NACKs counts rejected pushes by reason class (NACKClass).
	NACKs *prometheus.CounterVec
	// Refused counts streams refused: no_svid, node_id_mismatch, type_url, delta.
	Refused *prometheus.CounterVec
	// PushLatency is the time from a bundle version being set for a sidecar to its ACK.
	PushLatency prometheus.Histogram
	// BundleVersion is 1 for each version currently served to the sidecars of a namespace:
	// one per distinct set of brokered Credentials its connected sidecars may use (an
	// Audience), so one per namespace without brokered Credentials. Bounded by the brokered
	// Credentials' allow lists, not by the number of sidecars. The label is sidecar_namespace,
	// not namespace: Prometheus puts the scraped pod's namespace (the controller's) there.
	BundleVersion *prometheus.GaugeVec
	// Rejected is the number of objects left out of every bundle, by kind.
	Rejected *prometheus.GaugeVec
	// Computes counts recomputations of the bundles.
	Computes prometheus.Counter
	// StatusWrites counts status updates of every kind by result (ok, conflict, error).
	StatusWrites *prometheus.CounterVec
	// BrokerMints counts the sidecars' requests for brokered tokens by credential (a brokered
	// Credential's name; "" for a name that is none) and result (ok, denied, revoked,
	// not_found, unavailable, invalid).
	BrokerMints *prometheus.CounterVec
}

// NewMetrics creates the collectors and registers them with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	const ns, sub = "escrow", "controller"
	m := &Metrics{
		Connected: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "connected_sidecars",
			Help: "Open ADS streams from sidecars whose identity was checked."}),
		Pushes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "pushes_total",
			Help: "Bundles sent to sidecars."}),
		NACKs: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "nacks_total",
			Help: "Bundles a sidecar rejected, by reason class (decode, config, policy, conflict, other)."}, []string{"reason"}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "refused_streams_total",
			Help: "ADS streams refused, by reason (no_svid, node_id_mismatch, type_url, delta)."}, []string{"reason"}),
		PushLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "push_latency_seconds",
			Help:    "Time from a bundle version being set for a sidecar to the sidecar's ACK of it.",
			Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}}),
		BundleVersion: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "bundle_version_info",
			Help: "1 for each bundle version served to the sidecars of a namespace (more than one when they differ in the brokered credentials they may use)."}, []string{"sidecar_namespace", "version"}),
		Rejected: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "rejected_objects",
			Help: "Objects left out of every bundle (invalid, or colliding with another), by kind."}, []string{"kind"}),
		Computes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "computes_total",
			Help: "Recomputations of the bundles after changes of the watched objects."}),
		StatusWrites: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "status_writes_total",
			Help: "Status updates of Policy, Upstream, Credential and Revocation objects, by result (ok, conflict, error)."}, []string{"result"}),
		BrokerMints: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "broker_mints_total",
			Help: "Sidecars' requests for brokered tokens, by credential and result (ok, denied, revoked, not_found, unavailable, invalid)."}, []string{"credential", "result"}),
	}
	if reg != nil {
		reg.MustRegister(m.Connected, m.Pushes, m.NACKs, m.Refused, m.PushLatency, m.BundleVersion, m.Rejected, m.Computes, m.StatusWrites, m.BrokerMints)
	}
	return m
}

// NACK reason classes.
const (
	NACKDecode = "decode" // the sidecar could not read the bundle (bundle: ...)
	NACKConfig = "config" // upstreams/credentials did not validate with the sidecar's config (config: ...)
	NACKPolicy = "policy" // the policy set did not compile (policy: ...)
	// NACKConflict: a pushed name is also in the sidecar's own file config or policy directory.
	NACKConflict = "conflict"
	NACKOther    = "other"
)

// NACKClass maps a sidecar's NACK message to a bounded reason class by the package prefix the
// sidecar's errors carry ("bundle: ", "config: ", "policy: ", after the sidecar's own
// "controlplane: "). The message itself is logged, never used as a label.
func NACKClass(msg string) string {
	msg = strings.TrimPrefix(msg, "controlplane: ")
	switch {
	case strings.HasPrefix(msg, "credentials.") || strings.HasPrefix(msg, "policies["):
		return NACKConflict
	case strings.HasPrefix(msg, "bundle:"):
		return NACKDecode
	case strings.HasPrefix(msg, "config:"):
		return NACKConfig
	case strings.HasPrefix(msg, "policy:"):
		return NACKPolicy
	}
	return NACKOther
}
