// Package mcp makes escrow understand the Model Context Protocol's Streamable HTTP transport
// (JSON-RPC 2.0 over HTTP POST, answered as JSON or as an SSE stream) on upstreams marked as MCP
// servers, so each tool call is decided by the policy on its own.
//
// Three pieces, used by the proxy around its request pipeline:
//
//   - Inspector.Inspect reads a POSTed body (bounded), validates it strictly and returns a Call:
//     one policy input per tools/call, resources/read and prompts/get (Call.Inputs), what the
//     audit record keeps (Call.Audit), and the body put back, byte for byte, for the upstream.
//     Bad input is an *Error (kinds ErrTooLarge, ErrMalformed, ErrTooDeep, ErrDuplicateKey,
//     ErrInvalid, ErrHeaderMismatch); WriteError answers it and nothing is forwarded.
//   - Call.Deny answers a refused call in place of the upstream: HTTP 200 with a JSON-RPC error
//     for the request's id (code CodeDenied, -32050), as JSON or as an SSE event when the client
//     accepts only SSE. A batch is refused whole, with one error per request id.
//   - Call.ResponseFilter rewrites the response to a tools/list request (JSON, or SSE streamed
//     event by event; each page of a paginated list) to drop the tools an allow callback refuses;
//     Inspector.StreamFilter does the same for lists replayed on the GET stream.
//
// # Strict parsing
//
// The call escrow decides must be the call the server executes, whatever JSON decoder the
// server uses. So a body is refused, never guessed at, when decoders could read it
// differently: invalid UTF-8 or lone surrogate escapes, two keys in one object that are equal
// or equal ignoring case ({"path":..., "Path":...}: Go's encoding/json matches keys ignoring
// case, others take the first or the last), and a member escrow reads spelled in another case
// ("Arguments", "NAME"). Nesting is bounded (Options.MaxDepth), and so are the body
// (Options.MaxMessageBytes), the batch (Options.MaxBatch) and a tools/list response
// (Options.MaxListBytes). A decided method sent as a notification (no id) is refused: it would
// get no answer to carry a denial. Messages without a method are accepted only as responses
// (the client answering a server's sampling or elicitation request). A single message whose
// Mcp-Method or Mcp-Name header (protocol 2026-07-28) contradicts its body is refused.
//
// Argument keys are matched exactly (context.mcp.arguments.path is "path", not "Path"): a
// server that matches them ignoring case could read a differently spelled key, so argument
// conditions belong in permits (allow what is known) rather than in forbids.
//
// # Wiring into the proxy
//
// Build one Inspector per upstream with an mcp block (config upstreams[].mcp):
//
//	insp, err := mcp.New(mcp.OptionsFrom(*u.MCP))
//
// In Proxy.handle, after the request's own decision allowed it and before the credential:
//
//	if rt.mcp != nil && rt.mcp.Applies(r) {
//		call, err := rt.mcp.Inspect(r, in) // in: the request's own policy.Input
//		if err != nil {
//			markDenied(rec, ReasonBadRequest)
//			p.log.Info("denied", ..., zap.Error(err)) // err's text: log only
//			mcp.WriteError(w, err, string(ReasonBadRequest), rec.RequestID)
//			p.finish(rec)
//			return
//		}
//		rec.MCP = call.Audit(cfg.Audit.MCPArguments)
//		for k, extra := range call.Inputs() {
//			extra.Identity, extra.Time = v.Identity, p.now()
//			if reason := p.decide(ctx, rec, extra, st.mode); reason != ReasonAllowed {
//				markDenied(rec, reason)
//				call.Deny(w, mcp.Denial{Input: k, Reason: string(reason), RequestID: rec.RequestID})
//				p.finish(rec)
//				return
//			}
//		}
//		ob.filter = call.ResponseFilter(func(tool string) bool { /* could a permit match
//			Tool::"<host>/<tool>" for v.Identity */ })
//	}
//
// and in the route's ReverseProxy.ModifyResponse, after the existing scrubbing:
//
//	if st.out.filter != nil {
//		if err := st.out.filter(resp); err != nil {
//			return err // ReverseProxy's ErrorHandler answers 502: nothing unfiltered reaches the agent
//		}
//	}
//
// ResponseFilter returns nil when the body held no tools/list request, so only those responses
// pay for filtering. Requests on the host that Applies rejects (the GET stream, DELETE of a
// session, other paths) go through the pipeline as plain HTTP; for a GET, also set
//
//	ob.filter = rt.mcp.StreamFilter(r, allow) // nil unless a GET of the endpoint
//
// so that a tools/list response the server replays on its stream (a client resuming with
// Last-Event-ID) is filtered too.
package mcp
