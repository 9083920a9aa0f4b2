package broker

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/escrowproxy/escrow/credential"
)

// Client asks the controller for brokered tokens over conn (the sidecar's mTLS connection to
// the controller, shared with its xDS subscription). It implements credential.Broker.
type Client struct {
	conn grpc.ClientConnInterface
}

// NewClient returns a Client over conn.
func NewClient(conn grpc.ClientConnInterface) *Client { return &Client{conn: conn} }

// Mint asks for the current token of credential r.Name. A refusal is an error naming the
// gRPC code and the controller's message (which never holds a secret).
func (c *Client) Mint(ctx context.Context, r credential.BrokerRequest) (credential.Token, error) {
	in, err := EncodeRequest(MintRequest{Credential: r.Name, Scope: r.Scope})
	if err != nil {
		return credential.Token{}, err
	}
	out := new(structpb.Struct)
	if err := c.conn.Invoke(ctx, MintMethod, in, out); err != nil {
		st := status.Convert(err)
		return credential.Token{}, fmt.Errorf("the controller answered %s: %s", st.Code(), st.Message())
	}
	resp, err := DecodeResponse(out)
	if err != nil {
		return credential.Token{}, err
	}
	if resp.Parts != nil {
		return credential.NewTokenParts(r.Name, resp.Parts, resp.ExpiresAt), nil
	}
	return credential.NewToken(r.Name, resp.Value, resp.ExpiresAt), nil
}

var _ credential.Broker = (*Client)(nil)
