package controlplane_test

import (
	"strings"
	"testing"
)

func TestCRDs_AcceptValidObjectsAndShowColumns(t *testing.T) {
	ns := namespace(t, "crd-valid")
	kubectl(t, yamlDoc("Upstream", ns, "github", `host: api.github.com
port: 443
credential: gh
inject: {header: Authorization, value: "token {{.Token}}"}
response_timeout: 30s`), "apply", "-f", "-")
	kubectl(t, yamlDoc("Credential", ns, "gh", `static: {secret_ref: {name: gh-token, key: token}}`), "apply", "-f", "-")
	kubectl(t, yamlDoc("Credential", ns, "app", `github_app: {app_id: 1, installation_id: 2, private_key_ref: {name: app, key: key.pem}, permissions: {contents: read}}`), "apply", "-f", "-")
	kubectl(t, yamlDoc("Revocation", ns, "leak", `spiffe_ids: ["spiffe://td/ns/crd-valid/sa/agent"]
reason: key leaked`), "apply", "-f", "-")
	kubectl(t, yamlDoc("Policy", ns, "allow", `cedar: |
  @id("allow-github")
  permit(principal, action, resource == Host::"api.github.com");`), "apply", "-f", "-")

	out := kubectl(t, "", "get", "upstreams", "-n", ns)
	for _, want := range []string{"HOST", "PORT", "TUNNEL", "CREDENTIAL", "ACCEPTED", "REASON", "api.github.com", "443", "gh"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl get upstreams lacks %q:\n%s", want, out)
		}
	}
	out = kubectl(t, "", "get", "revocations", "-n", ns)
	for _, want := range []string{"ACCEPTED", "ACCEPTED-REASON", "REASON", "key leaked", "spiffe://td/ns/crd-valid/sa/agent"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl get revocations lacks %q:\n%s", want, out)
		}
	}
	for _, kind := range []string{"policies", "upstreams", "credentials", "revocations"} {
		header, _, _ := strings.Cut(kubectl(t, "", "get", kind, "-n", ns, "-o", "wide"), "\n")
		for _, want := range []string{"ACCEPTED", "MESSAGE"} {
			if !strings.Contains(header, want) {
				t.Errorf("kubectl get %s -o wide lacks %s: %s", kind, want, header)
			}
		}
	}
	out = kubectl(t, "", "get", "escrow", "-n", ns) // the category lists all four kinds
	for _, want := range []string{"policy.escrow.dev/allow", "upstream.escrow.dev/github", "credential.escrow.dev/gh", "revocation.escrow.dev/leak"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl get escrow lacks %q:\n%s", want, out)
		}
	}
}

func TestCRDs_RefuseInvalidObjects(t *testing.T) {
	ns := namespace(t, "crd-invalid")
	for name, c := range map[string]struct{ doc, want string }{
		"revocation without selector": {yamlDoc("Revocation", ns, "r1", `reason: nothing named`), "at least one of"},
		"revocation bad id":           {yamlDoc("Revocation", ns, "r2", `spiffe_ids: ["https://x"]`), "spiffe_ids"},
		"upstream without host":       {yamlDoc("Upstream", ns, "u1", `port: 443`), "host"},
		"upstream port out of range":  {yamlDoc("Upstream", ns, "u2", "host: a.example\nport: 70000"), "port"},
		"upstream unknown field":      {yamlDoc("Upstream", ns, "u3", "host: a.example\nhots: x"), "hots"},
		"credential two providers":    {yamlDoc("Credential", ns, "c1", "static: {secret_ref: {name: a, key: b}}\nazure: {tenant_id: t, client_id: c, scope: s}"), "spec"},
		"credential file path":        {yamlDoc("Credential", ns, "c2", "static: {file: /etc/secret}"), "file"},
		"policy without cedar":        {yamlDoc("Policy", ns, "p1", `{}`), "cedar"},
		"duration not a duration":     {yamlDoc("Upstream", ns, "u4", "host: a.example\nresponse_timeout: soon"), "response_timeout"},
	} {
		err := kubectlErr(t, c.doc, "apply", "-f", "-")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one naming %q", name, err, c.want)
		}
	}
	if out := kubectl(t, "", "get", "escrow", "-n", ns, "-o", "name"); strings.TrimSpace(out) != "" {
		t.Errorf("refused objects were stored: %s", out)
	}
}
