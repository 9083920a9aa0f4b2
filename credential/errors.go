package credential

import (
	"errors"
	"strconv"
)

// ErrUnavailable is wrapped by every error that means "no credential can be served right now":
// a failed or refused fetch, a credential in its failure backoff, an expired token that could
// not be refreshed, or a caller whose context ended while waiting. The proxy answers 503
// credential_unavailable and shows the agent none of the error's text.
var ErrUnavailable = errors.New("credential: unavailable")

// ErrUnknown means the Manager has no credential of that name (a configuration bug: config
// validation should have caught it).
var ErrUnknown = errors.New("credential: unknown")

// Error is the error Manager returns. Its text names the credential and the cause (file missing,
// empty, env unset, context canceled, ...), never the secret. It matches ErrUnavailable (or
// ErrUnknown) and its cause with errors.Is.
type Error struct {
	// Name is the credential's name.
	Name string
	// Kind is ErrUnavailable or ErrUnknown.
	Kind error
	// Err is the cause; nil for ErrUnknown.
	Err error
}

func (e *Error) Error() string {
	s := "credential " + strconv.Quote(e.Name)
	if e.Kind == ErrUnknown {
		return s + ": unknown credential"
	}
	s += ": unavailable"
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns Kind and Err, so errors.Is matches both.
func (e *Error) Unwrap() []error {
	if e.Err == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Err}
}

func unavailable(name string, err error) *Error {
	return &Error{Name: name, Kind: ErrUnavailable, Err: err}
}
