package k8s_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// docStep is one block of a document marked `<!-- step: NAME -->`: what the test runs.
type docStep struct {
	Name, Lang, Body string
}

var (
	stepMarker = regexp.MustCompile(`<!-- step: ([a-z0-9-]+) -->`)
	stepBlock  = regexp.MustCompile("(?s)<!-- step: ([a-z0-9-]+) -->\n```(sh|yaml)\n(.*?)```")
)

// docSteps returns the marked blocks of a document under docs/, in order. A marker that is not
// directly followed by a sh or yaml block fails the test: a step cannot silently drop out.
func docSteps(t *testing.T, doc string) []docStep {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "docs", doc))
	if err != nil {
		t.Fatal(err)
	}
	var steps []docStep
	for _, m := range stepBlock.FindAllStringSubmatch(string(b), -1) {
		steps = append(steps, docStep{Name: m[1], Lang: m[2], Body: m[3]})
	}
	if n := len(stepMarker.FindAllString(string(b), -1)); n != len(steps) {
		t.Fatalf("docs/%s: %d step markers but %d are directly followed by a ```sh or ```yaml block", doc, n, len(steps))
	}
	return steps
}

// checkStepNames fails unless the document's steps are exactly want, in order.
func checkStepNames(t *testing.T, doc string, steps []docStep, want []string) {
	t.Helper()
	var got []string
	for _, s := range steps {
		got = append(got, s.Name)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("docs/%s's steps are\n  %s\nbut the test plays\n  %s\nChange both together.", doc, strings.Join(got, " "), strings.Join(want, " "))
	}
}

// substituted replaces old with new in a step, failing if the step no longer says old: a
// substitution the test makes must match what the document says, or the two have drifted.
func (s docStep) substituted(t *testing.T, old, new string) docStep {
	t.Helper()
	if !strings.Contains(s.Body, old) {
		t.Fatalf("step %s no longer contains %q, which the test substitutes (see docs/walkthrough.md, How this page is tested):\n%s", s.Name, old, s.Body)
	}
	s.Body = strings.ReplaceAll(s.Body, old, new)
	return s
}
