// Package deps pins the module's dependencies while packages are being written.
package deps

import (
	_ "github.com/cedar-policy/cedar-go"
	_ "github.com/cedar-policy/cedar-go/x/exp/schema"
	_ "github.com/cedar-policy/cedar-go/x/exp/schema/validate"
	_ "github.com/go-jose/go-jose/v4"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/prometheus/client_golang/prometheus/promhttp"
	_ "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	_ "github.com/spiffe/go-spiffe/v2/workloadapi"
	_ "go.uber.org/zap"
	_ "golang.org/x/sync/singleflight"
	_ "google.golang.org/grpc"
	_ "sigs.k8s.io/yaml"
)
