package controlplane_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

type rbacRule struct {
	APIGroups []string `json:"apiGroups"`
	Resources []string `json:"resources"`
	Verbs     []string `json:"verbs"`
}

// grants flattens rules into sorted "group/resource:verb" strings.
func grants(t *testing.T, where, rulesYAML string) []string {
	t.Helper()
	var doc struct {
		Rules []rbacRule `json:"rules"`
	}
	if err := yaml.Unmarshal([]byte(rulesYAML), &doc); err != nil {
		t.Fatalf("%s: %v\n%s", where, err, rulesYAML)
	}
	var g []string
	for _, r := range doc.Rules {
		for _, grp := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					g = append(g, grp+"/"+res+":"+v)
				}
			}
		}
	}
	slices.Sort(g)
	if len(g) == 0 {
		t.Fatalf("%s: no rules found", where)
	}
	return g
}

// section returns the text of file from the first line starting with from (included) to the
// first later line that starts with until (excluded).
func section(t *testing.T, file, from, until string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repoRoot, file))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(raw), from)
	if !ok {
		t.Fatalf("%s has no %q", file, from)
	}
	body, _, ok := strings.Cut(rest, until)
	if !ok {
		t.Fatalf("%s has no %q after %q", file, until, from)
	}
	return from + body
}

// The RBAC the controller runs with here (rbac), the chart's ClusterRole and the block in
// docs/controlplane.md must grant the same: what the tests prove is what operators install.
func TestRBAC_TheTestsTheChartAndTheDocsGrantTheSame(t *testing.T) {
	tests := grants(t, "rbac", section(t, "test/controlplane/controller_test.go", "rules:\n", "---"))
	chart := grants(t, "chart", section(t, "charts/escrow/templates/controller.yaml", "rules:\n", "---"))
	docs := grants(t, "docs", section(t, "docs/controlplane.md", "rules:\n", "```"))
	if !slices.Equal(tests, chart) || !slices.Equal(tests, docs) {
		t.Errorf("RBAC differs:\ntests: %v\nchart: %v\ndocs:  %v", tests, chart, docs)
	}
	for _, res := range []string{"policies", "upstreams", "credentials", "revocations"} {
		if !slices.Contains(tests, "escrow.dev/"+res+"/status:update") {
			t.Errorf("no update on %s/status: %v", res, tests)
		}
	}
}
