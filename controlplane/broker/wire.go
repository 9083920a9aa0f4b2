// Package broker is the wire contract of credential brokering between escrow sidecars and
// `escrow controller`: for a provider whose root secret must not live in agent pods (a GitHub
// App private key, an OAuth client secret), the controller holds the secret and mints the
// short-lived token when a sidecar asks; the sidecar caches it like any other.
//
// The service is escrow.broker.v1alpha1.Broker with one unary method, Mint, served on the
// controller's ADS gRPC server (same listener, same mTLS). Its request and response are
// google.protobuf.Struct values carrying the JSON form of MintRequest and MintResponse, as
// controlplane/bundle carries the Bundle: no generated code, and decoding is strict (an
// unknown field is an error) so that a newer peer's intent is never half read.
//
// The caller is the SPIFFE ID of the client certificate the TLS handshake verified, never an
// ID the request claims. Refusals are gRPC status codes (PermissionDenied, NotFound,
// Unavailable, InvalidArgument) whose messages name the credential and the reason class only:
// the controller's internal error text stays in its log.
package broker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"
)

const (
	// ServiceName is the gRPC service.
	ServiceName = "escrow.broker.v1alpha1.Broker"
	// MintMethod is the full method name of Mint.
	MintMethod = "/" + ServiceName + "/Mint"
	// maxName bounds a credential name (a Kubernetes object name) and maxScope a scope.
	maxName  = 253
	maxScope = 4096
)

// MintRequest asks for the current token of a brokered credential.
type MintRequest struct {
	// Credential is the credential's name (the Credential object's, in escrow's namespace).
	Credential string `json:"credential"`
	// Scope is the canonical scope parameters; "" for none (the only value the brokerable
	// providers take today).
	Scope string `json:"scope,omitempty"`
}

// MintResponse is a token: exactly one of Value or Parts, and its expiry.
type MintResponse struct {
	Value     string            `json:"value,omitempty"`
	Parts     map[string]string `json:"parts,omitempty"`
	ExpiresAt time.Time         `json:"expires_at"`
}

// Check reports what makes r unusable.
func (r MintRequest) Check() error {
	switch {
	case r.Credential == "":
		return errors.New("broker: credential: required")
	case len(r.Credential) > maxName || strings.ContainsFunc(r.Credential, isCTL):
		return fmt.Errorf("broker: credential: want a name of at most %d characters without control characters", maxName)
	case len(r.Scope) > maxScope || strings.ContainsFunc(r.Scope, isCTL):
		return fmt.Errorf("broker: scope: want at most %d characters without control characters", maxScope)
	}
	return nil
}

// Check reports what makes r unusable. Its text never quotes the token.
func (r MintResponse) Check() error {
	switch {
	case (r.Value == "") == (len(r.Parts) == 0):
		return errors.New("broker: a token has exactly one of value or parts")
	case r.ExpiresAt.IsZero():
		return errors.New("broker: expires_at: required (a brokered token is short-lived)")
	}
	return nil
}

func isCTL(r rune) bool { return r < 0x20 || r == 0x7f }

// EncodeRequest and EncodeResponse turn a message into its wire form.
func EncodeRequest(r MintRequest) (*structpb.Struct, error)   { return encode(r) }
func EncodeResponse(r MintResponse) (*structpb.Struct, error) { return encode(r) }

// DecodeRequest reads a request strictly and checks it.
func DecodeRequest(st *structpb.Struct) (MintRequest, error) {
	var r MintRequest
	if err := decode(st, &r); err != nil {
		return MintRequest{}, err
	}
	return r, r.Check()
}

// DecodeResponse reads a response strictly and checks it. Its errors never quote the token.
func DecodeResponse(st *structpb.Struct) (MintResponse, error) {
	var r MintResponse
	if err := decode(st, &r); err != nil {
		return MintResponse{}, err
	}
	if err := r.Check(); err != nil {
		return MintResponse{}, err
	}
	return r, nil
}

func encode(v any) (*structpb.Struct, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("broker: encode: %w", err)
	}
	st := &structpb.Struct{}
	if err := protojson.Unmarshal(raw, st); err != nil {
		return nil, fmt.Errorf("broker: encode: %w", err)
	}
	return st, nil
}

// decode reads st's JSON into v, refusing unknown fields and trailing data. The errors of
// encoding/json name fields and types, never values.
func decode(st *structpb.Struct, v any) error {
	if st == nil {
		return errors.New("broker: empty message")
	}
	raw, err := protojson.Marshal(st)
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("broker: %s", jsonError(err))
	}
	return nil
}

// jsonError describes a decoding error without the value it choked on: a time that does not
// parse is quoted by package time, and the value may be a token sent in the wrong field.
func jsonError(err error) string {
	var te *json.UnmarshalTypeError
	var pe *time.ParseError
	switch {
	case errors.As(err, &te):
		return fmt.Sprintf("%s: want a %s, got a %s", te.Field, te.Type, te.Value)
	case errors.As(err, &pe):
		return "expires_at: want an RFC 3339 time"
	}
	return err.Error()
}
