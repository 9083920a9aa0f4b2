package broker

import (
	"context"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/escrowproxy/escrow/credential"
)

// Result classifies the outcome of one Mint (the result label of the controller's metric).
type Result string

// Results.
const (
	ResultOK          Result = "ok"
	ResultDenied      Result = "denied"      // the caller is not among the credential's workloads
	ResultRevoked     Result = "revoked"     // a Revocation names the credential or covers the caller
	ResultNotFound    Result = "not_found"   // no brokered credential of that name
	ResultUnavailable Result = "unavailable" // the upstream mint failed
	ResultInvalid     Result = "invalid"     // the request does not decode or check
)

// Refusal is a Minter's refusal: a Result other than ResultOK, and the internal cause, which
// the server logs and never sends.
type Refusal struct {
	Result Result
	Err    error
}

func (r *Refusal) Error() string {
	if r.Err == nil {
		return "broker: " + string(r.Result)
	}
	return "broker: " + string(r.Result) + ": " + r.Err.Error()
}

func (r *Refusal) Unwrap() error { return r.Err }

// Refuse returns a Refusal of class res with cause err (may be nil).
func Refuse(res Result, err error) error { return &Refusal{Result: res, Err: err} }

// Request is one authenticated Mint: the caller's verified SPIFFE ID and what it asked.
type Request struct {
	Caller spiffeid.ID
	MintRequest
}

// Minter mints the token of a brokered credential for a caller, or refuses with a Refusal
// (any other error counts as ResultUnavailable). A name that is not a brokered credential's
// must be refused with ResultNotFound: the server uses the name as a metric label otherwise.
// The token must expire. The controller implements it.
type Minter interface {
	Mint(ctx context.Context, r Request) (credential.Token, error)
}

// ServerOptions configure a Server.
type ServerOptions struct {
	Minter Minter
	Logger *zap.Logger
	// Observe is told the result of every Mint (metrics). credential is "" when the name is not
	// a brokered credential's (not_found, invalid), so the label set stays bounded by the
	// configured names. Default: nothing.
	Observe func(credential string, r Result)
}

// Server serves Broker on a gRPC server whose transport is mTLS with X509-SVIDs.
type Server struct {
	minter  Minter
	log     *zap.Logger
	observe func(string, Result)
}

// NewServer returns a Server; Register puts it on a gRPC server.
func NewServer(o ServerOptions) (*Server, error) {
	if o.Minter == nil {
		return nil, errors.New("broker: the server needs a Minter")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Observe == nil {
		o.Observe = func(string, Result) {}
	}
	return &Server{minter: o.Minter, log: o.Logger, observe: o.Observe}, nil
}

// Register registers the Broker service on r (before it serves).
func (s *Server) Register(r grpc.ServiceRegistrar) { r.RegisterService(&serviceDesc, s) }

// mintService is the service's handler type (grpc checks the implementation against it).
type mintService interface {
	mint(ctx context.Context, in *structpb.Struct) (*structpb.Struct, error)
}

var serviceDesc = grpc.ServiceDesc{
	ServiceName: ServiceName,
	HandlerType: (*mintService)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Mint", Handler: mintHandler}},
	Metadata:    "escrow/broker/v1alpha1",
}

func mintHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	in := new(structpb.Struct)
	if err := dec(in); err != nil {
		return nil, err
	}
	if interceptor == nil {
		return srv.(mintService).mint(ctx, in)
	}
	info := &grpc.UnaryServerInfo{Server: srv, FullMethod: MintMethod}
	return interceptor(ctx, in, info, func(ctx context.Context, req any) (any, error) {
		return srv.(mintService).mint(ctx, req.(*structpb.Struct))
	})
}

func (s *Server) mint(ctx context.Context, in *structpb.Struct) (*structpb.Struct, error) {
	caller, err := PeerID(ctx)
	if err != nil {
		s.observe("", ResultDenied)
		s.log.Warn("refused a mint without an X509-SVID", zap.Error(err))
		return nil, status.Error(codes.Unauthenticated, "an X509-SVID is required")
	}
	req, err := DecodeRequest(in)
	if err != nil {
		s.observe("", ResultInvalid)
		s.log.Warn("refused a mint request that does not decode", zap.String("caller", caller.String()), zap.Error(err))
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	tok, err := s.minter.Mint(ctx, Request{Caller: caller, MintRequest: req})
	res := ResultOK
	if err != nil {
		res = ResultUnavailable
		var r *Refusal
		if errors.As(err, &r) {
			res = r.Result
		}
	}
	log := s.log.With(zap.String("caller", caller.String()), zap.String("credential", req.Credential), zap.String("result", string(res)))
	label := req.Credential
	if res == ResultNotFound || res == ResultInvalid {
		label = ""
	}
	if res != ResultOK {
		s.observe(label, res)
		log.Warn("refused a mint", zap.Error(err))
		return nil, refusal(res, req.Credential)
	}
	resp := responseOf(tok)
	err = resp.Check() // a token without expiry would be cached by sidecars until revoked
	var out *structpb.Struct
	if err == nil {
		out, err = EncodeResponse(resp)
	}
	if err != nil {
		s.observe(label, ResultUnavailable)
		log.Error("encoding a minted token", zap.Error(err))
		return nil, refusal(ResultUnavailable, req.Credential)
	}
	s.observe(label, ResultOK)
	log.Debug("minted", zap.String("credential_id", tok.ID()), zap.Time("expires_at", tok.ExpiresAt()))
	return out, nil
}

// refusal is the status a caller sees: the reason class and the credential's name, nothing of
// the cause.
func refusal(res Result, name string) error {
	switch res {
	case ResultDenied:
		return status.Errorf(codes.PermissionDenied, "this workload may not use credential %q", name)
	case ResultRevoked:
		return status.Errorf(codes.PermissionDenied, "credential %q is revoked for this workload", name)
	case ResultNotFound:
		return status.Errorf(codes.NotFound, "no brokered credential %q", name)
	case ResultInvalid:
		return status.Errorf(codes.InvalidArgument, "credential %q: invalid request", name)
	}
	return status.Errorf(codes.Unavailable, "credential %q could not be minted (the controller logs why)", name)
}

func responseOf(tok credential.Token) MintResponse {
	r := MintResponse{ExpiresAt: tok.ExpiresAt().UTC()}
	if !tok.MultiPart() {
		r.Value = tok.Value()
		return r
	}
	r.Parts = map[string]string{}
	for _, k := range tok.PartNames() {
		r.Parts[k] = tok.Part(k)
	}
	return r
}

// PeerID is the SPIFFE ID of the client certificate of ctx's connection, which the TLS
// handshake verified against the trust bundle.
func PeerID(ctx context.Context) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, errors.New("broker: no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("broker: no client certificate")
	}
	id, err := x509svid.IDFromCert(ti.State.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("broker: %w", err)
	}
	return id, nil
}
