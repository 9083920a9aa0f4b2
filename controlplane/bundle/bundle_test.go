package bundle_test

import (
	"reflect"
	"strings"
	"testing"

	xdstype "github.com/cncf/xds/go/xds/type/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
)

func sample() bundle.Bundle {
	return bundle.Bundle{
		Version: "v7",
		Upstreams: []config.Upstream{
			{Host: "api.github.com", Credential: "github"},
			{Host: "pypi.org", Port: 443, Tunnel: true},
		},
		Credentials: map[string]config.Credential{
			"github": {Static: &config.Static{Env: "GITHUB_TOKEN"}},
		},
		Policies: map[string]string{"agents/allow-github.cedar": `@id("allow-github") permit (principal, action, resource == Host::"api.github.com");`},
		Revocations: []bundle.Revocation{{
			Name: "escrow-system/incident-7", SPIFFEIDPrefixes: []string{"spiffe://example.org/ns/agents"},
			Credentials: []string{"github"}, Reason: "leaked",
		}},
	}
}

func encode(t *testing.T, b bundle.Bundle) *anypb.Any {
	t.Helper()
	tec, err := bundle.Encode(b)
	if err != nil {
		t.Fatal(err)
	}
	a, err := anypb.New(tec)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestBundle_RoundTripsThroughTheXDSResource(t *testing.T) {
	in := sample()
	out, err := bundle.Decode([]*anypb.Any{encode(t, in)})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("decoded %+v\nwant %+v", out, in)
	}
}

func TestBundle_NoResourceIsAnEmptyBundle(t *testing.T) {
	b, err := bundle.Decode(nil)
	if err != nil || !reflect.DeepEqual(b, bundle.Bundle{}) {
		t.Fatalf("Decode(nil) = %+v, %v", b, err)
	}
}

// typed builds a resource by hand, to send what a controller should never send.
func typed(t *testing.T, name, typeURL string, v map[string]any) *anypb.Any {
	t.Helper()
	st, err := structpb.NewStruct(v)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := anypb.New(&xdstype.TypedStruct{TypeUrl: typeURL, Value: st})
	if err != nil {
		t.Fatal(err)
	}
	a, err := anypb.New(&core.TypedExtensionConfig{Name: name, TypedConfig: ts})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestBundle_DecodeRefusesWhatItCannotReadExactly(t *testing.T) {
	good := encode(t, sample())
	notTEC, _ := anypb.New(structpb.NewStringValue("x"))
	for name, tc := range map[string]struct {
		res  []*anypb.Any
		want string
	}{
		"two resources":    {[]*anypb.Any{good, good}, "2 resources"},
		"not a TEC":        {[]*anypb.Any{notTEC}, "not a TypedExtensionConfig"},
		"other name":       {[]*anypb.Any{typed(t, "other", bundle.TypeURL, map[string]any{})}, `resource "other"`},
		"other type URL":   {[]*anypb.Any{typed(t, bundle.ResourceName, "type.googleapis.com/x.Y", map[string]any{})}, "type_url"},
		"unknown field":    {[]*anypb.Any{typed(t, bundle.ResourceName, bundle.TypeURL, map[string]any{"version": "1", "kill_switch": true})}, "kill_switch"},
		"unknown upstream": {[]*anypb.Any{typed(t, bundle.ResourceName, bundle.TypeURL, map[string]any{"upstreams": []any{map[string]any{"host": "a", "hots": "b"}}})}, "hots"},
		"wrong type":       {[]*anypb.Any{typed(t, bundle.ResourceName, bundle.TypeURL, map[string]any{"policies": "x"})}, "policies"},
		"empty revocation": {[]*anypb.Any{typed(t, bundle.ResourceName, bundle.TypeURL, map[string]any{"revocations": []any{map[string]any{"name": "a/b"}}})}, "names no SPIFFE ID"},
		"bad prefix":       {[]*anypb.Any{typed(t, bundle.ResourceName, bundle.TypeURL, map[string]any{"revocations": []any{map[string]any{"name": "a/b", "spiffe_id_prefixes": []any{"spiffe://"}}}})}, "not a spiffe:// prefix"},
		"policy name":      {[]*anypb.Any{typed(t, bundle.ResourceName, bundle.TypeURL, map[string]any{"policies": map[string]any{"a/b.txt": "permit(principal,action,resource);"}})}, "must end in .cedar"},
		"huge policy":      {[]*anypb.Any{typed(t, bundle.ResourceName, bundle.TypeURL, map[string]any{"policies": map[string]any{"a/b.cedar": strings.Repeat("x", bundle.MaxPolicyBytes+1)}})}, "more than"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := bundle.Decode(tc.res)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "bundle: ") {
				t.Fatalf("Decode: %v; want an error naming %q", err, tc.want)
			}
		})
	}
}

func TestRevocation_CoversIDsAndPrefixesAtSegmentBoundaries(t *testing.T) {
	r := bundle.Revocation{
		SPIFFEIDs:        []string{"spiffe://example.org/ns/x/sa/one"},
		SPIFFEIDPrefixes: []string{"spiffe://example.org/ns/agents/"},
	}
	for id, want := range map[string]bool{
		"spiffe://example.org/ns/x/sa/one":     true,
		"spiffe://example.org/ns/x/sa/one2":    false,
		"spiffe://example.org/ns/agents":       true,
		"spiffe://example.org/ns/agents/sa/a":  true,
		"spiffe://example.org/ns/agentsx/sa/a": false,
		"spiffe://other.org/ns/agents/sa/a":    false,
		"":                                     false,
	} {
		if got := r.Covers(id); got != want {
			t.Errorf("Covers(%q) = %v, want %v", id, got, want)
		}
	}
}

// FuzzDecode: whatever a controller (or an attacker on a broken channel) sends, Decode returns
// an error or a Bundle that passes Check; it never panics.
func FuzzDecode(f *testing.F) {
	tec, _ := bundle.Encode(sample())
	seed, _ := anypb.New(tec)
	f.Add(seed.GetValue())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, raw []byte) {
		a := &anypb.Any{TypeUrl: "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", Value: raw}
		b, err := bundle.Decode([]*anypb.Any{a})
		if err != nil {
			return
		}
		if err := b.Check(); err != nil {
			t.Fatalf("Decode accepted a bundle Check refuses: %v", err)
		}
	})
}
