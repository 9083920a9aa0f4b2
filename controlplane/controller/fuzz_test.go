package controller

import (
	"encoding/json"
	"testing"

	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/bundle"
)

// FuzzServedBundlesValidate: whatever objects the API server hands the controller (any JSON
// for an Upstream's and a Credential's spec), the bundle it serves passes the sidecar's config
// validation and the bundle's own Check, so no object can make a namespace's sidecars NACK.
func FuzzServedBundlesValidate(f *testing.F) {
	f.Add([]byte(`{"host":"api.github.com","credential":"gh"}`), []byte(`{"static":{"secret_ref":{"name":"gh","key":"token"}}}`))
	f.Add([]byte(`{"host":"x.example","credential":"gh","inject":{"header":"Bad Header"}}`), []byte(`{"oauth2":{"token_url":"nope","client_id":"c"}}`))
	f.Add([]byte(`{"host":"*.example.com","port":8443,"tunnel":true}`), []byte(`{"github_app":{"app_id":1,"installation_id":2,"private_key_ref":{"name":"a","key":"b"}}}`))
	f.Add([]byte(`{"host":"a.example","credential":"gh","basic":{"username":"u"},"query":{"param":"k"}}`), []byte(`{"aws":{"region":"us-east-1","web_identity":{"jwt_svid":{"audience":"sts"}}}}`))
	f.Add([]byte(`{"host":"api.github.com","credential":"gh"}`), []byte(`{"github_app":{"app_id":1,"installation_id":2,"private_key_ref":{"name":"a","key":"b"}},"broker":{"spiffe_id_prefixes":["spiffe://example.org/ns/agents"]}}`))
	f.Fuzz(func(t *testing.T, upSpec, credSpec []byte) {
		obj := func(kind, name string, spec []byte) map[string]any {
			var s any
			if json.Unmarshal(spec, &s) != nil {
				s = map[string]any{}
			}
			return map[string]any{"apiVersion": "escrow.dev/v1alpha1", "kind": kind,
				"metadata": map[string]any{"name": name, "namespace": "agents"}, "spec": s}
		}
		var objs Objects
		if u, err := v1alpha1.Decode[v1alpha1.Upstream](obj("Upstream", "u", upSpec)); err == nil {
			objs.Upstreams = append(objs.Upstreams, *u)
		}
		if c, err := v1alpha1.Decode[v1alpha1.Credential](obj("Credential", "gh", credSpec)); err == nil {
			objs.Credentials = append(objs.Credentials, *c)
		}
		// The same objects with the Credential cluster-wide (where a brokered one is served).
		cluster := Objects{Upstreams: objs.Upstreams}
		for _, c := range objs.Credentials {
			c.Namespace = sys
			cluster.Credentials = append(cluster.Credentials, c)
		}
		for _, o := range []Objects{objs, cluster} {
			v := Compute(o, sys)
			b := v.BundleFor(agentsID)
			if errs := configErrors(b); len(errs) != 0 {
				t.Fatalf("served bundle does not validate: %v\n%+v", errs, b)
			}
			if err := b.Check(); err != nil {
				t.Fatal(err)
			}
			if _, err := bundle.Encode(b); err != nil {
				t.Fatal(err)
			}
			// A brokered credential reaches sidecars as its kind alone.
			for name := range v.Brokered() {
				if c, ok := b.Credentials[name]; ok && (c.Broker == nil || c.Provider() != "broker") {
					t.Fatalf("brokered %s served as %+v", name, c)
				}
			}
		}
	})
}
