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
// Action::"connect", which is in neither group. The MCP actions "tools/call",
// "resources/read" and "prompts/get" (one decision per JSON-RPC call on an MCP upstream) are
// in neither group either.
//
// Resource: Host::"<host>", the destination host name (lower-cased, one trailing dot removed)
// or IP literal. Host entities have no attributes and no parents. An MCP action's resource is
// Tool::"<host>/<name>", Resource::"<host>/<uri>" or Prompt::"<host>/<name>"
// (Input.Resource), whose parent is Host::"<host>".
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
//	upgrade?     String    the requested protocol upgrade ("websocket"), lower-cased
//	caller?      Record    {uid, gid, pid: Long, exe, sha256: String}: the calling process
//	delegation?  Record    {subject: String, actors: Set<String>, nearest: String,
//	                        depth: Long, issuer: String}: the verified delegation chain
//	mcp?         Record    {method, name: String, arguments: Record}: the MCP call (always
//	                        present for the MCP actions, never for HTTP actions)
//
// The optional fields are present only when the input has them. MCP arguments are converted
// by argumentsRecord (see args.go) within MaxArgumentsDepth and MaxArgumentsValues; beyond
// them the decision is a (non-overridable) ReasonError. With the default schema, the
// attributes of context.mcp.arguments are declared per policy from its uses (schema_args.go).
//
// Adding a context field means adding it in context.go (buildContext) and in
// schema.cedarschema; TestDefaultSchema_MatchesBuiltRequests fails until both agree.
//
// # Policies
//
// A policy set arrives as a [Source]: file name → Cedar text, plus an optional schema. It comes
// from a directory ([ReadDir] reads every *.cedar file, skipping dot-files and following
// symlinks, and schema.cedarschema if present) or from the control plane as bytes. [Compile]
// turns it into an immutable [Set], or into a *[LoadError] listing every problem, each with its
// position as "name:line:col". Compile does no I/O, so text from the network is checked exactly
// like a directory. Files are compiled in name order. Every policy is validated (strict mode)
// against the Source's schema, or, when it has none (Source.Schema nil, a directory without
// schema.cedarschema), against the built-in one: a typo such as context.methd, which would
// make every decision a policy_error, is rejected at load. A schema of one's own replaces the
// built-in one (to declare more methods, or to type MCP arguments). Whatever the schema,
// policies that can never match a request escrow builds are rejected too ([ErrNeverMatches]:
// `principal == ServiceAccount::...`, a Host with upper case or a port). Problems point at the
// offending token where it can be found. Every policy must carry a unique @id("...") annotation: it is the name that
// decisions, audit records and metrics use. A set's [Set.Version] is a short hash of the
// names and texts (not of where they came from), so the same set has the same version from a
// directory and from the control plane.
//
// There is one update path: [Engine.Install] swaps a compiled set in atomically;
// [Engine.Load] compiles and installs; [Engine.LoadDir] and [Engine.Watch] read a directory
// and load it. A set that fails to compile in any way is rejected whole and the last good one
// stays in force. A policy that names a method outside the schema (say Action::"PROPFIND")
// fails validation: add the method to a schema of your own to write policies for it.
//
// # Decisions
//
// [Engine.Decide] is evaluated against a lock-free snapshot of the set in force: a decision is
// made wholly by one set, even while another is being installed. The set is indexed by
// principal, action and resource scope, so only the policies whose scope can match the request
// are evaluated (an `==`/`in` scope is bucketed by its entity; `principal`, `is`-only and
// other unindexable scopes are always evaluated); the result is identical to evaluating the
// full set.
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
//   - an input the engine cannot build a Cedar request from (empty SPIFFE ID, action or
//     host): denied (ReasonError), no PolicyIDs.
//   - no policy set is loaded: denied (ReasonUnavailable).
//
// The engine always answers with enforce semantics; it has no mode. A caller that runs in
// report mode (log the would-be deny, allow) asks [Decision.Overridable] which denials it may
// let through: the policies' own outcomes (ReasonDenied, and ReasonError from evaluation), not
// a missing policy set nor a malformed input.
package policy
