// Package attest answers "who is calling": the workload identity of the pod escrow runs in,
// established for every outbound request before policy is asked and before any credential is
// put on the request. Later it is narrowed to the calling process and a delegation chain.
//
// Two sources exist today:
//
//   - [SPIFFE] follows the SPIFFE Workload API (a SPIRE agent's socket). It holds the current
//     X509-SVID's SPIFFE ID and expiry, replaces them on every rotation, and fetches JWT-SVIDs
//     for credential providers. Its identities are Attested.
//   - [Static] is a configured SPIFFE ID for local use. Nothing vouches for it, so its
//     identities are not Attested, and policy and audit can tell the difference.
//
// # The calling process
//
// A pod runs several processes (the agent, a tool it spawned, a package install); the pod's
// SVID does not say which one is calling. [ProcessFinder] asks the kernel, once per accepted
// connection: for loopback TCP the client socket's inode in /proc/net/tcp{,6} and the process
// holding it, for a Unix socket SO_PEERCRED. The result, a [Process] (pid, uid, gid, executable
// path and its sha256, start time), is attested by the kernel; policy sees it as
// context.caller. A process that cannot be found is left out (ErrProcessNotFound), never
// guessed: policy decides whether a caller is required.
//
// # Delegation tokens
//
// An agent may say whom it acts for by presenting a JWT in Proxy-Authorization ("Bearer
// <jwt>", or Basic with the JWT as password, which is what clients send for credentials in
// the proxy URL). [DelegationVerifier] verifies it against the configured issuers (JWT-SVIDs
// of other workloads via the Workload API's JWT bundles, or OIDC issuers' JWKS), its audience,
// expiry and algorithm, and reads the chain from RFC 8693's nested act claims into a
// [Delegation] (subject, actors nearest first, issuer, a token id that is never the token).
// A delegation is verified cryptographically but only asserted by its issuer; policy sees it
// as context.delegation. Any failure wraps [ErrDelegationInvalid].
//
// # No identity is an error, never "anonymous"
//
// Every decision escrow makes downstream keys off the identity: the Cedar principal, the
// credential a route may receive, the audit record that says who did what. If a source
// answered "anonymous" (or an empty principal) when it cannot establish who is calling, that
// value would flow into policy as an ordinary principal, and any policy written with a broad
// scope ("permit (principal, action, resource) when ...", a forgotten `unless`) would then
// allow an unidentified caller and hand it a real credential. Failing closed must not depend
// on every policy author remembering a special case. So when there is no SVID yet, the
// Workload API has gone away and the last SVID has passed its NotAfter, or the source is
// closed, Identify returns an error wrapping [ErrUnavailable], and the proxy denies the
// request (503 identity_unavailable) and records that denial. An expired SVID is treated the
// same as none: the Workload API stopped vouching for the workload at NotAfter, and serving it
// afterwards would turn an outage of the attestation system into silent trust.
package attest
