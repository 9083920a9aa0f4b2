// Package policy decides, with Cedar (github.com/cedar-policy/cedar-go), whether an outbound
// request from the agent may leave the pod. The proxy calls [Engine.Decide] for every request
// after it has established the workload identity and before it injects a credential.
//
// # The Cedar model
//
// For every request the engine builds this Cedar request; the embedded default schema
// ([DefaultSchema], also shipped as policy/schema.cedarschema) describes exactly the same model.
//
// Principal: Workload::"<spiffe id>", with attributes
//
//	trust_domain  String  the SPIFFE trust domain
//	attested      Bool    false for a static (configured, unverified) identity
//
// When the SPIFFE ID path has the Kubernetes shape /ns/<ns>/sa/<sa>, the workload's parent is
// ServiceAccount::"<ns>/<sa>", whose parent is Namespace::"<ns>", so both
// `principal in ServiceAccount::"agents/coder"` and `principal in Namespace::"agents"` work.
//
// Action: Action::"<METHOD>" for a request seen in clear (TLS-intercepted or plain HTTP). The
// method is upper-cased. GET, HEAD and OPTIONS are `in Action::"read"`; POST, PUT, PATCH,
// DELETE, CONNECT, TRACE and every other method are `in Action::"write"`, so an unknown method
// is never read-only. A blind tunnel (Input.Action == "connect", lower case) is
// Action::"connect", which is in neither group.
//
// Resource: Host::"<host>", the destination host name (lower-cased, one trailing dot removed)
// or IP literal. Host entities have no attributes and no parents.
//
// Context:
//
//	scheme       String    "http" | "https"
//	port         Long
//	method       String    the HTTP method; "CONNECT" for a blind tunnel
//	path         String    the request path; "" for a blind tunnel
//	credential   String    the route's credential name; "" if none
//	time         datetime  the request time
//	attestation  Record    {source: String ("spiffe"|"static"), attested: Bool,
//	                        expires_in_s: Long (seconds until the SVID expires; 0 for static)}
//
// Adding a context field means adding it in context.go (buildContext) and in
// schema.cedarschema; TestDefaultSchema_MatchesBuiltRequests fails until both agree.
//
// # Policies
//
// [Engine.LoadDir] reads every *.cedar file of a directory (sorted by name; dot-files are
// skipped) and, when the directory holds schema.cedarschema, validates every policy against
// it (strict mode). Every policy must carry a unique @id("...") annotation: it is the name that
// decisions, audit records and metrics use. A directory that fails to load in any way is
// rejected whole and the last good set stays in force. With a schema, a policy that names a
// method outside the schema (say Action::"PROPFIND") fails validation: add the method to the
// schema to write policies for it. Without a schema such methods work as described above.
//
// # Decisions
//
// [Engine.Decide] is evaluated against a lock-free snapshot of the loaded set. The set is
// indexed by principal, action and resource scope, so only the policies whose scope can match
// the request are evaluated (an `==`/`in` scope is bucketed by its entity; `principal`,
// `is`-only and other unindexable scopes are always evaluated); the result is identical to
// evaluating the full set.
//
// Cedar's answer is mapped as follows:
//
//   - a permit matched and no forbid matched and nothing errored: allowed (ReasonAllowed),
//     PolicyIDs are the permits.
//   - a forbid matched: denied (ReasonDenied), PolicyIDs are the forbids.
//   - nothing matched: denied by default (ReasonDenied), PolicyIDs is empty.
//   - any policy raised an evaluation error: denied (ReasonError), PolicyIDs are the
//     erroring policies. Cedar skips an erroring policy, including a forbid, so the engine
//     fails closed rather than let a broken forbid silently allow.
//   - no policy set is loaded: denied (ReasonUnavailable).
//
// In report mode (ModeReport) a request that Cedar denies or that errors is let through:
// Allow is true, WouldDeny is true and Reason still says what Cedar decided. Report mode is
// about policy decisions only: with no policy set loaded, or with an input the engine cannot
// build a Cedar request from (empty SPIFFE ID, action or host), it still denies.
package policy
