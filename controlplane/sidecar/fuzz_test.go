package sidecar

import (
	"encoding/json"
	"testing"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/policy"
)

// FuzzMerge: whatever a controller pushes, merging it with the file's config either fails
// with an error or yields a validated config and a compiled policy set; it never panics.
func FuzzMerge(f *testing.F) {
	f.Add([]byte(`{"upstreams":[{"host":"api.example.com","credential":"k"}],"credentials":{"k":{"static":{"env":"K"}}},"policies":{"a/p.cedar":"@id(\"p\") permit (principal, action, resource);"}}`))
	f.Add([]byte(`{"upstreams":[{"host":"*.example.com","tunnel":true,"port":8443}],"policies":{"a/p.cedar":"forbid (principal, action, resource);"}}`))
	f.Add([]byte(`{"credentials":{"base":{"static":{"file":"/x"}}},"upstreams":[{"host":"a.example.com","inject":{"header":"X","value":"{{.Token}}"}}]}`))
	f.Add([]byte(`{}`))
	base, err := config.Parse([]byte("identity: {spiffe: {}}\nxds: {address: c:1}\ncredentials: {base: {static: {env: B}}}\nupstreams: [{host: base.example.com, credential: base}]\n"))
	if err != nil {
		f.Fatal(err)
	}
	basePol := policy.Source{Policies: map[string][]byte{"base.cedar": []byte(`@id("base") permit (principal, action, resource);`)}}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var b bundle.Bundle
		if json.Unmarshal(raw, &b) != nil {
			return
		}
		m, err := merge(base, basePol, b)
		if err != nil {
			return
		}
		if !m.config.Validated() || m.policies == nil {
			t.Fatalf("merge succeeded without a validated config and a policy set: %s", raw)
		}
		if len(m.config.Upstreams) != len(base.Upstreams)+len(b.Upstreams) {
			t.Fatalf("upstreams lost or added: %s", raw)
		}
	})
}
