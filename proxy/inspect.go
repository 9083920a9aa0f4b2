package proxy

import (
	"context"
	"net/http"

	"github.com/escrowproxy/escrow/policy"
)

// Inspector looks into a request between routing and the credential, after the request itself
// was allowed, and may ask for further decisions about what it carries: the MCP support reads a
// bounded JSON-RPC body here and returns one policy input per tool call. An inspector that reads
// the body must put back an equivalent one (the upstream receives r.Body). An error denies the
// request as bad_request; every returned input must be allowed (Identity and Time are filled in
// by the proxy), or the request is denied with that decision's reason.
type Inspector interface {
	Inspect(ctx context.Context, r *http.Request, in Inspection) ([]policy.Input, error)
}

// Inspection is what the proxy knows when it calls an Inspector; a struct so it can grow.
type Inspection struct {
	// Input is the request's own policy input, which was allowed (without Identity and Time).
	Input policy.Input
}
