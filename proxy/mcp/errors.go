package mcp

import (
	"encoding/json"
	"errors"
	"fmt"
)

// The kinds of bad input Inspect refuses. Every error Inspect returns is an *Error that wraps
// exactly one of these (test with errors.Is); the proxy turns it into a denial (WriteError)
// and nothing is forwarded.
var (
	// ErrTooLarge: the body is larger than Options.MaxMessageBytes.
	ErrTooLarge = errors.New("mcp: message too large")
	// ErrMalformed: the body is not one valid JSON text (syntax, invalid UTF-8, a lone
	// surrogate escape, data after the value).
	ErrMalformed = errors.New("mcp: malformed JSON")
	// ErrTooDeep: arrays and objects nest deeper than Options.MaxDepth.
	ErrTooDeep = errors.New("mcp: JSON nested too deep")
	// ErrDuplicateKey: an object has two keys that are equal, or equal ignoring case.
	ErrDuplicateKey = errors.New("mcp: duplicate key in a JSON object")
	// ErrInvalid: valid JSON but not an acceptable JSON-RPC 2.0 message or batch: no
	// "jsonrpc":"2.0", neither a method nor a response, an id that is not a string or number,
	// a tools/call or prompts/get without a name, a resources/read without a uri, a decided
	// call sent as a notification (no id), arguments that are not an object, an empty or too
	// large batch, or a content-encoded body.
	ErrInvalid = errors.New("mcp: invalid JSON-RPC message")
	// ErrHeaderMismatch: the Mcp-Method or Mcp-Name header does not match the message body.
	ErrHeaderMismatch = errors.New("mcp: Mcp-Method or Mcp-Name header does not match the body")
)

// Error is bad input found by Inspect. Kind is one of the Err* values above; Detail says what
// and where, for the log and the audit record only: it may quote the input, so it is never
// sent to the agent (WriteError sends Code and Kind's stable name).
type Error struct {
	Kind   error
	Detail string
	// ID is the JSON-RPC id of the offending message when it is known (a single message whose
	// id could be read), else nil.
	ID json.RawMessage
}

func (e *Error) Error() string {
	if e.Detail == "" {
		return e.Kind.Error()
	}
	return e.Kind.Error() + ": " + e.Detail
}

func (e *Error) Unwrap() error { return e.Kind }

// Name is the stable, machine-readable name of the error's kind (e.g. "mcp_duplicate_key"),
// sent to the agent in the JSON-RPC error's data.detail.
func (e *Error) Name() string {
	switch e.Kind {
	case ErrTooLarge:
		return "mcp_message_too_large"
	case ErrMalformed:
		return "mcp_malformed_json"
	case ErrTooDeep:
		return "mcp_nesting_too_deep"
	case ErrDuplicateKey:
		return "mcp_duplicate_key"
	case ErrHeaderMismatch:
		return "mcp_header_mismatch"
	}
	return "mcp_invalid_message"
}

func syntaxErr(what string, at int) error {
	return &Error{Kind: ErrMalformed, Detail: fmt.Sprintf("%s at offset %d", what, at)}
}

func errTooDeep(at int) error {
	return &Error{Kind: ErrTooDeep, Detail: fmt.Sprintf("at offset %d", at)}
}

func errDuplicate(at int) error {
	return &Error{Kind: ErrDuplicateKey, Detail: fmt.Sprintf("key at offset %d", at)}
}

func invalid(format string, args ...any) *Error {
	return &Error{Kind: ErrInvalid, Detail: fmt.Sprintf(format, args...)}
}
