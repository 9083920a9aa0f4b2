package attest_test

import (
	"context"
	"strings"
	"testing"

	"github.com/escrowproxy/escrow/attest"
)

func TestStaticIsUnattested(t *testing.T) {
	s, err := attest.NewStatic("spiffe://example.org/ns/dev/sa/agent")
	if err != nil {
		t.Fatalf("NewStatic: %v", err)
	}
	got, err := s.Identify(context.Background(), attest.Peer{})
	if err != nil {
		t.Fatalf("Identify: %v", err)
	}
	want := attest.Identity{
		SPIFFEID:    "spiffe://example.org/ns/dev/sa/agent",
		TrustDomain: "example.org",
		Attested:    false,
		Source:      attest.SourceStatic,
	}
	if got != want {
		t.Fatalf("Identify = %+v, want %+v", got, want)
	}
	if !s.Ready() {
		t.Fatal("static source not Ready")
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func TestStaticRejectsBadIDs(t *testing.T) {
	for _, id := range []string{
		"",
		"agent",
		"https://example.org/ns/dev/sa/agent",
		"spiffe://",
		"spiffe://Example.org/ns/dev", // upper case trust domain
		"spiffe://example.org/ns//sa", // empty path segment
		"spiffe://example.org",        // no path: not a workload ID
		"spiffe://example.org/",
	} {
		s, err := attest.NewStatic(id)
		if err == nil {
			t.Errorf("NewStatic(%q) = %+v, want an error", id, s)
			continue
		}
		if !strings.HasPrefix(err.Error(), "attest: ") {
			t.Errorf("NewStatic(%q) error %q lacks the attest: prefix", id, err)
		}
	}
}
