package proxy

import (
	"net/http"
	"strings"

	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/audit"
	"github.com/escrowproxy/escrow/policy"
	"github.com/escrowproxy/escrow/proxy/mcp"
)

// mayAllower is the policy query behind tools/list filtering: could any context allow in?
// *policy.Engine implements it.
type mayAllower interface {
	MayAllow(in policy.Input) bool
}

// inspectMCP is the second decision on an MCP server: the request itself was allowed (in is
// its decided input); each tools/call, resources/read and prompts/get in a POSTed body is now
// decided on its own, and a denied one is answered as a JSON-RPC error the upstream never sees.
// It returns the response filter (tools/list answers keep only the tools this workload could
// call) and false when it answered the agent itself.
func (p *Proxy) inspectMCP(w http.ResponseWriter, r *http.Request, rt *route, rec *audit.Record, in policy.Input, st *state) (func(*http.Response) error, bool) {
	allow := p.toolAllower(in)
	if !rt.mcp.Applies(r) {
		// The GET stream replays server messages, tools/list answers among them; StreamFilter
		// is nil for anything else.
		return rt.mcp.StreamFilter(r, allow), true
	}
	call, err := rt.mcp.Inspect(r, in)
	if err != nil {
		markDenied(rec, ReasonBadRequest)
		rec.Status = ReasonBadRequest.Status()
		p.log.Info("denied", zap.String("request_id", rec.RequestID), zap.String("reason", string(ReasonBadRequest)), zap.Error(err))
		p.metrics.MCPCalls.WithLabelValues(audit.Deny, "invalid").Inc()
		w.Header()[RequestIDHeader] = []string{rec.RequestID}
		w.Header()[ReasonHeader] = []string{string(ReasonBadRequest)}
		mcp.WriteError(w, err, string(ReasonBadRequest), rec.RequestID)
		p.finish(rec)
		return nil, false
	}
	rec.MCP = auditMCP(call.Audit(st.mcpArguments))
	inputs := call.Inputs()
	for k, extra := range inputs {
		extra.Time = p.now()
		reason := p.decide(r.Context(), rec, extra, st.mode)
		if reason != ReasonAllowed {
			p.metrics.MCPCalls.WithLabelValues(audit.Deny, extra.MCP.Method).Inc()
			markDenied(rec, reason)
			rec.Status = http.StatusOK // the JSON-RPC error travels in a 200, as MCP clients expect
			w.Header()[RequestIDHeader] = []string{rec.RequestID}
			w.Header()[ReasonHeader] = []string{string(reason)}
			call.Deny(w, mcp.Denial{Input: k, Reason: string(reason), RequestID: rec.RequestID})
			p.finish(rec)
			return nil, false
		}
	}
	for _, extra := range inputs {
		p.metrics.MCPCalls.WithLabelValues(audit.Allow, extra.MCP.Method).Inc()
	}
	return call.ResponseFilter(allow), true
}

// toolAllower answers, for tools/list filtering, whether a tools/call of the named tool could
// be allowed for this request's workload whatever its arguments. Without the engine's query (a
// test's Authorizer) every tool stays listed: each call is still decided on its own.
func (p *Proxy) toolAllower(in policy.Input) func(tool string) bool {
	ma, ok := p.pol.(mayAllower)
	if !ok {
		return func(string) bool { return true }
	}
	host := in.Host
	return func(tool string) bool {
		q := in
		q.Action, q.Path = policy.ActionToolsCall, ""
		q.Resource = policy.Resource{Type: policy.TypeTool, ID: host + "/" + tool}
		q.MCP = &policy.MCPCall{Method: policy.ActionToolsCall, Name: tool}
		return ma.MayAllow(q)
	}
}

// auditMCP copies the MCP calls of a body onto the record's own type (audit imports nothing
// of ours).
func auditMCP(in []mcp.Audit) []audit.MCPCall {
	out := make([]audit.MCPCall, len(in))
	for i, a := range in {
		out[i] = audit.MCPCall{
			Method: a.Method, Tool: a.Tool, JSONRPCID: a.JSONRPCID, Session: a.Session,
			ArgumentsSHA256: a.ArgumentsSHA256, Arguments: strings.Clone(string(a.Arguments)),
		}
	}
	return out
}
