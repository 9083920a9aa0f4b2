// Package controller is `escrow controller`: it watches escrow's Kubernetes resources
// (Policy, Upstream, Credential, Revocation of escrow.dev/v1alpha1), computes the bundle of
// every connected sidecar (its namespace's objects plus those of escrow's own namespace), and
// serves it over ADS (go-control-plane's snapshot cache, one ECDS TypedExtensionConfig per
// sidecar, see package bundle) to sidecars that authenticate with their X509-SVID over mTLS.
//
// The sidecar's identity, and so the namespace whose objects it receives, comes from the SPIFFE
// ID of its certificate, never from the node id it claims: a stream whose node id differs from
// the certificate's ID is refused.
//
// Compute is the pure part (objects in, bundles and every object's verdict out); Controller
// watches and writes each object's status (its Accepted condition) when it changes; Server
// serves ADS.
package controller
