package mcp

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
)

// JSON-RPC error codes escrow answers with.
const (
	// CodeDenied is the code of a call escrow refused (policy, identity, credential...): in
	// JSON-RPC's implementation-defined server-error range, and distinct from the codes the MCP
	// specification and SDKs use (-32000 connection closed, -32001 request timeout, -32002
	// resource not found, -32020..-32022, -32042).
	CodeDenied = -32050
	// CodeParseError and CodeInvalidRequest are JSON-RPC's own, for bad input (WriteError).
	CodeParseError     = -32700
	CodeInvalidRequest = -32600
	// CodeHeaderMismatch is MCP's, for Mcp-Method/Mcp-Name headers that contradict the body.
	CodeHeaderMismatch = -32020
)

// ReasonBatchDenied is the reason given to the other requests of a batch in which one call was
// denied: the batch is forwarded whole or not at all.
const ReasonBatchDenied = "batch_denied"

// ReasonHeader is the response header that carries escrow's reason; it is the proxy's
// X-Escrow-Reason, which the proxy strips from upstream responses.
const ReasonHeader = "X-Escrow-Reason"

// ErrorData is the "data" of escrow's JSON-RPC errors.
type ErrorData struct {
	// Reason is escrow's stable, machine-readable reason (the proxy's, e.g. "policy_denied").
	Reason string `json:"reason"`
	// Detail names the kind of bad input ("mcp_duplicate_key"...), for bad_request only.
	Detail    string `json:"detail,omitempty"`
	RequestID string `json:"request_id,omitempty"`
}

type rpcError struct {
	Code    int       `json:"code"`
	Message string    `json:"message"`
	Data    ErrorData `json:"data"`
}

type rpcResponse struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Error   rpcError        `json:"error"`
}

// Denial says which decided call of a Call was refused and why.
type Denial struct {
	// Input is the index, in Call.Inputs, of the refused call.
	Input int
	// Reason is the stable reason (the proxy's Reason). It is sent to the agent, so it must
	// come from a closed set, never from input or an error's text.
	Reason    string
	RequestID string
}

// Deny answers the agent in place of the upstream: HTTP 200 (what MCP clients expect of a
// call the server refused) with a JSON-RPC error response for the request, code CodeDenied,
// message "escrow denied this call: <reason>" and data {reason, request_id}. A batch is
// refused whole: the refused call gets its reason and every other request of the batch
// ReasonBatchDenied (notifications and responses get no answer, as in JSON-RPC). The answer is
// JSON, or SSE events (one per error) when the client accepts text/event-stream but not JSON.
func (c *Call) Deny(w http.ResponseWriter, d Denial) {
	denied := -1
	if d.Input >= 0 && d.Input < len(c.decided) {
		denied = c.decided[d.Input]
	}
	var out []rpcResponse
	for i, m := range c.Messages {
		if m.Kind != KindRequest {
			continue
		}
		e := rpcError{Code: CodeDenied, Data: ErrorData{Reason: d.Reason, RequestID: d.RequestID}}
		if i == denied || !c.Batch {
			e.Message = "escrow denied this call: " + d.Reason
		} else {
			e.Message = "escrow denied this batch: another call in it was refused (" + d.Reason + ")"
			e.Data.Reason = ReasonBatchDenied
		}
		out = append(out, rpcResponse{JSONRPC: "2.0", ID: m.ID, Error: e})
	}
	writeResponses(w, http.StatusOK, d.Reason, out, c.Batch, c.sseOnly)
}

// WriteError answers bad input found by Inspect: HTTP 413 for a body over the bound, 400
// otherwise (as the Streamable HTTP transport answers invalid input), with a JSON-RPC error
// response whose id is the message's when one could be read (else null), code CodeParseError,
// CodeInvalidRequest or CodeHeaderMismatch, and data {reason: reason (the proxy's, e.g.
// "bad_request"), detail: the kind's stable name, request_id}. The error's own text is never
// sent: log it.
func WriteError(w http.ResponseWriter, err error, reason, requestID string) {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Kind: ErrInvalid}
	}
	code := CodeParseError
	switch e.Kind {
	case ErrInvalid:
		code = CodeInvalidRequest
	case ErrHeaderMismatch:
		code = CodeHeaderMismatch
	}
	status := http.StatusBadRequest
	if e.Kind == ErrTooLarge {
		status = http.StatusRequestEntityTooLarge
	}
	id := e.ID
	if id == nil {
		id = json.RawMessage("null")
	}
	resp := rpcResponse{JSONRPC: "2.0", ID: id, Error: rpcError{
		Code: code, Message: "escrow refused the message: " + e.Name(),
		Data: ErrorData{Reason: reason, Detail: e.Name(), RequestID: requestID},
	}}
	writeResponses(w, status, reason, []rpcResponse{resp}, false, false)
}

func writeResponses(w http.ResponseWriter, status int, reason string, out []rpcResponse, batch, sse bool) {
	var body []byte
	switch {
	case sse:
		for _, r := range out {
			b, _ := json.Marshal(r)
			body = append(body, "event: message\ndata: "...)
			body = append(append(body, b...), "\n\n"...)
		}
	case batch:
		body, _ = json.Marshal(out)
	case len(out) == 1:
		body, _ = json.Marshal(out[0])
	}
	h := w.Header()
	if sse {
		h.Set("Content-Type", "text/event-stream")
	} else {
		h.Set("Content-Type", "application/json")
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set(ReasonHeader, reason)
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
