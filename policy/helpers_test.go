package policy

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/attest"
)

const (
	coderID    = "spiffe://example.org/ns/agents/sa/coder"
	reviewerID = "spiffe://example.org/ns/agents/sa/reviewer"
	etlID      = "spiffe://example.org/ns/batch/sa/etl"
	vmID       = "spiffe://example.org/vm/builder"
)

var testNow = time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)

func fixedClock() time.Time { return testNow }

// writeDir writes files (name → content) into a new temp dir and returns it.
func writeDir(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	writeFiles(t, dir, files)
	return dir
}

func writeFiles(t testing.TB, dir string, files map[string]string) {
	t.Helper()
	// Atomically (temp file + rename), as Kubernetes volume updates and most editors do: the
	// watch tests poll every millisecond and must not see a file half-written.
	for name, content := range files {
		tmp := filepath.Join(dir, ".tmp-"+name)
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
}

// loaded returns an enforcing engine with the given policies loaded.
func loaded(t testing.TB, policies string, opts ...func(*Options)) *Engine {
	t.Helper()
	o := Options{Now: fixedClock}
	for _, f := range opts {
		f(&o)
	}
	e := NewEngine(o)
	if err := e.LoadDir(writeDir(t, map[string]string{"p.cedar": policies})); err != nil {
		t.Fatalf("LoadDir: %v", err)
	}
	return e
}

// loadedUnvalidated returns an enforcing engine with policies installed without schema
// validation: for tests of evaluation errors, which validation would reject at load.
func loadedUnvalidated(t testing.TB, policies string) *Engine {
	t.Helper()
	s, err := Compile(Source{Origin: "mem", Policies: map[string][]byte{"p.cedar": []byte(policies)}, unvalidated: true})
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	e := NewEngine(Options{Now: fixedClock})
	e.Install(s)
	return e
}

func spiffeIdentity(id string) attest.Identity {
	return attest.Identity{
		SPIFFEID:    id,
		TrustDomain: trustDomainOf(id),
		Attested:    true,
		Source:      attest.SourceSPIFFE,
		ExpiresAt:   testNow.Add(time.Hour),
	}
}

func staticIdentity(id string) attest.Identity {
	return attest.Identity{SPIFFEID: id, TrustDomain: trustDomainOf(id), Source: attest.SourceStatic}
}

// get is a GET https://host/path request from id.
func get(id, host, path string) Input {
	return Input{Identity: spiffeIdentity(id), Action: "GET", Scheme: "https", Host: host, Port: 443, Path: path, Time: testNow}
}

func with(in Input, f func(*Input)) Input {
	f(&in)
	return in
}

func decide(e *Engine, in Input) Decision {
	return e.Decide(context.Background(), in)
}

// wantDecision checks the fields of d that tests care about.
func wantDecision(t *testing.T, d Decision, allow bool, reason Reason, ids ...string) {
	t.Helper()
	got := slices.Clone(d.PolicyIDs)
	slices.Sort(got)
	slices.Sort(ids)
	if d.Allow != allow || d.Reason != reason || !slices.Equal(got, ids) {
		t.Fatalf("decision = {Allow:%v Reason:%s PolicyIDs:%v Errors:%v}, want {Allow:%v Reason:%s PolicyIDs:%v}",
			d.Allow, d.Reason, d.PolicyIDs, d.Errors, allow, reason, ids)
	}
}
