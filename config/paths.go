package config

// Files escrow writes into ca_dir, where the agent's containers read them. They live here, not in
// the proxy, so that the Kubernetes injector (which points the agent's trust variables at them)
// and the proxy (which writes them) agree without one importing the other.
const (
	// CACertFile holds the pod CA certificate only (PEM).
	CACertFile = "ca.crt"
	// TrustBundleFile holds the system roots followed by the pod CA (PEM): what SSL_CERT_FILE,
	// REQUESTS_CA_BUNDLE and the like point at.
	TrustBundleFile = "trust-bundle.pem"
)
