package v1alpha1

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/escrowproxy/escrow/config"
)

var update = flag.Bool("update", false, "rewrite the chart's CRDs from the Go types")

const chartCRDs = "../../../charts/escrow/crds"

func TestCRDs_MatchTheChart(t *testing.T) {
	docs, err := CustomResourceDefinitions()
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.MkdirAll(chartCRDs, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, doc := range docs {
			if err := os.WriteFile(filepath.Join(chartCRDs, name), doc, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	ents, err := os.ReadDir(chartCRDs)
	if err != nil {
		t.Fatal(err)
	}
	var onDisk []string
	for _, e := range ents {
		onDisk = append(onDisk, e.Name())
	}
	var want []string
	for name := range docs {
		want = append(want, name)
	}
	slices.Sort(want)
	if !slices.Equal(onDisk, want) {
		t.Fatalf("charts/escrow/crds holds %v, want %v", onDisk, want)
	}
	for name, doc := range docs {
		got, _ := os.ReadFile(filepath.Join(chartCRDs, name))
		if !bytes.Equal(got, doc) {
			t.Errorf("charts/escrow/crds/%s differs from the Go types; run: go test ./controlplane/api/v1alpha1 -run TestCRDs_MatchTheChart -update", name)
		}
	}
}

// crd returns the openAPIV3Schema of the CRD for plural.
func crdSchema(t *testing.T, plural string) map[string]any {
	t.Helper()
	docs, err := CustomResourceDefinitions()
	if err != nil {
		t.Fatal(err)
	}
	var crd map[string]any
	if err := yaml.Unmarshal(docs[Group+"_"+plural+".yaml"], &crd); err != nil {
		t.Fatal(err)
	}
	v := crd["spec"].(map[string]any)["versions"].([]any)[0].(map[string]any)
	return v["schema"].(map[string]any)["openAPIV3Schema"].(map[string]any)
}

func props(s map[string]any, path ...string) map[string]any {
	for _, p := range path {
		s = s["properties"].(map[string]any)[p].(map[string]any)
	}
	return s
}

func TestCRDs_UpstreamSchemaHasEveryConfigKey(t *testing.T) {
	spec := props(crdSchema(t, "upstreams"), "spec")
	for _, k := range []string{"host", "port", "tunnel", "credential", "inject", "basic", "query", "address",
		"ca_file", "unsafe_plaintext_credential", "response_timeout", "scrub_responses", "mcp"} {
		if _, ok := spec["properties"].(map[string]any)[k]; !ok {
			t.Errorf("spec.%s missing from the Upstream schema", k)
		}
	}
	if got := spec["required"]; !slices.Equal(asStrings(got), []string{"host"}) {
		t.Errorf("required = %v, want [host]", got)
	}
	if got := props(spec, "inject")["required"]; !slices.Equal(asStrings(got), []string{"header"}) {
		t.Errorf("inject.required = %v, want [header]", got)
	}
}

func TestCRDs_CredentialSchemaTakesSecretReferencesNotFiles(t *testing.T) {
	spec := props(crdSchema(t, "credentials"), "spec")
	if _, ok := props(spec, "static", "secret_ref")["properties"].(map[string]any)["key"]; !ok {
		t.Fatal("static.secret_ref.key missing")
	}
	for _, p := range [][]string{{"static", "file"}, {"static", "env"}, {"oauth2", "client_secret_file"},
		{"token_exchange", "client_secret_file"}, {"github_app", "private_key_file"}} {
		if _, ok := props(spec, p[0])["properties"].(map[string]any)[p[1]]; ok {
			t.Errorf("%s.%s is in the schema: secrets must be references", p[0], p[1])
		}
	}
	for _, p := range [][]string{{"oauth2", "client_secret_ref"}, {"token_exchange", "client_secret_ref"}, {"github_app", "private_key_ref"}} {
		if _, ok := props(spec, p[0])["properties"].(map[string]any)[p[1]]; !ok {
			t.Errorf("%s.%s missing", p[0], p[1])
		}
	}
	if !slices.Contains(asStrings(props(spec, "github_app")["required"]), "private_key_ref") {
		t.Error("github_app.private_key_ref is not required")
	}
	// Every config provider has a block.
	for _, k := range []string{config.ProviderStatic, config.ProviderOAuth2, config.ProviderTokenExchange, config.ProviderAWS,
		config.ProviderGitHubApp, config.ProviderVault, config.ProviderGCP, config.ProviderAzure} {
		if _, ok := spec["properties"].(map[string]any)[k]; !ok {
			t.Errorf("provider %s missing", k)
		}
	}
}

func TestCRDs_RevocationNeedsASelector(t *testing.T) {
	spec := props(crdSchema(t, "revocations"), "spec")
	rules, _ := spec["x-kubernetes-validations"].([]any)
	if len(rules) != 1 || !strings.Contains(rules[0].(map[string]any)["rule"].(string), "has(self.credentials)") {
		t.Fatalf("x-kubernetes-validations = %v", rules)
	}
}

func TestCRDs_PolicyHasStatusSubresource(t *testing.T) {
	docs, _ := CustomResourceDefinitions()
	if !bytes.Contains(docs["escrow.dev_policies.yaml"], []byte("subresources:\n      status: {}")) {
		t.Fatalf("no status subresource:\n%s", docs["escrow.dev_policies.yaml"])
	}
}

func asStrings(v any) []string {
	var out []string
	switch x := v.(type) {
	case []any:
		for _, s := range x {
			out = append(out, s.(string))
		}
	case []string:
		out = x
	}
	return out
}

func TestDecode_Upstream(t *testing.T) {
	obj := map[string]any{
		"apiVersion": "escrow.dev/v1alpha1", "kind": "Upstream",
		"metadata": map[string]any{"name": "github", "namespace": "agents", "generation": int64(3)},
		"spec": map[string]any{
			"host": "api.github.com", "port": int64(443), "credential": "gh",
			"inject":           map[string]any{"header": "Authorization", "value": "token {{.Token}}"},
			"response_timeout": "30s",
		},
	}
	u, err := Decode[Upstream](obj)
	if err != nil {
		t.Fatal(err)
	}
	if u.Name != "github" || u.Namespace != "agents" || u.Generation != 3 {
		t.Errorf("meta = %+v", u.ObjectMeta)
	}
	if u.Spec.Host != "api.github.com" || u.Spec.Port != 443 || u.Spec.Credential != "gh" ||
		u.Spec.Inject == nil || u.Spec.Inject.Value != "token {{.Token}}" || u.Spec.Timeout.D().Seconds() != 30 {
		t.Errorf("spec = %+v", u.Spec)
	}
}

func TestDecode_RefusesUnknownFields(t *testing.T) {
	obj := map[string]any{
		"metadata": map[string]any{"name": "x", "namespace": "n"},
		"spec":     map[string]any{"host": "a.example", "hots": "typo"},
	}
	_, err := Decode[Upstream](obj)
	if err == nil || !strings.Contains(err.Error(), "hots") {
		t.Fatalf("err = %v, want one naming the unknown field", err)
	}
}

func TestDecode_Revocation(t *testing.T) {
	r, err := Decode[Revocation](map[string]any{
		"metadata": map[string]any{"name": "stop", "namespace": "n"},
		"spec": map[string]any{"spiffe_ids": []any{"spiffe://td/ns/n/sa/a"}, "credentials": []any{"gh"},
			"reason": "leaked"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.Spec.SPIFFEIDs, []string{"spiffe://td/ns/n/sa/a"}) || !slices.Equal(r.Spec.Credentials, []string{"gh"}) || r.Spec.Reason != "leaked" {
		t.Errorf("spec = %+v", r.Spec)
	}
}

func TestCredentialSpec_SecretReferencesBecomeSidecarFiles(t *testing.T) {
	c, err := Decode[Credential](map[string]any{
		"metadata": map[string]any{"name": "gh", "namespace": "n"},
		"spec": map[string]any{"github_app": map[string]any{
			"app_id": int64(1), "installation_id": int64(2),
			"private_key_ref": map[string]any{"name": "gh-app", "key": "key.pem"},
			"permissions":     map[string]any{"contents": "read"},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := c.Spec.Config()
	if err != nil {
		t.Fatal(err)
	}
	if cc.GitHubApp == nil || cc.GitHubApp.PrivateKeyFile != SecretsDir+"/gh-app/key.pem" || cc.GitHubApp.AppID != 1 ||
		cc.GitHubApp.Permissions["contents"] != "read" {
		t.Fatalf("config = %+v", cc.GitHubApp)
	}
	if cc.Provider() != config.ProviderGitHubApp {
		t.Errorf("provider = %q", cc.Provider())
	}

	s := CredentialSpec{Static: &StaticSpec{SecretRef: SecretKeyRef{Name: "openai", Key: "api-key"}}}
	cc, err = s.Config()
	if err != nil || cc.Static.File != "/var/run/escrow-secrets/openai/api-key" || cc.Static.Env != "" {
		t.Fatalf("static = %+v, %v", cc.Static, err)
	}
	o := CredentialSpec{OAuth2: &OAuth2Spec{OAuth2: config.OAuth2{TokenURL: "https://idp/token", ClientID: "c"},
		ClientSecretRef: &SecretKeyRef{Name: "idp", Key: "secret"}}}
	cc, err = o.Config()
	if err != nil || cc.OAuth2.ClientSecretFile != SecretsDir+"/idp/secret" || cc.OAuth2.TokenURL != "https://idp/token" {
		t.Fatalf("oauth2 = %+v, %v", cc.OAuth2, err)
	}
}

func TestCredentialSpec_RefusesPathsAndBadReferences(t *testing.T) {
	for name, s := range map[string]CredentialSpec{
		"oauth2 file": {OAuth2: &OAuth2Spec{OAuth2: config.OAuth2{ClientSecretFile: "/etc/passwd"}}},
		"github file": {GitHubApp: &GitHubAppSpec{GitHubApp: config.GitHubApp{PrivateKeyFile: "/k"},
			PrivateKeyRef: SecretKeyRef{Name: "a", Key: "b"}}},
		"key ..":        {Static: &StaticSpec{SecretRef: SecretKeyRef{Name: "a", Key: ".."}}},
		"key ../x":      {Static: &StaticSpec{SecretRef: SecretKeyRef{Name: "a", Key: "../x"}}},
		"name slash":    {Static: &StaticSpec{SecretRef: SecretKeyRef{Name: "a/b", Key: "k"}}},
		"name upper":    {Static: &StaticSpec{SecretRef: SecretKeyRef{Name: "A", Key: "k"}}},
		"empty key":     {Static: &StaticSpec{SecretRef: SecretKeyRef{Name: "a"}}},
		"token ex file": {TokenExchange: &TokenExchangeSpec{TokenExchange: config.TokenExchange{ClientSecretFile: "/x"}}},
	} {
		if _, err := s.Config(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestEncode_RoundTripsThroughDecode(t *testing.T) {
	in := Upstream{Spec: config.Upstream{Host: "a.example", Port: 8443, Inject: &config.Inject{Header: "X-Key"}}}
	in.Name, in.Namespace = "a", "n"
	m, err := Encode(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := Decode[Upstream](m)
	if err != nil {
		t.Fatal(err)
	}
	if out.Spec.Host != "a.example" || out.Spec.Port != 8443 || out.Spec.Inject.Header != "X-Key" || out.Name != "a" {
		t.Errorf("round trip = %+v", out)
	}
}
