package main

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/broker"
	"github.com/escrowproxy/escrow/controlplane/sidecar"
	"github.com/escrowproxy/escrow/credential"
	"github.com/escrowproxy/escrow/proxy"
)

// xdsClient connects a running sidecar to `escrow controller` (config xds): mTLS with the
// sidecar's own X509-SVID, node id = its SPIFFE ID, every bundle applied through the sidecar's
// one update path.
type xdsClient struct {
	sub atomic.Pointer[sidecar.Subscriber]
	// broker mints brokered credentials over the same connection; it exists before the
	// connection does (the credentials are built first), so it is bound late.
	broker lateBroker
}

// lateBroker is the credential.Broker handed to the sidecar at build time. Until the
// controller connection is made (xds.run, once the identity source is up) and after it closes, every mint
// fails (fail closed: the request is answered 503 credential_unavailable).
type lateBroker struct {
	c atomic.Pointer[broker.Client]
}

func (b *lateBroker) Mint(ctx context.Context, r credential.BrokerRequest) (credential.Token, error) {
	c := b.c.Load()
	if c == nil {
		return credential.Token{}, errors.New("not connected to the controller yet (waiting for the X509-SVID)")
	}
	return c.Mint(ctx, r)
}

// ready is the sidecar's "xds" /readyz check.
func (x *xdsClient) ready() error {
	if s := x.sub.Load(); s != nil {
		return s.Ready()
	}
	return errors.New("not subscribed to the controller yet (waiting for the X509-SVID)")
}

type x509Sources interface {
	X509Source() interface {
		x509svid.Source
		x509bundle.Source
	}
}

// run subscribes until ctx ends. It waits for the first X509-SVID: the controller refuses a
// stream whose node id is not the SVID's SPIFFE ID.
func (x *xdsClient) run(ctx context.Context, cfg *config.Config, sc *proxy.Sidecar, log *zap.Logger) error {
	src, ok := sc.Identity().(x509Sources)
	if !ok {
		return errors.New("escrow proxy: xds needs identity.spiffe (the controller authenticates the sidecar's X509-SVID)")
	}
	svids := src.X509Source()
	creds, err := sidecar.MTLS(cfg.XDS, svids, svids)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(cfg.XDS.Address, grpc.WithTransportCredentials(creds))
	if err != nil {
		return fmt.Errorf("escrow proxy: xds.address: %w", err)
	}
	defer conn.Close()
	x.broker.c.Store(broker.NewClient(conn))
	defer x.broker.c.Store(nil)
	var nodeID string
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		if svid, err := svids.GetX509SVID(); err == nil {
			nodeID = svid.ID.String()
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
	sub, err := sidecar.New(sidecar.Options{
		Base:   cfg,
		Conn:   conn,
		NodeID: nodeID,
		Logger: log,
		Apply: func(ctx context.Context, u sidecar.Update) error {
			revs := make([]proxy.Revocation, len(u.Revocations))
			for i, r := range u.Revocations {
				revs[i] = proxy.Revocation(r)
			}
			return sc.Update(ctx, proxy.Update{Config: u.Config, PolicySet: u.Policies, Revocations: &revs})
		},
	})
	if err != nil {
		return err
	}
	if err := sub.Register(sc.Metrics.Registry); err != nil {
		return err
	}
	x.sub.Store(sub)
	log.Info("subscribing to the controller", zap.String("address", cfg.XDS.Address), zap.String("node_id", nodeID))
	if err := sub.Run(ctx); err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}
