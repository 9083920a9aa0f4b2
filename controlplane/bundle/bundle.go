// Package bundle is the wire contract between `escrow controller` and the sidecars it serves:
// what one sidecar receives over xDS, and how it travels.
//
// A sidecar subscribes over ADS to one type, ECDS's TypedExtensionConfig, and receives exactly
// one resource named ResourceName. Its typed_config is an xds.type.v3.TypedStruct whose
// type_url is TypeURL and whose value is the Bundle as a google.protobuf.Struct (the Bundle's
// JSON form). A Bundle is always complete: it replaces the previous one whole, so a sidecar
// never has to merge deltas, and an empty Bundle means "nothing pushed" (the sidecar's own file
// config and policies still apply).
//
// Decode is strict (unknown fields, a wrong type URL, a second resource are errors) because
// the sidecar NACKs what it cannot read exactly: a controller newer than the sidecar must not
// have half of its intent silently dropped.
package bundle

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	xdstype "github.com/cncf/xds/go/xds/type/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/escrowproxy/escrow/config"
)

const (
	// ResourceName is the name of the one TypedExtensionConfig a sidecar receives.
	ResourceName = "escrow.bundle"
	// TypeURL names the Bundle inside the TypedStruct.
	TypeURL = "type.googleapis.com/escrow.v1alpha1.Bundle"
	// MaxPolicyBytes bounds one policy's Cedar text (the CRD's OpenAPI schema says the same).
	MaxPolicyBytes = 256 << 10
)

// Bundle is everything the control plane sets for one sidecar.
type Bundle struct {
	// Version identifies this content (the controller derives it from the resources'
	// generations); the sidecar reports it in /readyz, /metrics and its ACKs.
	Version string `json:"version"`
	// Upstreams and Credentials are added to those of the sidecar's own config file, and the
	// whole is validated exactly as a file would be. A name in both is an error (NACK).
	Upstreams   []config.Upstream            `json:"upstreams,omitempty"`
	Credentials map[string]config.Credential `json:"credentials,omitempty"`
	// Policies maps a unique name ("<namespace>/<Policy name>.cedar") to Cedar text. They are
	// added to the sidecar's own policy directory, if any, and validated as one set.
	Policies map[string]string `json:"policies,omitempty"`
	// Revocations deny identities and drop credentials while they are present.
	Revocations []Revocation `json:"revocations,omitempty"`
}

// Revocation is one Revocation object as the sidecar applies it. At least one of SPIFFEIDs,
// SPIFFEIDPrefixes and Credentials is set.
type Revocation struct {
	// Name is "<namespace>/<name>" of the object (audit records name it).
	Name string `json:"name"`
	// SPIFFEIDs are denied exactly; SPIFFEIDPrefixes deny every ID that starts with one of
	// them at a path-segment boundary ("spiffe://td/ns/a" covers ".../ns/a/sa/b", not
	// ".../ns/ab").
	SPIFFEIDs        []string `json:"spiffe_ids,omitempty"`
	SPIFFEIDPrefixes []string `json:"spiffe_id_prefixes,omitempty"`
	// Credentials are dropped from the cache (and revoked upstream where the provider can) and
	// not minted again while the revocation exists.
	Credentials []string `json:"credentials,omitempty"`
	Reason      string   `json:"reason,omitempty"`
}

// Covers reports whether the revocation denies id.
func (r Revocation) Covers(id string) bool {
	for _, x := range r.SPIFFEIDs {
		if x == id {
			return true
		}
	}
	for _, p := range r.SPIFFEIDPrefixes {
		p = strings.TrimSuffix(p, "/")
		if id == p || strings.HasPrefix(id, p+"/") {
			return true
		}
	}
	return false
}

// Check reports what makes b unusable regardless of the sidecar's own config: empty names,
// an empty revocation, oversized policies. Config and Cedar validation happen where the
// sidecar merges b with its own config.
func (b Bundle) Check() error {
	var errs []string
	for name, text := range b.Policies {
		if name == "" || !strings.HasSuffix(name, ".cedar") {
			errs = append(errs, fmt.Sprintf("policies[%q]: the name must end in .cedar", name))
		}
		if len(text) > MaxPolicyBytes {
			errs = append(errs, fmt.Sprintf("policies[%q]: %d bytes, more than %d", name, len(text), MaxPolicyBytes))
		}
	}
	for i, r := range b.Revocations {
		if r.Name == "" {
			errs = append(errs, fmt.Sprintf("revocations[%d].name: required", i))
		}
		if len(r.SPIFFEIDs)+len(r.SPIFFEIDPrefixes)+len(r.Credentials) == 0 {
			errs = append(errs, fmt.Sprintf("revocations[%d]: names no SPIFFE ID, prefix or credential", i))
		}
		for _, p := range r.SPIFFEIDPrefixes {
			if !strings.HasPrefix(p, "spiffe://") || len(strings.TrimSuffix(p, "/")) <= len("spiffe://") {
				errs = append(errs, fmt.Sprintf("revocations[%d].spiffe_id_prefixes: %q is not a spiffe:// prefix with a trust domain", i, p))
			}
		}
	}
	if len(errs) == 0 {
		return nil
	}
	sort.Strings(errs)
	return errors.New("bundle: " + strings.Join(errs, "; "))
}

// Encode wraps b as the TypedExtensionConfig a sidecar receives.
func Encode(b Bundle) (*core.TypedExtensionConfig, error) {
	raw, err := json.Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("bundle: encode: %w", err)
	}
	st := &structpb.Struct{}
	if err := protojson.Unmarshal(raw, st); err != nil {
		return nil, fmt.Errorf("bundle: encode: %w", err)
	}
	ts, err := anypb.New(&xdstype.TypedStruct{TypeUrl: TypeURL, Value: st})
	if err != nil {
		return nil, fmt.Errorf("bundle: encode: %w", err)
	}
	return &core.TypedExtensionConfig{Name: ResourceName, TypedConfig: ts}, nil
}

// Decode reads the resources of one xDS response (each an Any holding a
// TypedExtensionConfig). No resource at all is an empty Bundle.
func Decode(resources []*anypb.Any) (Bundle, error) {
	switch len(resources) {
	case 0:
		return Bundle{}, nil
	case 1:
	default:
		return Bundle{}, fmt.Errorf("bundle: %d resources, want one named %q", len(resources), ResourceName)
	}
	var tec core.TypedExtensionConfig
	if err := resources[0].UnmarshalTo(&tec); err != nil {
		return Bundle{}, fmt.Errorf("bundle: the resource is not a TypedExtensionConfig: %w", err)
	}
	if tec.GetName() != ResourceName {
		return Bundle{}, fmt.Errorf("bundle: resource %q, want %q", tec.GetName(), ResourceName)
	}
	var ts xdstype.TypedStruct
	if tec.GetTypedConfig() == nil || tec.GetTypedConfig().UnmarshalTo(&ts) != nil {
		return Bundle{}, errors.New("bundle: typed_config is not an xds.type.v3.TypedStruct")
	}
	if ts.GetTypeUrl() != TypeURL {
		return Bundle{}, fmt.Errorf("bundle: type_url %q, want %q", ts.GetTypeUrl(), TypeURL)
	}
	raw, err := protojson.Marshal(ts.GetValue())
	if err != nil {
		return Bundle{}, fmt.Errorf("bundle: %w", err)
	}
	var b Bundle
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return Bundle{}, fmt.Errorf("bundle: %w", err)
	}
	if err := b.Check(); err != nil {
		return Bundle{}, err
	}
	return b, nil
}
